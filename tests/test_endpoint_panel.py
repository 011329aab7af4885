"""An endpoint's logs, metrics and notebook panel: over a scripted serving job (asserting on widget
values), over a real local server, and the Ray Serve case, which has no job to read."""

from __future__ import annotations

import doctest
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import followed, wait_until
from scripted import ScriptedBackend

from dsnb.backends.base import LogChunk
from dsnb.errors import ClusterError, JobNotFound
from dsnb.monitor import JobMonitor
from dsnb.serving import ServeSpec
from dsnb.serving.endpoint import Endpoint
from dsnb.serving.job_serving import EndpointsAsJobs, JobEndpoints, ServiceExposure
from dsnb.status import JobState, JobStatus, LogLine, MetricSample
from dsnb.widgets import endpoint_panel
from dsnb.widgets.display import PANEL_ATTR, display_endpoint, endpoint_panel_for
from dsnb.widgets.endpoint_panel import SERVING_PLOTS, EndpointPanel, ServedJob
from dsnb.widgets.plots import JOB_PLOTS, plot_png

PNG = b"\x89PNG\r\n\x1a\n"
URL = "http://127.0.0.1:39051/"
SERVING_CODE = Path(__file__).parent / "serving_code"
NAME = "tiny-abcd"


class ScriptedExposure(ServiceExposure):
    """Where the scripted server answers and whether it is ready: what the backend's test double says."""

    def __init__(self, backend: ScriptedServing) -> None:
        self.backend = backend

    def endpoint_url(self, name: str) -> str:
        return self.backend.endpoint_url(name)

    def server_ready(self, name: str, status: Any) -> tuple[bool, str]:
        return self.backend.server_ready(name, status)


class ScriptedServing(EndpointsAsJobs, ScriptedBackend):
    """A serving job whose readiness, lines and samples a test sets by hand."""

    def __init__(self) -> None:
        super().__init__(status=JobStatus(name=NAME, backend=self.name, state=JobState.RUNNING,
                                          started_at=100.0, created_at=99.0))
        self.ready = False
        self.job_endpoints = JobEndpoints(self, ScriptedExposure(self))  # type: ignore[arg-type]

    def spec_of(self, name: str) -> Any:
        if name != NAME:
            raise JobNotFound(name, self.name)
        return ServeSpec(name="tiny", model="models:build", procs_per_node=2).to_job_spec()

    def jobs(self) -> list[JobStatus]:
        return [self.current]

    def endpoint_url(self, name: str) -> str:
        if not self.ready:
            raise ClusterError(f"endpoint {name!r}", "has no address yet", "wait")
        return URL

    def server_ready(self, name: str, status: Any) -> tuple[bool, str]:
        return (True, f"ready at {URL}") if self.ready else (False, "loading the model")

    def read_logs(self, name: str, cursor: Any = None, rank: int | None = None) -> LogChunk:
        lines = [line for line in self.lines if rank is None or line.rank == rank]
        start = cursor or 0
        return LogChunk(lines=lines[start:], cursor=len(lines))

    def read_log_tail(self, name: str, count: int, rank: int | None = None) -> LogChunk:
        lines = [line for line in self.lines if rank is None or line.rank == rank]
        return LogChunk(lines=lines[-count:], cursor=len(lines))

    def cancel(self, name: str) -> JobStatus:
        self.finish(JobState.CANCELLED)
        return self.current

    def serve_traffic(self, windows: int = 3) -> None:
        """What a ready rank 0 writes: its address, readiness, and a metric line per 5 s window."""
        self.lines += [LogLine(0, f"dsnb.serving: rank 0 of 2 listening at {URL}", 100.5),
                       LogLine(1, "dsnb.serving: rank 1 of 2 loaded", 100.6),
                       LogLine(0, f'DSNB_SERVE {{"ready": true, "url": "{URL}"}}', 101.0)]
        for w in range(1, windows + 1):
            values = {"requests_per_s": 10.0 * w, "p50_ms": 5.0 + w, "p99_ms": 20.0 + w, "errors": w - 1.0,
                      "queue": 0.0, "batch_items": 2.0}
            self.samples += [MetricSample(w, name, value, 0, 101.0 + 5 * w) for name, value in values.items()]
            self.lines.append(LogLine(0, "DSNB_METRIC {...}", 101.0 + 5 * w))


