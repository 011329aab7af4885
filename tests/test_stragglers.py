"""Stuck and slow ranks: the rules on recorded activity, then local jobs whose rank 1 goes quiet or falls behind,
flagged in the status while they run, and with ``hang_timeout`` failed naming the rank with its Python stack."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from dsnb import Cluster, InvalidSpecError, JobSpec, JobState
from dsnb.stragglers import DEFAULT_FLOOR_S, PACE_FACTOR, RankActivity, Straggler


# -- the rules ---------------------------------------------------------------------------------
def steady(activity: RankActivity, rank: int, start: float, end: float, every: float, first_step: int = 0) -> None:
    step, t = first_step, start
    while t <= end:
        activity.saw_step(rank, step, t)
        step, t = step + 1, t + every


def test_a_rank_quiet_while_the_others_write_is_silent_and_the_threshold_follows_the_step_time() -> None:
    activity = RankActivity(floor_s=10)
    steady(activity, 0, 0.0, 60.0, every=4.0)
    steady(activity, 1, 0.0, 60.0, every=4.0)
    assert activity.step_time() == pytest.approx(4.0)
    assert activity.threshold_s() == pytest.approx(PACE_FACTOR * 4.0)  # 20 s: above the 10 s floor
    assert activity.stragglers(now=75.0) == []  # 15 s quiet everywhere: within five steps
    steady(activity, 0, 64.0, 100.0, every=4.0, first_step=16)
    silent = activity.stragglers(now=101.0)
    assert [(s.rank, s.kind) for s in silent] == [(1, "silent"), (1, "behind")]
    assert str(silent[0]) == "rank 1 has written nothing for 41 s while the others progressed"
    assert str(silent[1]) == "rank 1 is 10 steps behind"


def test_a_fast_job_uses_the_floor_and_a_job_quiet_everywhere_has_no_silent_rank() -> None:
    activity = RankActivity(floor_s=30)
    steady(activity, 0, 0.0, 50.0, every=0.5)
    steady(activity, 1, 0.0, 50.0, every=0.5)
    assert activity.threshold_s() == 30
    # Every rank stopped together (a long evaluation, a checkpoint): no rank is singled out.
    assert activity.stragglers(now=200.0) == []
    assert activity.last_output() == pytest.approx(50.0)


def test_a_rank_that_only_printed_at_start_is_not_called_stuck() -> None:
    activity = RankActivity(floor_s=10)
    for t in (0.0, 0.1, 0.2):  # start-up lines on every rank, then only rank 0 prints
        activity.saw_line(1, t)
    steady(activity, 0, 0.0, 100.0, every=1.0)
    assert activity.stragglers(now=100.0) == []
    activity.saw_line(-1, 100.0)  # a node's launcher line is no rank's
    assert sorted(activity._ranks) == [0, 1]


def test_ranks_within_a_step_are_not_behind_and_the_most_behind_comes_first() -> None:
    activity = RankActivity()
    for rank, step in ((0, 10), (1, 9), (2, 7), (3, 4)):
        activity.saw_step(rank, step, 1.0)
    assert [str(s) for s in activity.stragglers(now=2.0)] == ["rank 3 is 6 steps behind", "rank 2 is 3 steps behind"]
    assert str(Straggler(rank=2, kind="behind", silent_s=0.0, steps_behind=1)) == "rank 2 is 1 step behind"
    with pytest.raises(ValueError, match="floor_s must be positive"):
        RankActivity(floor_s=0)
    assert RankActivity().floor_s == DEFAULT_FLOOR_S


# -- local jobs ----------------------------------------------------------------------------------
STALL = textwrap.dedent("""
    import os, time
    rank = int(os.environ["RANK"])

    def wait_for_a_lock_that_never_comes():
        while True:
            time.sleep(0.5)

    for step in range(400):
        print(f"rank {rank} step {step}", flush=True)
        if rank == 1 and step == 30:
            wait_for_a_lock_that_never_comes()
        time.sleep(0.2)
""")


def run_until_done(job, timeout: float = 120.0) -> tuple[list[tuple[float, tuple[str, ...]]], object]:
    """Poll the status until the job ends; returns the stragglers seen (with when) and the last status."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        status = job.status()
        if status.stragglers:
            seen.append((time.time(), status.stragglers))
        if status.state.is_terminal():
            return seen, status
        time.sleep(0.2)
    job.cancel()
    raise AssertionError(f"job {job.name} did not end within {timeout} s")


