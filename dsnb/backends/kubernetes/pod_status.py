"""Read what a pod says about its node of the job: started when, finished how.

Every Kubernetes backend runs its pods through the same entry, which leaves a JSON
outcome as the container's termination message (exit code, failing rank, last lines).
Where a container died without one (killed, out of memory), the exit code and reason
come from Kubernetes itself.

Example:
    >>> pod = {"status": {"containerStatuses": [{"name": "dsnb", "restartCount": 1,
    ...     "state": {"running": {"startedAt": "2026-11-28T10:00:09Z"}},
    ...     "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "finishedAt": "2026-11-28T10:00:08Z",
    ...         "message": '{"node": 1, "exit_code": 1, "failed_rank": 3, "rank_exit_code": 7, "last_lines": ["boom"]}'}}}]}}
    >>> outcome = node_outcome(pod, "dsnb")
    >>> outcome.failed_rank, outcome.exit_code, outcome.last_lines
    (3, 7, ('boom',))
"""

from __future__ import annotations

import calendar
import json
from dataclasses import dataclass
from typing import Any


def parse_time(stamp: str | None) -> float | None:
    """Seconds since the epoch of a Kubernetes timestamp (``2026-11-28T10:00:09Z``)."""
    if not stamp:
        return None
    # Fixed positions (YYYY-MM-DDTHH:MM:SS): several times faster than strptime over 512 pods.
    return float(calendar.timegm((int(stamp[0:4]), int(stamp[5:7]), int(stamp[8:10]),
                                  int(stamp[11:13]), int(stamp[14:16]), int(stamp[17:19]), 0, 0, 0)))


def container_status(pod: dict[str, Any], container: str) -> dict[str, Any]:
    """The status of ``container`` in ``pod`` (empty before the kubelet reports it)."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == container:
            return status
    return {}


@dataclass(frozen=True)
class NodeOutcome:
    """How one node's launcher ended.

    Attributes:
        exit_code: the failing rank's exit code when known, else the container's.
        failed_rank: the global rank that failed first (None on success or when unknown).
        reason: Kubernetes' reason (``Completed``, ``Error``, ``OOMKilled``).
        message: the entry's remark (e.g. a timeout or the peers that never resolved).
        last_lines: the failing rank's last lines.
        finished_at: when the container ended.
        started_at: when the node's launcher started (known from the job's record only).
    """

    exit_code: int
    failed_rank: int | None
    reason: str
    message: str
    last_lines: tuple[str, ...]
    finished_at: float | None
    started_at: float | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def node_outcome(pod: dict[str, Any], container: str) -> NodeOutcome | None:
    """The outcome of the pod's first finished run, or None while it has not finished."""
    status = container_status(pod, container)
    terminated = (status.get("lastState") or {}).get("terminated") or (status.get("state") or {}).get("terminated")
    if not terminated:
        return None
    code = int(terminated.get("exitCode", 1))
    reason = terminated.get("reason") or ("Completed" if code == 0 else "Error")
    text = terminated.get("message") or ""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        return reported_outcome(data, code, reason, parse_time(terminated.get("finishedAt")))
    # No outcome written (killed before it could): the message is the log's end, if any.
    lines = tuple(line for line in text.splitlines() if line.strip())[-20:]
    return NodeOutcome(code, None, reason, "", lines, parse_time(terminated.get("finishedAt")))


def reported_outcome(data: dict[str, Any], code: int | None = None, reason: str | None = None,
                     finished_at: float | None = None) -> NodeOutcome:
    """A node's outcome from what its entry wrote (the termination message, or the job's record).

    ``code``, ``reason`` and ``finished_at`` are Kubernetes' when read from a pod; from the record,
    the entry's own.

    Example:
        >>> outcome = reported_outcome({"exit_code": 1, "failed_rank": 2, "rank_exit_code": 3, "last_lines": ["x"],
        ...                             "finished_at": 1700000000.5})
        >>> outcome.exit_code, outcome.failed_rank, outcome.reason, outcome.finished_at
        (3, 2, 'Error', 1700000000.5)
    """
    code = int(data.get("exit_code", 1)) if code is None else code
    rank_code = data.get("rank_exit_code") or 0
    return NodeOutcome(
        exit_code=rank_code if code and rank_code else code,
        failed_rank=data.get("failed_rank") if code else None,
        reason=reason or ("Completed" if code == 0 else "Error"),
        message=data.get("message") or "",
        last_lines=tuple(data.get("last_lines") or ()),
        finished_at=finished_at if finished_at is not None else data.get("finished_at"),
        started_at=data.get("started_at"),
    )


def terminating(pod: dict[str, Any]) -> bool:
    """Whether the pod is being deleted: what its container does now is no outcome of the job."""
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def started_at(pod: dict[str, Any], container: str) -> float | None:
    """When the container first started running, if it has."""
    status = container_status(pod, container)
    for state in (status.get("lastState") or {}, status.get("state") or {}):
        for key in ("terminated", "running"):
            if state.get(key) and state[key].get("startedAt"):
                return parse_time(state[key]["startedAt"])
    return None
