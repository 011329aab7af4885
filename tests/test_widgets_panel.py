"""The notebook views: JobPanel over real local jobs (asserting on widget values), the display
paths with and without ipywidgets, and the cluster view."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import IPython.display
import pytest
from helpers import followed, wait_until
from scripted import ScriptedBackend

from dsnb import Cluster, JobSpec
from dsnb.errors import JobNotFound
from dsnb.job import Job
from dsnb.monitor import JobMonitor
from dsnb.status import JobState, JobStatus, LogLine, MetricSample
from dsnb.widgets.cluster_view import ClusterView
from dsnb.widgets.display import PANEL_ATTR, display_cluster, display_job, panel_for
from dsnb.widgets.panel import ALL_RANKS, JobPanel

PY = sys.executable
PNG = b"\x89PNG\r\n\x1a\n"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

TRAIN = """
import os, sys, time, dsnb
rank = int(os.environ["RANK"])
steps = int(sys.argv[1])
for step in range(1, steps + 1):
    print(f"step {step} from rank {rank}", flush=True)
    dsnb.report(step=step, loss=4.0 - step / 10, tokens_per_s=1000.0 + step, total_steps=steps)
    time.sleep(0.02)
print(f"done rank {rank}", flush=True)
"""


def py_job(cluster: Cluster, code: str, *args: str, procs: int = 1, name: str = "panel") -> Job:
    return cluster.submit(JobSpec(name=name, command=[PY, "-c", code, *args], procs_per_node=procs))


def hidden(widget: Any) -> bool:
    return widget.layout.display == "none"


# -- a real two-rank job, start to end ----------------------------------------------------------
def test_panel_shows_header_ranks_logs_progress_and_plot_of_a_finished_job(cluster):
    job = py_job(cluster, TRAIN, "6", procs=2, name="tiny")
    panel = followed(JobPanel(job))
    try:
        assert panel.state_label.value == "SUCCEEDED"
        assert panel.name_label.value == f"<b>{job.name}</b>" and panel.backend_label.value == "on local"
        assert panel.world_size_label.value == "world size 2"
        assert panel.restarts_label.value == "restarts 0"
        assert panel.elapsed_label.value.startswith("elapsed ")
        assert panel.rank_rows == [("0", "SUCCEEDED", "0", ""), ("1", "SUCCEEDED", "0", "")]
        assert panel.rank_table.value.count('class="dsnb-rank"') == 2
        assert panel.cancel_button.disabled
        assert hidden(panel.diagnosis)

        lines = panel.log_text.splitlines()
        assert len(lines) == 14 and set(lines) >= {"[rank 0] step 1 from rank 0", "[rank 1] done rank 1"}
        assert "[rank 1] step 6 from rank 1" in panel.log_view.value
        assert not any("DSNB_METRIC" in line for line in lines)  # metrics are shown as numbers, not lines

        assert not hidden(panel.progress_box)
        assert (panel.progress.value, panel.progress.max) == (6, 6)
        assert panel.progress_label.value == "step 6/6  100%" and panel.progress.bar_style == "success"
        assert "<b>loss</b> 3.4" in panel.metrics_label.value and "<b>tokens_per_s</b> 1006" in panel.metrics_label.value
        assert not hidden(panel.plot) and panel.plot.value[:8] == PNG and panel.plot_renders >= 1
    finally:
        panel.close()


def test_log_selector_filter_and_follow_toggle(cluster, tmp_path: Path):
    go = tmp_path / "go"
    code = (
        "import os, time, pathlib\n"
        "r = os.environ['RANK']\n"
        "for i in range(3): print(f'before {i} from {r}', flush=True)\n"
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.02)\n"
        "for i in range(3): print(f'after {i} from {r}', flush=True)\n"
    )
    job = py_job(cluster, code, procs=2, name="logs")
    panel = JobPanel(job)
    try:
        wait_until(lambda: panel.log_text.count("before") == 6)
        assert panel.log_selector.options == (("all ranks", ALL_RANKS), ("rank 0", 0), ("rank 1", 1))

        panel.log_selector.value = 0
        assert panel.log_text.splitlines() == [f"before {i} from 0" for i in range(3)]  # no prefix, one rank
        panel.log_filter.value = "BEFORE 1"  # case-insensitive
        assert panel.log_text == "before 1 from 0" and panel.log_info.value == "1 of 3 lines match"
        panel.log_filter.value = ""
        panel.log_selector.value = ALL_RANKS

        panel.follow.value = False
        frozen = panel.log_view.value
        go.touch()
        wait_until(lambda: sum("after" in line.text for line in panel.monitor.lines()) == 6)
        time.sleep(0.3)  # a few more updates reach the panel
        assert panel.log_view.value == frozen and "after" not in panel.log_text
        assert panel.log_info.value.endswith("(paused)")
        panel.log_filter.value = "from 1"  # filtering works on the frozen lines
        assert panel.log_text.splitlines() == [f"[rank 1] before {i} from 1" for i in range(3)]
        panel.log_filter.value = ""

        panel.follow.value = True
        followed(panel)
        assert panel.log_text.count("after") == 6 and "[rank 1] after 2 from 1" in panel.log_text
        assert panel.log_selector.options[1:] == (("rank 0", 0), ("rank 1", 1))
    finally:
        panel.close()


def test_shown_lines_are_bounded(cluster):
    job = py_job(cluster, "for i in range(300): print(f'line {i}')", name="chatty")
    panel = followed(JobPanel(job, max_log_lines=50))
    try:
        lines = panel.log_text.splitlines()
        assert len(lines) == 50 and lines[-1] == "[rank 0] line 299" and lines[0] == "[rank 0] line 250"
        assert panel.log_info.value == "last 50 of 300 lines"
    finally:
        panel.close()


# -- failure and cancel --------------------------------------------------------------------------
def test_failed_job_shows_the_diagnosis(cluster):
    code = (
        "import os, sys, time\n"
        "if os.environ['RANK'] == '1':\n"
        "    import dsnb; dsnb.report(step=1, loss=9.0)\n"
        "    print('loading shard', flush=True); print('boom: shard missing', flush=True); sys.exit(3)\n"
        "time.sleep(30)\n"
    )
    job = py_job(cluster, code, procs=2, name="broken")
    panel = followed(JobPanel(job))
    try:
        assert panel.state_label.value == "FAILED"
        assert not hidden(panel.diagnosis)
        assert "rank 1 failed with exit code 3" in panel.diagnosis.value
        assert "boom: shard missing" in panel.diagnosis.value
        assert "DSNB_METRIC" not in panel.diagnosis.value  # the metric is plotted, not a "last line"
        assert [row[:3] for row in panel.rank_rows if row[0] == "1"] == [("1", "FAILED", "3")]
        assert panel.cancel_button.disabled
        assert "boom: shard missing" in panel.to_text()
    finally:
        panel.close()


def test_cancel_button_returns_at_once_and_the_job_ends_cancelled(cluster, monkeypatch):
    job = py_job(cluster, "import time; print('ready', flush=True); time.sleep(60)", name="sleepy")
    panel = JobPanel(job)
    release, cancelling = threading.Event(), threading.Event()
    original_cancel = job.backend.cancel

    def slow_cancel(name: str):  # a cancel that takes as long as the test wants
        cancelling.set()
        assert release.wait(30)
        return original_cancel(name)

    monkeypatch.setattr(job.backend, "cancel", slow_cancel)
    try:
        wait_until(lambda: "ready" in panel.log_text and panel.state_label.value == "RUNNING")
        assert not panel.cancel_button.disabled
        panel.cancel_button.click()  # returns while the cancel is still under way: it runs on another thread
        assert cancelling.wait(10) and panel.cancel_thread.is_alive()
        assert panel.cancel_button.disabled and panel.cancel_button.description == "Cancelling…"
        release.set()
        followed(panel)
        panel.cancel_thread.join(10)
        assert not panel.cancel_thread.is_alive()
        assert panel.state_label.value == "CANCELLED" and job.status().state == JobState.CANCELLED
        assert panel.cancel_button.disabled and panel.cancel() is None  # nothing left to cancel
    finally:
        release.set()
        panel.close()


def test_close_stops_following_and_leaves_the_job_running(cluster):
    job = py_job(cluster, "import time; print('up', flush=True); time.sleep(60)", name="keep")
    panel = JobPanel(job)
    wait_until(lambda: "up" in panel.log_text)
    panel.close()
    assert not panel.monitor.thread.is_alive() and not panel.ticker.is_alive()
    assert panel.widget.comm is None and panel.log_view.comm is None  # the widgets are closed
    assert not job.status().state.is_terminal()  # closing a view leaves the job alone
    assert set(panel._repr_mimebundle_()) == {"text/plain", "text/html"}  # no view of closed widgets
    job.cancel()


# -- the display paths ---------------------------------------------------------------------------
def test_display_job_is_cached_never_reads_the_backend_on_the_callers_thread(cluster, shown, monkeypatch):
    job = py_job(cluster, TRAIN, "3", name="shown")
    callers: list[str] = []
    for method in ("status", "read_logs", "read_metrics", "spec_of"):
        original = getattr(job.backend, method)

        def recording(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            callers.append(threading.current_thread().name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(job.backend, method, recording)

    job._ipython_display_()
    assert callers.count(threading.main_thread().name) == 0  # every read happens on the follower
    panel = getattr(job, PANEL_ATTR)
    job._ipython_display_()
    assert [obj for obj, _ in shown] == [panel, panel]  # the same panel both times
    assert shown[0][1] == {"display_id": True}
    followed(panel)
    assert callers and threading.main_thread().name not in callers

    bundle = panel._repr_mimebundle_()
    assert bundle[WIDGET_VIEW]["model_id"] == panel.widget.model_id
    assert bundle["text/plain"].startswith(f"dsnb job {job.name} on local: SUCCEEDED")
    assert "SUCCEEDED" in bundle["text/html"] and 'class="dsnb-rank"' in bundle["text/html"]
    assert "data:image/png;base64," in bundle["text/html"] and "[rank 0] step 3 from rank 0" in bundle["text/html"]

    panel.close()
    assert panel_for(job) is not panel  # a closed panel is replaced
    panel_for(job).close()


def test_display_handles_are_refreshed_with_the_final_state(cluster, monkeypatch):
    """The static HTML saved in a notebook shows how the job ended, and the listed jobs."""
    updates: list[dict[str, Any]] = []

    class Handle:
        def update(self, obj: Any) -> None:
            updates.append(obj._repr_mimebundle_())

    monkeypatch.setattr(IPython.display, "display", lambda obj, **kwargs: Handle())
    job = py_job(cluster, "import time; time.sleep(0.5); print('hi')", name="handle")
    panel = display_job(job)
    followed(panel)
    wait_until(lambda: updates)
    assert len(updates) == 1 and "SUCCEEDED" in updates[0]["text/html"] and "[rank 0] hi" in updates[0]["text/html"]
    display_job(job)  # already ended: shown as it is, nothing left to refresh
    time.sleep(0.2)
    assert len(updates) == 1
    panel.close()

    view = display_cluster(cluster)
    view.thread.join(10)
    assert len(updates) == 2 and job.name in updates[1]["text/html"]
    view.close()


def test_display_falls_back_to_html_without_ipywidgets(cluster, shown, monkeypatch):
    job = py_job(cluster, "print('hi')", name="plain")
    job.wait(timeout=30)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # `import ipywidgets` now fails
    assert display_job(job) is None
    assert display_cluster(cluster) is None
    (job_bundle, job_kwargs), (cluster_bundle, _) = shown
    assert job_kwargs == {"raw": True}
    assert job.name in job_bundle["text/html"] and "SUCCEEDED" in job_bundle["text/html"]
    assert job_bundle["text/plain"] == repr(job)
    assert cluster_bundle["text/html"].count('class="dsnb-job"') == 1 and job.name in cluster_bundle["text/html"]
    assert job.name in cluster_bundle["text/plain"]
    assert getattr(job, PANEL_ATTR, None) is None  # no panel was made


def test_static_fallback_shows_a_status_error_instead_of_raising(cluster, shown, monkeypatch):
    job = py_job(cluster, "print('hi')", name="gone")
    job.wait(timeout=30)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    ghost = Job(job.backend, "no-such-job")
    display_job(ghost)
    assert "status unavailable" in shown[0][0]["text/html"] and "no-such-job" in shown[0][0]["text/html"]


# -- the cluster view ----------------------------------------------------------------------------
def test_cluster_view_lists_jobs_and_opens_a_panel(cluster, shown):
    job = py_job(cluster, TRAIN, "2", name="listed")
    job.wait(timeout=30)
    view = display_cluster(cluster)
    try:
        assert isinstance(view, ClusterView) and shown[0][0] is view
        view.thread.join(10)
        assert view.jobs_table.value.count('class="dsnb-job"') == 1 and job.name in view.jobs_table.value
        assert view.job_selector.options == ((f"{job.name} (SUCCEEDED)", job.name),)
        assert view.status_label.value.startswith("1 job,")

        assert view.job_selector.value == job.name  # the newest job is chosen, so Open works at once
        view.open_button.click()
        view.thread.join(10)
        panel = view.panel
        assert isinstance(panel, JobPanel) and panel.job.name == job.name
        assert view.panel_box.children == (panel.widget,)
        followed(panel)
        assert panel.state_label.value == "SUCCEEDED" and "[rank 0] step 2 from rank 0" in panel.log_text
        assert view.open(job.name) is panel  # opened again: the same panel

        second = py_job(cluster, "print('x')", name="second")
        assert display_cluster(cluster) is view  # cached, and refreshed
        view.thread.join(10)
        assert view.jobs_table.value.count('class="dsnb-job"') == 2 and second.name in view.jobs_table.value
        assert view.job_selector.value == job.name  # the selection survives a refresh
        bundle = view._repr_mimebundle_()
        assert WIDGET_VIEW in bundle and second.name in bundle["text/html"]
        second.wait(timeout=30)

        view.open_async("no-such-job").join(10)
        assert view.status_label.value.startswith("open failed: JobNotFound")
    finally:
        view.close()
    assert panel.closed


# -- rate limit and elapsed time on a fake clock --------------------------------------------------
def test_plot_rate_limit_elapsed_and_world_size_on_a_fake_clock():
    backend = ScriptedBackend()
    now = [100.0]
    job = Job(backend, "fake-abcd")  # type: ignore[arg-type]
    panel = JobPanel(job, JobMonitor(job, clock=lambda: now[0]), start=False)
    renders = []
    for step in range(1, 8):  # a sample every 0.25 s
        backend.samples.append(MetricSample(step, "loss", 5.0 - step, 0, now[0]))
        panel.monitor.poll()
        renders.append(panel.plot_renders)
        now[0] += 0.25
    assert renders == [1, 1, 1, 1, 2, 2, 2]  # at most once a second
    assert panel.elapsed_label.value == "elapsed 1.5 s"
    assert panel.world_size_label.value == "world size 8"  # from the spec, not from the replicas
    backend.current = replace(backend.current, state=JobState.SUCCEEDED, finished_at=103.0)
    panel.monitor.poll()
    assert panel.plot_renders == 3  # the final state is always drawn
    assert panel.state_label.value == "SUCCEEDED" and panel.elapsed_label.value == "elapsed 3.0 s"
    assert panel.plot.value[:8] == PNG
    panel.close()


def test_panel_over_a_monitor_that_already_finished():
    backend = ScriptedBackend()
    backend.lines = [LogLine(0, "only line", 100.5)]
    backend.current = replace(backend.current, state=JobState.SUCCEEDED, finished_at=101.0)
    job = Job(backend, "fake-abcd")  # type: ignore[arg-type]
    monitor = JobMonitor(job, clock=lambda: 200.0)
    monitor.poll()
    assert monitor.done
    panel = JobPanel(job, monitor)  # no update will come: it renders what the monitor holds
    assert panel.state_label.value == "SUCCEEDED" and panel.log_text == "[rank 0] only line"
    assert panel.ticker is None and panel.cancel_button.disabled
    panel.close()


def test_invalid_limits():
    backend = ScriptedBackend()
    job = Job(backend, "fake-abcd")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        JobPanel(job, max_log_lines=0, start=False)
    with pytest.raises(ValueError):
        JobPanel(job, poll_interval=0, start=False)



def test_monitor_error_is_shown_and_following_stops():
    backend = ScriptedBackend()
    job = Job(backend, "fake-abcd")  # type: ignore[arg-type]
    panel = JobPanel(job, poll_interval=0.05)
    wait_until(lambda: panel.state_label.value == "RUNNING")

    def gone(name: str) -> JobStatus:
        raise JobNotFound(name, "scripted")

    backend.status = gone  # type: ignore[method-assign]
    followed(panel, timeout=10)
    assert panel.message_label.value.startswith("monitor stopped: JobNotFound: job 'fake-abcd' not found")
    panel.close()


def test_the_panel_shows_the_stuck_and_slow_ranks_and_the_time_left() -> None:
    backend = ScriptedBackend()
    for step in range(0, 100):  # rank 0 steps each second to t = 199; rank 1 stopped at t = 140
        backend.samples.append(MetricSample(step, "loss", 1.0, 0, 100.0 + step))
        if step <= 40:
            backend.samples.append(MetricSample(step, "loss", 1.0, 1, 100.0 + step))
    backend.samples.append(MetricSample(99, "total_steps", 400.0, 0, 199.0))
    job = Job(backend, "fake-abcd")  # type: ignore[arg-type]
    panel = JobPanel(job, JobMonitor(job, clock=lambda: 210.0), start=False)
    panel.monitor.poll()
    assert not hidden(panel.stragglers)
    assert "⚠ rank 1 has written nothing for 70 s while the others progressed" in panel.stragglers.value
    assert "⚠ rank 1 is 59 steps behind" in panel.stragglers.value
    assert panel.progress_label.value == "step 99/400  25%  about 5m 01s left"
    backend.current = replace(backend.current, state=JobState.SUCCEEDED, finished_at=211.0)
    panel.monitor.poll()
    assert hidden(panel.stragglers) and panel.stragglers.value == ""
    panel.close()


def test_the_panel_plots_each_ranks_cpu_and_memory_apart_from_the_loss() -> None:
    pytest.importorskip("matplotlib")
    backend = ScriptedBackend()
    for second in range(6):
        for rank in (0, 1):
            backend.samples.append(MetricSample(0, "cpu_percent", 95.0 + rank, rank, 100.0 + 2 * second))
            backend.samples.append(MetricSample(0, "rss_mib", 500.0 * (rank + 1), rank, 100.0 + 2 * second))
    job = Job(backend, "fake-abcd")  # type: ignore[arg-type]
    panel = JobPanel(job, JobMonitor(job, clock=lambda: 120.0), start=False)
    panel.monitor.poll()
    panel._render_all()
    assert not hidden(panel.usage_plot) and panel.usage_plot.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert hidden(panel.plot)  # no loss or throughput yet: the job's plot stays hidden
    assert panel.monitor.progress is None  # usage samples are no step of the job
    assert panel.to_html().count("data:image/png") == 1  # a saved notebook keeps the usage plot
    drawn, renders = panel.usage_plot.value, panel.plot_renders
    backend.samples.append(MetricSample(0, "cpu_percent", 50.0, 0, 112.0))
    panel.monitor.poll()  # a usage sample within 5 s of the last drawing: neither plot is drawn again
    assert (panel.usage_plot.value, panel.plot_renders) == (drawn, renders)
    panel.close()