@pytest.fixture
def served() -> tuple[ScriptedServing, Endpoint]:
    backend = ScriptedServing()
    return backend, Endpoint(backend, NAME)  # type: ignore[arg-type]


def test_the_docstring_examples_hold() -> None:
    result = doctest.testmod(endpoint_panel)
    assert result.attempted > 0 and result.failed == 0


# -- logs and metrics ----------------------------------------------------------------------------
def test_logs_and_metrics_are_the_serving_jobs(served):
    backend, endpoint = served
    backend.serve_traffic()
    assert [(s.step, s.value) for s in endpoint.metrics("p99_ms")] == [(1, 21.0), (2, 22.0), (3, 23.0)]
    assert len(endpoint.metrics(rank=0)) == 18 and endpoint.metrics(rank=1) == []
    assert [line.text for line in endpoint.logs(rank=1)] == ["dsnb.serving: rank 1 of 2 loaded"]
    assert [line.text for line in endpoint.logs(tail=2)] == ["DSNB_METRIC {...}"] * 2
    assert len(list(endpoint.logs())) == 6


def test_ray_serve_endpoints_say_where_their_logs_and_metrics_are():
    pytest.importorskip("ray")
    from dsnb.backends.ray.backend import RayBackend

    remote = Endpoint(RayBackend(address="http://ray-head.invalid:8265"), NAME)
    for read in (remote.logs, remote.metrics, remote.panel):
        with pytest.raises(ClusterError) as error:
            read()
        message = str(error.value)
        assert message.startswith(f"endpoint '{NAME}' on backend 'ray': is served by Ray Serve")
        assert "Fix: open the Ray dashboard at http://ray-head.invalid:8265, Serve tab" in message
        assert "/tmp/ray/session_latest/logs/serve/" in message
    assert "read its logs" in str(pytest.raises(ClusterError, remote.logs).value)
    assert "read its metrics" in str(pytest.raises(ClusterError, remote.metrics).value)
    private = Endpoint(RayBackend(), NAME)  # no head is started to say where
    assert "cluster.backend.dashboard_url" in str(pytest.raises(ClusterError, private.logs).value)
    assert not remote.served_as_job


# -- the panel over a scripted serving job -------------------------------------------------------
def test_panel_shows_readiness_url_serving_metrics_and_logs_then_stops(served):
    backend, endpoint = served
    panel = EndpointPanel(endpoint, poll_interval=0.05, plot_interval=0)
    try:
        wait_until(lambda: panel.state_label.value == "STARTING")
        assert panel.ready_label.value == "loading" and panel.url_label.layout.display == "none"
        assert panel.message_label.value == "loading the model"
        assert panel.name_label.value == f"<b>endpoint {NAME}</b>" and panel.backend_label.value == "on scripted"
        assert panel.world_size_label.value == "world size 2"
        assert panel.cancel_button.description == "Stop" and not panel.cancel_button.disabled

        backend.ready = True
        backend.serve_traffic()
        wait_until(lambda: panel.ready_label.value == "ready" and panel.plot_renders >= 1 and "window 3" in panel.metrics_label.value)
        assert panel.state_label.value == "RUNNING" and panel.message_label.value == f"ready at {URL}"
        assert panel.url_label.value == f'<a href="{URL}" target="_blank"><code>{URL}</code></a>'
        assert panel.url_label.layout.display is None
        # The figures of the last window, by name, whatever the markup around them.
        shown = dict(re.findall(r"<b>([^<]+)</b>\s*([0-9.]+)", panel.metrics_label.value))
        assert shown == {"requests/s": "30", "p50 ms": "8", "p99 ms": "23", "errors": "2", "queue": "0", "batch items": "2"}
        assert re.sub(r"<[^>]+>", "", panel.metrics_label.value).startswith("window 3: ")
        assert panel.plot.value[:8] == PNG and panel.plot.layout.display is None
        assert panel.log_text.splitlines() == [
            f"[rank 0] dsnb.serving: rank 0 of 2 listening at {URL}", "[rank 1] dsnb.serving: rank 1 of 2 loaded",
            f'[rank 0] DSNB_SERVE {{"ready": true, "url": "{URL}"}}']  # metric lines are numbers and plots
        assert panel.to_text().startswith(f"dsnb endpoint {NAME} on scripted: RUNNING, elapsed ")
        assert panel.to_text().endswith(f"ready at {URL}")
        page = panel.to_html()
        assert f"<b>dsnb endpoint</b> <code>{NAME}</code>" in page and f'href="{URL}"' in page
        assert ">ready</b>" in page and "requests/s" in page and "data:image/png;base64," in page

        panel.cancel_button.click()  # Stop: the endpoint is stopped on another thread
        panel.cancel_thread.join(10)
        followed(panel, ended="the endpoint stopped")
        assert backend.current.state == JobState.CANCELLED
        assert panel.state_label.value == "CANCELLED" and panel.ready_label.value == "stopped"
        assert panel.cancel_button.disabled and panel.cancel_button.description == "Stop"
    finally:
        panel.close()


