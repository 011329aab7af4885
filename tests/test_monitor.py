"""JobMonitor: bounded buffers, metric series and progress, complete final reads, the
follower thread and the subscriber rate limit, on a scripted backend and on real local jobs."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from dataclasses import replace

import pytest
from scripted import ScriptedBackend

from dsnb import Cluster, JobSpec
from dsnb.errors import JobNotFound
from dsnb.job import Job
from dsnb.monitor import MAX_CHUNKS_PER_POLL, JobMonitor, MonitorSnapshot, MonitorUpdate, Progress
from dsnb.status import JobState, LogLine, MetricSample

PY = sys.executable


class FakeClock:
    def __init__(self, start: float = 1000.0, step: float = 0.0) -> None:
        self.now = start
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.fixture
def scripted() -> tuple[ScriptedBackend, Job]:
    backend = ScriptedBackend()
    return backend, Job(backend, "job-abcd")  # type: ignore[arg-type]


def py_job(cluster: Cluster, code: str, procs: int = 1, name: str = "mon") -> Job:
    return cluster.submit(JobSpec(name=name, command=[PY, "-c", code], procs_per_node=procs))


# -- scripted backend: exact behaviour ------------------------------------------------------------
def test_ring_buffers_stay_bounded_per_rank_and_merged(scripted):
    backend, job = scripted
    backend.lines = [LogLine(rank=i % 2, text=f"line {i}", time=float(i)) for i in range(1000)]
    monitor = JobMonitor(job, log_lines_per_rank=10)
    assert monitor.poll() is True
    assert [line.text for line in monitor.lines(0)] == [f"line {i}" for i in range(980, 1000, 2)]
    assert len(monitor.lines(1)) == 10
    merged = monitor.lines()
    assert len(merged) == 20 and merged[-1].text == "line 999"
    assert monitor.lines(0, last=2)[-1].text == "line 998"
    assert monitor.lines(5) == [] and monitor.lines(0, last=0) == []
    assert monitor.lines_seen == 1000


def test_snapshot_is_a_frozen_copy_that_later_polls_leave_alone(scripted):
    backend, job = scripted
    backend.lines = [LogLine(0, "a", 1.0), LogLine(1, "b", 2.0)]
    backend.samples = [MetricSample(1, "total_steps", 10.0), MetricSample(2, "loss", 3.0, 1)]
    monitor = JobMonitor(job)
    monitor.poll()
    snapshot = monitor.snapshot()
    assert isinstance(snapshot, MonitorSnapshot)
    assert snapshot.status is monitor.status and snapshot.progress == Progress(step=2, total=10)
    assert snapshot.ranks == (0, 1) and snapshot.metric_names == ("loss",)
    assert [line.text for line in snapshot.lines] == ["a", "b"]
    assert [line.text for line in snapshot.lines_of(1)] == ["b"] and snapshot.lines_of(7) == ()
    assert snapshot.latest["loss"].value == 3.0 and not snapshot.done and snapshot.error is None

    backend.lines.append(LogLine(2, "c", 3.0))
    backend.samples.append(MetricSample(3, "lr", 0.1))
    backend.finish()
    monitor.poll()
    assert snapshot.ranks == (0, 1) and len(snapshot.lines) == 2 and "lr" not in snapshot.latest  # unchanged
    assert monitor.snapshot().ranks == (0, 1, 2) and monitor.snapshot().done
    with pytest.raises(AttributeError):
        snapshot.done = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        snapshot.latest["loss"] = MetricSample(9, "loss", 0.0)  # type: ignore[index]
    assert not hasattr(monitor, "lock")  # views read snapshots; the lock is the monitor's own


def test_poll_reports_whether_anything_changed(scripted):
    backend, job = scripted
    monitor = JobMonitor(job)
    assert monitor.poll() is True  # the first status is a change
    assert monitor.poll() is False
    backend.lines.append(LogLine(0, "hello", 1.0))
    assert monitor.poll() is True
    assert monitor.poll() is False
    backend.samples.append(MetricSample(1, "loss", 2.0))
    assert monitor.poll() is True


def test_metric_series_latest_and_progress(scripted):
    backend, job = scripted
    for step in range(1, 31):
        for rank in (0, 1):
            backend.samples.append(MetricSample(step, "total_steps", 100.0, rank, float(step)))
            backend.samples.append(MetricSample(step, "loss", 5.0 - step / 10, rank, float(step)))
    monitor = JobMonitor(job, max_points_per_metric=25)
    monitor.poll()
    assert monitor.metric_names() == ["loss"]  # total_steps is progress, not a series
    points = monitor.series("loss")
    assert len(points) == 25 and points[-1].step == 30
    assert monitor.latest["loss"].value == pytest.approx(2.0)
    assert "total_steps" not in monitor.latest_metrics()
    assert monitor.progress == Progress(step=30, total=100, seconds_left=70.0)  # 1 s a step, 70 steps to go
    assert monitor.progress.fraction == pytest.approx(0.3)


def test_progress_advances_with_later_reports_but_not_deepspeed_steps(scripted):
    backend, job = scripted
    backend.samples = [
        MetricSample(1, "total_steps", 50.0),
        MetricSample(7, "loss", 1.0),
        MetricSample(400, "lr", 0.001),  # DeepSpeed's optimizer step, another counter
    ]
    monitor = JobMonitor(job)
    monitor.poll()
    assert monitor.progress == Progress(step=7, total=50)


def test_no_progress_without_total_steps(scripted):
    backend, job = scripted
    backend.samples = [MetricSample(3, "loss", 1.0)]
    monitor = JobMonitor(job)
    monitor.poll()
    assert monitor.progress is None


def test_events_record_state_changes(scripted):
    backend, job = scripted
    clock = FakeClock(start=500.0)
    monitor = JobMonitor(job, clock=clock)
    monitor.poll()
    monitor.poll()
    clock.now = 510.0
    backend.current = replace(backend.current, restarts=1, message="restarting")
    monitor.poll()
    backend.finish()
    monitor.poll()
    events = monitor.events()
    assert [(e.state, e.restarts) for e in events] == [
        (JobState.RUNNING, 0), (JobState.RUNNING, 1), (JobState.SUCCEEDED, 1)
    ]
    assert events[1].time == 510.0 and events[1].message == "restarting"


def test_terminal_poll_reads_to_the_end_before_done(scripted):
    backend, job = scripted
    backend.chunk = 1
    total = MAX_CHUNKS_PER_POLL + 5
    backend.lines = [LogLine(0, f"l{i}", float(i)) for i in range(total)]
    backend.finish()
    monitor = JobMonitor(job)
    monitor.poll()
    assert not monitor.done  # the status is final, but more output is waiting
    assert len(monitor.lines()) == MAX_CHUNKS_PER_POLL
    monitor.poll()
    assert monitor.done
    assert [line.text for line in monitor.lines()][-1] == f"l{total - 1}"
    assert monitor.lines_seen == total


def test_subscribers_are_rate_limited_and_get_everything(scripted):
    backend, job = scripted
    clock = FakeClock(start=0.0)
    monitor = JobMonitor(job, clock=clock)
    updates: list[MonitorUpdate] = []
    monitor.subscribe(updates.append)
    for i in range(100):  # one new line every 10 ms of fake time, for one second
        clock.now = i * 0.01
        backend.lines.append(LogLine(0, f"line {i}", float(i)))
        monitor.poll()
    assert 9 <= len(updates) <= 11
    backend.finish()
    clock.now = 1.0001  # under 0.1 s after the last update: the final one still goes out
    monitor.poll()
    assert updates[-1].final and updates[-1].status.state == JobState.SUCCEEDED
    assert [line.text for u in updates for line in u.lines] == [f"line {i}" for i in range(100)]
    assert sum(1 for u in updates if u.final) == 1
    monitor.poll()
    assert sum(1 for u in updates if u.final) == 1  # the final update is sent once


def test_notifications_at_least_100ms_apart(scripted):
    backend, job = scripted
    clock = FakeClock(start=0.0)
    monitor = JobMonitor(job, clock=clock)
    times: list[float] = []
    monitor.subscribe(lambda update: times.append(clock.now))
    for i in range(300):
        clock.now = i * 0.003
        backend.lines.append(LogLine(0, str(i), float(i)))
        monitor.poll()
    assert len(times) >= 5
    assert all(b - a >= 0.1 - 1e-9 for a, b in zip(times, times[1:]))


def test_subscriber_batches_are_bounded_and_count_dropped_lines(scripted):
    backend, job = scripted
    clock = FakeClock(start=0.0)
    monitor = JobMonitor(job, log_lines_per_rank=50, clock=clock)
    updates: list[MonitorUpdate] = []
    monitor.subscribe(updates.append)
    monitor.poll()
    backend.lines = [LogLine(0, str(i), float(i)) for i in range(500)]
    monitor.poll()  # rate-limited: held back
    clock.now = 1.0
    monitor.poll()
    assert len(updates) == 2
    assert len(updates[1].lines) == 50 and updates[1].lines[-1].text == "499"
    assert updates[1].dropped_lines == 450


def test_unsubscribe_and_failing_subscriber(scripted):
    backend, job = scripted
    clock = FakeClock(start=0.0)
    monitor = JobMonitor(job, clock=clock)
    good: list[MonitorUpdate] = []

    def bad(update: MonitorUpdate) -> None:
        raise RuntimeError("a broken view")

    monitor.subscribe(bad)
    unsubscribe = monitor.subscribe(good.append)
    monitor.poll()
    assert len(good) == 1  # the failing subscriber did not stop the others
    unsubscribe()
    clock.now = 5.0
    backend.lines.append(LogLine(0, "x", 1.0))
    monitor.poll()
    assert len(good) == 1


def test_invalid_limits(scripted):
    _, job = scripted
    with pytest.raises(ValueError):
        JobMonitor(job, log_lines_per_rank=0)


# -- real local jobs ------------------------------------------------------------------------------
def test_chatty_job_keeps_memory_bounded(cluster):
    job = py_job(cluster, "import os\nfor i in range(5000): print(f\"r{os.environ['RANK']} line {i}\")", procs=2)
    monitor = JobMonitor(job, log_lines_per_rank=100)
    thread = monitor.start(interval=0.05)
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert monitor.done and monitor.status.state == JobState.SUCCEEDED
    assert monitor.lines_seen == 10_000
    assert len(monitor.lines(0)) == 100 and len(monitor.lines(1)) == 100
    assert monitor.lines(0)[-1].text == "r0 line 4999"
    assert monitor.lines(1)[0].text == "r1 line 4900"
    assert len(monitor.lines()) == 200


def test_metrics_and_progress_from_report_lines(cluster):
    code = "import dsnb\nfor i in range(1, 6): dsnb.report(step=i, total_steps=5, loss=1.0 / i, tokens_per_s=100.0 * i)"
    job = py_job(cluster, code)
    job.wait(timeout=60)
    monitor = JobMonitor(job)
    monitor.poll()
    assert monitor.done
    assert monitor.metric_names() == ["loss", "tokens_per_s"]
    assert [(p.step, p.value) for p in monitor.series("loss")] == [(i, pytest.approx(1.0 / i)) for i in range(1, 6)]
    assert monitor.latest["tokens_per_s"].value == 500.0
    assert monitor.progress == Progress(step=5, total=5)


def test_final_poll_after_the_end_gets_the_last_lines(cluster, tmp_path):
    go = tmp_path / "go"  # the job says its last words only once the test has seen the first ones
    job = py_job(cluster, f"import os, time\nprint('first', flush=True)\nwhile not os.path.exists({str(go)!r}): time.sleep(0.02)\n"
                          "print('last words')")
    monitor = JobMonitor(job)
    deadline = time.monotonic() + 30
    while not any(line.text == "first" for line in monitor.lines()) and time.monotonic() < deadline:
        monitor.poll()
        time.sleep(0.05)
    assert not monitor.done and "last words" not in [line.text for line in monitor.lines()]
    go.touch()
    job.wait(timeout=60)
    monitor.poll()
    assert monitor.done
    assert [line.text for line in monitor.lines()] == ["first", "last words"]


def test_follower_thread_ends_with_the_job_and_sends_the_final_update(cluster):
    job = py_job(cluster, "print('a'); print('b')", procs=2)
    monitor = JobMonitor(job)
    updates: list[MonitorUpdate] = []
    monitor.subscribe(updates.append)
    thread = monitor.start(interval=0.05)
    assert monitor.start() is thread  # already following
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert updates[-1].final and updates[-1].status.state == JobState.SUCCEEDED
    assert sorted(line.text for u in updates for line in u.lines) == ["a", "a", "b", "b"]


def test_stop_ends_the_follower_and_the_job_keeps_running(cluster):
    job = py_job(cluster, "import time; print('up', flush=True); time.sleep(60)")
    monitor = JobMonitor(job)
    thread = monitor.start(interval=0.05)
    time.sleep(0.3)
    monitor.stop(timeout=5)
    assert not thread.is_alive()
    assert not monitor.done
    assert not job.status().state.is_terminal()
    job.cancel()


def test_follower_records_an_error_and_stops(cluster, dsnb_home):
    job = py_job(cluster, "import time; time.sleep(60)")
    monitor = JobMonitor(job)
    updates: list[MonitorUpdate] = []
    monitor.subscribe(updates.append)
    job.cancel()
    shutil.rmtree(dsnb_home / "jobs" / job.name)
    thread = monitor.start(interval=0.05)
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert isinstance(monitor.error, JobNotFound)
    assert updates and updates[-1].error is monitor.error


def test_concurrent_pollers_do_not_duplicate_lines(scripted):
    backend, job = scripted
    backend.chunk, backend.read_delay = 1, 0.0005
    backend.lines = [LogLine(0, str(i), float(i)) for i in range(400)]
    monitor = JobMonitor(job, log_lines_per_rank=1000)
    threads = [threading.Thread(target=lambda: [monitor.poll() for _ in range(20)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    while monitor.poll():
        pass
    assert [line.text for line in monitor.lines()] == [str(i) for i in range(400)]


def test_the_monitor_flags_a_quiet_rank_and_a_slow_one_on_any_backend_and_gives_the_time_left() -> None:
    now = [210.0]
    backend = ScriptedBackend()
    for step in range(0, 100):  # rank 0 reports every second to t = 199; rank 1 stopped at t = 140
        backend.samples.append(MetricSample(step, "loss", 1.0, 0, 100.0 + step))
        backend.lines.append(LogLine(0, f"step {step}", 100.0 + step))
        if step <= 40:
            backend.samples.append(MetricSample(step, "loss", 1.0, 1, 100.0 + step))
            backend.lines.append(LogLine(1, f"step {step}", 100.0 + step))
    backend.samples.append(MetricSample(99, "total_steps", 400.0, 0, 199.0))
    monitor = JobMonitor(Job(backend, "job-abcd"), clock=lambda: now[0])  # type: ignore[arg-type]
    monitor.poll()
    snapshot = monitor.snapshot()
    assert snapshot.stragglers == ("rank 1 has written nothing for 70 s while the others progressed",
                                   "rank 1 is 59 steps behind")
    assert snapshot.progress == Progress(step=99, total=400, seconds_left=301.0)  # 1 s a step
    assert str(snapshot.progress) == "step 99/400  25%  about 5m 01s left"
    backend.current = replace(backend.current, state=JobState.FAILED)
    monitor.poll()
    assert monitor.snapshot().stragglers == ()  # an ended job has no stragglers


def test_the_local_backends_own_flags_are_the_ones_shown(cluster) -> None:
    backend = ScriptedBackend()
    backend.reports_stragglers = True  # as the local backend, whose supervisor follows every rank
    backend.current = replace(backend.current, stragglers=("rank 3 is 4 steps behind",))
    monitor = JobMonitor(Job(backend, "job-abcd"))  # type: ignore[arg-type]
    monitor.poll()
    assert monitor.snapshot().stragglers == ("rank 3 is 4 steps behind",)
