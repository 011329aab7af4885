"""A Hugging Face Trainer script runs unchanged under dsnb, with DeepSpeed ZeRO-2 and "auto" values.

``examples/hf_trainer/train.py`` trains a tiny GPT-2 for real on 2 CPU ranks (gloo) with the
ZeRO-2 config in ``ds_zero2.json``, whose values the Trainer fills. Its printed logs become
metrics with no change to the script, numbered by line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dsnb import Cluster, JobSpec, JobState

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer"


@pytest.mark.deepspeed
def test_the_trainer_script_trains_on_two_ranks_and_its_losses_become_metrics(tmp_path: Path) -> None:
    spec = JobSpec(name="hf-trainer", script="train.py", working_dir=str(EXAMPLE), procs_per_node=2,
                   args=["--steps", "8", "--output-dir", str(tmp_path / "out")], deepspeed=str(EXAMPLE / "ds_zero2.json"))
    assert spec.deepspeed_config["train_batch_size"] == "auto"  # left to the Trainer
    job = Cluster("local").submit(spec)
    final = job.wait(timeout=600)
    assert final.state == JobState.SUCCEEDED, [str(line) for line in job.logs(tail=30)]
    losses = job.metrics("loss", rank=0)
    assert [(s.step, s.step_unit) for s in losses] == [(1, "log line"), (2, "log line"), (3, "log line"), (4, "log line")]
    # Two ranks of two samples each: one step is 4 of the 64 samples, so the log at step 2 is at epoch 0.125
    # (with a world of 1, as a Trainer that missed the launcher's ranks would count, it would be 0.0625).
    assert job.metrics("epoch", rank=0)[0].value == pytest.approx(0.125)
    assert job.metrics("train_loss", rank=0)