def test_close_stops_following_and_leaves_the_endpoint_serving(served):
    backend, endpoint = served
    backend.ready = True
    panel = EndpointPanel(endpoint, poll_interval=0.05)
    wait_until(lambda: panel.ready_label.value == "ready")
    panel.close()
    assert not panel.monitor.thread.is_alive() and not panel.ticker.is_alive()
    assert panel.widget.comm is None and panel.url_label.comm is None and panel.ready_label.comm is None
    assert backend.current.state == JobState.RUNNING
    assert set(panel._repr_mimebundle_()) == {"text/plain", "text/html"}
    assert repr(panel) == f"EndpointPanel(endpoint='{NAME}', state=RUNNING, closed)"


def test_serving_metrics_are_plotted_against_time_on_a_fake_clock(served):
    backend, endpoint = served
    backend.ready = True
    now = [100.0]
    job = ServedJob(endpoint)
    panel = EndpointPanel(endpoint, JobMonitor(job, clock=lambda: now[0]), start=False)
    panel.monitor.poll()
    assert panel.plot_renders == 0 and panel.plot.layout.display == "none"  # no traffic: nothing to draw
    backend.serve_traffic(windows=2)
    now[0] += 2
    panel.monitor.poll()
    assert panel.plot_renders == 1 and panel.plot.value[:8] == PNG
    assert plot_png(panel.monitor, groups=SERVING_PLOTS, x="time")[:8] == PNG
    assert plot_png(panel.monitor, groups=JOB_PLOTS[:1]) is None  # no loss: a plot that selects nothing is left out
    with pytest.raises(ValueError):
        plot_png(panel.monitor, x="wall")
    assert panel.metric_order()[:4] == ["requests_per_s", "p50_ms", "p99_ms", "errors"]
    panel.close()