def test_a_quiet_rank_is_flagged_then_the_hang_timeout_fails_it_with_its_stack(tmp_path: Path) -> None:
    (tmp_path / "stall.py").write_text(STALL)
    hang = 8.0
    job = Cluster().submit(JobSpec(name="stall", script="stall.py", working_dir=str(tmp_path), procs_per_node=2,
                                   hang_timeout=hang))
    seen, status = run_until_done(job)
    rank1 = [line for line in job.logs(rank=1) if "step" in line.text]
    stopped_at = rank1[-1].time  # the last line rank 1 wrote
    assert rank1[-1].text == "rank 1 step 30"
    flagged = [(when, text) for when, texts in seen for text in texts if text.startswith("rank 1 has written nothing")]
    assert flagged, seen
    threshold = hang / 2  # flags show at half the hang timeout
    assert flagged[0][0] - stopped_at <= 2 * threshold
    assert status.state == JobState.FAILED and status.failed_rank == 1
    assert status.message.startswith("rank 1 hung: it wrote nothing for")
    assert "while the others progressed (JobSpec.hang_timeout=8 s)" in status.message
    assert status.last_lines[0] == "Fatal Python error: Aborted"
    assert any("in wait_for_a_lock_that_never_comes" in line for line in status.last_lines)
    assert status.stragglers == ()  # a finished job flags nothing
    assert "last lines of rank 1:" in status.diagnosis()


def test_a_rank_that_leaves_the_printing_to_rank_0_is_not_failed_by_the_hang_timeout(tmp_path: Path) -> None:
    (tmp_path / "quiet.py").write_text(textwrap.dedent("""
        import os, time
        rank = int(os.environ["RANK"])
        print(f"rank {rank} ready", flush=True)
        for step in range(40):
            if rank == 0:
                print(f"step {step}", flush=True)
            time.sleep(0.2)
    """))
    job = Cluster().submit(JobSpec(name="quiet", script="quiet.py", working_dir=str(tmp_path), procs_per_node=2,
                                   hang_timeout=3))
    seen, status = run_until_done(job)
    assert status.state == JobState.SUCCEEDED, status.diagnosis()
    assert seen == []


def test_a_job_where_no_rank_writes_fails_after_the_hang_timeout_with_every_ranks_stack(tmp_path: Path) -> None:
    (tmp_path / "mute.py").write_text("import time\nprint('started', flush=True)\ntime.sleep(600)\n")
    job = Cluster().submit(JobSpec(name="mute", script="mute.py", working_dir=str(tmp_path), procs_per_node=2,
                                   hang_timeout=3))
    _, status = run_until_done(job)
    assert status.state == JobState.FAILED and status.failed_rank == 0
    assert status.message.startswith("the job hung: no rank wrote anything for")
    assert "the stack of every rank still running is at the end of its log" in status.message
    assert any('mute.py", line 3 in <module>' in line for line in status.last_lines)
    for rank in (0, 1):
        assert any(line.text == "Fatal Python error: Aborted" for line in job.logs(rank=rank))


def test_a_slow_rank_is_named_steps_behind(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(textwrap.dedent("""
        import os, time
        import dsnb
        rank = int(os.environ["RANK"])
        for step in range(30):
            dsnb.report(step, loss=1.0 / (step + 1))
            time.sleep(0.1 if rank == 0 else 0.4)
    """))
    job = Cluster().submit(JobSpec(name="slow", script="slow.py", working_dir=str(tmp_path), procs_per_node=2))
    seen, status = run_until_done(job)
    assert status.state == JobState.SUCCEEDED
    behind = [text for _, texts in seen for text in texts if text.startswith("rank 1 is ")]
    assert behind and all(text.endswith("steps behind") for text in behind)


def test_hang_timeout_is_refused_where_it_is_not_enforced() -> None:
    pytest.importorskip("kubernetes")
    spec = JobSpec(name="a", script="train.py", hang_timeout=60)
    with pytest.raises(InvalidSpecError, match=r"JobSpec\.hang_timeout: backend 'mpijob' does not enforce it"):
        Cluster("mpijob", namespace="ml", kubeconfig="/nonexistent").dryrun(spec)
