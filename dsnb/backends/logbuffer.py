"""A job's log lines and metric samples in one bounded, thread-safe buffer, read by cursor.

Backends that gather lines from elsewhere (pod log streams, a Ray job's driver log) keep them
here; :class:`dsnb.job.Job` reads them through the backend's cursor calls.

Example:
    >>> buffer = JobLogs(capacity=3)
    >>> for text in ("a", "b", "c", "d"):
    ...     buffer.add(0, text, 0.0)
    >>> [line.text for line in buffer.read(0, None, 10)[0]]
    ['b', 'c', 'd']
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable

from dsnb.metrics import MetricParser
from dsnb.status import LogLine, MetricSample


class JobLogs:
    """The lines and metric samples of one job, in arrival order, with a cap.

    Cursors are absolute line numbers, so a reader that falls behind the cap skips ahead
    instead of reading the same lines twice.
    """

    def __init__(self, capacity: int = 100_000, metric_capacity: int = 200_000) -> None:
        self._lines: collections.deque[LogLine] = collections.deque(maxlen=capacity)
        self._dropped = 0
        self._samples: collections.deque[MetricSample] = collections.deque(maxlen=metric_capacity)
        self._samples_dropped = 0
        self._parser = MetricParser()
        self._lock = threading.Lock()

    def add(self, rank: int, text: str, when: float, parse_metrics: bool = True) -> None:
        """Keep one line and (unless told not to) the metric samples it carries."""
        with self._lock:
            if len(self._lines) == self._lines.maxlen:
                self._dropped += 1
            self._lines.append(LogLine(rank=rank, text=text, time=when))
            if parse_metrics:
                self._keep_samples(self._parser.feed(rank, text, when))

    def add_samples(self, samples: Iterable[MetricSample]) -> None:
        """Keep metric samples read from elsewhere (an archive)."""
        with self._lock:
            self._keep_samples(samples)

    def _keep_samples(self, samples: Iterable[MetricSample]) -> None:
        for sample in samples:
            if len(self._samples) == self._samples.maxlen:
                self._samples_dropped += 1
            self._samples.append(sample)

    def read(self, cursor: int, rank: int | None, limit: int) -> tuple[list[LogLine], int]:
        """Up to ``limit`` lines after line number ``cursor`` (of ``rank``), and the next cursor."""
        with self._lock:
            start = max(cursor, self._dropped)
            lines = list(self._lines)[start - self._dropped:]
        chosen: list[LogLine] = []
        position = start
        for line in lines:
            if len(chosen) >= limit:
                break
            position += 1
            if rank is None or line.rank == rank:
                chosen.append(line)
        return chosen, position

    def tail(self, count: int, rank: int | None) -> tuple[list[LogLine], int]:
        """The last ``count`` lines (of ``rank``) and the cursor after them."""
        with self._lock:
            lines = list(self._lines)
            end = self._dropped + len(lines)
        chosen = [line for line in lines if rank is None or line.rank == rank]
        return chosen[-count:] if count > 0 else [], end

    def samples(self, cursor: int) -> tuple[list[MetricSample], int]:
        """Metric samples after number ``cursor`` and the next cursor."""
        with self._lock:
            start = max(cursor, self._samples_dropped)
            samples = list(self._samples)[start - self._samples_dropped:]
        return samples, start + len(samples)

    def __len__(self) -> int:
        with self._lock:
            return self._dropped + len(self._lines)
