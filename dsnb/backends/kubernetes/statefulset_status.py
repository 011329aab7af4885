"""A StatefulSet job's status, as a table of rules tried in order (see :mod:`.status_rules`).

A StatefulSet reports no end of its own (it restarts what exits), so the status comes from
each node's outcome: the termination message of its pod, or what the pod wrote into the job's
record before the job's release deleted it. Pod ``<job>-<i>`` runs node ``i``
(``pkg/controller/statefulset/stateful_set_utils.go``, Kubernetes 1.31).

Example:
    >>> from dsnb import JobSpec
    >>> from dsnb.backends.kubernetes.status_rules import first_status
    >>> reading = SetReading("t-x7k2", "statefulset", JobSpec(name="t-x7k2", command=["true"]), None, ())
    >>> first_status(reading, RULES).message
    'waiting for the StatefulSet to create 1 pod(s)'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from dsnb.backends.kubernetes.diagnose import Diagnosis
from dsnb.backends.kubernetes.pod_status import (
    NodeOutcome,
    container_status,
    node_outcome,
    reported_outcome,
    started_at,
)
from dsnb.backends.kubernetes.pod_template import CONTAINER
from dsnb.backends.kubernetes.status_rules import Pod, Reading
from dsnb.status import JobState, JobStatus, ReplicaStatus

__all__ = ["RULES", "SetReading", "record_outcomes"]


def record_outcomes(record: dict[str, Any] | None) -> dict[int, NodeOutcome]:
    """The outcomes the job's pods wrote into its record, by node.

    Example:
        >>> record = {"data": {"outcome-1.json": '{"node": 1, "exit_code": 3, "failed_rank": 2, "finished_at": 5.0}'}}
        >>> record_outcomes(record)[1].failed_rank
        2
    """
    data = (record or {}).get("data") or {}
    result = {}
    for key, text in data.items():
        if key.startswith("outcome-") and key.endswith(".json"):
            try:
                report = json.loads(text)
                result[int(report["node"])] = reported_outcome(report)
            except (ValueError, KeyError, TypeError):
                continue  # not written by dsnb's entry
    return result


def _node_of(pod: Pod) -> int | None:
    try:
        return int(pod["metadata"]["name"].rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class SetReading(Reading):
    """A Reading of a StatefulSet job: ``pods`` without the ones being deleted, ``workload`` its record."""

    @cached_property
    def by_node(self) -> dict[int, Pod]:
        """The pods by node, in the order of ``pods``."""
        return {node: pod for pod in self.pods if (node := _node_of(pod)) is not None}

    @cached_property
    def outcomes(self) -> dict[int, NodeOutcome | None]:
        """Each node's outcome: its pod's, else what it wrote into the record."""
        outcomes = {node: node_outcome(pod, CONTAINER) for node, pod in self.by_node.items()}
        for node, reported in record_outcomes(dict(self.workload)).items():  # pods gone since wrote these
            if outcomes.get(node) is None:
                outcomes[node] = reported
        return outcomes

    def diagnosed(self) -> tuple[Pod, ...]:
        """The pods of nodes that have no outcome yet."""
        return tuple(pod for node, pod in self.by_node.items() if self.outcomes.get(node) is None)

    @property
    def fatal(self) -> tuple[Pod, Diagnosis] | None:
        """The lowest node whose pod cannot run, and why."""
        fatal = sorted(((_node_of(pod), pod, d) for pod, d in self.diagnoses if d.fatal), key=lambda found: found[0])
        return (fatal[0][1], fatal[0][2]) if fatal else None

    @property
    def started_at(self) -> float | None:
        starts = [t for t in (started_at(p, CONTAINER) for p in self.by_node.values()) if t is not None]
        starts += [o.started_at for node, o in self.outcomes.items()
                   if o is not None and o.started_at is not None and node not in self.by_node]
        return min(starts, default=None)

    @cached_property
    def node_states(self) -> dict[int, JobState]:
        """Each node's state: its outcome's, else how far its pod has come."""
        states = {}
        for node in range(self.spec.nodes):
            pod, outcome = self.by_node.get(node), self.outcomes.get(node)
            if outcome is not None:
                states[node] = JobState.SUCCEEDED if outcome.ok else JobState.FAILED
            elif pod is not None and (container_status(pod, CONTAINER).get("state") or {}).get("running"):
                states[node] = JobState.RUNNING
            elif pod is not None and (pod.get("spec") or {}).get("nodeName"):
                states[node] = JobState.STARTING
            else:
                states[node] = JobState.PENDING
        return states

    @cached_property
    def replicas(self) -> tuple[ReplicaStatus, ...]:
        """One replica per rank, with its node's state and exit code; its host is pod ``<job>-<node>``."""
        procs = self.spec.procs_per_node

        def replica(rank: int) -> ReplicaStatus:
            node = rank // procs
            outcome = self.outcomes.get(node)
            # the pod's name: pod <job>-<i> runs node i, also after the job's release deleted it
            return ReplicaStatus(rank=rank, state=self.node_states[node], exit_code=outcome.exit_code if outcome else None,
                                 host=f"{self.name}-{node}" if node in self.by_node or outcome else None)
        return tuple(replica(rank) for rank in range(self.spec.world_size))


