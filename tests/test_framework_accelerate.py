"""An Accelerate loop runs unchanged under dsnb, with DeepSpeed ZeRO-2 and "auto" values.

``examples/accelerate/train.py`` trains for real on 2 CPU ranks (gloo): Accelerate reads the
local backend's ``LOCAL_RANK``/``RANK``/``WORLD_SIZE``, counts both ranks and fills the
config's batch sizes for a world of two; dsnb's tracker reports the loss at the loop's step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dsnb import Cluster, JobSpec, JobState

pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "accelerate"


@pytest.mark.deepspeed
def test_the_accelerate_script_trains_on_two_ranks_with_deepspeed_and_reports_its_losses() -> None:
    spec = JobSpec(name="accelerate", script="train.py", working_dir=str(EXAMPLE), procs_per_node=2,
                   args=["--steps", "6", "--tracker"])
    job = Cluster("local").submit(spec)
    final = job.wait(timeout=300)
    assert final.state == JobState.SUCCEEDED, [str(line) for line in job.logs(tail=30)]
    said = {line.rank: line.text for line in job.logs() if line.text.startswith("rank ")}
    # Both ranks are one world of two, inside DeepSpeed: "auto" became 4 per rank x 1 x 2 ranks.
    assert said == {rank: f"rank {rank} of 2: 6 steps, DEEPSPEED ZeRO stage 2, train_batch_size 8" for rank in (0, 1)}
    losses = job.metrics("loss")
    assert [(s.step, s.rank, s.step_unit) for s in losses] == [(step, 0, "step") for step in range(1, 7)]
    assert all(s.value > 0 for s in losses)
