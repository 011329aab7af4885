"""The live job panel: header, per-rank table, logs, metric plot, progress, Cancel, diagnosis.

A :class:`JobPanel` is a view over one :class:`~dsnb.monitor.JobMonitor`. The monitor's
follower thread polls the backend and hands the panel each batch of changes, so the cell
that displays a job returns at once and the kernel stays free while the job runs.

Example:
    >>> from dsnb import Cluster, JobSpec
    >>> job = Cluster().submit(JobSpec(name="hello", command=["python", "-c", "print('hi')"]))
    >>> panel = JobPanel(job)             # follows the job; display(panel) shows it  # doctest: +SKIP
    >>> panel.monitor.thread.join(60)                                               # doctest: +SKIP
    >>> panel.state_label.value, panel.log_text                                     # doctest: +SKIP
    ('SUCCEEDED', '[rank 0] hi')
"""

from __future__ import annotations

import html
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dsnb.errors import BackendUnavailable
from dsnb.formatting import elapsed_of, format_duration, format_value
from dsnb.monitor import JobMonitor, MonitorSnapshot, MonitorUpdate
from dsnb.runtime.usage import USAGE_METRICS
from dsnb.status import JobState, JobStatus, LogLine, rank_label
from dsnb.widgets.markup import (
    STATE_COLORS,
    diagnosis_html,
    diagnosis_of,
    is_shown,
    log_html,
    log_tail_html,
    png_html,
    rank_table_html,
    summary_head_html,
)
from dsnb.widgets.plots import JOB_PLOTS, USAGE_PLOTS, PlotGroup, plot_png
from dsnb.widgets.ticker import SHARED_TICKER, Ticker, Ticking

try:
    import ipywidgets as widgets
except ImportError as e:  # pragma: no cover - exercised through display.py's fallback
    raise BackendUnavailable("notebook", "the job panel needs ipywidgets", "pip install 'dsnb[notebook]'") from e

if TYPE_CHECKING:
    from dsnb.job import Job

#: The log selector's value for the merged view of all ranks (the other values are rank numbers).
ALL_RANKS = "all"
#: Log lines shown at most, after filtering.
MAX_LOG_LINES = 500
#: Log lines in the static HTML that stands in for the widget where widgets do not render.
STATIC_LOG_LINES = 20
#: Seconds between two renderings of the metric plot.
PLOT_INTERVAL_S = 1.0
#: Seconds between two drawings of the usage plot: its samples come every 2 s, and drawing takes CPU the ranks want.
USAGE_PLOT_INTERVAL_S = 5.0

BAR_STYLES: dict[JobState, str] = {
    JobState.SUCCEEDED: "success",
    JobState.FAILED: "danger",
    JobState.CANCELLED: "warning",
}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _hide(widget: widgets.Widget, hidden: bool) -> None:
    display = "none" if hidden else None
    if widget.layout.display != display:
        widget.layout.display = display


