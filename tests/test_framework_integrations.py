"""dsnb's Accelerate tracker and Lightning logger, in one process: what they print is what dsnb parses.

The Lightning Trainer runs for real here (one CPU process, a tiny model, six steps, a log every
two); its output goes through the parser every backend uses.
"""

from __future__ import annotations

import pytest

from dsnb.metrics import REPORTS_STEPS_TAG, MetricParser
from dsnb.status import MetricSample


def _parsed(out: str) -> list[MetricSample]:
    parser = MetricParser()
    return [sample for line in out.splitlines() for sample in parser.feed(0, line)]


def test_the_accelerate_tracker_reports_at_the_given_step_and_leaves_out_a_log_without_one(capsys) -> None:
    pytest.importorskip("accelerate")
    from dsnb.integrations.accelerate import DsnbTracker

    tracker = DsnbTracker()
    tracker.start()
    tracker.log({"loss": 2.5, "note": "warmup"}, step=7)
    tracker.log({"loss": 2.0})
    tracker.log({"loss": 1.5})
    captured = capsys.readouterr()
    assert captured.out.startswith(REPORTS_STEPS_TAG)
    assert [(s.step, s.name, s.value) for s in _parsed(captured.out)] == [(7, "loss", 2.5)]
    assert captured.err.count("without step=") == 1


def test_the_lightning_logger_reports_at_lightnings_step_on_rank_zero_only(tmp_path, capsys) -> None:
    pytest.importorskip("lightning")
    import lightning as L
    import torch
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from dsnb.integrations.lightning import DsnbLogger

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            loss = torch.nn.functional.mse_loss(self.linear(batch[0]).squeeze(-1), batch[1])
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, 4), torch.randn(24))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=6, log_every_n_steps=2, logger=DsnbLogger(),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    capsys.readouterr()
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=4))
    out = capsys.readouterr().out
    samples = _parsed(out)
    assert [s.step for s in samples if s.name == "loss"] == [1, 3, 5]  # Lightning's step: optimizer steps 2, 4, 6
    assert {s.name for s in samples} == {"loss", "epoch"} and out.count(REPORTS_STEPS_TAG) == 1

    other = DsnbLogger()
    rank, rank_zero_only.rank = rank_zero_only.rank, 1
    try:
        other.log_metrics({"loss": 1.0}, step=3)
    finally:
        rank_zero_only.rank = rank
    other.log_metrics({"loss": 1.0})  # no step: nothing
    assert capsys.readouterr().out == ""


def test_the_trainer_callback_reports_max_steps_as_the_total_on_the_main_process_only(capsys) -> None:
    pytest.importorskip("transformers")
    from transformers import TrainerControl, TrainerState

    from dsnb.integrations.transformers import DsnbCallback

    callback = DsnbCallback()
    callback.on_train_begin(None, TrainerState(max_steps=120, global_step=0), TrainerControl())
    out = capsys.readouterr().out
    assert out.startswith(REPORTS_STEPS_TAG)
    assert [(s.step, s.name, s.value) for s in _parsed(out)] == [(0, "total_steps", 120.0)]
    worker = TrainerState(max_steps=120, global_step=0, is_world_process_zero=False)
    callback.on_train_begin(None, worker, TrainerControl())
    assert capsys.readouterr().out == ""
