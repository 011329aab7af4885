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
    """

    exit_code: int
    failed_rank: int | None
    reason: str
    message: str
    last_lines: tuple[str, ...]
    finished_at: float | None

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
        rank_code = data.get("rank_exit_code") or 0
        return NodeOutcome(
            exit_code=rank_code if code and rank_code else code,
            failed_rank=data.get("failed_rank") if code else None,
            reason=reason,
            message=data.get("message") or "",
            last_lines=tuple(data.get("last_lines") or ()),
            finished_at=parse_time(terminated.get("finishedAt")),
        )
    # No outcome written (killed before it could): the message is the log's end, if any.
    lines = tuple(line for line in text.splitlines() if line.strip())[-20:]
    return NodeOutcome(code, None, reason, "", lines, parse_time(terminated.get("finishedAt")))


def started_at(pod: dict[str, Any], container: str) -> float | None:
    """When the container first started running, if it has."""
    status = container_status(pod, container)
    for state in (status.get("lastState") or {}, status.get("state") or {}):
        for key in ("terminated", "running"):
            if state.get(key) and state[key].get("startedAt"):
                return parse_time(state[key]["startedAt"])
    return None