class JobPanel:
    """A live notebook panel for one job; a view over its :class:`~dsnb.monitor.JobMonitor`.

    The panel never calls the backend from a display path: the monitor's follower thread
    feeds it, and a callback on the shared :class:`~dsnb.widgets.ticker.Ticker` (one thread for
    all open panels) refreshes the elapsed time and a plot held back by the rate limit about
    once a second. Both stop by themselves when the job has ended and its output was read to
    the end, and :meth:`close` stops them earlier. The panel renders from the monitor's
    :meth:`~dsnb.monitor.JobMonitor.snapshot`, never under the monitor's lock.

    Child widgets (assert on their ``.value``):
        ``name_label``, ``backend_label``, ``state_label`` (the state word, e.g. ``"RUNNING"``),
        ``elapsed_label``, ``world_size_label``, ``restarts_label``, ``message_label``,
        ``cancel_button``, ``progress`` (IntProgress), ``progress_label``, ``metrics_label``,
        ``plot`` (Image, PNG), ``rank_table`` (HTML table), ``diagnosis`` (HTML, shown on
        failure), ``log_selector`` (``ALL_RANKS`` or a rank), ``log_filter``, ``follow``,
        ``log_info``, ``log_view`` (HTML ``<pre>``); ``widget`` is the whole panel.

    Args:
        job: the job to show.
        monitor: the monitor to view; a new :class:`JobMonitor` of ``job`` if None.
        max_log_lines: log lines shown at most (the newest).
        plot_interval: seconds between two plot renderings; the last one is always drawn.
        poll_interval: seconds between the follower thread's polls.
        start: start following at once; otherwise call :meth:`start` (or poll the monitor).
        shared_ticker: the ticker whose thread refreshes the panel (``SHARED_TICKER`` if None).

    Raises:
        ValueError: a limit below 1 or a negative interval.
        BackendUnavailable: ipywidgets is missing (raised when this module is imported).

    Example:
        >>> panel = JobPanel(job)               # doctest: +SKIP
        >>> panel                               # in a notebook: the live panel  # doctest: +SKIP
        >>> panel.log_selector.value = 1        # only rank 1's lines  # doctest: +SKIP
        >>> panel.close()                       # stops following; the job keeps running  # doctest: +SKIP
    """

    #: What the panel shows, in its text and HTML summaries ("dsnb job NAME on BACKEND").
    kind = "job"
    #: The label of the button that calls ``job.cancel()``, and its tooltip.
    stop_label = "Cancel"
    stop_tooltip = "Stop the job and all its ranks"
    #: The plots (see :func:`plot_png`), and what their x axis is.
    plot_groups: tuple[PlotGroup, ...] = JOB_PLOTS
    plot_x = "step"
    #: Display names of metrics; the metrics named here are listed first, in this order.
    metric_labels: Mapping[str, str] = {}
    #: What a metric sample's step counts, in the latest-values line.
    step_word = "step"

    def __init__(
        self,
        job: Job,
        monitor: JobMonitor | None = None,
        *,
        max_log_lines: int = MAX_LOG_LINES,
        plot_interval: float = PLOT_INTERVAL_S,
        poll_interval: float = 0.2,
        start: bool = True,
        shared_ticker: Ticker | None = None,
    ) -> None:
        if max_log_lines < 1:
            raise ValueError("max_log_lines must be at least 1")
        if plot_interval < 0 or poll_interval <= 0:
            raise ValueError("plot_interval must be >= 0 and poll_interval > 0")
        self.job = job
        self.monitor = monitor if monitor is not None else JobMonitor(job)
        self.max_log_lines = max_log_lines
        self.plot_interval = plot_interval
        self.poll_interval = poll_interval
        #: How many times the plot was drawn (the rate limit keeps it to one a ``plot_interval``).
        self.plot_renders = 0
        #: The thread running ``job.cancel()`` after a click on Cancel, if any.
        self.cancel_thread: threading.Thread | None = None
        #: The panel's place on the shared ticker once started; ``is_alive()`` while it ticks.
        self.ticker: Ticking | None = None
        self._shared_ticker = shared_ticker if shared_ticker is not None else SHARED_TICKER
        self.closed = False
        self.log_text = ""
        self.rank_rows: list[tuple[str, str, str, str]] = []
        self._lock = threading.RLock()
        self._quiet = False  # set while the panel itself changes the log controls
        self._frozen_logs: MonitorSnapshot | None = None  # the lines shown while follow is off
        self._ranks: list[int] = []
        self._world_size: int | None = None
        self._spec_read = False
        self._plot_dirty = False
        self._last_plot: float | None = None
        self._usage_dirty = False  # new usage samples: their own plot, drawn less often (it costs the ranks CPU)
        self._last_usage_plot: float | None = None
        self._final = False
        self._cancelling = False
        self._display_handles: list[Any] = []
        self._note = ""  # shown after the status message, e.g. a failed cancel
        self._build()
        self._unsubscribe: Callable[[], None] | None = self.monitor.subscribe(self._on_update)
        with self._lock:
            # What the monitor already holds: it may have followed the job before.
            self._render_all(plot=not self.monitor.done)
            if self.monitor.done:
                self._finish()
        if start:
            self.start()

    # -- widgets ---------------------------------------------------------------------------
    def _build(self) -> None:
        w = widgets
        self.name_label = w.HTML(f"<b>{html.escape(self.job.name)}</b>")
        self.backend_label = w.Label(f"on {self.job.backend.name}")
        self.state_label = w.Label("…", style={"font_weight": "bold"})
        self.elapsed_label = w.Label("")
        self.world_size_label = w.Label("")
        self.restarts_label = w.Label("restarts 0")
        self.cancel_button = w.Button(description=self.stop_label, icon="stop", button_style="danger",
                                      tooltip=self.stop_tooltip, layout=w.Layout(width="auto"))
        self.cancel_button.on_click(lambda _button: self.cancel())
        self.message_label = w.Label("waiting for the first status")
        self.progress = w.IntProgress(value=0, min=0, max=1, description="progress")
        self.progress_label = w.Label("")
        self.progress_box = w.HBox([self.progress, self.progress_label])
        self.metrics_label = w.HTML("")
        self.plot = w.Image(format="png", value=b"", layout=w.Layout(max_width="100%"))
        self.usage_plot = w.Image(format="png", value=b"", layout=w.Layout(max_width="100%"))
        self.rank_table = w.HTML("")
        self.stragglers = w.HTML("")
        self.diagnosis = w.HTML("")
        self.log_selector = w.Dropdown(options=[("all ranks", ALL_RANKS)], value=ALL_RANKS, description="logs",
                                       layout=w.Layout(width="14em"))
        self.log_filter = w.Text(value="", placeholder="filter lines", continuous_update=True,
                                 layout=w.Layout(width="16em"))
        self.follow = w.ToggleButton(value=True, description="follow", icon="arrow-down",
                                     tooltip="Keep showing the newest lines; off freezes the view")
        self.log_info = w.Label("")
        self.log_view = w.HTML(log_html(""))
        for widget, css in (
            (self.state_label, "dsnb-state"), (self.cancel_button, "dsnb-cancel"), (self.plot, "dsnb-plot"),
            (self.usage_plot, "dsnb-usage-plot"),
            (self.rank_table, "dsnb-ranks"), (self.diagnosis, "dsnb-diagnosis"), (self.log_view, "dsnb-log"),
            (self.log_selector, "dsnb-log-selector"), (self.log_filter, "dsnb-log-filter"),
            (self.follow, "dsnb-follow"), (self.progress, "dsnb-progress"), (self.stragglers, "dsnb-stragglers"),
        ):
            widget.add_class(css)
        for hidden in (self.progress_box, self.plot, self.usage_plot, self.diagnosis, self.stragglers):
            _hide(hidden, True)
        self.header = w.HBox(
            [self.name_label, self.backend_label, self.state_label, self.elapsed_label,
             self.world_size_label, self.restarts_label, self.cancel_button],
            layout=w.Layout(align_items="center", grid_gap="12px"),
        )
        self.log_controls = w.HBox([self.log_selector, self.log_filter, self.follow, self.log_info],
                                   layout=w.Layout(align_items="center", grid_gap="8px"))
        self.widget = w.VBox(
            [self.header, self.message_label, self.stragglers, self.progress_box, self.metrics_label, self.plot,
             self.usage_plot, self.rank_table, self.diagnosis, self.log_controls, self.log_view],
        )
        self.widget.add_class("dsnb-panel")
        self.log_selector.observe(self._on_log_control, names="value")
        self.log_filter.observe(self._on_log_control, names="value")
        self.follow.observe(self._on_follow, names="value")

    def _all_widgets(self) -> Iterable[widgets.Widget]:
        return (
            self.name_label, self.backend_label, self.state_label, self.elapsed_label, self.world_size_label,
            self.restarts_label, self.cancel_button, self.message_label, self.progress, self.progress_label,
            self.progress_box, self.metrics_label, self.plot, self.usage_plot, self.rank_table, self.stragglers,
            self.diagnosis,
            self.log_selector,
            self.log_filter, self.follow, self.log_info, self.log_view, self.header, self.log_controls, self.widget,
        )

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> JobPanel:
        """Follow the job: start the monitor's thread and tick on the shared ticker (no-op once ended).

        Returns:
            The panel.

        Example:
            >>> JobPanel(job, start=False).start()  # doctest: +SKIP
        """
        with self._lock:
            if self.closed or self._final:
                return self
            self.monitor.start(interval=self.poll_interval)
            if self.ticker is None or not self.ticker.is_alive():
                interval = max(0.1, min(1.0, self.plot_interval or 1.0))
                self.ticker = self._shared_ticker.register(self._tick, interval)
        return self

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop following (the monitor's thread and the panel's ticks) and close the widgets.

        The job keeps running; a closed panel is not shown again (``display_job`` makes a new one).

        Args:
            timeout: seconds to wait for each thread.

        Example:
            >>> panel.close(); panel.monitor.thread.is_alive()  # doctest: +SKIP
            False
        """
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._stop_ticking()
            unsubscribe, self._unsubscribe = self._unsubscribe, None
        # Outside the lock: the follower may be waiting for it inside _on_update.
        if unsubscribe is not None:
            unsubscribe()
        self.monitor.stop(timeout)
        if self.ticker is not None:
            self.ticker.join(timeout)  # a tick under way finishes first
        for widget in self._all_widgets():
            widget.close()

    def cancel(self) -> threading.Thread | None:
        """Cancel the job on a background thread, so a click returns at once.

        The button is disabled while cancelling and stays disabled once the job has ended; a
        failure is shown in ``message_label`` and enables the button again.

        Returns:
            The thread running ``job.cancel()``, or None when there is nothing to cancel.

        Example:
            >>> panel.cancel_button.click()  # same as panel.cancel()  # doctest: +SKIP
        """
        with self._lock:
            status = self.monitor.status
            if self._cancelling or self._final or (status is not None and status.state.is_terminal()):
                return None
            self._cancelling = True
            self.cancel_button.disabled = True
            self.cancel_button.description = "Cancelling…"
            self.cancel_thread = threading.Thread(target=self._cancel_job, name=f"dsnb-cancel-{self.job.name}", daemon=True)
            self.cancel_thread.start()
            return self.cancel_thread

    def _cancel_job(self) -> None:
        try:
            self.job.cancel()
        except Exception as e:  # shown in the panel: no one can catch it on this thread
            with self._lock:
                self._cancelling = False
                self._note = f"cancel failed: {type(e).__name__}: {e}"
                if not self.closed:
                    self.cancel_button.description = self.stop_label
                    self._render_header(self.monitor.snapshot())

    def show(self, display: Callable[..., Any]) -> Any:
        """Display the panel with ``display`` (IPython's) and refresh that output once the job has ended.

        The saved notebook then keeps the final state in its static HTML, which nbconvert and
        GitHub show where widgets do not render.

        Args:
            display: called as ``display(panel, display_id=True)``; what it returns is kept as the
                handle to update if it has an ``update`` method.

        Returns:
            What ``display`` returned.

        Example:
            >>> from IPython.display import display
            >>> panel.show(display)  # doctest: +SKIP
        """
        # Under the lock, the final update comes either before the display (which then shows
        # it) or after the handle is kept (which it then updates).
        with self._lock:
            handle = display(self, display_id=True)
            if not self._final and callable(getattr(handle, "update", None)):
                self._display_handles.append(handle)
        return handle

    # -- updates ---------------------------------------------------------------------------
    def _on_update(self, update: MonitorUpdate) -> None:
        with self._lock:
            if self.closed:
                return
            if not self._spec_read:
                self._spec_read = True
                try:
                    self._world_size = self.job.spec.world_size  # one read, on the follower thread
                except Exception:
                    self._world_size = None  # the replicas still tell the size
            usage = sum(sample.name in USAGE_METRICS for sample in update.samples)
            self._plot_dirty = self._plot_dirty or len(update.samples) > usage
            self._usage_dirty = self._usage_dirty or usage > 0
            self._render_all(plot=False)
            if update.error is not None:
                self._stop_ticking()
            if update.final:
                self._finish()
            elif self._plot_wanted():
                self._render_plot()
            handles = list(self._display_handles) if update.final else []
        for handle in handles:
            try:
                handle.update(self)
            except Exception:
                pass  # a display that cannot be refreshed keeps its last state

    def _finish(self) -> None:
        self._final = True
        self._stop_ticking()
        self._render_plot(force=True)
        self._render_header(self.monitor.snapshot())

    def _tick(self) -> None:
        """On the shared ticker's thread: the elapsed time, and a plot the rate limit held back."""
        with self._lock:
            if self.closed or self._final:
                self._stop_ticking()
                return
            self._render_header(self.monitor.snapshot())
            if self._plot_wanted():
                self._render_plot()

    def _stop_ticking(self) -> None:
        if self.ticker is not None:
            self.ticker.cancel()

    def _plot_due(self) -> bool:
        return self._last_plot is None or self.monitor.clock() - self._last_plot >= self.plot_interval

    def _usage_due(self) -> bool:
        return self._last_usage_plot is None or self.monitor.clock() - self._last_usage_plot >= USAGE_PLOT_INTERVAL_S

    def _plot_wanted(self) -> bool:
        """Whether a plot has new points and its rate limit lets it be drawn now."""
        return (self._plot_dirty and self._plot_due()) or (self._usage_dirty and self._usage_due())

    def _on_log_control(self, _change: dict[str, Any]) -> None:
        with self._lock:
            if not self._quiet:
                self._render_logs(self.monitor.snapshot())

    def _on_follow(self, change: dict[str, Any]) -> None:
        with self._lock:
            self._frozen_logs = None if change["new"] else self.monitor.snapshot()
            self._render_logs(self.monitor.snapshot())

    # -- rendering (always under self._lock; reads a snapshot of the monitor only) ---------------
    def _render_all(self, plot: bool = True) -> None:
        snapshot = self.monitor.snapshot()
        self._render_header(snapshot)
        self._render_ranks(snapshot.status)
        self._render_stragglers(snapshot.stragglers)
        self._render_progress(snapshot)
        self._render_metrics(snapshot)
        if self.follow.value:
            self._render_logs(snapshot)
        if plot and snapshot.metric_names:
            self._render_plot(force=True)

    def _render_header(self, snapshot: MonitorSnapshot) -> None:
        status = snapshot.status
        if status is None:
            self.message_label.value = self._note or "waiting for the first status"
            return
        self.state_label.value = status.state.value
        self.state_label.style.text_color = STATE_COLORS.get(status.state, "")
        self._render_times(status, self.monitor.clock())
        size = self._size_of(status)
        self.world_size_label.value = f"world size {size}" if size is not None else ""
        self.restarts_label.value = f"restarts {status.restarts}"
        notes = [status.message, self._note]
        if snapshot.error is not None:
            notes.append(f"monitor stopped: {type(snapshot.error).__name__}: {snapshot.error}")
        self.message_label.value = " — ".join(note for note in notes if note)
        self._render_stop_button(status)
        failed = status.state == JobState.FAILED
        if failed:
            self.diagnosis.value = diagnosis_html(status)
        _hide(self.diagnosis, not failed)

    def _render_times(self, status: JobStatus, now: float) -> None:
        elapsed = elapsed_of(status, now)
        if elapsed is not None:
            self.elapsed_label.value = f"elapsed {format_duration(elapsed)}"
        elif status.created_at is not None:
            self.elapsed_label.value = f"waiting {format_duration(max(0.0, now - status.created_at))}"

    def _render_stop_button(self, status: JobStatus) -> None:
        if status.state.is_terminal():
            self.cancel_button.disabled = True
            self.cancel_button.description = self.stop_label
        elif not self._cancelling:
            self.cancel_button.disabled = False

    def _size_of(self, status: JobStatus) -> int | None:
        """The world size: from the spec once read, else from the replicas the status lists."""
        return self._world_size if self._world_size is not None else len(status.replicas) or None

    def _render_ranks(self, status: JobStatus | None) -> None:
        replicas = status.replicas if status is not None else ()
        rows = [
            (str(r.rank), r.state.value, "" if r.exit_code is None else str(r.exit_code), r.message)
            for r in replicas
        ]
        if rows == self.rank_rows and self.rank_table.value:
            return
        self.rank_rows = rows
        self.rank_table.value = rank_table_html(rows)

    def _render_stragglers(self, stragglers: tuple[str, ...]) -> None:
        value = "".join(f"<div class='dsnb-straggler' style='color:#a15c00'>⚠ {html.escape(text)}</div>"
                        for text in stragglers)
        if value != self.stragglers.value:
            self.stragglers.value = value
        _hide(self.stragglers, not stragglers)

    def _render_progress(self, snapshot: MonitorSnapshot) -> None:
        progress = snapshot.progress
        if progress is None:
            return
        total = max(1, progress.total)
        if self.progress.max != total:
            self.progress.max = total
        self.progress.value = min(progress.step, total)
        self.progress_label.value = str(progress)
        if snapshot.status is not None:
            self.progress.bar_style = BAR_STYLES.get(snapshot.status.state, "")
        _hide(self.progress_box, False)

    def _render_metrics(self, snapshot: MonitorSnapshot) -> None:
        latest = snapshot.latest
        if not latest:
            return
        items = "  ".join(
            f"<b>{html.escape(self.metric_labels.get(name, name))}</b> {format_value(latest[name].value)}"
            for name in self._ordered(snapshot.metric_names)[:12]
        )
        step = max(sample.step for sample in latest.values())
        self.metrics_label.value = f'<span style="font-size:12px">{self.step_word} {step}: {items}</span>'

    def metric_order(self) -> list[str]:
        """The metric names seen so far: those of ``metric_labels`` first (in its order), then the others.

        Example:
            >>> panel.metric_order()  # doctest: +SKIP
            ['loss', 'tokens_per_s']
        """
        return self._ordered(self.monitor.metric_names())

    def _ordered(self, names: Sequence[str]) -> list[str]:
        known = [name for name in self.metric_labels if name in names]
        return known + [name for name in names if name not in self.metric_labels]

    def _render_plot(self, force: bool = False) -> None:
        """Draw the job's plot and the usage plot, each when it has new points and its rate limit allows
        (``force``: both, now)."""
        now = self.monitor.clock()
        job = force or (self._plot_dirty and self._plot_due())
        usage = force or (self._usage_dirty and self._usage_due())
        try:
            png = plot_png(self.monitor, groups=self.plot_groups, labels=self.metric_labels, x=self.plot_x) if job else None
            used = plot_png(self.monitor, groups=USAGE_PLOTS, x="time", height=2.2) if usage else None
        except ImportError:
            self._plot_dirty = self._usage_dirty = False
            self.metrics_label.value += " <i>(install matplotlib for a plot)</i>"
            return
        if job:
            self._plot_dirty, self._last_plot = False, now
        if usage:
            self._usage_dirty, self._last_usage_plot = False, now
        for widget, drawn in ((self.plot, png), (self.usage_plot, used)):
            if drawn is not None:
                widget.value = drawn
                _hide(widget, False)
        if png is not None:
            self.plot_renders += 1

    def _lines_shown(self, snapshot: MonitorSnapshot) -> tuple[list[str], int]:
        rank = self.log_selector.value
        source = (self._frozen_logs or snapshot).lines_of(None if rank == ALL_RANKS else rank)
        prefix = rank == ALL_RANKS

        def text_of(line: LogLine) -> str:
            text = _ANSI.sub("", line.text)
            return f"[{line.source}] {text}" if prefix else text

        shown = [line for line in source if is_shown(line)]
        needle = self.log_filter.value.strip().lower()
        if needle:
            texts = [t for t in map(text_of, shown) if needle in t.lower()]
        else:  # format only what fits: this runs up to ten times a second
            texts = [text_of(line) for line in shown[-self.max_log_lines:]]
        return texts[-self.max_log_lines:], len(shown)

    def _render_logs(self, snapshot: MonitorSnapshot) -> None:
        self._sync_rank_options(list(snapshot.ranks))
        texts, total = self._lines_shown(snapshot)
        text = "\n".join(texts)
        if self.log_filter.value.strip():
            info = f"{len(texts)} of {total} lines match"
        else:
            info = f"{len(texts)} lines" if len(texts) == total else f"last {len(texts)} of {total} lines"
        if not self.follow.value:
            info += " (paused)"
        self.log_info.value = info
        if text != self.log_text or not self.log_view.value:
            self.log_text = text
            self.log_view.value = log_html(text)

    def _sync_rank_options(self, ranks: list[int]) -> None:
        if ranks == self._ranks:
            return
        self._ranks = ranks
        current = self.log_selector.value
        self._quiet = True
        try:
            self.log_selector.options = [("all ranks", ALL_RANKS)] + [(rank_label(r), r) for r in ranks]
            self.log_selector.value = current if current == ALL_RANKS or current in ranks else ALL_RANKS
        finally:
            self._quiet = False

    # -- static views ----------------------------------------------------------------------
    def _extra_html(self) -> list[str]:
        """More lines under the static HTML's header (none for a job)."""
        return []

    def to_text(self) -> str:
        """A plain-text summary: name, backend, state, elapsed, world size, and the diagnosis on failure.

        Example:
            >>> print(panel.to_text())  # doctest: +SKIP
            dsnb job hello-x1y2 on local: SUCCEEDED, elapsed 1.2 s, world size 1
        """
        snapshot = self.monitor.snapshot()
        status = snapshot.status
        if status is None:
            return f"dsnb {self.kind} {self.job.name} on {self.job.backend.name}: waiting for the first status"
        parts = [status.state.value]
        elapsed = elapsed_of(status, self.monitor.clock())
        if elapsed is not None:
            parts.append(f"elapsed {format_duration(elapsed)}")
        size = self._size_of(status)
        if size is not None:
            parts.append(f"world size {size}")
        if status.restarts:
            parts.append(f"restarts {status.restarts}")
        text = f"dsnb {self.kind} {self.job.name} on {self.job.backend.name}: " + ", ".join(parts)
        if snapshot.progress is not None:
            text += f"\nstep {snapshot.progress.step}/{snapshot.progress.total}"
        if status.state == JobState.FAILED:
            text += "\n" + diagnosis_of(status)
        elif status.message:
            text += f"\n{status.message}"
        return text

    def to_html(self) -> str:
        """A static HTML snapshot: header, progress, latest metrics, plot, rank table, diagnosis, last lines.

        Example:
            >>> "<table" in panel.to_html()  # doctest: +SKIP
            True
        """
        with self._lock:
            snapshot = self.monitor.snapshot()
            status = snapshot.status
            details = [label.value for label in (self.elapsed_label, self.world_size_label) if label.value]
            parts = [summary_head_html(self.kind, self.job.name, self.job.backend.name, status, details),
                     *self._extra_html()]
            notes = [status.message if status is not None else "", self.progress_label.value]
            parts.extend(f"<div>{html.escape(note)}</div>" for note in notes if note)
            if self.metrics_label.value:
                parts.append(f"<div>{self.metrics_label.value}</div>")
            parts.extend(png_html(plot.value) for plot in (self.plot, self.usage_plot) if plot.value)
            parts.append(rank_table_html(self.rank_rows))
            if status is not None and status.state == JobState.FAILED:
                parts.append(self.diagnosis.value)
            parts.append(log_tail_html([str(line) for line in snapshot.lines if is_shown(line)][-STATIC_LOG_LINES:]))
            return '<div class="dsnb-panel-static">' + "".join(parts) + "</div>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        bundle: dict[str, Any] = {}
        if not self.closed:
            bundle.update(self.widget._repr_mimebundle_() or {})
        bundle["text/plain"] = self.to_text()
        bundle["text/html"] = self.to_html()
        return bundle

    def __repr__(self) -> str:
        status = self.monitor.status
        state = status.state.value if status is not None else "unknown"
        return f"JobPanel(job={self.job.name!r}, state={state}{', closed' if self.closed else ''})"
