"""A Ray job's driver log, turned into per-rank lines.

Ray forwards every worker's output to the job's driver log with a prefix naming the actor
and its pid, ``(RayTrainWorker pid=4242, ip=10.0.0.3) text``. dsnb's driver makes every
worker announce its rank and pid first (``DSNB_RAY_WORKER {...}``), so later lines of that
pid belong to that rank. The driver's own lines and those of Ray's actors (the Train
controller) are the launcher's; the driver's closing ``DSNB_RAY_OUTCOME`` line is kept as
the job's outcome, not shown.

Example:
    >>> parser = DriverLogParser()
    >>> parser.feed('(RayTrainWorker pid=42) DSNB_RAY_WORKER {"rank": 1, "pid": 42, "node": 0}') is None
    True
    >>> parser.feed("(RayTrainWorker pid=42) loss 2.5")
    (1, 'loss 2.5')
    >>> parser.feed("(TrainController pid=7) Started training worker group of size 2")
    (-1000000, '(TrainController) Started training worker group of size 2')
"""

from __future__ import annotations

import json
import re
from typing import Any

from dsnb.runtime.ray_train_entry import OUTCOME_TAG, WORKER_TAG
from dsnb.status import LAUNCHER_LINE_RANK

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PREFIX = re.compile(r"^\((?P<actor>[\w.:-]+) pid=(?P<pid>\d+)(?:, ip=(?P<ip>[\w.:-]+))?\) ?")
# Ray Train's controller lists its workers once they started: "- (ip=10.0.0.3, pid=4242) world_rank=1, ..."
_CONTROLLER_RANK = re.compile(r"^- \(ip=[^,]+, pid=(?P<pid>\d+)\) world_rank=(?P<rank>\d+)")


class DriverLogParser:
    """Attributes each line of a Ray job's driver log to a rank (or the launcher).

    Ray reads a worker's stdout and stderr from two files, so lines of the two streams can
    arrive out of order; a worker announces itself on both, and the controller's list of
    workers is read too, so a worker's first lines are rarely left unattributed.

    Attributes:
        ranks: pid -> rank, learnt from the workers' announcements.
        outcome: the driver's outcome record once its last line was read, else None.
    """

    def __init__(self) -> None:
        self.ranks: dict[int, int] = {}
        self.outcome: dict[str, Any] | None = None

    def feed(self, raw: str) -> tuple[int, str] | None:
        """The rank and text of one log line, or None for dsnb's own bookkeeping lines."""
        text = _ANSI.sub("", raw).rstrip("\r")
        match = _PREFIX.match(text)
        if match is None:
            if text.startswith(OUTCOME_TAG):
                self.outcome = _json(text[len(OUTCOME_TAG):])
                return None
            return LAUNCHER_LINE_RANK, text
        body = text[match.end():]
        key = int(match["pid"])
        if body.startswith(WORKER_TAG):
            record = _json(body[len(WORKER_TAG):])
            if isinstance(record, dict) and isinstance(record.get("rank"), int):
                self.ranks[key] = record["rank"]
            return None
        listed = _CONTROLLER_RANK.match(body)
        if listed:
            self.ranks.setdefault(int(listed["pid"]), int(listed["rank"]))
        rank = self.ranks.get(key)
        if rank is None:
            return LAUNCHER_LINE_RANK, f"({match['actor']}) {body}"
        return rank, body


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
