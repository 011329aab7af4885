"""The :class:`Endpoint` handle: a served model's URL, predictions, status, logs, metrics and stop.

Like :class:`~dsnb.job.Job`, an Endpoint holds only a backend and a name, so
``cluster.endpoint(name)`` in a new kernel gives an equal handle. On the job backends (local,
Kubernetes) a served model is an always-on job, so its logs and metrics (request rate, p50/p99
latency, errors, every 5 s with traffic) are read like a job's; Ray Serve keeps them in Ray.

Example:
    >>> from dsnb import Cluster
    >>> from dsnb.serving import ServeSpec
    >>> endpoint = Cluster("ray").serve(ServeSpec(name="tiny", model="models:build"))   # doctest: +SKIP
    >>> endpoint.predict({"inputs": [[0.0, 1.0, 2.0, 3.0]]})                           # doctest: +SKIP
    {'outputs': [[0.12, -0.4]]}
    >>> endpoint.stop().state.value                                                    # doctest: +SKIP
    'CANCELLED'
"""

from __future__ import annotations

import html
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dsnb.errors import ClusterError, JobFailed, WaitTimeout
from dsnb.metrics import is_metric_line
from dsnb.status import JobState, JobStatus, LogLine, MetricSample

if TYPE_CHECKING:
    from dsnb.backends.base import Backend
    from dsnb.job import Job
    from dsnb.widgets.endpoint_panel import EndpointPanel

#: The metrics a server reports every few seconds with traffic, and how views name them.
SERVING_METRICS = {"requests_per_s": "requests/s", "p50_ms": "p50 ms", "p99_ms": "p99 ms", "errors": "errors",
                   "queue": "queue", "batch_items": "batch items", "tokens_per_s": "tokens/s",
                   "ttft_p50_ms": "first token p50 ms", "ttft_p99_ms": "first token p99 ms",
                   "itl_p50_ms": "between tokens p50 ms", "itl_p99_ms": "between tokens p99 ms",
                   "running": "running sequences", "waiting": "waiting sequences", "kv_cache_use": "KV cache use"}
#: Log lines in the static summary of an endpoint.
STATIC_LOG_LINES = 5
# Two threads displaying one handle at once still make one panel (and one follower thread).
_PANEL_LOCK = threading.Lock()


