"""Local backend behaviour beyond the conformance suite, checked against the machine itself."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import job_processes, settled, wait_until

from dsnb import Cluster, InvalidSpecError, JobFailed, JobSpec, JobState
from dsnb.backends.base import Backend
from dsnb.backends.local.jobdir import JobDir


def python_job(name: str, code: str, tmp_path: Path, **kwargs) -> JobSpec:
    script = tmp_path / f"{name}.py"
    script.write_text(textwrap.dedent(code))
    return JobSpec(name=name, script=script.name, working_dir=str(tmp_path), **kwargs)


def test_ranks_get_the_torch_distributed_environment(tmp_path: Path) -> None:
    code = """
        import json, os
        keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "NODE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR", "OMP_NUM_THREADS", "DSNB_DIST_BACKEND",
                "PYTHONUNBUFFERED", "DSNB_DEEPSPEED_CONFIG", "MY_SETTING"]
        print(json.dumps({k: os.environ.get(k) for k in keys}))
    """
    spec = python_job("env", code, tmp_path, nodes=2, procs_per_node=2, env={"MY_SETTING": "x"},
                      deepspeed={"train_micro_batch_size_per_gpu": 2})
    job = Cluster().submit(spec)
    job.wait(timeout=60)
    envs = {line.rank: json.loads(line.text) for line in job.logs()}
    assert sorted(envs) == [0, 1, 2, 3]
    for rank, env in envs.items():
        assert env["RANK"] == str(rank)
        assert env["LOCAL_RANK"] == str(rank % 2) and env["NODE_RANK"] == str(rank // 2)
        assert env["WORLD_SIZE"] == "4" and env["LOCAL_WORLD_SIZE"] == "2" and env["LOCAL_SIZE"] == "2"
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"].isdigit()
        assert env["DS_ACCELERATOR"] == "cpu" and env["DSNB_DIST_BACKEND"] == "gloo"
        assert int(env["OMP_NUM_THREADS"]) >= 1 and env["PYTHONUNBUFFERED"] == "1" and env["MY_SETTING"] == "x"
    assert len({env["MASTER_PORT"] for env in envs.values()}) == 1
    config = json.loads(Path(envs[0]["DSNB_DEEPSPEED_CONFIG"]).read_text())
    assert config["train_batch_size"] == 8  # filled for world size 4


def test_cancel_kills_grandchildren(tmp_path: Path) -> None:
    code = """
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print("spawned", child.pid, flush=True)
        time.sleep(120)
    """
    job = Cluster().submit(python_job("tree", code, tmp_path, procs_per_node=2))
    wait_until(lambda: sum("spawned" in line.text for line in job.logs()) == 2)
    assert len(job_processes(job.name)) >= 4  # two ranks, two grandchildren
    assert job.cancel().state == JobState.CANCELLED
    assert settled(lambda: job_processes(job.name)) == []
    replicas = job.status().replicas
    assert [r.state for r in replicas] == [JobState.CANCELLED, JobState.CANCELLED]


def test_crashing_rank_fails_job_quickly_while_peers_block(tmp_path: Path) -> None:
    code = """
        import os, sys, time
        if os.environ["RANK"] == "1":
            time.sleep(0.5)
            for step in range(30):
                print('DSNB_METRIC {"step": %d, "loss": 1.0}' % step)
            raise RuntimeError("loss became NaN at step 7")
        time.sleep(300)  # rank 0 would otherwise block until a collective timeout
    """
    job = Cluster().submit(python_job("crash", code, tmp_path, procs_per_node=2))
    started = time.monotonic()
    with pytest.raises(JobFailed) as info:
        job.wait(timeout=120)
    assert time.monotonic() - started < 30  # seconds, not the 300 s the peer would block
    status = info.value.status
    assert status.failed_rank == 1 and status.exit_code == 1
    assert "RuntimeError: loss became NaN at step 7" in status.last_lines[-1]
    assert "Traceback" in "\n".join(status.last_lines)
    assert not any("DSNB_METRIC" in line for line in status.last_lines)
    by_rank = {r.rank: r for r in status.replicas}
    assert by_rank[1].state == JobState.FAILED and by_rank[0].state == JobState.CANCELLED
    assert settled(lambda: job_processes(job.name)) == []


def test_signal_death_is_described(tmp_path: Path) -> None:
    code = """
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)
    """
    job = Cluster().submit(python_job("killed", code, tmp_path))
    with pytest.raises(JobFailed, match="rank 0 was killed by SIGKILL"):
        job.wait(timeout=60)


def test_restarts_whole_job_after_failure(tmp_path: Path) -> None:
    code = """
        import os, sys
        from pathlib import Path
        marker = Path("attempt-" + os.environ["RANK"])
        first = not marker.exists()
        marker.touch()
        print("first attempt" if first else "second attempt")
        if first and os.environ["RANK"] == "0":
            sys.exit(5)
    """
    job = Cluster().submit(python_job("retry", code, tmp_path, procs_per_node=2, max_restarts=2))
    final = job.wait(timeout=60)
    assert final.state == JobState.SUCCEEDED and final.restarts == 1
    texts = [line.text for line in job.logs(rank=0)]
    assert texts[0] == "first attempt" and texts[-1] == "second attempt"
    assert any("restarting all ranks (restart 1 of 2)" in t for t in texts)


def test_timeout_fails_the_job(tmp_path: Path) -> None:
    job = Cluster().submit(python_job("slow", "import time; time.sleep(60)", tmp_path, timeout=1.0))
    with pytest.raises(JobFailed, match=r"timed out after 1 s \(JobSpec.timeout\)"):
        job.wait(timeout=60)
    assert settled(lambda: job_processes(job.name)) == []


def test_attach_read_and_cancel_from_another_process(tmp_path: Path, dsnb_home: Path) -> None:
    job = Cluster().submit(python_job("shared", "print('ready', flush=True)\nimport time; time.sleep(120)", tmp_path))
    # The rank can print before the supervisor records RUNNING (a loaded machine shows it): wait for both.
    wait_until(lambda: any(line.text == "ready" for line in job.logs()) and job.status().state == JobState.RUNNING)
    other = textwrap.dedent(f"""
        from dsnb import Cluster
        cluster = Cluster()
        job = cluster.attach({job.name!r})
        print("STATE", job.status().state.value)
        print("LOGS", [line.text for line in job.logs()])
        print("LISTED", {job.name!r} in [s.name for s in cluster.jobs()])
        print("CANCEL", job.cancel().state.value)
    """)
    run = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DSNB_HOME": str(dsnb_home)})
    assert run.returncode == 0, run.stderr
    assert "STATE RUNNING" in run.stdout and "LOGS ['ready']" in run.stdout
    assert "LISTED True" in run.stdout and "CANCEL CANCELLED" in run.stdout
    assert job.status().state == JobState.CANCELLED
    assert settled(lambda: job_processes(job.name)) == []


def test_killed_supervisor_is_detected_and_ranks_stopped(tmp_path: Path) -> None:
    job = Cluster().submit(python_job("orphan", "print('up', flush=True)\nimport time; time.sleep(120)", tmp_path))
    wait_until(lambda: any(line.text == "up" for line in job.logs()))
    supervisor = JobDir(Path(os.environ["DSNB_HOME"]) / "jobs" / job.name).read_status_extra()["supervisor_pid"]
    os.kill(supervisor, signal.SIGKILL)
    status = wait_until(lambda: (s := job.status()).state.is_terminal() and s)
    assert status.state == JobState.FAILED and "supervisor" in status.message
    wait_until(lambda: job_processes(job.name) == [], timeout=10)


def test_job_directory_is_private_and_complete(tmp_path: Path, dsnb_home: Path) -> None:
    job = Cluster().submit(python_job("files", "print('x')", tmp_path, env={"HF_TOKEN": "hf_x"}))
    job.wait(timeout=60)
    path = dsnb_home / "jobs" / job.name
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert {p.name for p in path.iterdir()} >= {"spec.json", "plan.json", "status.json", "rank-0.log", "metrics.jsonl"}
    assert JobSpec.from_dict(json.loads((path / "spec.json").read_text())).name == job.name


def test_missing_script_refused_before_anything_exists(tmp_path: Path, dsnb_home: Path) -> None:
    with pytest.raises(InvalidSpecError, match="JobSpec.script: .*not found"):
        Cluster().submit(JobSpec(name="nope", script="missing.py", working_dir=str(tmp_path)))
    with pytest.raises(InvalidSpecError, match="JobSpec.command: 'no-such-program-x' is not on PATH"):
        Cluster().submit(JobSpec(name="nope", command=["no-such-program-x"]))
    with pytest.raises(InvalidSpecError, match="JobSpec.resources.gpus"):
        Cluster().dryrun(JobSpec(name="gpu", command=["true"], resources={"gpus": 64}))
    assert not (dsnb_home / "jobs").exists()


def test_plan_shows_commands_with_redacted_secrets(tmp_path: Path) -> None:
    spec = python_job("plan", "print(1)", tmp_path, procs_per_node=2, env={"WANDB_API_KEY": "abc123"})
    text = str(Cluster().dryrun(spec))
    assert "RANK=0" in text and "RANK=1" in text and "MASTER_PORT=$MASTER_PORT" in text
    assert "WANDB_API_KEY='***'" in text and "abc123" not in text


def test_long_lines_and_partial_output_are_kept(tmp_path: Path) -> None:
    code = """
        import sys
        sys.stdout.write("x" * 200000 + "\\n")
        sys.stdout.write("no newline at the end")
    """
    job = Cluster().submit(python_job("long", code, tmp_path))
    job.wait(timeout=60)
    texts = [line.text for line in job.logs()]
    assert "".join(texts[:-1]) == "x" * 200000
    assert texts[-1] == "no newline at the end"


def test_stopped_ranks_run_their_cleanup(tmp_path: Path) -> None:
    """Ranks are interrupted before they are terminated, so finally-blocks run (and release locks)."""
    code = """
        import time
        from pathlib import Path
        lock = Path("build.lock")
        lock.touch()
        print("holding the lock", flush=True)
        try:
            time.sleep(120)
        finally:
            lock.unlink()
    """
    job = Cluster().submit(python_job("locker", code, tmp_path))
    wait_until(lambda: any("holding" in line.text for line in job.logs()))
    assert (tmp_path / "build.lock").exists()
    assert job.cancel().state == JobState.CANCELLED
    assert not (tmp_path / "build.lock").exists()


def test_odd_output_neither_stops_the_copy_nor_splits_lines(tmp_path: Path) -> None:
    code = """
        import sys
        print("first")
        print("step=1, skipped=0, lr=[warmup]")  # looks like DeepSpeed's progress line, is not
        print("50%\\r100%")                       # a progress bar redrawn with carriage returns
        for i in range(3000):                    # more than a pipe buffer holds
            print("line", i, "." * 100)
        print("last")
    """
    job = Cluster().submit(python_job("odd", code, tmp_path))
    assert job.wait(timeout=60).state == JobState.SUCCEEDED
    texts = [line.text for line in job.logs()]
    assert texts[:3] == ["first", "step=1, skipped=0, lr=[warmup]", "50%\r100%"]
    assert texts[-1] == "last" and len(texts) == 3004


def test_plan_repr_hides_secrets(tmp_path: Path) -> None:
    plan = Cluster().dryrun(python_job("secret", "print(1)", tmp_path, env={"HF_TOKEN": "hf_hidden"}))
    assert "hf_hidden" not in repr(plan) and "hf_hidden" not in str(plan) and "hf_hidden" not in plan.to_yaml()


def test_tail_reads_from_the_end(tmp_path: Path) -> None:
    code = """
        for i in range(20000):
            print("line", i)
    """
    job = Cluster().submit(python_job("tail", code, tmp_path, procs_per_node=2))
    job.wait(timeout=60)
    assert [line.text for line in job.logs(rank=1, tail=3)] == ["line 19997", "line 19998", "line 19999"]
    assert list(job.logs(tail=0)) == []
    # The local tail agrees with the generic one that reads everything, merged or per rank.
    for rank in (None, 0):
        generic = Backend.read_log_tail(job.backend, job.name, 5, rank)
        local = job.backend.read_log_tail(job.name, 5, rank)
        assert [(x.rank, x.text) for x in local.lines] == [(x.rank, x.text) for x in generic.lines]
        assert len(local.lines) == 5 and local.cursor == generic.cursor
