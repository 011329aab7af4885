"""Job states and the records every backend reports: statuses, log lines, metric samples.

Example:
    >>> from dsnb.status import JobState
    >>> JobState.RUNNING.is_terminal(), JobState.FAILED.is_terminal()
    (False, True)
"""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field
from typing import Any


class JobState(str, enum.Enum):
    """Life cycle of a job: ``PENDING → STARTING → RUNNING → SUCCEEDED | FAILED | CANCELLED``."""

    PENDING = "PENDING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    def is_terminal(self) -> bool:
        """True for SUCCEEDED, FAILED and CANCELLED."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ReplicaStatus:
    """State of one rank (local) or one replica/pod (clusters).

    Example:
        >>> ReplicaStatus(rank=1, state=JobState.FAILED, exit_code=3).exit_code
        3
    """

    rank: int
    state: JobState
    exit_code: int | None = None
    pid: int | None = None
    host: str | None = None
    message: str = ""


# A last line that names its own cause, and what to do about it.
_HINTS = {
    # libstdc++'s words when a process exits while a std::thread (gloo's, here) still runs
    "terminate called without an active exception": (
        "the rank aborted as its process exited with torch.distributed's process group still open; "
        "end the script with torch.distributed.destroy_process_group()"),
}


def _hint_for(last_lines: tuple[str, ...]) -> str:
    return next((hint for line in reversed(last_lines) for known, hint in _HINTS.items() if known in line), "")


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of a job.

    ``failed_rank``, ``exit_code`` and ``last_lines`` are set when the job failed
    because one rank did; :meth:`diagnosis` turns them into one readable message.
    ``stragglers`` says, while the job runs, which ranks look stuck or slow
    (e.g. ``"rank 3 has written nothing for 120 s while the others progressed"``; see
    :mod:`dsnb.stragglers`), where the backend follows every rank's output.

    Example:
        >>> s = JobStatus(name="a-x1", backend="local", state=JobState.FAILED,
        ...               message="rank 1 exited with code 3", failed_rank=1,
        ...               exit_code=3, last_lines=("boom",))
        >>> print(s.diagnosis())
        job 'a-x1' FAILED: rank 1 exited with code 3
        last lines of rank 1:
          boom
    """

    name: str
    backend: str
    state: JobState
    replicas: tuple[ReplicaStatus, ...] = ()
    message: str = ""
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    failed_rank: int | None = None
    exit_code: int | None = None
    last_lines: tuple[str, ...] = ()
    restarts: int = 0
    stragglers: tuple[str, ...] = ()

    @property
    def elapsed(self) -> float | None:
        """Seconds from start to finish (or to now while running); None before start."""
        if self.started_at is None:
            return None
        end = self.finished_at if self.finished_at is not None else time.time()
        return max(0.0, end - self.started_at)

    def diagnosis(self) -> str:
        """One message: state, cause, and the failing rank's last lines."""
        text = f"job {self.name!r} {self.state.value}"
        if self.message:
            text += f": {self.message}"
        if self.last_lines:
            who = f"rank {self.failed_rank}" if self.failed_rank is not None else "the job"
            text += f"\nlast lines of {who}:\n" + "\n".join(f"  {line}" for line in self.last_lines)
            hint = _hint_for(self.last_lines)
            if hint:
                text += f"\nhint: {hint}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (states as strings)."""
        data = asdict(self)
        data["state"] = self.state.value
        data["replicas"] = [{**asdict(r), "state": r.state.value} for r in self.replicas]
        data["last_lines"] = list(self.last_lines)
        data["stragglers"] = list(self.stragglers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobStatus:
        """Inverse of :meth:`to_dict`."""
        data = {k: v for k, v in data.items() if not k.startswith("_")}
        replicas = tuple(
            ReplicaStatus(**{**r, "state": JobState(r["state"])}) for r in data.get("replicas", ())
        )
        return cls(
            **{
                **data,
                "state": JobState(data["state"]),
                "replicas": replicas,
                "last_lines": tuple(data.get("last_lines", ())),
                "stragglers": tuple(data.get("stragglers", ())),
            }
        )


@dataclass(frozen=True)
class LogLine:
    """One line of output from one rank; ``time`` is seconds since the epoch.

    A negative ``rank`` marks a line from a node's launcher rather than from a rank
    (node ``-rank - 1``; see :func:`node_line_rank`), e.g. a pod waiting for its peers.

    Example:
        >>> str(LogLine(rank=1, text="loss 2.1")), str(LogLine(rank=node_line_rank(0), text="waiting"))
        ('[rank 1] loss 2.1', '[node 0] waiting')
    """

    rank: int
    text: str
    time: float = field(default_factory=time.time)

    @property
    def source(self) -> str:
        """``rank N`` for a rank's line, ``node N`` for a launcher's."""
        return rank_label(self.rank)

    def __str__(self) -> str:
        return f"[{self.source}] {self.text}"


#: ``LogLine.rank`` of lines from a job-wide launcher (e.g. ``mpirun``) rather than from a rank.
LAUNCHER_LINE_RANK = -1_000_000


def rank_label(rank: int) -> str:
    """How views name a log source: ``rank 3``, ``node 0`` for a node's launcher, or ``launcher``."""
    if rank == LAUNCHER_LINE_RANK:
        return "launcher"
    return f"rank {rank}" if rank >= 0 else f"node {-rank - 1}"


def node_line_rank(node: int) -> int:
    """The ``LogLine.rank`` of lines from node ``node``'s launcher (not from a rank)."""
    return -node - 1


@dataclass(frozen=True)
class MetricSample:
    """One value of one metric at one step, from one rank.

    ``step_unit`` says what ``step`` counts: ``"step"`` (the training step the script or a
    framework callback reported) or ``"log line"`` (the n-th metrics line a framework printed,
    for frameworks whose printed lines carry no step; see :mod:`dsnb.metrics`).
    """

    step: int
    name: str
    value: float
    rank: int = 0
    time: float = field(default_factory=time.time)
    step_unit: str = "step"
