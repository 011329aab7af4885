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

import base64
import html
import io
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from dsnb.errors import BackendUnavailable
from dsnb.formatting import elapsed_of, format_duration, format_value
from dsnb.metrics import is_metric_line
from dsnb.monitor import JobMonitor, MonitorUpdate
from dsnb.status import JobState, JobStatus, LogLine, rank_label

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
#: Ranks drawn per metric; more would make the plot unreadable.
MAX_RANKS_PLOTTED = 8
THROUGHPUT_SUFFIXES = ("_per_s", "_per_sec", "_per_second")

STATE_COLORS: dict[JobState, str] = {
    JobState.PENDING: "#b58900",
    JobState.STARTING: "#b58900",
    JobState.RUNNING: "#1f6feb",
    JobState.SUCCEEDED: "#1a7f37",
    JobState.FAILED: "#cf222e",
    JobState.CANCELLED: "#8250df",
}
BAR_STYLES: dict[JobState, str] = {
    JobState.SUCCEEDED: "success",
    JobState.FAILED: "danger",
    JobState.CANCELLED: "warning",
}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def is_loss(name: str) -> bool:
    """True for the metrics drawn on the loss plot.

    Example:
        >>> is_loss("loss"), is_loss("val_loss"), is_loss("lr")
        (True, True, False)
    """
    return name == "loss" or name.endswith(("_loss", "/loss"))


def is_throughput(name: str) -> bool:
    """True for the metrics drawn on the throughput plot (``tokens_per_s``, ``samples_per_sec``...).

    Example:
        >>> is_throughput("tokens_per_s"), is_throughput("avg_samples_per_sec"), is_throughput("loss")
        (True, True, False)
    """
    return name.endswith(THROUGHPUT_SUFFIXES)


#: A plot of :func:`plot_png`: its title, and which metric names it draws.
PlotGroup = tuple[str, Callable[[str], bool]]
#: A job's plots: loss, and throughput.
JOB_PLOTS: tuple[PlotGroup, ...] = (("loss", is_loss), ("throughput", is_throughput))


