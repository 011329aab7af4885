"""A TrainJob's status, as a table of rules tried in order (see :mod:`.status_rules`).

What each rule reads follows Kubeflow Trainer v2.3.0 and JobSet v0.12.0: the TrainJob's
conditions (``Complete``, ``Failed``, ``Suspended``), its ``trainerStatus`` (progress the
runtime reports), and the JobSet's pods, found by hostname, since a pod's name adds a random
part. On an MPI runtime the ranks start with mpirun on the launcher, so the job runs only
once the launcher's container does.

Example:
    >>> from dsnb import JobSpec
    >>> from dsnb.backends.kubernetes.status_rules import first_status
    >>> reading = TrainReading("t-x7k2", "trainjob", JobSpec(name="t-x7k2", command=["true"]), None, (),
    ...                        workload={"status": {"conditions": [{"type": "Suspended", "status": "True"}]}})
    >>> first_status(reading, RULES).message
    'the TrainJob is suspended'
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from dsnb.backends.kubernetes.labels import role
from dsnb.backends.kubernetes.pod_status import container_status
from dsnb.backends.kubernetes.status_rules import Pod, Reading
from dsnb.backends.kubernetes.trainer_layout import node_pods, rank_hosts
from dsnb.status import JobState, JobStatus, ReplicaStatus

RUNTIME_CONTAINER = "node"

__all__ = ["RULES", "TrainReading"]


def hostname(pod: Pod) -> str:
    """A JobSet pod's hostname, ``<jobset>-<replicatedJob>-<job index>-<pod index>`` (its name adds a random part)."""
    return (pod.get("spec") or {}).get("hostname") or pod["metadata"]["name"]


def progress(trainer_status: dict[str, Any]) -> str:
    """The Trainer's progress report in words, e.g. ``42% done, about 3 min left, loss 2.1``.

    Example:
        >>> progress({"progressPercentage": 42, "metrics": [{"name": "loss", "value": "2.1"}]})
        '42% done, loss 2.1'
    """
    parts = []
    if trainer_status.get("progressPercentage") is not None:
        parts.append(f"{trainer_status['progressPercentage']}% done")
    if trainer_status.get("estimatedRemainingSeconds") is not None:
        parts.append(f"about {max(1, round(trainer_status['estimatedRemainingSeconds'] / 60))} min left")
    parts += [f"{m['name']} {m['value']}" for m in trainer_status.get("metrics") or [] if "name" in m and "value" in m]
    return ", ".join(parts)


def _running(pod: Pod | None) -> bool:
    return pod is not None and bool((container_status(pod, RUNTIME_CONTAINER).get("state") or {}).get("running"))


@dataclass(frozen=True)
class TrainReading(Reading):
    """A Reading of a TrainJob: ``pods`` without the ones being deleted (they have no outcome).

    Attributes:
        launcher_is_node: whether the runtime's launcher runs ranks too (``runLauncherAsNode``).
        first_start: when the first pod's container started, deleted pods included.
    """

    launcher_is_node: bool = False
    first_start: float | None = None

    @property
    def started_at(self) -> float | None:
        return self.first_start

    @cached_property
    def nodes(self) -> dict[int, Pod]:
        """The pods that run ranks, by node."""
        by_host = {hostname(p): p for p in self.pods}
        hosts = rank_hosts(self.name, self.spec.nodes, self.launcher_is_node)
        return {index: by_host[host] for index, host in enumerate(hosts) if host in by_host}

    def node_state(self, node: int) -> JobState:
        """PENDING until scheduled, STARTING until its container runs, then RUNNING."""
        pod = self.nodes.get(node)
        if pod is None:
            return JobState.PENDING
        if _running(pod):
            return JobState.RUNNING
        return JobState.STARTING if (pod.get("spec") or {}).get("nodeName") else JobState.PENDING

    def replicas(self, state_of: object) -> tuple[ReplicaStatus, ...]:
        """One replica per rank: ``state_of`` is a JobState, or a function of the node."""
        procs = self.spec.procs_per_node
        return tuple(ReplicaStatus(rank=r, state=state_of(r // procs) if callable(state_of) else state_of,
                                   host=self.nodes[r // procs]["metadata"]["name"] if r // procs in self.nodes else None)
                     for r in range(self.spec.world_size))

    @cached_property
    def states(self) -> set[JobState]:
        """The nodes' states; all RUNNING only once the launcher (where mpirun starts the ranks) runs too."""
        states = {self.node_state(n) for n in range(self.spec.nodes)}
        launcher = next((p for p in self.pods if role(p) == "launcher"), None)
        if states == {JobState.RUNNING} and not _running(launcher):
            return {JobState.STARTING}
        return states

    def ended(self, state: JobState, message: str) -> JobStatus:
        """An end the TrainJob reports, at its condition's time."""
        return self.status(state, self.replicas(state), message=message,
                           finished_at=self.condition_time("Complete", "Failed"))


def complete(r: TrainReading) -> JobStatus | None:
    if "Complete" not in r.conditions:
        return None
    return r.ended(JobState.SUCCEEDED, r.conditions["Complete"].get("message") or "the TrainJob completed")


def failed(r: TrainReading) -> JobStatus | None:
    condition = r.conditions.get("Failed")
    if condition is None:
        return None
    return r.ended(JobState.FAILED, condition.get("message") or condition.get("reason") or "the TrainJob failed")


def pod_cannot_run(r: TrainReading) -> JobStatus | None:
    found = r.fatal
    return None if found is None else r.status(JobState.FAILED, r.replicas(JobState.FAILED), message=str(found[1]))


def suspended(r: TrainReading) -> JobStatus | None:
    if "Suspended" not in r.conditions:
        return None
    return r.status(JobState.PENDING, r.replicas(JobState.PENDING), message="the TrainJob is suspended")


def running(r: TrainReading) -> JobStatus | None:
    if r.states != {JobState.RUNNING}:
        return None
    said = progress((r.workload.get("status") or {}).get("trainerStatus") or {})
    return r.status(JobState.RUNNING, r.replicas(r.node_state),
                    message=said or f"{r.spec.world_size} process(es) on {r.spec.nodes} node(s)")


def starting(r: TrainReading) -> JobStatus | None:
    if not r.states & {JobState.RUNNING, JobState.STARTING}:
        return None
    expected = node_pods(r.spec.nodes, r.launcher_is_node) + 1
    waiting = r.waiting
    return r.status(JobState.STARTING, r.replicas(r.node_state),
                    message=waiting[0] if waiting else f"{len(r.pods)} of {expected} pod(s) created")


def pending(r: TrainReading) -> JobStatus:
    waiting = r.waiting
    message = waiting[0] if waiting else ("waiting for Kubeflow Trainer to create the JobSet" if not r.pods
                                          else f"{len(r.pods)} pod(s) waiting to be scheduled")
    return r.status(JobState.PENDING, r.replicas(r.node_state), message=message)


#: The rules, in the order they are tried: an end the TrainJob reports, a pod that cannot
#: run, then how far the start has come.
RULES = (complete, failed, pod_cannot_run, suspended, running, starting, pending)
