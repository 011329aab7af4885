"""Real DeepSpeed on CPU (gloo, 2 ranks) through the local backend, with the bundled example."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest
from helpers import REPO, job_processes, settled, wait_until

from dsnb import Cluster, JobFailed, JobSpec, JobState

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.deepspeed

EXAMPLE = REPO / "examples" / "tiny_gpt"


def tiny_gpt(name: str, *args: str, deepspeed: dict | None = None) -> JobSpec:
    config = deepspeed or json.loads((EXAMPLE / "ds_config.json").read_text())
    return JobSpec(name=name, script=str(EXAMPLE / "train.py"), procs_per_node=2, args=list(args), deepspeed=config)


def shm_segments() -> set[str]:
    return set(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"))


def test_train_report_checkpoint_and_resume(tmp_path: Path) -> None:
    shm_before = shm_segments()
    config = json.loads((EXAMPLE / "ds_config.json").read_text())
    config.update({"log_level": "info", "steps_per_print": 2, "wall_clock_breakdown": True})
    ckpt = str(tmp_path / "ckpt")
    cluster = Cluster()

    first = cluster.submit(tiny_gpt("tiny-gpt", "--steps", "6", "--checkpoint-dir", ckpt, deepspeed=config))
    assert first.wait(timeout=600).state == JobState.SUCCEEDED
    losses = first.metrics("loss", rank=0)
    assert [s.step for s in losses] == [1, 2, 3, 4, 5, 6]
    assert all(s.value > 0 for s in first.metrics("tokens_per_s"))
    # DeepSpeed's own progress lines are parsed into samples too.
    # (DeepSpeed also prints a step=0 line when its scheduler starts.)
    assert [s.step for s in first.metrics("lr", rank=0) if s.step > 0] == [2, 4, 6]
    assert first.metrics("time_ms/fwd", rank=0) and first.metrics("samples_per_sec", rank=0)
    assert (Path(ckpt) / "latest").is_file()

    second = cluster.submit(tiny_gpt("tiny-gpt", "--steps", "10", "--checkpoint-dir", ckpt))
    assert second.wait(timeout=600).state == JobState.SUCCEEDED
    assert any("resumed from step 6" in line.text for line in second.logs(rank=0))
    resumed = second.metrics("loss", rank=0)
    assert [s.step for s in resumed] == [7, 8, 9, 10]
    assert resumed[-1].value < losses[0].value  # it learned something across the two runs
    assert shm_segments() <= shm_before  # DeepSpeed's shared-memory segments were removed


def test_crash_in_one_rank_fails_job_with_its_traceback(tmp_path: Path) -> None:
    job = Cluster().submit(tiny_gpt("tiny-gpt-crash", "--steps", "50", "--fail-at-step", "2", "--no-save"))
    with pytest.raises(JobFailed) as info:
        job.wait(timeout=600)
    status = info.value.status
    assert status.failed_rank == 1 and status.exit_code == 1
    assert any("step 2" in line for line in status.last_lines), status.last_lines
    assert settled(lambda: job_processes(job.name)) == []


def test_cancel_mid_run_leaves_no_process(tmp_path: Path) -> None:
    job = Cluster().submit(tiny_gpt("tiny-gpt-cancel", "--steps", "100000", "--no-save"))
    wait_until(lambda: job.metrics("loss"), timeout=600, interval=0.5)
    assert job.status().state == JobState.RUNNING
    assert job.cancel().state == JobState.CANCELLED
    assert settled(lambda: job_processes(job.name)) == []
