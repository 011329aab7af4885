"""The live endpoint panel: a :class:`~dsnb.widgets.panel.JobPanel` over the job that serves a model.

On the job backends (local, Kubernetes) a served model is an always-on job, so the endpoint's
panel is the job panel with what an endpoint adds: the URL and whether the server answers in
the header, the serving metrics first and by their names (requests/s, p50 ms, p99 ms,
errors), plotted against time, and a Stop button. Its follower thread reads the endpoint's
status (the job's, RUNNING only once rank 0 answers ``/readyz``), the ranks' logs and the
``DSNB_METRIC`` lines rank 0 prints every 5 s with traffic; it stops by itself once the
endpoint is stopped, and :meth:`EndpointPanel.close` stops it earlier.

Example:
    >>> from dsnb import Cluster
    >>> from dsnb.serving import ServeSpec
    >>> endpoint = Cluster("local").serve(ServeSpec(name="tiny", model="models:build"))  # doctest: +SKIP
    >>> panel = EndpointPanel(endpoint)        # display(panel) shows it; so does `endpoint` last in a cell  # doctest: +SKIP
    >>> panel.ready_label.value, panel.url_label.value                                  # doctest: +SKIP
    ('ready', '<a href="http://127.0.0.1:39051/" target="_blank"><code>http://127.0.0.1:39051/</code></a>')
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from dsnb.job import Job
from dsnb.monitor import JobMonitor, MonitorSnapshot, MonitorUpdate
from dsnb.serving.endpoint import SERVING_METRICS
from dsnb.status import JobState, JobStatus
from dsnb.widgets.markup import STATE_COLORS
from dsnb.widgets.panel import JobPanel, _hide, widgets
from dsnb.widgets.plots import PlotGroup

if TYPE_CHECKING:
    from dsnb.serving.endpoint import Endpoint

#: The endpoint panel's plots: request rate, latency percentiles, errors; for a server that generates
#: text, tokens per second and the time to the first token and between tokens (each drawn when it has samples).
SERVING_PLOTS: tuple[PlotGroup, ...] = (
    ("requests/s", lambda name: name == "requests_per_s"),
    ("latency (ms)", lambda name: name in ("p50_ms", "p99_ms")),
    ("errors", lambda name: name == "errors"),
    ("tokens/s", lambda name: name == "tokens_per_s"),
    ("tokens (ms)", lambda name: name in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")),
    ("sequences", lambda name: name in ("running", "waiting")),
    ("KV cache use", lambda name: name == "kv_cache_use"),
)
#: Seconds between two polls of the follower: the readiness probe is an HTTP request.
ENDPOINT_POLL_S = 1.0


class ServedJob(Job):
    """The job behind an endpoint, seen as the endpoint: its status says whether the server answers, cancel stops it.

    Args:
        endpoint: the endpoint, on a backend that serves through a job.

    Example:
        >>> ServedJob(endpoint).status().message   # doctest: +SKIP
        'ready at http://127.0.0.1:39051/'
    """

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__(endpoint.backend, endpoint.name)
        self.endpoint = endpoint

    def status(self) -> JobStatus:
        """The endpoint's status: STARTING while the ranks load, RUNNING once rank 0 answers.

        Raises:
            JobNotFound: no endpoint of that name.
        """
        return self.endpoint.status()

    def cancel(self) -> JobStatus:
        """Stop the endpoint (its ranks drain and exit).

        Raises:
            JobNotFound: no endpoint of that name.
        """
        return self.endpoint.stop()


def ready_text(status: JobStatus | None) -> tuple[str, str]:
    """What the header says about the server, and its colour.

    Example:
        >>> ready_text(JobStatus(name="a-x1", backend="local", state=JobState.RUNNING))[0]
        'ready'
        >>> ready_text(JobStatus(name="a-x1", backend="local", state=JobState.CANCELLED))[0]
        'stopped'
    """
    if status is None:
        return "…", ""
    if status.state == JobState.RUNNING:
        return "ready", STATE_COLORS[JobState.SUCCEEDED]
    if status.state == JobState.FAILED:
        return "failed", STATE_COLORS[JobState.FAILED]
    if status.state.is_terminal():
        return "stopped", STATE_COLORS[JobState.CANCELLED]
    return "loading", STATE_COLORS[JobState.STARTING]


def url_html(url: str) -> str:
    """The URL as a link.

    Example:
        >>> url_html("http://127.0.0.1:8000/")
        '<a href="http://127.0.0.1:8000/" target="_blank"><code>http://127.0.0.1:8000/</code></a>'
    """
    escaped = html.escape(url)
    return f'<a href="{escaped}" target="_blank"><code>{escaped}</code></a>'


class EndpointPanel(JobPanel):
    """A live notebook panel for one endpoint served through a job (local, Kubernetes).

    It is a :class:`~dsnb.widgets.panel.JobPanel` of a :class:`ServedJob`, so everything
    the job panel shows (rank table, per-rank logs with filter and follow, diagnosis on
    failure) is there, and the same rules hold: the display path never calls the backend,
    and the follower thread and the panel's ticks stop when the endpoint is stopped (after one
    last read) or when the panel is closed.

    Child widgets, beyond the job panel's: ``url_label`` (HTML link, once the server has an
    address) and ``ready_label`` (``"loading"``, ``"ready"``, ``"stopped"``, ``"failed"``);
    ``cancel_button`` reads **Stop** and stops the endpoint. ``metrics_label`` lists
    requests/s, p50 ms, p99 ms, errors first; ``plot`` draws them against time.

    Args:
        endpoint: the endpoint.
        monitor: the monitor to view; a new one of the endpoint's :class:`ServedJob` if None.
        poll_interval: seconds between the follower's polls (each one probes ``/readyz`` once).
        **options: the other :class:`~dsnb.widgets.panel.JobPanel` options (``max_log_lines``,
            ``plot_interval``, ``start``, ``shared_ticker``).

    Raises:
        ClusterError: the backend serves with Ray Serve: there is no job to follow.
        ValueError: a limit below 1 or a negative interval.
        BackendUnavailable: ipywidgets is missing (raised when this module is imported).

    Example:
        >>> panel = EndpointPanel(endpoint)     # doctest: +SKIP
        >>> panel                               # in a notebook: the live panel  # doctest: +SKIP
        >>> panel.close()                       # stops following; the endpoint keeps serving  # doctest: +SKIP
    """

    kind = "endpoint"
    stop_label = "Stop"
    stop_tooltip = "Stop the server and all its ranks"
    plot_groups = SERVING_PLOTS
    plot_x = "time"
    metric_labels = SERVING_METRICS
    step_word = "window"

    def __init__(self, endpoint: Endpoint, monitor: JobMonitor | None = None, *,
                 poll_interval: float = ENDPOINT_POLL_S, **options: Any) -> None:
        endpoint._job("logs and metrics")  # a ClusterError on Ray Serve, before any widget is made
        self.endpoint = endpoint
        #: The server's URL, once read (on the follower thread).
        self.url: str | None = None
        job = ServedJob(endpoint)
        super().__init__(job, monitor if monitor is not None else JobMonitor(job), poll_interval=poll_interval, **options)

    def _build(self) -> None:
        super()._build()
        w = widgets
        self.name_label.value = f"<b>endpoint {html.escape(self.job.name)}</b>"
        self.ready_label = w.Label("…", style={"font_weight": "bold"})
        self.url_label = w.HTML("")
        self.ready_label.add_class("dsnb-ready")
        self.url_label.add_class("dsnb-url")
        _hide(self.url_label, True)
        self.header.children = (self.name_label, self.backend_label, self.state_label, self.ready_label,
                                self.url_label, *self.header.children[3:])
        self.widget.add_class("dsnb-endpoint-panel")

    def _all_widgets(self) -> Iterable[widgets.Widget]:
        return (self.ready_label, self.url_label, *super()._all_widgets())

    def _on_update(self, update: MonitorUpdate) -> None:
        # On the follower thread: the address is read once the server wrote it, never on a display path.
        if self.url is None and update.status is not None and not update.status.state.is_terminal():
            try:
                self.url = self.endpoint.url
            except Exception:
                pass  # still loading: no address yet
        super()._on_update(update)

    def _render_header(self, snapshot: MonitorSnapshot) -> None:
        super()._render_header(snapshot)
        text, color = ready_text(snapshot.status)
        self.ready_label.value = text
        if color:
            self.ready_label.style.text_color = color
        if self.url is not None and not self.url_label.value:
            self.url_label.value = url_html(self.url)
            _hide(self.url_label, False)

    def _extra_html(self) -> list[str]:
        text, color = ready_text(self.monitor.status)
        url = f" at {url_html(self.url)}" if self.url else ""
        return [f'<div><b style="color:{color}">{html.escape(text)}</b>{url}</div>']

    def to_text(self) -> str:
        """A plain-text summary: name, backend, state, elapsed, world size, readiness and URL.

        Example:
            >>> print(panel.to_text())  # doctest: +SKIP
            dsnb endpoint tiny-gpt-x1y2 on local: RUNNING, elapsed 12 s, world size 1
            ready at http://127.0.0.1:39051/
        """
        text = super().to_text()
        if self.url and self.url not in text:
            text += f"\nURL {self.url}"
        return text

    def __repr__(self) -> str:
        status = self.monitor.status
        state = status.state.value if status is not None else "unknown"
        return f"EndpointPanel(endpoint={self.job.name!r}, state={state}{', closed' if self.closed else ''})"