# -- the display paths ---------------------------------------------------------------------------
def test_displaying_an_endpoint_shows_its_cached_panel(served, shown, monkeypatch):
    backend, endpoint = served
    backend.ready = True
    callers: list[str] = []
    for method in ("status", "read_logs", "read_metrics", "spec_of", "endpoint_url", "server_ready"):
        original = getattr(backend, method)

        def recording(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            callers.append(threading.current_thread().name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(backend, method, recording)
    endpoint._ipython_display_()
    panel = getattr(endpoint, PANEL_ATTR)
    wait_until(lambda: panel.url_label.value)
    assert callers and threading.main_thread().name not in callers  # every read happens on the follower
    endpoint._ipython_display_()
    assert [obj for obj, _ in shown] == [panel, panel] and shown[0][1] == {"display_id": True}
    assert isinstance(panel, EndpointPanel) and endpoint.panel() is panel and endpoint_panel_for(endpoint) is panel
    panel.close()
    assert endpoint.panel() is not panel  # a closed panel is replaced
    endpoint.panel().close()


def test_display_falls_back_to_html_without_ipywidgets(served, shown, monkeypatch):
    backend, endpoint = served
    backend.ready = True
    backend.serve_traffic()
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # `import ipywidgets` now fails
    assert display_endpoint(endpoint) is None
    ((bundle, kwargs),) = shown
    assert kwargs == {"raw": True} and bundle["text/plain"] == repr(endpoint)
    page = bundle["text/html"]
    assert f"<code>{NAME}</code>" in page and "<b>RUNNING</b>" in page and f"<code>{URL}</code>" in page
    assert "window 3: <b>requests/s</b> 30  <b>p50 ms</b> 8  <b>p99 ms</b> 23  <b>errors</b> 2" in page
    assert "[rank 1] dsnb.serving: rank 1 of 2 loaded" in page and "DSNB_METRIC" not in page
    assert getattr(endpoint, PANEL_ATTR, None) is None


def test_ray_serve_endpoint_displays_a_summary_naming_the_dashboard(shown):
    class RayLike:
        name = "ray"
        address = "http://ray-head.invalid:8265"

        def endpoint_status(self, name: str) -> JobStatus:
            return JobStatus(name=name, backend=self.name, state=JobState.RUNNING, message="1 replica running")

        def endpoint_url(self, name: str) -> str:
            return f"http://ray-head.invalid:8000/{name}"

    endpoint = Endpoint(RayLike(), NAME)  # type: ignore[arg-type]
    assert display_endpoint(endpoint) is None
    page = shown[0][0]["text/html"]
    assert "<b>RUNNING</b>" in page and f"http://ray-head.invalid:8000/{NAME}" in page
    assert "logs and metrics: open the Ray dashboard at http://ray-head.invalid:8265, Serve tab" in page


def test_static_summary_shows_a_status_error_instead_of_raising(served, shown, monkeypatch):
    _, endpoint = served
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    display_endpoint(Endpoint(endpoint.backend, "no-such-endpoint"))
    assert "status unavailable" in shown[0][0]["text/html"]


# -- a real server on this machine ---------------------------------------------------------------
@pytest.mark.deepspeed
def test_panel_logs_and_metrics_of_a_local_server(cluster, shown):
    endpoint = cluster.serve(ServeSpec(name="mlp", model="tiny_models:tiny_mlp", working_dir=str(SERVING_CODE)), wait=120)
    try:
        panel = endpoint.panel(poll_interval=0.2)
        wait_until(lambda: panel.ready_label.value == "ready" and panel.url_label.value, timeout=30)
        assert endpoint.url in panel.url_label.value

        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                endpoint.predict({"inputs": [[0.0, 1.0, 2.0, 3.0]]})
                time.sleep(0.02)

        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        try:
            samples = wait_until(lambda: endpoint.metrics("requests_per_s"), timeout=30)  # one window is 5 s
        finally:
            stop.set()
            sender.join(10)
        assert samples[0].rank == 0 and samples[0].value > 0
        assert {s.name for s in endpoint.metrics()} >= {"requests_per_s", "p50_ms", "p99_ms", "errors"}
        assert any(line.text.startswith("DSNB_SERVE ") for line in endpoint.logs(rank=0))
        assert len(list(endpoint.logs(tail=2))) == 2
        wait_until(lambda: "<b>requests/s</b>" in panel.metrics_label.value and panel.plot_renders >= 1, timeout=10)
        assert "listening at" in panel.log_text

        panel.cancel_button.click()
        panel.cancel_thread.join(30)
        followed(panel, timeout=30, ended="the endpoint stopped")
        assert panel.ready_label.value == "stopped" and endpoint.status().state == JobState.CANCELLED
    finally:
        endpoint.stop()


def test_generation_plots_appear_only_for_a_server_that_generates() -> None:
    from dsnb.widgets.plots import chosen_groups

    embedding = ["requests_per_s", "p50_ms", "p99_ms", "errors", "queue", "batch_items"]
    assert [title for title, _ in chosen_groups(embedding, SERVING_PLOTS)] == ["requests/s", "latency (ms)", "errors"]
    generating = embedding + ["tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms"]
    assert chosen_groups(generating, SERVING_PLOTS)[-2:] == [
        ("tokens/s", ["tokens_per_s"]), ("tokens (ms)", ["ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms"])]
