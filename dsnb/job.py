"""The :class:`Job` handle: status, waiting, logs, metrics and cancel for one submitted job.

A Job holds only a backend and a name, so ``cluster.attach(name)`` in a new kernel gives
an equal handle. Following logs is built here on the backend's non-blocking cursor reads,
so every backend follows, tails and feeds the views the same way.

Example:
    >>> from dsnb import Cluster, JobSpec
    >>> job = Cluster().submit(JobSpec(name="hello", command=["python", "-c", "print('hi')"]))
    >>> job.wait(timeout=60).state.value
    'SUCCEEDED'
    >>> [line.text for line in job.logs()]
    ['hi']
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dsnb.errors import JobFailed, WaitTimeout
from dsnb.status import JobState, JobStatus, LogLine, MetricSample

if TYPE_CHECKING:
    from dsnb.backends.base import Backend
    from dsnb.spec import JobSpec
    from dsnb.widgets.panel import JobPanel

FOLLOW_POLL_S = 0.2
#: Lines of a job's log tail searched for a function's result (its value takes at most 33 lines).
RESULT_TAIL_LINES = 2000
# Two threads displaying one handle at once still make one panel (and one follower thread).
_PANEL_LOCK = threading.Lock()


class Job:
    """A handle on one job of one backend.

    Args:
        backend: the backend that runs it.
        name: the job's unique name.
    """

    def __init__(self, backend: Backend, name: str) -> None:
        self.backend = backend
        self.name = name
        self._spec: JobSpec | None = None
        self._panel: JobPanel | None = None

    @property
    def spec(self) -> JobSpec:
        """The spec it was submitted with.

        Raises:
            JobNotFound: the job no longer exists.
        """
        if self._spec is None:
            self._spec = self.backend.spec_of(self.name)
        return self._spec

    def status(self) -> JobStatus:
        """The current status.

        Raises:
            JobNotFound: the job no longer exists.

        Example:
            >>> job.status().state.is_terminal()  # doctest: +SKIP
            False
        """
        return self.backend.status(self.name)

    def wait(self, timeout: float | None = None, poll: float = 0.25) -> JobStatus:
        """Block until the job ends; return its final status.

        Args:
            timeout: seconds to wait at most; None waits as long as it runs.
            poll: seconds between status checks.

        Raises:
            JobFailed: the job FAILED; the error carries the failing rank, exit code and last lines.
            WaitTimeout: ``timeout`` passed first; the job keeps running.

        Example:
            >>> job.wait(timeout=600)  # doctest: +SKIP
            JobStatus(name='tiny-gpt-x7k2', ..., state=<JobState.SUCCEEDED: 'SUCCEEDED'>, ...)
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = min(0.1, poll)
        while True:
            status = self.status()
            if status.state == JobState.FAILED:
                raise JobFailed(status)
            if status.state.is_terminal():
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(self.name, timeout or 0.0, status.state.value)
            pause = interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic()))
            time.sleep(pause)
            interval = min(poll, interval * 2)

    def result(self, timeout: float | None = None) -> Any:
        """Rank 0's return value of a function job (``JobSpec(function=...)``), once it has ended.

        The value travels as result lines in rank 0's log (see :mod:`dsnb.function_job`), so
        it is read back on any backend, by this kernel or another that attached to the job.

        Args:
            timeout: seconds to wait for the job to end at most; None waits as long as it runs.

        Raises:
            JobFailed: the job FAILED (the error carries the failing rank, exit code and last lines).
            WaitTimeout: ``timeout`` passed first; the job keeps running.
            ResultUnavailable: not a function job, a return value too large or not picklable,
                or its lines are no longer in the job's logs.

        Example:
            >>> from dsnb import Cluster, JobSpec
            >>> def square(x):
            ...     return x * x
            >>> Cluster().submit(JobSpec(name="square", function=square, kwargs={"x": 7})).result(timeout=60)
            49
        """
        from dsnb import function_job

        spec = self.spec
        if spec.function is None:
            raise function_job.ResultUnavailable(self.name, "it runs a script or a command, not a function; "
                                                            "read its logs or metrics instead")
        self.wait(timeout=timeout)
        missing: function_job.ResultUnavailable | None = None
        for rank in (0, None):  # rank 0's lines, or every line where a backend could not tell the rank
            lines = self.backend.read_log_tail(self.name, RESULT_TAIL_LINES, rank).lines
            try:
                return function_job.read_result((line.text for line in lines), spec.function, self.name)  # type: ignore[arg-type]
            except function_job.ResultUnavailable as error:
                if not error.missing:
                    raise
                missing = error
        raise missing  # type: ignore[misc]

    def logs(self, rank: int | None = None, follow: bool = False, tail: int | None = None) -> Iterator[LogLine]:
        """Iterate over log lines, of one rank or of all (merged by time).

        Args:
            rank: only this rank; None for all.
            follow: keep yielding new lines until the job ends.
            tail: start with only the last ``tail`` lines written so far.

        Raises:
            JobNotFound: the job does not exist.

        Example:
            >>> for line in job.logs(rank=0, follow=True):  # doctest: +SKIP
            ...     print(line.text)
        """
        if tail is not None:
            chunk = self.backend.read_log_tail(self.name, tail, rank)
            yield from chunk.lines
            cursor = chunk.cursor
        else:
            chunk = self.backend.read_logs(self.name, None, rank)
            cursor = chunk.cursor
            while chunk.lines:
                yield from chunk.lines
                chunk = self.backend.read_logs(self.name, cursor, rank)
                cursor = chunk.cursor
        if not follow:
            return
        while True:
            ended = self.status().state.is_terminal()
            chunk = self.backend.read_logs(self.name, cursor, rank)
            cursor = chunk.cursor
            yield from chunk.lines
            if not chunk.lines:
                if ended:
                    return  # read once more after the end was seen: nothing is lost
                time.sleep(FOLLOW_POLL_S)

    def metrics(self, name: str | None = None, rank: int | None = None) -> list[MetricSample]:
        """All metric samples so far (from ``dsnb.report`` and DeepSpeed's progress lines).

        Args:
            name: only this metric, e.g. ``"loss"``.
            rank: only this rank.

        Raises:
            JobNotFound: the job does not exist.

        Example:
            >>> [(s.step, s.value) for s in job.metrics("loss", rank=0)][:2]  # doctest: +SKIP
            [(1, 9.01), (2, 8.87)]
        """
        samples: list[MetricSample] = []
        cursor = None
        while True:
            chunk = self.backend.read_metrics(self.name, cursor)
            samples.extend(s for s in chunk.samples if (name is None or s.name == name) and (rank is None or s.rank == rank))
            if not chunk.samples:
                return samples
            cursor = chunk.cursor

    def cancel(self) -> JobStatus:
        """Stop the job and everything it started; safe to call again.

        Raises:
            JobNotFound: the job does not exist.
        """
        return self.backend.cancel(self.name)

    def panel(self, **options: Any) -> JobPanel:
        """The job's live notebook panel, made once and shown each time the job is displayed.

        A closed panel is replaced by a new one on the next call.

        Args:
            **options: passed to :class:`~dsnb.widgets.panel.JobPanel` when a new panel is made.

        Raises:
            BackendUnavailable: ipywidgets is not installed (``pip install 'dsnb[notebook]'``).
            ValueError: an option out of range (see :class:`~dsnb.widgets.panel.JobPanel`).

        Example:
            >>> job.panel() is job.panel()   # doctest: +SKIP
            True
            >>> job.panel().close()          # stops following; the job keeps running  # doctest: +SKIP
        """
        from dsnb.widgets.panel import JobPanel

        with _PANEL_LOCK:
            if self._panel is None or self._panel.closed:
                self._panel = JobPanel(self, **options)
            return self._panel

    def __repr__(self) -> str:
        return f"Job(name={self.name!r}, backend={self.backend.name!r})"

    def _ipython_display_(self) -> None:
        """Show a live panel in a notebook (a static summary where ipywidgets is absent)."""
        from dsnb.widgets.display import display_job

        display_job(self)

    def _repr_html_(self) -> str:
        status = self.status()
        elapsed = f"{status.elapsed:.0f} s" if status.elapsed is not None else "-"
        rows = "".join(
            f"<tr><td>{r.rank}</td><td>{r.state.value}</td><td>{'' if r.exit_code is None else r.exit_code}</td></tr>"
            for r in status.replicas
        )
        return (
            f"<b>dsnb job</b> <code>{html.escape(self.name)}</code> on <i>{html.escape(self.backend.name)}</i>: "
            f"<b>{status.state.value}</b> ({elapsed})<br>{html.escape(status.message)}"
            f"<table><tr><th>rank</th><th>state</th><th>exit code</th></tr>{rows}</table>"
        )
