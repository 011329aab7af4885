"""Stuck and slow ranks, from each rank's last output time and last reported step.

A distributed job whose one rank hangs usually shows nothing until the collective timeout
(10 to 30 minutes) kills every rank. Its output says more, and much sooner: the stuck rank stops
writing while the others go on (until they too block in the next collective), and a slow rank
falls steps behind. :class:`RankActivity` keeps, per rank, the times of its output and the steps
it reported; :meth:`RankActivity.stragglers` says which ranks look stuck or slow, each as a
:class:`Straggler` whose text is what the views show.

Thresholds adapt to the job: a rank counts as silent after ``max(floor, PACE_FACTOR × step time)``
seconds, the step time being the median interval between the steps the job reports (between its
output lines when it reports none). Only a rank that has been writing for a while is judged, so a
rank that prints its start-up lines and then leaves the printing to rank 0 is not called stuck.

Example:
    >>> activity = RankActivity(floor_s=10)
    >>> for t in range(0, 30, 2):
    ...     activity.saw_line(0, 1000.0 + t)
    ...     if t < 12:
    ...         activity.saw_line(1, 1000.0 + t)
    >>> [str(s) for s in activity.stragglers(now=1030.0)]
    ['rank 1 has written nothing for 20 s while the others progressed']
"""

from __future__ import annotations

import collections
import statistics
import threading
from dataclasses import dataclass, field

#: Silence longer than this many step times (and than the floor) makes a rank look stuck.
PACE_FACTOR = 5.0
#: The floor of that threshold for the views, in seconds.
DEFAULT_FLOOR_S = 60.0
#: Steps a rank may lag the most advanced one before it is called behind.
BEHIND_STEPS = 2
#: Intervals kept to estimate the step time (and output times kept per rank).
KEPT = 32


@dataclass(frozen=True)
class Straggler:
    """A rank that looks stuck (``kind="silent"``) or slow (``kind="behind"``).

    Attributes:
        rank: the rank.
        kind: ``"silent"``: it has written nothing for ``silent_s`` while others wrote;
            ``"behind"``: its last step is ``steps_behind`` behind the most advanced rank's.
        silent_s: seconds since its last output.
        steps_behind: steps behind the most advanced rank (0 when it reports none).

    Example:
        >>> str(Straggler(rank=5, kind="behind", silent_s=1.0, steps_behind=4))
        'rank 5 is 4 steps behind'
    """

    rank: int
    kind: str
    silent_s: float
    steps_behind: int = 0

    def __str__(self) -> str:
        if self.kind == "silent":
            return f"rank {self.rank} has written nothing for {self.silent_s:.0f} s while the others progressed"
        return f"rank {self.rank} is {self.steps_behind} step{'s' if self.steps_behind != 1 else ''} behind"


@dataclass
class _Rank:
    first: float
    last: float
    step: int | None = None
    step_times: collections.deque[tuple[int, float]] = field(default_factory=lambda: collections.deque(maxlen=KEPT))
    gaps: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=KEPT))