def plot_png(
    monitor: JobMonitor,
    width: float = 8.0,
    height: float = 2.8,
    dpi: int = 80,
    *,
    groups: Sequence[PlotGroup] = JOB_PLOTS,
    labels: Mapping[str, str] | None = None,
    x: str = "step",
) -> bytes | None:
    """One plot per group of metrics (loss and throughput by default), one line per rank, as PNG bytes.

    It draws on a :class:`matplotlib.figure.Figure` with the Agg canvas, never through pyplot,
    so it touches no global figure state and is safe off the main thread.

    Args:
        monitor: where the metric series are.
        width: inches.
        height: inches.
        dpi: dots per inch.
        groups: ``(title, wanted)`` per plot; a plot draws the metrics ``wanted(name)`` selects,
            and is left out when it selects none.
        labels: how a metric is named in the legends (default: its name).
        x: ``"step"`` (the reported step) or ``"time"`` (seconds since the first point drawn).

    Returns:
        The PNG, or None with nothing to draw.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: ``x`` is neither ``"step"`` nor ``"time"``.

    Example:
        >>> png = plot_png(monitor)      # doctest: +SKIP
        >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"  # doctest: +SKIP
        True
        >>> plot_png(monitor, groups=[("latency (ms)", lambda n: n.endswith("_ms"))], x="time")  # doctest: +SKIP
    """
    if x not in ("step", "time"):
        raise ValueError(f"x must be 'step' or 'time', got {x!r}")
    labels = labels or {}
    names = monitor.metric_names()
    chosen = [(title, [n for n in names if wanted(n)]) for title, wanted in groups]
    chosen = [(title, group) for title, group in chosen if group]
    if not chosen:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = {name: monitor.series(name) for _, group in chosen for name in group}
    start = min((s.time for points in series.values() for s in points), default=0.0)
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(chosen), squeeze=False)[0]
    for ax, (title, group) in zip(axes, chosen):
        drawn, labelled = 0, False
        for name in group:
            by_rank: dict[int, tuple[list[float], list[float]]] = {}
            for sample in series[name]:
                xs, values = by_rank.setdefault(sample.rank, ([], []))
                xs.append(sample.step if x == "step" else sample.time - start)
                values.append(sample.value)
            ranks = sorted(by_rank)[:MAX_RANKS_PLOTTED]
            for rank in ranks:
                xs, values = by_rank[rank]
                label = labels.get(name, name)
                label = label if len(ranks) == 1 else f"{label} (rank {rank})"
                ax.plot(xs, values, label=label, marker="." if len(xs) < 40 else None)
                drawn += 1
                labelled = labelled or label != title
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("step" if x == "step" else "seconds")
        ax.grid(alpha=0.3)
        if drawn > 1 or labelled:
            ax.legend(fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _hide(widget: widgets.Widget, hidden: bool) -> None:
    display = "none" if hidden else None
    if widget.layout.display != display:
        widget.layout.display = display


def _log_html(text: str) -> str:
    # column-reverse keeps the scroll position anchored at the newest line as lines arrive.
    return (
        '<div class="dsnb-log-scroll" style="max-height:24em;overflow:auto;display:flex;'
        'flex-direction:column-reverse;border:1px solid #d0d7de;border-radius:4px;padding:4px">'
        '<pre class="dsnb-log-text" style="flex-shrink:0;margin:0;white-space:pre-wrap;font-size:12px;line-height:1.35">'
        f"{html.escape(text, quote=False)}</pre></div>"
    )


def _shown(line: LogLine) -> bool:
    return not is_metric_line(line.text)  # metrics are shown as numbers and plots


class JobPanel:
    """A live notebook panel for one job; a view over its :class:`~dsnb.monitor.JobMonitor`.

    The panel never calls the backend from a display path: the monitor's follower thread
    (and the panel's one-second ticker, which refreshes the elapsed time and a plot held back
    by the rate limit) feed it. Both stop by themselves when the job has ended and its output
    was read to the end, and :meth:`close` stops them earlier.

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
        #: The ticker thread, while it runs.
        self.ticker: threading.Thread | None = None
        self.closed = False
        self.log_text = ""
        self.rank_rows: list[tuple[str, str, str, str]] = []
        self._lock = threading.RLock()
        self._quiet = False  # set while the panel itself changes the log controls
        self._snapshot: tuple[list[LogLine], dict[int, list[LogLine]]] | None = None
        self._ranks: list[int] = []
        self._world_size: int | None = None
        self._spec_read = False
        self._plot_dirty = False
        self._last_plot: float | None = None
        self._final = False
        self._cancelling = False
        self._stop_ticks = threading.Event()
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
        self.rank_table = w.HTML("")
        self.diagnosis = w.HTML("")
        self.log_selector = w.Dropdown(options=[("all ranks", ALL_RANKS)], value=ALL_RANKS, description="logs",
                                       layout=w.Layout(width="14em"))
        self.log_filter = w.Text(value="", placeholder="filter lines", continuous_update=True,
                                 layout=w.Layout(width="16em"))
        self.follow = w.ToggleButton(value=True, description="follow", icon="arrow-down",
                                     tooltip="Keep showing the newest lines; off freezes the view")
        self.log_info = w.Label("")
        self.log_view = w.HTML(_log_html(""))
        for widget, css in (
            (self.state_label, "dsnb-state"), (self.cancel_button, "dsnb-cancel"), (self.plot, "dsnb-plot"),
            (self.rank_table, "dsnb-ranks"), (self.diagnosis, "dsnb-diagnosis"), (self.log_view, "dsnb-log"),
            (self.log_selector, "dsnb-log-selector"), (self.log_filter, "dsnb-log-filter"),
            (self.follow, "dsnb-follow"), (self.progress, "dsnb-progress"),
        ):
            widget.add_class(css)
        for hidden in (self.progress_box, self.plot, self.diagnosis):
            _hide(hidden, True)
        self.header = w.HBox(
            [self.name_label, self.backend_label, self.state_label, self.elapsed_label,
             self.world_size_label, self.restarts_label, self.cancel_button],
            layout=w.Layout(align_items="center", grid_gap="12px"),
        )
        self.log_controls = w.HBox([self.log_selector, self.log_filter, self.follow, self.log_info],
                                   layout=w.Layout(align_items="center", grid_gap="8px"))
        self.widget = w.VBox(
            [self.header, self.message_label, self.progress_box, self.metrics_label, self.plot,
             self.rank_table, self.diagnosis, self.log_controls, self.log_view],
        )
        self.widget.add_class("dsnb-panel")
        self.log_selector.observe(self._on_log_control, names="value")
        self.log_filter.observe(self._on_log_control, names="value")
        self.follow.observe(self._on_follow, names="value")

    def _all_widgets(self) -> Iterable[widgets.Widget]:
        return (
            self.name_label, self.backend_label, self.state_label, self.elapsed_label, self.world_size_label,
            self.restarts_label, self.cancel_button, self.message_label, self.progress, self.progress_label,
            self.progress_box, self.metrics_label, self.plot, self.rank_table, self.diagnosis, self.log_selector,
            self.log_filter, self.follow, self.log_info, self.log_view, self.header, self.log_controls, self.widget,
        )

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> JobPanel:
        """Follow the job: start the monitor's thread and the panel's ticker (no-op once ended).

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
                self._stop_ticks.clear()
                self.ticker = threading.Thread(target=self._tick_loop, name=f"dsnb-panel-{self.job.name}", daemon=True)
                self.ticker.start()
        return self

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop following (the monitor's thread and the ticker) and close the widgets.

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
            self._stop_ticks.set()
            unsubscribe, self._unsubscribe = self._unsubscribe, None
        # Outside the lock: the follower may be waiting for it inside _on_update.
        if unsubscribe is not None:
            unsubscribe()
        self.monitor.stop(timeout)
        ticker = self.ticker
        if ticker is not None and ticker is not threading.current_thread():
            ticker.join(timeout)
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
                    self._render_header(self.monitor.status)

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
            if update.samples:
                self._plot_dirty = True
            self._render_all(plot=False)
            if update.error is not None:
                self._stop_ticks.set()
            if update.final:
                self._finish()
            elif self._plot_dirty and self._plot_due():
                self._render_plot()
            handles = list(self._display_handles) if update.final else []
        for handle in handles:
            try:
                handle.update(self)
            except Exception:
                pass  # a display that cannot be refreshed keeps its last state

    def _finish(self) -> None:
        self._final = True
        self._stop_ticks.set()
        self._render_plot()
        self._render_header(self.monitor.status)

    def _tick_loop(self) -> None:
        while not self._stop_ticks.wait(max(0.1, min(1.0, self.plot_interval or 1.0))):
            with self._lock:
                if self.closed or self._final:
                    return
                self._render_header(self.monitor.status)
                if self._plot_dirty and self._plot_due():
                    self._render_plot()

    def _plot_due(self) -> bool:
        return self._last_plot is None or self.monitor.clock() - self._last_plot >= self.plot_interval

    def _on_log_control(self, _change: dict[str, Any]) -> None:
        with self._lock:
            if not self._quiet:
                self._render_logs()

    def _on_follow(self, change: dict[str, Any]) -> None:
        with self._lock:
            if change["new"]:
                self._snapshot = None
            else:
                merged = self.monitor.lines()
                self._snapshot = (merged, {r: self.monitor.lines(r) for r in self.monitor.ranks()})
            self._render_logs()

    # -- rendering (always under self._lock; reads the monitor only) ------------------------
    def _render_all(self, plot: bool = True) -> None:
        status = self.monitor.status
        self._render_header(status)
        self._render_ranks(status)
        self._render_progress(status)
        self._render_metrics()
        if self.follow.value:
            self._render_logs()
        if plot and self.monitor.metric_names():
            self._render_plot()

    def _render_header(self, status: JobStatus | None) -> None:
        if status is None:
            self.message_label.value = self._note or "waiting for the first status"
            return
        now = self.monitor.clock()
        self.state_label.value = status.state.value
        self.state_label.style.text_color = STATE_COLORS.get(status.state, "")
        elapsed = elapsed_of(status, now)
        if elapsed is not None:
            self.elapsed_label.value = f"elapsed {format_duration(elapsed)}"
        elif status.created_at is not None:
            self.elapsed_label.value = f"waiting {format_duration(max(0.0, now - status.created_at))}"
        size = self._world_size if self._world_size is not None else len(status.replicas) or None
        self.world_size_label.value = f"world size {size}" if size is not None else ""
        self.restarts_label.value = f"restarts {status.restarts}"
        notes = [status.message, self._note]
        if self.monitor.error is not None:
            notes.append(f"monitor stopped: {type(self.monitor.error).__name__}: {self.monitor.error}")
        self.message_label.value = " — ".join(note for note in notes if note)
        terminal = status.state.is_terminal()
        if terminal:
            self.cancel_button.disabled = True
            self.cancel_button.description = self.stop_label
        elif not self._cancelling:
            self.cancel_button.disabled = False
        failed = status.state == JobState.FAILED
        if failed:
            who = f"rank {status.failed_rank}" if status.failed_rank is not None else "the job"
            code = f" with exit code {status.exit_code}" if status.exit_code is not None else ""
            self.diagnosis.value = (
                f'<div style="border-left:4px solid {STATE_COLORS[JobState.FAILED]};padding:2px 8px">'
                f"<b>{html.escape(who)} failed{code}</b>"
                f'<pre style="margin:4px 0;white-space:pre-wrap;font-size:12px">'
                f"{html.escape(diagnosis_of(status), quote=False)}</pre></div>"
            )
        _hide(self.diagnosis, not failed)

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

    def _render_progress(self, status: JobStatus | None) -> None:
        progress = self.monitor.progress
        if progress is None:
            return
        total = max(1, progress.total)
        if self.progress.max != total:
            self.progress.max = total
        self.progress.value = min(progress.step, total)
        self.progress_label.value = f"step {progress.step}/{progress.total}  {progress.fraction:.0%}"
        if status is not None:
            self.progress.bar_style = BAR_STYLES.get(status.state, "")
        _hide(self.progress_box, False)

    def _render_metrics(self) -> None:
        latest = self.monitor.latest_metrics()
        if not latest:
            return
        items = "  ".join(
            f"<b>{html.escape(self.metric_labels.get(name, name))}</b> {format_value(latest[name].value)}"
            for name in self.metric_order()[:12]
        )
        step = max(sample.step for sample in latest.values())
        self.metrics_label.value = f'<span style="font-size:12px">{self.step_word} {step}: {items}</span>'

    def metric_order(self) -> list[str]:
        """The metric names seen so far: those of ``metric_labels`` first (in its order), then the others.

        Example:
            >>> panel.metric_order()  # doctest: +SKIP
            ['loss', 'tokens_per_s']
        """
        names = self.monitor.metric_names()
        known = [name for name in self.metric_labels if name in names]
        return known + [name for name in names if name not in self.metric_labels]

    def _render_plot(self) -> None:
        self._plot_dirty = False
        self._last_plot = self.monitor.clock()
        try:
            png = plot_png(self.monitor, groups=self.plot_groups, labels=self.metric_labels, x=self.plot_x)
        except ImportError:
            self.metrics_label.value += " <i>(install matplotlib for a plot)</i>"
            return
        if png is None:
            return
        self.plot.value = png
        self.plot_renders += 1
        _hide(self.plot, False)

    def _lines_shown(self) -> tuple[list[str], int]:
        rank = self.log_selector.value
        if self._snapshot is not None:
            merged, per_rank = self._snapshot
            source = merged if rank == ALL_RANKS else per_rank.get(rank, [])
        else:
            source = self.monitor.lines(None if rank == ALL_RANKS else rank)
        prefix = rank == ALL_RANKS

        def text_of(line: LogLine) -> str:
            text = _ANSI.sub("", line.text)
            return f"[{line.source}] {text}" if prefix else text

        shown = [line for line in source if _shown(line)]
        needle = self.log_filter.value.strip().lower()
        if needle:
            texts = [t for t in map(text_of, shown) if needle in t.lower()]
        else:  # format only what fits: this runs up to ten times a second
            texts = [text_of(line) for line in shown[-self.max_log_lines:]]
        return texts[-self.max_log_lines:], len(shown)

    def _render_logs(self) -> None:
        self._sync_rank_options()
        texts, total = self._lines_shown()
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
            self.log_view.value = _log_html(text)

    def _sync_rank_options(self) -> None:
        ranks = self.monitor.ranks()
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
        status = self.monitor.status
        if status is None:
            return f"dsnb {self.kind} {self.job.name} on {self.job.backend.name}: waiting for the first status"
        parts = [status.state.value]
        elapsed = elapsed_of(status, self.monitor.clock())
        if elapsed is not None:
            parts.append(f"elapsed {format_duration(elapsed)}")
        size = self._world_size if self._world_size is not None else len(status.replicas) or None
        if size is not None:
            parts.append(f"world size {size}")
        if status.restarts:
            parts.append(f"restarts {status.restarts}")
        text = f"dsnb {self.kind} {self.job.name} on {self.job.backend.name}: " + ", ".join(parts)
        if self.monitor.progress is not None:
            p = self.monitor.progress
            text += f"\nstep {p.step}/{p.total}"
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
            status = self.monitor.status
            state = status.state.value if status is not None else "waiting for the first status"
            color = STATE_COLORS.get(status.state, "") if status is not None else ""
            head = (
                f"<b>dsnb {self.kind}</b> <code>{html.escape(self.job.name)}</code> on <i>{html.escape(self.job.backend.name)}</i>: "
                f'<b style="color:{color}">{html.escape(state)}</b>'
            )
            details = [label.value for label in (self.elapsed_label, self.world_size_label) if label.value]
            if details:
                head += " (" + ", ".join(html.escape(d) for d in details) + ")"
            parts = [f"<div>{head}</div>", *self._extra_html()]
            if status is not None and status.message:
                parts.append(f"<div>{html.escape(status.message)}</div>")
            if self.progress_label.value:
                parts.append(f"<div>{html.escape(self.progress_label.value)}</div>")
            if self.metrics_label.value:
                parts.append(f"<div>{self.metrics_label.value}</div>")
            if self.plot.value:
                encoded = base64.b64encode(self.plot.value).decode("ascii")
                parts.append(f'<img alt="metrics" src="data:image/png;base64,{encoded}">')
            parts.append(rank_table_html(self.rank_rows))
            if status is not None and status.state == JobState.FAILED:
                parts.append(self.diagnosis.value)
            last = [str(line) for line in self.monitor.lines() if _shown(line)][-STATIC_LOG_LINES:]
            if last:
                parts.append(f'<pre style="font-size:12px">{html.escape(chr(10).join(last), quote=False)}</pre>')
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


def diagnosis_of(status: JobStatus) -> str:
    """``status.diagnosis()`` without metric lines among the last lines: they are plotted already.

    Example:
        >>> s = JobStatus(name="a-x1", backend="local", state=JobState.FAILED, failed_rank=1,
        ...               last_lines=('DSNB_METRIC {"step": 1, "loss": 2.0}', "boom"))
        >>> diagnosis_of(s).splitlines()[-1]
        '  boom'
    """
    lines = tuple(line for line in status.last_lines if not is_metric_line(line))
    return replace(status, last_lines=lines).diagnosis()


def rank_table_html(rows: list[tuple[str, str, str, str]]) -> str:
    """The per-rank table: rank, state, exit code, message (one ``<tr class="dsnb-rank">`` a rank).

    Example:
        >>> rank_table_html([("0", "RUNNING", "", "")]).count('class="dsnb-rank"')
        1
    """
    body = "".join(
        f'<tr class="dsnb-rank"><td>{html.escape(rank)}</td>'
        f'<td style="color:{STATE_COLORS.get(JobState(state), "")}">{html.escape(state)}</td>'
        f"<td>{html.escape(code)}</td><td>{html.escape(message)}</td></tr>"
        for rank, state, code, message in rows
    )
    return (
        '<table class="dsnb-rank-table" style="font-size:12px">'
        "<tr><th>rank</th><th>state</th><th>exit code</th><th>message</th></tr>"
        f"{body}</table>"
    )