def a_node_failed(r: SetReading) -> JobStatus | None:
    """The node that failed first (by time, then node) names the failed rank."""
    failed = sorted(((o.finished_at or 0.0, node, o) for node, o in r.outcomes.items() if o is not None and not o.ok),
                    key=lambda item: (item[0], item[1]))
    if not failed:
        return None
    _, node, outcome = failed[0]
    rank = outcome.failed_rank if outcome.failed_rank is not None else node * r.spec.procs_per_node
    what = "was killed: out of memory (OOMKilled)" if outcome.reason == "OOMKilled" else f"exited with code {outcome.exit_code}"
    message = f"rank {rank} (pod {r.name}-{node}) {what}" + (f"; {outcome.message}" if outcome.message else "")
    return r.status(JobState.FAILED, r.replicas, message=message, failed_rank=rank, exit_code=outcome.exit_code,
                    last_lines=outcome.last_lines, finished_at=outcome.finished_at)


def pod_cannot_run(r: SetReading) -> JobStatus | None:
    found = r.fatal
    if found is None:
        return None
    pod, diagnosis = found
    return r.status(JobState.FAILED, r.replicas, message=str(diagnosis),
                    failed_rank=(_node_of(pod) or 0) * r.spec.procs_per_node)


def all_succeeded(r: SetReading) -> JobStatus | None:
    ended = [o for o in r.outcomes.values() if o is not None]
    if len(ended) != r.spec.nodes or not all(o.ok for o in ended):
        return None
    finished = max((o.finished_at or 0.0) for o in ended) or None
    return r.status(JobState.SUCCEEDED, r.replicas, message=f"all {r.spec.nodes} node(s) finished", finished_at=finished)


def running(r: SetReading) -> JobStatus | None:
    if not set(r.node_states.values()) <= {JobState.RUNNING, JobState.SUCCEEDED}:
        return None
    return r.status(JobState.RUNNING, r.replicas, message=f"{r.spec.world_size} rank(s) on {r.spec.nodes} pod(s)")


def starting(r: SetReading) -> JobStatus | None:
    if not {JobState.RUNNING, JobState.STARTING} & set(r.node_states.values()):
        return None
    ready = sum(s in (JobState.RUNNING, JobState.SUCCEEDED) for s in r.node_states.values())
    waiting = r.waiting
    return r.status(JobState.STARTING, r.replicas, message=waiting[0] if waiting else f"{ready} of {r.spec.nodes} pod(s) running")


def pending(r: SetReading) -> JobStatus:
    waiting = r.waiting
    message = waiting[0] if waiting else (f"waiting for the StatefulSet to create {r.spec.nodes} pod(s)" if not r.by_node
                                          else f"{len(r.by_node)} pod(s) waiting to be scheduled")
    return r.status(JobState.PENDING, r.replicas, message=message)


#: The rules, in the order they are tried: a node that failed, a pod that cannot run, every
#: node done, then how far the start has come.
RULES = (a_node_failed, pod_cannot_run, all_succeeded, running, starting, pending)
