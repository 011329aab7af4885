"""The console view (rendered into a StringIO with a fixed clock) and the ``dsnb`` command."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from scripted import ScriptedBackend

from dsnb import Cluster
from dsnb.console import cli
from dsnb.console.cli import main
from dsnb.console.view import jobs_table, render, status_view
from dsnb.formatting import format_duration
from dsnb.job import Job
from dsnb.monitor import JobMonitor
from dsnb.status import JobState, JobStatus, LogLine, MetricSample, ReplicaStatus

PY = sys.executable
STARTED = 1_700_000_000.0


def text_of(renderable: Any, width: int = 100) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=False, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def scripted_monitor(state: JobState = JobState.RUNNING, **status_fields: Any) -> tuple[ScriptedBackend, JobMonitor]:
    replicas = tuple(ReplicaStatus(rank=r, state=state if r == 1 else JobState.RUNNING) for r in (0, 1))
    status = JobStatus(
        name="tiny-gpt-x7k2", backend="scripted", state=state, replicas=replicas,
        created_at=STARTED - 3, started_at=STARTED, message="training", **status_fields,
    )
    lines = [LogLine(rank=r, text=f"rank {r} says {i}", time=STARTED + i) for i in range(8) for r in (0, 1)]
    lines.append(LogLine(rank=0, text="[bold]not markup[/bold]", time=STARTED + 9))
    lines.append(LogLine(rank=0, text='DSNB_METRIC {"step": 30, "loss": 2.318765}', time=STARTED + 10))
    samples = [
        MetricSample(30, "loss", 2.318765, 0, STARTED + 10),
        MetricSample(30, "tokens_per_s", 15123.4, 0, STARTED + 10),
        MetricSample(30, "total_steps", 100.0, 0, STARTED + 10),
    ]
    backend = ScriptedBackend(status, lines, samples)
    monitor = JobMonitor(Job(backend, status.name), clock=lambda: STARTED + 12.5)  # type: ignore[arg-type]
    monitor.poll()
    return backend, monitor


# -- the view ----------------------------------------------------------------------------------------
def test_render_shows_state_elapsed_metrics_progress_and_log_tails():
    _, monitor = scripted_monitor()
    out = text_of(render(monitor, now=STARTED + 12.5))
    assert "tiny-gpt-x7k2" in out and "scripted" in out
    assert "RUNNING" in out and "elapsed 12.5 s" in out and "world size 2" in out
    assert "training" in out
    assert "step 30/100" in out and "30%" in out
    assert "loss" in out and "2.319" in out and "tokens_per_s" in out and "15,123" in out
    assert "total_steps" not in out
    assert "rank 0 says 7" in out and "rank 1 says 7" in out
    assert "rank 1 says 2" not in out  # only the last 5 lines of each rank
    assert "[bold]not markup[/bold]" in out  # log text is never read as markup
    assert "DSNB_METRIC" not in out  # metric lines show as metrics, not as log lines


def test_render_elapsed_follows_the_given_clock():
    _, monitor = scripted_monitor()
    assert "elapsed 2m 05s" in text_of(render(monitor, now=STARTED + 125))


def test_render_failed_job_marks_the_rank_and_stops_the_clock():
    backend, monitor = scripted_monitor()
    backend.current = replace(
        backend.current, state=JobState.FAILED, finished_at=STARTED + 4, message="rank 1 exited with code 3",
        replicas=(ReplicaStatus(0, JobState.CANCELLED), ReplicaStatus(1, JobState.FAILED, exit_code=3)),
    )
    monitor.poll()
    out = text_of(render(monitor, now=STARTED + 999))
    assert "FAILED" in out and "elapsed 4.0 s" in out
    assert "rank 1 FAILED exit code 3" in out
    assert "rank 1 exited with code 3" in out


def test_render_before_the_first_poll():
    backend, _ = scripted_monitor()
    monitor = JobMonitor(Job(backend, "tiny-gpt-x7k2"))  # type: ignore[arg-type]
    assert "waiting for the first status" in text_of(render(monitor, now=STARTED))


def test_jobs_table_and_status_view():
    status = JobStatus(
        name="a-x1y2", backend="local", state=JobState.FAILED, created_at=STARTED, started_at=STARTED,
        finished_at=STARTED + 65, message="rank 1 exited with code 3", failed_rank=1, exit_code=3,
        last_lines=("boom",), replicas=(ReplicaStatus(1, JobState.FAILED, exit_code=3, pid=42),),
    )
    table = text_of(jobs_table([status], now=STARTED + 1000), width=140)
    assert "a-x1y2" in table and "FAILED" in table and "1m 05s" in table and "rank 1 exited with code 3" in table
    view = text_of(status_view(status), width=140)
    assert "boom" in view and "42" in view and "1m 05s" in view


@pytest.mark.parametrize(
    ("seconds", "text"), [(None, "-"), (0.04, "0.0 s"), (59.9, "59.9 s"), (60, "1m 00s"), (3600 * 2 + 61, "2h 01m")]
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


# -- the command ---------------------------------------------------------------------------------------
@pytest.fixture
def home(dsnb_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    yield dsnb_home
    with Cluster() as cluster:
        for status in cluster.jobs():
            if not status.state.is_terminal():
                cluster.attach(status.name).cancel()


def dsnb(*argv: str, terminal: bool = False) -> tuple[int, str]:
    console = Console(file=io.StringIO(), width=200, force_terminal=terminal, color_system=None)
    code = main(list(argv), console=console)
    return code, console.file.getvalue()


def write_script(folder: Path, name: str, body: str) -> str:
    (folder / name).write_text(body)
    return name


TRAIN = """
import os, sys, time
import dsnb
rank = os.environ["RANK"]
for step in range(1, 4):
    print(f"rank {rank} step {step}", flush=True)
    dsnb.report(step=step, total_steps=3, loss=4.0 - step)
