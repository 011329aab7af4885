"""A Lightning script runs unchanged under dsnb, with its DeepSpeed strategy (ZeRO-2) on CPU.

``examples/lightning/train.py`` trains for real on 2 CPU ranks (gloo): Lightning sees the
local backend's ``LOCAL_RANK`` and spawns no processes of its own, and dsnb's logger reports
the loss at Lightning's step (0-based: the logs of optimizer steps 2, 4, 6 are at 1, 3, 5).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dsnb import Cluster, JobSpec, JobState

pytest.importorskip("lightning")
pytest.importorskip("deepspeed")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning"


@pytest.mark.deepspeed
def test_the_lightning_script_trains_on_two_ranks_with_deepspeed_and_reports_its_losses(tmp_path: Path) -> None:
    spec = JobSpec(name="lightning", script="train.py", working_dir=str(EXAMPLE), procs_per_node=2,
                   args=["--steps", "6", "--logger", "--output-dir", str(tmp_path / "out")])
    job = Cluster("local").submit(spec)
    final = job.wait(timeout=300)
    assert final.state == JobState.SUCCEEDED, [str(line) for line in job.logs(tail=30)]
    said = [(line.rank, line.text) for line in job.logs() if line.text.startswith("rank ")]
    # One line per launched rank: a Lightning that spawned its own processes would print more.
    assert sorted(said) == [(rank, f"rank {rank} of 2: 6 steps, CPUDeepSpeedStrategy with ZeRO stage 2") for rank in (0, 1)]
    losses = job.metrics("loss")
    assert [(s.step, s.rank, s.step_unit) for s in losses] == [(1, 0, "step"), (3, 0, "step"), (5, 0, "step")]
    assert [s.value for s in job.metrics("epoch")] == [0.0, 0.0, 0.0]