class _NoCredentialsOnRedirect(urllib.request.HTTPRedirectHandler):
    """Follow a redirect without the endpoint's token: it was given for this endpoint, not for wherever
    a redirect points (urllib's own handler copies ``Authorization`` to the new request)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            for key in [k for k in new.headers if k.lower() == "authorization"]:
                del new.headers[key]
            new.unredirected_hdrs.pop("Authorization", None)
        return new


_OPENER = urllib.request.build_opener(_NoCredentialsOnRedirect)


class Endpoint:
    """A handle on one served model of one backend.

    Args:
        backend: the backend that serves it.
        name: the endpoint's unique name.
    """

    def __init__(self, backend: Backend, name: str) -> None:
        self.backend = backend
        self.name = name
        self._panel: EndpointPanel | None = None

    @property
    def token(self) -> str | None:
        """The bearer token the server asks for (what an OpenAI client takes as ``api_key``), or None.

        ``predict`` sends it by itself; no repr or panel shows it.

        Example:
            >>> client = openai.OpenAI(base_url=endpoint.url + "v1", api_key=endpoint.token)  # doctest: +SKIP
        """
        header = self.backend.endpoint_headers(self.name).get("Authorization", "")
        return header.removeprefix("Bearer ") or None

    @property
    def url(self) -> str:
        """Where to send requests (``POST`` JSON ``{"inputs": ...}``)."""
        return self.backend.endpoint_url(self.name)

    def status(self) -> JobStatus:
        """RUNNING once every replica answers; STARTING while they load; FAILED, CANCELLED.

        Raises:
            JobNotFound: no endpoint of that name.
        """
        return self.backend.endpoint_status(self.name)

    def wait(self, timeout: float | None = 600, poll: float = 0.5) -> JobStatus:
        """Block until the endpoint answers (RUNNING).

        Raises:
            JobFailed: the deployment failed (the message says why, e.g. the loader's error).
            WaitTimeout: it was not ready within ``timeout`` seconds; it keeps starting.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            if status.state == JobState.RUNNING:
                return status
            if status.state == JobState.FAILED:
                raise JobFailed(status)
            if status.state.is_terminal():
                raise ClusterError(f"endpoint {self.name!r}", f"is {status.state.value}", "deploy it again with cluster.serve(spec)")
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(self.name, timeout or 0.0, status.state.value)
            time.sleep(poll)

    def predict(self, payload: Any, timeout: float = 60.0) -> Any:
        """Send one request and return the decoded JSON answer.

        Args:
            payload: a JSON-ready body, e.g. ``{"inputs": [[1.0, 2.0]]}``.
            timeout: seconds to wait for the answer.

        Raises:
            ClusterError: the endpoint answered an HTTP error (status and reason in the
                message) or could not be reached.

        Example:
            >>> endpoint.predict({"inputs": ["a sentence to embed"]})   # doctest: +SKIP
        """
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", **self.backend.endpoint_headers(self.name)}
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise ClusterError(f"endpoint {self.name!r}", f"answered HTTP {e.code}: {detail}",
                               "check the request body" if 400 <= e.code < 500 else "see endpoint.status() and the replicas' logs") from e
        except OSError as e:
            raise ClusterError(f"endpoint {self.name!r}", f"cannot be reached at {self.url} ({e})",
                               "wait until endpoint.status() is RUNNING (endpoint.wait())") from e

    @property
    def served_as_job(self) -> bool:
        """Whether a dsnb job runs the server (local, Kubernetes), so that its logs and metrics can be read."""
        from dsnb.serving.job_serving import EndpointsAsJobs

        return isinstance(self.backend, EndpointsAsJobs)  # the Ray backends serve with Ray Serve instead

    def _job(self, wanted: str) -> Job:
        """The job that runs the server.

        Raises:
            ClusterError: the backend serves without a dsnb job (Ray Serve); the message says where ``wanted`` is.
        """
        if not self.served_as_job:
            raise ClusterError(f"endpoint {self.name!r} on backend {self.backend.name!r}",
                               f"is served by Ray Serve, which runs no dsnb job behind it, so dsnb cannot read its {wanted}",
                               _ray_logs_fix(self.backend))
        from dsnb.job import Job

        return Job(self.backend, self.name)

    def logs(self, rank: int | None = None, follow: bool = False, tail: int | None = None) -> Iterator[LogLine]:
        """The server ranks' log lines, as :meth:`Job.logs <dsnb.job.Job.logs>` reads them.

        Rank 0 writes the ``DSNB_SERVE`` readiness lines and, with traffic, a ``DSNB_METRIC``
        line every 5 s; every rank writes the loader's output and errors.

        Args:
            rank: only this rank; None for all (merged by time).
            follow: keep yielding new lines until the endpoint is stopped.
            tail: start with only the last ``tail`` lines written so far.

        Raises:
            ClusterError: the backend serves with Ray Serve (its logs are in Ray; the message says where).
            JobNotFound: no endpoint of that name (raised when the lines are first read).

        Example:
            >>> for line in endpoint.logs(tail=5):   # doctest: +SKIP
            ...     print(line)
            [rank 0] DSNB_SERVE {"ready": true, "url": "http://127.0.0.1:39051/", ...}
        """
        return self._job("logs").logs(rank=rank, follow=follow, tail=tail)

    def metrics(self, name: str | None = None, rank: int | None = None) -> list[MetricSample]:
        """The server's metric samples so far, as :meth:`Job.metrics <dsnb.job.Job.metrics>` reads them.

        Every 5 s with traffic rank 0 reports, for the requests of those 5 s (the sample's
        ``step`` counts the windows): ``requests_per_s``, ``p50_ms`` and ``p99_ms`` (latency),
        ``errors`` (5xx and 429 answers), ``queue`` (requests waiting) and ``batch_items``
        (mean texts or rows per model batch). A loader may ``dsnb.report`` more.

        Args:
            name: only this metric, e.g. ``"p99_ms"``.
            rank: only this rank.

        Raises:
            ClusterError: the backend serves with Ray Serve (its metrics are Ray's; the message says where).
            JobNotFound: no endpoint of that name.

        Example:
            >>> [(s.step, s.value) for s in endpoint.metrics("p99_ms")]   # doctest: +SKIP
            [(1, 41.3), (2, 12.8)]
        """
        return self._job("metrics").metrics(name=name, rank=rank)

    def panel(self, **options: Any) -> EndpointPanel:
        """The endpoint's live notebook panel (made once, reused until closed); displaying the endpoint shows it.

        It shows the state, whether the server answers, its URL, plots of requests/s, p50/p99
        latency and errors, the rank table and the ranks' logs, and a Stop button.

        Args:
            **options: passed to :class:`~dsnb.widgets.endpoint_panel.EndpointPanel` when a new panel is made.

        Raises:
            ClusterError: the backend serves with Ray Serve (no job to follow; see the Ray dashboard).
            BackendUnavailable: ipywidgets is not installed (``pip install 'dsnb[notebook]'``).

        Example:
            >>> panel = endpoint.panel()     # doctest: +SKIP
            >>> panel.url_label.value        # doctest: +SKIP
            '<a href="http://127.0.0.1:39051/" target="_blank"><code>http://127.0.0.1:39051/</code></a>'
            >>> panel.close()                # stops following; the endpoint keeps serving  # doctest: +SKIP
        """
        self._job("logs and metrics")
        from dsnb.widgets.endpoint_panel import EndpointPanel

        with _PANEL_LOCK:
            if self._panel is None or self._panel.closed:
                self._panel = EndpointPanel(self, **options)
            return self._panel

    def stop(self) -> JobStatus:
        """Remove the served application and its replicas; safe to call again.

        Raises:
            JobNotFound: no endpoint of that name.
        """
        return self.backend.stop_endpoint(self.name)

    def __repr__(self) -> str:
        return f"Endpoint(name={self.name!r}, backend={self.backend.name!r})"

    def _ipython_display_(self) -> None:
        """Show a live panel in a notebook (a static summary without ipywidgets, or on Ray Serve)."""
        from dsnb.widgets.display import display_endpoint

        display_endpoint(self)

    def _repr_html_(self) -> str:
        status = self.status()
        try:
            url = f" at <code>{html.escape(self.url)}</code>"
        except Exception:  # a server still loading has no address yet
            url = ""
        parts = [f"<b>dsnb endpoint</b> <code>{html.escape(self.name)}</code> on <i>{html.escape(self.backend.name)}</i>: "
                 f"<b>{status.state.value}</b>{url}<br>{html.escape(status.message)}"]
        if not self.served_as_job:
            parts.append(f"<br><i>logs and metrics: {html.escape(_ray_logs_fix(self.backend))}</i>")
            return "".join(parts)
        try:
            latest: dict[str, MetricSample] = {}
            for sample in self.metrics(rank=0):
                latest[sample.name] = sample
            lines = [str(line) for line in self.logs(tail=10 * STATIC_LOG_LINES) if not is_metric_line(line.text)]
        except Exception as e:  # a summary shows the problem rather than raising it
            parts.append(f"<br><i>logs and metrics unavailable ({html.escape(str(e))})</i>")
            return "".join(parts)
        if latest:
            window = max(s.step for s in latest.values())
            names = [n for n in SERVING_METRICS if n in latest] + [n for n in latest if n not in SERVING_METRICS]
            values = "  ".join(f"<b>{html.escape(SERVING_METRICS.get(n, n))}</b> {latest[n].value:g}" for n in names)
            parts.append(f'<div style="font-size:12px">window {window}: {values}</div>')
        if lines:
            text = html.escape("\n".join(lines[-STATIC_LOG_LINES:]), quote=False)
            parts.append(f'<pre style="font-size:12px">{text}</pre>')
        return "".join(parts)


def _ray_logs_fix(backend: Backend) -> str:
    """Where Ray Serve keeps an application's logs and metrics, for the backend's cluster."""
    address = getattr(backend, "address", None)
    namespace = getattr(backend, "namespace", None)
    if address:
        dashboard = f"the Ray dashboard at {address}"
    elif namespace:
        dashboard = f"the RayService's dashboard (kubectl -n {namespace} port-forward to its head service, port 8265)"
    else:
        dashboard = "the private head's Ray dashboard (its address is cluster.backend.dashboard_url)"
    return (f"open {dashboard}, Serve tab: each replica's logs, with request counts and latencies as Ray Serve's "
            "ray_serve_* metrics; on the head, `serve status` lists the replicas and their log files are under "
            "/tmp/ray/session_latest/logs/serve/")