code = int(sys.argv[1]) if len(sys.argv) > 1 else 0
if rank == "1" and code:
    print("rank 1 gives up")
    sys.exit(code)
"""


def test_run_succeeds(home, tmp_path):
    script = write_script(tmp_path, "train.py", TRAIN)
    code, out = dsnb("run", script, "--procs", "2")
    assert code == 0
    assert "[rank 0] rank 0 step 3" in out and "[rank 1] rank 1 step 3" in out
    assert "SUCCEEDED" in out and "step 3/3" in out and "loss" in out


def test_run_fails_with_the_diagnosis(home, tmp_path):
    script = write_script(tmp_path, "train.py", TRAIN)
    code, out = dsnb("run", script, "3", "--procs", "2")
    assert code == 1
    assert "FAILED: rank 1 exited with code 3" in out
    assert "last lines of rank 1:" in out and "rank 1 gives up" in out


def test_run_with_a_live_view_on_a_terminal(home, tmp_path):
    script = write_script(tmp_path, "train.py", TRAIN)
    code, out = dsnb("run", script, "--procs", "2", terminal=True)
    assert code == 0
    assert "SUCCEEDED" in out and "rank 1 step 3" in out


def test_invalid_input_exits_2_and_starts_nothing(home, tmp_path):
    script = write_script(tmp_path, "train.py", TRAIN)
    code, out = dsnb("run", script, "--procs", "0")
    assert code == 2
    assert "procs_per_node" in out and "--procs" in out
    assert len(out.strip().splitlines()) == 1
    assert not (home / "jobs").exists() or not any((home / "jobs").iterdir())


@pytest.mark.parametrize(
    ("argv", "field"),
    [(["--env", "NOEQUALS"], "env"), (["--deepspeed", "{bad json"], "deepspeed"), (["--env", "RANK=3"], "env.RANK")],
)
def test_invalid_options_name_the_field(home, tmp_path, argv, field):
    script = write_script(tmp_path, "train.py", TRAIN)
    code, out = dsnb("run", script, *argv)
    assert code == 2 and f"JobSpec.{field}" in out
    assert not (home / "jobs").exists()


def test_run_without_script_and_unknown_command_options(home):
    code, out = dsnb("run", "--procs", "2")
    assert code == 2 and "SCRIPT" in out
    assert dsnb("jobs", "--bogus")[0] == 2
    assert dsnb()[0] == 2


def test_script_arguments_pass_through(home, tmp_path):
    script = write_script(tmp_path, "args.py", "import sys; print('ARGS', sys.argv[1:])")
    code, out = dsnb("run", script, "data.txt", "--lr", "0.1", "--procs", "1", "--", "--name", "x")
    assert code == 0
    assert "ARGS ['data.txt', '--lr', '0.1', '--name', 'x']" in out


def test_detach_then_jobs_logs_status(home, tmp_path):
    script = write_script(tmp_path, "lines.py", "for i in range(5): print(f'line {i}')")
    code, out = dsnb("run", script, "--detach", "--name", "five")
    assert code == 0
    name = out.splitlines()[0].strip()
    assert name.startswith("five-") and f"dsnb logs {name} -f" in out
    Cluster().attach(name).wait(timeout=60)

    code, out = dsnb("jobs")
    assert code == 0 and name in out and "SUCCEEDED" in out

    code, out = dsnb("logs", name, "--tail", "2")
    assert code == 0 and out.splitlines() == ["[rank 0] line 3", "[rank 0] line 4"]

    code, out = dsnb("logs", name, "--rank", "0", "-f")
    assert code == 0 and len(out.splitlines()) == 5

    code, out = dsnb("status", name)
    assert code == 0 and "SUCCEEDED" in out and name in out


def test_jobs_when_there_are_none(home):
    code, out = dsnb("jobs")
    assert code == 0 and "no jobs" in out


def test_cancel_a_running_sleeper(home, tmp_path):
    script = write_script(tmp_path, "sleeper.py", "import time; print('up', flush=True); time.sleep(120)")
    code, out = dsnb("run", script, "--detach", "--procs", "2")
    name = out.splitlines()[0].strip()
    job = Cluster().attach(name)
    deadline = time.monotonic() + 30
    while job.status().state != JobState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
    code, out = dsnb("cancel", name)
    assert code == 0 and "CANCELLED" in out
    assert job.status().state == JobState.CANCELLED
    code, out = dsnb("cancel", name)  # idempotent
    assert code == 0 and "already ended" in out


def test_ctrl_c_cancels_the_job(home, tmp_path, monkeypatch):
    script = write_script(tmp_path, "sleeper.py", "import time; print('up', flush=True); time.sleep(120)")
    real_poll = JobMonitor.poll

    def poll_then_interrupt(self: JobMonitor) -> bool:
        changed = real_poll(self)
        if self.status is not None and self.status.state == JobState.RUNNING:
            raise KeyboardInterrupt
        return changed

    monkeypatch.setattr(JobMonitor, "poll", poll_then_interrupt)
    code, out = dsnb("run", script, "--name", "sleepy", terminal=True)
    assert code == 130
    assert "cancelling job sleepy-" in out and "CANCELLED" in out
    (status,) = Cluster().jobs()
    assert status.state == JobState.CANCELLED


def test_dryrun_prints_the_commands_and_creates_nothing(home, tmp_path):
    script = write_script(tmp_path, "train.py", TRAIN)
    code, out = dsnb("dryrun", script, "--procs", "2", "--env", "HF_TOKEN=hf_supersecret", "--env", "MODE=fast")
    assert code == 0
    assert "RANK=0" in out and "RANK=1" in out and "MODE=fast" in out
    assert "hf_supersecret" not in out and "HF_TOKEN='***'" in out
    assert not (home / "jobs").exists()


def test_dryrun_takes_inline_deepspeed_json(home, tmp_path):
    script = write_script(tmp_path, "train.py", TRAIN)
    config = json.dumps({"train_micro_batch_size_per_gpu": 4})
    code, out = dsnb("dryrun", script, "--procs", "2", "--deepspeed", config)
    assert code == 0 and "DSNB_DEEPSPEED_CONFIG=" in out


def test_logs_of_an_unknown_job(home):
    code, out = dsnb("logs", "nope-1234")
    assert code == 1 and "'nope-1234' not found" in out


def test_demo_submits_the_example_with_its_config_on_two_ranks(home, tmp_path, monkeypatch):
    """What the demo submits, with a stand-in train.py; the real example runs in the test below."""
    examples = tmp_path / "checkout" / "examples"
    (examples / "tiny_gpt").mkdir(parents=True)
    (examples / "tiny_gpt" / "train.py").write_text(
        "import os, dsnb\nprint('demo rank', os.environ['RANK'], os.environ['WORLD_SIZE'])\n"
        "print('config', dsnb.deepspeed_config()['train_batch_size'])\n"
    )
    (examples / "tiny_gpt" / "ds_config.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))
    monkeypatch.setattr(cli, "examples_dir", lambda: examples)
    code, out = dsnb("demo")
    assert code == 0
    assert "[rank 1] demo rank 1 2" in out and "config 4" in out and "tiny-gpt-" in out


@pytest.mark.deepspeed
def test_demo_runs_the_bundled_example(home):
    """``dsnb demo`` as a new user runs it: the real tiny GPT on 2 DeepSpeed ranks, its checkpoint under DSNB_HOME."""
    pytest.importorskip("deepspeed")
    code, out = dsnb("demo", "--steps", "20")
    assert code == 0, out[-3000:]
    assert "step 20/20" in out
    assert "tiny-gpt: " in out and "2 ranks" in out and "SUCCEEDED" in out
    losses = [float(line.split(" loss ")[1].split()[0]) for line in out.splitlines() if "[rank 0] step " in line and " loss " in line]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses  # it trained
    assert list((home / "checkpoints").glob("tiny-gpt*/latest"))  # kept under DSNB_HOME, not in the source tree


def test_demo_outside_a_checkout(home, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "examples_dir", lambda: tmp_path / "nowhere" / "examples")
    code, out = dsnb("demo")
    assert code == 1 and "dsnb source checkout" in out and "train.py" in out
    assert not (home / "jobs").exists()


def test_the_installed_command(home, tmp_path):
    script = write_script(tmp_path, "train.py", TRAIN)
    exe = Path(sys.executable).with_name("dsnb")
    command = [str(exe)] if exe.exists() else [PY, "-m", "dsnb.console.cli"]
    result = subprocess.run(
        [*command, "dryrun", script, "--procs", "2"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "DSNB_HOME": str(home)}, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "RANK=1" in result.stdout
    result = subprocess.run([*command, "run", script, "--procs", "0"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env={**os.environ, "DSNB_HOME": str(home)})
    assert result.returncode == 2 and "procs_per_node" in result.stderr and result.stdout == ""


def test_status_and_the_live_view_show_the_stuck_and_slow_ranks():
    flagged = ("rank 1 has written nothing for 120 s while the others progressed", "rank 5 is 4 steps behind")
    status = JobStatus(name="big-x1", backend="local", state=JobState.RUNNING, started_at=STARTED,
                       created_at=STARTED, stragglers=flagged)
    text = text_of(status_view(status, now=STARTED + 200), width=120)
    assert "⚠ rank 1 has written nothing for 120 s while the others progressed" in text
    assert "⚠ rank 5 is 4 steps behind" in text
    backend = ScriptedBackend(status)
    backend.reports_stragglers = True
    monitor = JobMonitor(Job(backend, status.name))  # type: ignore[arg-type]
    monitor.poll()
    assert "⚠ rank 5 is 4 steps behind" in text_of(render(monitor, now=STARTED + 200), width=120)
    done = replace(status, state=JobState.SUCCEEDED, finished_at=STARTED + 300, stragglers=())
    assert "⚠" not in text_of(status_view(done, now=STARTED + 400))
