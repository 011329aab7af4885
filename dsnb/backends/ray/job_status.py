"""A Ray job's status, as a table of rules tried in order (see :mod:`dsnb.backends.kubernetes.status_rules`).

What the rules read is Ray's ``JobDetails`` (its status, message, driver exit code and times)
and what the driver log said so far: which ranks announced themselves, and the driver's
closing outcome record (which rank failed, with what). Ray's RUNNING means the driver runs;
the job is STARTING until every rank has announced itself.

:class:`dsnb.backends.kubernetes.status_rules.Reading` is not used here: it reads pods,
their events and a Kubernetes workload, none of which a Ray job has. The rules are tried
with the same ``first_status``.

Example:
    >>> from types import SimpleNamespace
    >>> from dsnb.backends.kubernetes.status_rules import first_status
    >>> info = SimpleNamespace(status="RUNNING", message="", driver_exit_code=None, start_time=1000, end_time=None,
    ...                        metadata={"dsnb.io/spec": '{"procs_per_node": 2}'})
    >>> first_status(RayJobReading("t-x7k2", "ray", info, announced=frozenset({0})), JOB_RULES).state.value
    'STARTING'
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from dsnb.backends.logbuffer import JobLogs
from dsnb.status import JobState, JobStatus, ReplicaStatus

__all__ = ["JOB_RULES", "SPEC_KEY", "RayJobReading", "state_of"]

SPEC_KEY = "dsnb.io/spec"
#: Lines of the failed rank a failed job's status carries.
LAST_LINES = 15
_STATES = {"PENDING": JobState.PENDING, "RUNNING": JobState.RUNNING, "SUCCEEDED": JobState.SUCCEEDED,
           "FAILED": JobState.FAILED, "STOPPED": JobState.CANCELLED}


def state_of(info: Any) -> JobState:
    """dsnb's state for a Ray ``JobDetails``/``JobInfo`` (Ray's STOPPED is CANCELLED).

    Example:
        >>> from types import SimpleNamespace
        >>> state_of(SimpleNamespace(status="STOPPED")).value
        'CANCELLED'

    Raises:
        Nothing: a status Ray adds later reads as PENDING.
    """
    return _STATES.get(str(getattr(info.status, "value", info.status)), JobState.PENDING)


@dataclass(frozen=True)
class RayJobReading:
    """One Ray job's inputs to its status: pure data, no requests.

    Attributes:
        name: the job.
        backend: the backend's name, for the status.
        info: Ray's ``JobDetails`` of the job.
        announced: the ranks that announced themselves in the driver log so far.
        outcome: the driver's outcome record, once its last line was read.
        logs: the job's log lines, for a failure's last lines (None when this client read none).
    """

    name: str
    backend: str
    info: Any
    announced: frozenset[int] = frozenset()
    outcome: Any = None
    logs: JobLogs | None = None

    @cached_property
    def state(self) -> JobState:
        """Ray's state of the job, in dsnb's words."""
        return state_of(self.info)

    @cached_property
    def world(self) -> int:
        """The number of ranks, from the spec in the job's metadata (1 if it cannot be read)."""
        try:
            spec = json.loads((self.info.metadata or {})[SPEC_KEY])
            return int(spec.get("nodes", 1)) * int(spec.get("procs_per_node", 1))
        except (KeyError, TypeError, ValueError):
            return 1

    @property
    def said(self) -> str:
        """The first line of Ray's message on the job."""
        message = self.info.message
        return message.strip().splitlines()[0][:300] if message and message.strip() else ""

    def replicas(self, state: JobState) -> tuple[ReplicaStatus, ...]:
        """One replica per rank: in ``state`` once announced (or once the job ended), else STARTING."""
        return tuple(ReplicaStatus(rank=r, state=state if (r in self.announced or state.is_terminal()) else JobState.STARTING)
                     for r in range(self.world))

    def made(self, state: JobState, message: str, replicas: tuple[ReplicaStatus, ...] | None = None, **fields: Any) -> JobStatus:
        """A status of this job, with its replicas and Ray's times.

        Raises:
            TypeError: a field JobStatus does not have.
        """
        started = self.info.start_time / 1000 if self.info.start_time else None
        return JobStatus(name=self.name, backend=self.backend, state=state,
                         replicas=self.replicas(state) if replicas is None else replicas, message=message,
                         created_at=started, started_at=started,
                         finished_at=self.info.end_time / 1000 if self.info.end_time else None, **fields)


def job_failed(r: RayJobReading) -> JobStatus | None:
    """The driver's outcome names the rank that failed, its exit code and its error; Ray's words otherwise."""
    if r.state != JobState.FAILED:
        return None
    exit_code = r.info.driver_exit_code if r.info.driver_exit_code is not None else 1
    failed_rank, message = None, r.said
    if r.outcome:
        failed_rank = r.outcome.get("failed_rank")
        exit_code = r.outcome.get("rank_exit_code", exit_code)
        message = r.outcome.get("error") or message
    last_lines: tuple[str, ...] = ()
    if r.logs is not None:
        last_lines = tuple(line.text for line in r.logs.tail(LAST_LINES, failed_rank)[0])
    replicas = r.replicas(JobState.FAILED)
    if failed_rank is not None:
        replicas = tuple(dataclasses.replace(p, exit_code=exit_code) if p.rank == failed_rank else p for p in replicas)
    return r.made(JobState.FAILED, message, replicas, failed_rank=failed_rank, exit_code=exit_code, last_lines=last_lines)


def job_cancelled(r: RayJobReading) -> JobStatus | None:
    return r.made(JobState.CANCELLED, "cancelled") if r.state == JobState.CANCELLED else None


def ranks_starting(r: RayJobReading) -> JobStatus | None:
    """Ray runs the driver, but not every rank has announced itself yet."""
    if r.state != JobState.RUNNING or len(r.announced) >= r.world:
        return None
    return r.made(JobState.STARTING, r.said)


def as_ray_says(r: RayJobReading) -> JobStatus:
    return r.made(r.state, r.said)


#: A Ray job's rules, in the order they are tried: how it ended, then whether every rank runs.
JOB_RULES = (job_failed, job_cancelled, ranks_starting, as_ray_says)
