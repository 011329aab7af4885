"""UI-free live state of one job: status, log ring buffers, metric series, progress, events.

A :class:`JobMonitor` pulls what is new through the backend's non-blocking cursor reads
and keeps it in bounded memory, however chatty the job. Views (the ``dsnb`` console,
notebook panels) read from it or subscribe to it; they never talk to the backend.

Example:
    >>> from dsnb import Cluster, JobSpec
    >>> job = Cluster().submit(JobSpec(name="hello", command=["python", "-c", "print('hi')"]))
    >>> monitor = JobMonitor(job)
    >>> monitor.start().join(timeout=60)    # follows until the job ends  # doctest: +SKIP
    >>> monitor.status.state.value, [line.text for line in monitor.lines()]  # doctest: +SKIP
    ('SUCCEEDED', ['hi'])
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dsnb.formatting import format_duration
from dsnb.runtime.usage import USAGE_METRICS  # sampled of each rank's processes, at its last step: not its pace
from dsnb.status import JobState, JobStatus, LogLine, MetricSample
from dsnb.stragglers import RankActivity

if TYPE_CHECKING:
    from dsnb.job import Job

log = logging.getLogger(__name__)

#: The metric that means "show progress": ``dsnb.report(step, total_steps=N, ...)``.
PROGRESS_METRIC = "total_steps"
#: Metrics parsed from DeepSpeed's own lines; their step is the optimizer step, so it does
#: not advance the progress of a script that reports its own steps.
DEEPSPEED_METRICS = frozenset({"lr", "skipped", "samples_per_sec", "avg_samples_per_sec"})
#: Chunks read per cursor in one poll, so one poll stays short behind a very chatty job.
MAX_CHUNKS_PER_POLL = 16
MIN_NOTIFY_INTERVAL_S = 0.1


def paces(name: str) -> bool:
    """Whether a sample of metric ``name`` marks a rank's own step: DeepSpeed's lines (optimizer steps, rank 0 only),
    usage samples and timings do not.

    Example:
        >>> paces("loss"), paces("lr"), paces("cpu_percent"), paces("time_ms/forward")
        (True, False, False, False)
    """
    return name not in DEEPSPEED_METRICS and name not in USAGE_METRICS and not name.startswith("time_ms/")
MAX_EVENTS = 200


@dataclass(frozen=True)
class Progress:
    """How far a script that reports ``total_steps`` is, and the time left at its step rate.

    Attributes:
        step: the last step reported.
        total: the steps it will take (``dsnb.report(total_steps=N)``; the Trainer's ``max_steps``).
        seconds_left: ``(total - step) × seconds per step`` (the median over recent steps), None
            until two steps were seen.

    Example:
        >>> Progress(step=25, total=100).fraction
        0.25
        >>> str(Progress(step=25, total=100, seconds_left=150.0))
        'step 25/100  25%  about 2m 30s left'
    """

    step: int
    total: int
    seconds_left: float | None = None

    def __str__(self) -> str:
        text = f"step {self.step}/{self.total}  {self.fraction:.0%}"
        return text if self.seconds_left is None else f"{text}  about {format_duration(self.seconds_left)} left"

    @property
    def fraction(self) -> float:
        """``step / total``, clipped to [0, 1]."""
        if self.total <= 0:
            return 0.0
        return min(1.0, max(0.0, self.step / self.total))


@dataclass(frozen=True)
class MonitorEvent:
    """A change of the job's state (or a restart), seen at ``time`` on the monitor's clock."""

    time: float
    state: JobState
    message: str
    restarts: int = 0


@dataclass(frozen=True)
class MonitorUpdate:
    """What changed since a subscriber was last called.

    Attributes:
        status: the latest status.
        lines: new log lines (the newest ones, if more arrived than one batch holds).
        samples: new metric samples (likewise bounded).
        events: new state changes.
        dropped_lines: lines that arrived but did not fit in this batch.
        final: True for the last update: the job ended and its output was read to the end.
        error: set on the last update of a follower thread that stopped on an error.
    """

    status: JobStatus | None
    lines: list[LogLine] = field(default_factory=list)
    samples: list[MetricSample] = field(default_factory=list)
    events: list[MonitorEvent] = field(default_factory=list)
    dropped_lines: int = 0
    final: bool = False
    error: BaseException | None = None


Subscriber = Callable[[MonitorUpdate], Any]


@dataclass(frozen=True)
class MonitorSnapshot:
    """A copy of what the views show, taken at one moment: reading it needs no lock.

    Attributes:
        status: the latest status (None before the first poll).
        progress: how far a script that reports ``total_steps`` is.
        latest: the newest sample of each plotted metric.
        metric_names: the plotted metrics, in the order they first appeared.
        ranks: ranks known from the status or from their output, in order.
        stragglers: ranks that look stuck or slow, in words (see :mod:`dsnb.stragglers`); empty once
            the job ended.
        lines: the buffered lines of all ranks, in arrival order.
        lines_by_rank: the buffered lines of each rank.
        error: the error that stopped the follower thread, if one did.
        done: the job ended and everything it wrote was read.

    Example:
        >>> snapshot = monitor.snapshot()                          # doctest: +SKIP
        >>> snapshot.status.state.value, snapshot.ranks            # doctest: +SKIP
        ('RUNNING', (0, 1))
        >>> [line.text for line in snapshot.lines_of(1)][-1:]     # doctest: +SKIP
        ['step 10']
    """

    status: JobStatus | None
    progress: Progress | None
    latest: Mapping[str, MetricSample]
    metric_names: tuple[str, ...]
    ranks: tuple[int, ...]
    stragglers: tuple[str, ...]
    lines: tuple[LogLine, ...]
    lines_by_rank: Mapping[int, tuple[LogLine, ...]]
    error: BaseException | None
    done: bool

    def lines_of(self, rank: int | None) -> tuple[LogLine, ...]:
        """The lines of one rank (empty if it wrote none), or of all ranks for None."""
        return self.lines if rank is None else self.lines_by_rank.get(rank, ())


class JobMonitor:
    """Live state of one job, fed by :meth:`poll` (directly or from a follower thread).

    Everything is bounded: each rank keeps its last ``log_lines_per_rank`` lines, the merged
    view of all ranks keeps ``log_lines_per_rank × ranks`` lines, and each metric keeps its
    last ``max_points_per_metric`` points.

    Args:
        job: the job to watch.
        log_lines_per_rank: lines kept per rank.
        max_points_per_metric: points kept per metric series.
        clock: returns the current time in seconds (``time.time``); injectable for tests.

    Raises:
        ValueError: a limit below 1.

    Example:
        >>> monitor = JobMonitor(job, log_lines_per_rank=100)  # doctest: +SKIP
        >>> while not monitor.done:                            # doctest: +SKIP
        ...     monitor.poll(); time.sleep(0.2)
        >>> monitor.latest["loss"].value                       # doctest: +SKIP
        2.31
    """

    def __init__(
        self,
        job: Job,
        log_lines_per_rank: int = 500,
        max_points_per_metric: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if log_lines_per_rank < 1 or max_points_per_metric < 1:
            raise ValueError("log_lines_per_rank and max_points_per_metric must be at least 1")
        self.job = job
        self.log_lines_per_rank = log_lines_per_rank
        self.max_points_per_metric = max_points_per_metric
        self.clock = clock
        # Held while the state changes; readers use snapshot() and the copying accessors.
        self._lock = threading.RLock()
        self._poll_lock = threading.Lock()
        self.status: JobStatus | None = None
        self.latest: dict[str, MetricSample] = {}
        self.progress: Progress | None = None
        self.lines_seen = 0
        self.samples_seen = 0
        #: The error that stopped the follower thread, if one did.
        self.error: BaseException | None = None
        self._logs: dict[int, collections.deque[LogLine]] = {}
        self._all: collections.deque[LogLine] = collections.deque(maxlen=log_lines_per_rank)
        self._series: dict[str, collections.deque[MetricSample]] = {}
        self._events: collections.deque[MonitorEvent] = collections.deque(maxlen=MAX_EVENTS)
        self._log_cursor: Any = None
        self._metric_cursor: Any = None
        self._drained = False  # output read to the end after a terminal status was seen
        self._behind = False  # the last poll stopped before the end of the output
        self._subscribers: list[Subscriber] = []
        self._pending_lines: collections.deque[LogLine] = collections.deque(maxlen=log_lines_per_rank)
        self._pending_samples: collections.deque[MetricSample] = collections.deque(maxlen=max_points_per_metric)
        self._pending_events: list[MonitorEvent] = []
        self._pending_dropped = 0
        self._pending = False
        self._final_sent = False
        self._last_notify: float | None = None
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None
        #: When each rank last wrote and the steps it reported, for the stuck and slow ranks.
        self.activity = RankActivity()

    # -- reading ---------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """True once the job ended and every line and sample it wrote has been read."""
        return self._drained

    def poll(self) -> bool:
        """Read what is new (status, log lines, metric samples) and notify subscribers.

        Never waits for the job; it costs a few cursor reads. The status is read before the
        output, so once a terminal status is seen the output read after it is complete.

        Returns:
            True if anything changed.

        Raises:
            JobNotFound: the job no longer exists.

        Example:
            >>> monitor.poll()  # doctest: +SKIP
            True
        """
        with self._poll_lock:  # two pollers would read past each other's cursors
            status = self.job.status()
            lines, lines_complete = self._read_logs()
            samples, samples_complete = self._read_metrics()
            self._behind = not (lines_complete and samples_complete)
            with self._lock:
                changed = self._apply_status(status)
                if lines or samples:
                    changed = True
                for line in lines:
                    self._add_line(line)
                for sample in samples:
                    self._add_sample(sample)
                if status.state.is_terminal() and not self._behind and not self._drained:
                    self._drained = True
                    changed = True
        self._notify()
        return changed

    def _read_logs(self) -> tuple[list[LogLine], bool]:
        """New lines, and whether the reads reached the end of what was written."""
        lines: list[LogLine] = []
        for _ in range(MAX_CHUNKS_PER_POLL):
            chunk = self.job.backend.read_logs(self.job.name, self._log_cursor)
            self._log_cursor = chunk.cursor
            if not chunk.lines:
                return lines, True
            lines.extend(chunk.lines)
        return lines, False

    def _read_metrics(self) -> tuple[list[MetricSample], bool]:
        samples: list[MetricSample] = []
        for _ in range(MAX_CHUNKS_PER_POLL):
            chunk = self.job.backend.read_metrics(self.job.name, self._metric_cursor)
            self._metric_cursor = chunk.cursor
            if not chunk.samples:
                return samples, True
            samples.extend(chunk.samples)
        return samples, False

    def _apply_status(self, status: JobStatus) -> bool:
        old = self.status
        self.status = status
        if old is not None and old.state == status.state and old.restarts == status.restarts:
            return old != status
        event = MonitorEvent(time=self.clock(), state=status.state, message=status.message, restarts=status.restarts)
        self._events.append(event)
        self._pending_events.append(event)
        self._pending = True
        return True

    def _add_line(self, line: LogLine) -> None:
        ring = self._logs.get(line.rank)
        if ring is None:
            ring = self._logs[line.rank] = collections.deque(maxlen=self.log_lines_per_rank)
            self._all = collections.deque(self._all, maxlen=self.log_lines_per_rank * len(self._logs))
        ring.append(line)
        self._all.append(line)
        self.activity.saw_line(line.rank, line.time)
        self.lines_seen += 1
        if len(self._pending_lines) == self._pending_lines.maxlen:
            self._pending_dropped += 1
        self._pending_lines.append(line)
        self._pending = True

    def _add_sample(self, sample: MetricSample) -> None:
        self.samples_seen += 1
        self._pending_samples.append(sample)
        self._pending = True
        if sample.name == PROGRESS_METRIC:
            step = max(sample.step, self.progress.step if self.progress else 0)
            self.progress = self._progress(step, int(sample.value))
            return
        if sample.step_unit == "step" and paces(sample.name):
            self.activity.saw_step(sample.rank, sample.step, sample.time)
        series = self._series.get(sample.name)
        if series is None:
            series = self._series[sample.name] = collections.deque(maxlen=self.max_points_per_metric)
        series.append(sample)
        previous = self.latest.get(sample.name)
        if previous is None or (sample.step, sample.time) >= (previous.step, previous.time):
            self.latest[sample.name] = sample
        if self.progress is not None and paces(sample.name):
            if sample.step > self.progress.step:
                self.progress = self._progress(sample.step, self.progress.total)

    def _progress(self, step: int, total: int) -> Progress:
        per_step = self.activity.step_time()
        known = per_step is not None and self.activity.steps_seen() > 1 and step < total
        left = (total - step) * per_step if known else None
        return Progress(step=step, total=total, seconds_left=left)

    def _stragglers(self) -> tuple[str, ...]:
        """The backend's own flags where it follows every rank's output (local), else the monitor's."""
        status = self.status
        if status is None or status.state.is_terminal():
            return ()
        if getattr(self.job.backend, "reports_stragglers", False):
            return status.stragglers
        return tuple(str(s) for s in self.activity.stragglers(self.clock()))

    # -- accessors (copies, safe while the follower thread runs) ------------------------------
    def snapshot(self) -> MonitorSnapshot:
        """A frozen copy of the status, progress, latest metrics, ranks and buffered lines.

        Views render from it, so they never hold the monitor's lock while they draw.

        Raises:
            Nothing: it only copies what the monitor holds.

        Example:
            >>> monitor.snapshot().status is monitor.status  # doctest: +SKIP
            True
        """
        with self._lock:
            return MonitorSnapshot(
                status=self.status,
                progress=self.progress,
                latest=MappingProxyType(dict(self.latest)),
                metric_names=tuple(self._series),
                ranks=tuple(self._known_ranks()),
                stragglers=self._stragglers(),
                lines=tuple(self._all),
                lines_by_rank=MappingProxyType({rank: tuple(ring) for rank, ring in self._logs.items()}),
                error=self.error,
                done=self._drained,
            )

    def _known_ranks(self) -> list[int]:
        known = set(self._logs)
        if self.status is not None:
            known.update(r.rank for r in self.status.replicas)
        return sorted(known)

    def ranks(self) -> list[int]:
        """Ranks known from the status or from their output, in order."""
        with self._lock:
            return self._known_ranks()

    def lines(self, rank: int | None = None, last: int | None = None) -> list[LogLine]:
        """The buffered lines of one rank, or of all ranks in arrival order.

        Args:
            rank: one rank; None for all.
            last: only the newest ``last`` lines.

        Example:
            >>> [line.text for line in monitor.lines(rank=1, last=2)]  # doctest: +SKIP
            ['step 9', 'step 10']
        """
        with self._lock:
            ring = self._all if rank is None else self._logs.get(rank, ())
            items = list(ring)
        if last is not None:
            items = items[-last:] if last > 0 else []
        return items

    def series(self, name: str) -> list[MetricSample]:
        """The buffered points of one metric (empty if never reported).

        Example:
            >>> [(p.step, p.value) for p in monitor.series("loss")][:2]  # doctest: +SKIP
            [(1, 9.01), (2, 8.87)]
        """
        with self._lock:
            return list(self._series.get(name, ()))

    def metric_names(self) -> list[str]:
        """Names of the plotted metrics, in the order they first appeared."""
        with self._lock:
            return list(self._series)

    def latest_metrics(self) -> dict[str, MetricSample]:
        """The newest sample of each plotted metric (``total_steps`` is progress, not here)."""
        with self._lock:
            return dict(self.latest)

    def events(self) -> list[MonitorEvent]:
        """State changes seen so far (the last 200)."""
        with self._lock:
            return list(self._events)

    # -- subscribers -----------------------------------------------------------------------
    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(update)`` with batched changes, at most about 10 times a second.

        The last update (``update.final``) is always delivered. Callbacks run on the thread
        that polls; an exception in one is logged and does not stop the others.

        Returns:
            A function that unsubscribes.

        Example:
            >>> unsubscribe = monitor.subscribe(lambda u: print(len(u.lines)))  # doctest: +SKIP
        """
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def _notify(self, error: BaseException | None = None) -> None:
        with self._lock:
            final = self._drained and not self._final_sent
            if not self._subscribers or not (self._pending or final or error):
                return
            now = self.clock()
            urgent = final or error is not None
            if not urgent and self._last_notify is not None and now - self._last_notify < MIN_NOTIFY_INTERVAL_S:
                return
            update = MonitorUpdate(
                status=self.status,
                lines=list(self._pending_lines),
                samples=list(self._pending_samples),
                events=list(self._pending_events),
                dropped_lines=self._pending_dropped,
                final=final,
                error=error,
            )
            self._pending_lines.clear()
            self._pending_samples.clear()
            self._pending_events.clear()
            self._pending_dropped = 0
            self._pending = False
            self._last_notify = now
            self._final_sent = self._final_sent or final
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(update)
            except Exception:
                log.exception("dsnb monitor subscriber %r failed", callback)

    # -- follower thread -------------------------------------------------------------------
    def start(self, interval: float = 0.2) -> threading.Thread:
        """Follow the job on a daemon thread until it ends (and is read to the end) or :meth:`stop`.

        Calling it again while the thread runs returns the same thread.

        Args:
            interval: seconds between polls.

        Example:
            >>> monitor.start().join()  # doctest: +SKIP
        """
        with self._lock:
            if self.thread is not None and self.thread.is_alive():
                return self.thread
            self._stop.clear()
            self.thread = threading.Thread(target=self._follow, args=(interval,), name=f"dsnb-monitor-{self.job.name}", daemon=True)
            self.thread.start()
            return self.thread

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the follower thread and wait up to ``timeout`` seconds for it; the job keeps running.

        Example:
            >>> monitor.stop(); monitor.thread.is_alive()  # doctest: +SKIP
            False
        """
        self._stop.set()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _follow(self, interval: float) -> None:
        try:
            while not self._stop.is_set() and not self._drained:
                self.poll()
                if self._drained:
                    break
                if self._behind:
                    continue  # a chatty job: read on at once rather than fall further behind
                # Updates held back by the rate limit go out on the next poll.
                self._stop.wait(min(interval, MIN_NOTIFY_INTERVAL_S) if self._pending else interval)
        except Exception as e:  # a daemon thread cannot raise to anyone: keep it for the views
            self.error = e
            log.warning("dsnb monitor of %s stopped: %s: %s", self.job.name, type(e).__name__, e)
            self._notify(error=e)

    def __repr__(self) -> str:
        state = self.status.state.value if self.status is not None else "unknown"
        return f"JobMonitor(job={self.job.name!r}, state={state}, lines_seen={self.lines_seen})"