class RankActivity:
    """When each rank last wrote and which step it last reported; thread-safe, bounded per rank.

    Args:
        floor_s: the least silence, in seconds, that makes a rank look stuck.

    Raises:
        ValueError: ``floor_s`` is not positive.
    """

    def __init__(self, floor_s: float = DEFAULT_FLOOR_S) -> None:
        if not floor_s > 0:
            raise ValueError(f"floor_s must be positive, got {floor_s!r}")
        self.floor_s = floor_s
        self._ranks: dict[int, _Rank] = {}
        self._lock = threading.Lock()

    def saw_line(self, rank: int, when: float) -> None:
        """Rank ``rank`` wrote a line at ``when`` (seconds since the epoch); launcher lines (rank < 0) are ignored."""
        if rank < 0:
            return
        with self._lock:
            known = self._ranks.get(rank)
            if known is None:
                self._ranks[rank] = _Rank(first=when, last=when)
                return
            if when > known.last:
                known.gaps.append(when - known.last)
                known.last = when

    def saw_step(self, rank: int, step: int, when: float) -> None:
        """Rank ``rank`` reported ``step`` at ``when`` (a metric sample)."""
        self.saw_line(rank, when)
        if rank < 0:
            return
        with self._lock:
            known = self._ranks[rank]
            if known.step is None or step > known.step:
                known.step = step
                known.step_times.append((step, when))

    def step_time(self) -> float | None:
        """The job's typical seconds per step: the median over its ranks' recent steps (else between output lines)."""
        with self._lock:
            per_step = [(t2 - t1) / (s2 - s1) for r in self._ranks.values()
                        for (s1, t1), (s2, t2) in zip(r.step_times, list(r.step_times)[1:]) if s2 > s1]
            if per_step:
                return statistics.median(per_step)
            gaps = [g for r in self._ranks.values() for g in r.gaps]
        return statistics.median(gaps) if gaps else None

    def step_of(self, rank: int) -> int:
        """The last step ``rank`` reported, 0 before any."""
        with self._lock:
            known = self._ranks.get(rank)
            return known.step if known is not None and known.step is not None else 0

    def steps_seen(self) -> int:
        """How many distinct steps the rank that reported the most has reported (of those kept)."""
        with self._lock:
            return max((len(r.step_times) for r in self._ranks.values()), default=0)

    def threshold_s(self) -> float:
        """Seconds of silence that make a rank look stuck: the floor, or more for a job with slow steps."""
        step = self.step_time()
        return max(self.floor_s, PACE_FACTOR * step) if step is not None else self.floor_s

    def stragglers(self, now: float, threshold_s: float | None = None) -> list[Straggler]:
        """The ranks that look stuck, longest silent first, then those behind, most behind first.

        A rank is silent when it has written nothing for ``threshold_s`` (default: :meth:`threshold_s`)
        while another rank wrote within that time, provided it had been writing for at least half of it.
        """
        limit = self.threshold_s() if threshold_s is None else threshold_s
        with self._lock:
            ranks = dict(self._ranks)
        silent = []
        for rank, known in ranks.items():
            others = [o.last for r, o in ranks.items() if r != rank]
            wrote_lately = bool(others) and now - max(others) < limit
            if now - known.last > limit and wrote_lately and known.last - known.first >= limit / 2:
                silent.append(Straggler(rank, "silent", now - known.last))
        stepping = {rank: known.step for rank, known in ranks.items() if known.step is not None}
        behind = []
        if len(stepping) > 1:
            top = max(stepping.values())
            behind = [Straggler(rank, "behind", now - ranks[rank].last, top - step)
                      for rank, step in stepping.items() if top - step >= BEHIND_STEPS]
        silent.sort(key=lambda s: -s.silent_s)
        behind.sort(key=lambda s: -s.steps_behind)
        return silent + behind

    def hung(self, now: float, timeout_s: float, since: float) -> tuple[int | None, float] | None:
        """``hang_timeout``'s rule: (the rank silent for ``timeout_s`` while the others progressed, how long), or
        (None, how long) when no rank has written for ``timeout_s`` (counted from ``since`` before any output),
        or None while neither holds.

        Example:
            >>> activity = RankActivity()
            >>> activity.hung(now=130.0, timeout_s=20.0, since=100.0)
            (None, 30.0)
        """
        stuck = [s for s in self.stragglers(now, threshold_s=timeout_s) if s.kind == "silent"]
        if stuck:
            return stuck[0].rank, stuck[0].silent_s
        quiet = now - (self.last_output() or since)
        return (None, quiet) if quiet > timeout_s else None

    def quietest(self) -> tuple[int, float] | None:
        """(the rank silent the longest, the time of its last output), or None before any output."""
        with self._lock:
            if not self._ranks:
                return None
            rank, known = min(self._ranks.items(), key=lambda item: item[1].last)
            return rank, known.last

    def last_output(self) -> float | None:
        """When any rank last wrote, or None before any output."""
        with self._lock:
            return max((r.last for r in self._ranks.values()), default=None)
