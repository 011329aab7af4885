"""Metrics from frameworks: the Hugging Face Trainer's printed logs, with and without dsnb's callback.

The Trainer runs for real here (one CPU process, a tiny model, six steps, a log every two), and
its printed output goes through the same parser every backend uses.
"""

from __future__ import annotations

import json

import pytest

from dsnb.metrics import MAX_LOGGED_DICT_CHARS, REPORTS_STEPS_TAG, MetricParser, sample_to_dict
from dsnb.status import MetricSample

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


def test_a_trainer_line_of_transformers_5_becomes_samples_numbered_by_line() -> None:
    parser = MetricParser()
    first = parser.feed(0, "{'loss': '6.049', 'grad_norm': '1.156', 'learning_rate': '0', 'epoch': '0.03125'}")
    assert [(s.step, s.name, s.value, s.step_unit) for s in first] == [
        (1, "loss", 6.049, "log line"), (1, "grad_norm", 1.156, "log line"),
        (1, "learning_rate", 0.0, "log line"), (1, "epoch", 0.03125, "log line")]
    second = parser.feed(0, "{'loss': 5.5, 'grad_norm': 1.0, 'learning_rate': 5e-05, 'epoch': 0.06}")  # transformers 4
    assert {s.step for s in second} == {2} and second[0].value == 5.5
    assert parser.feed(1, "{'loss': '4.0', 'epoch': '0.1'}")[0].step == 1  # numbered per rank


def test_lines_that_only_look_like_logs_give_nothing() -> None:
    parser = MetricParser()
    assert parser.feed(0, "{'epoch': 'warmup'}") == []
    assert parser.feed(0, "{'epoch': __import__('os').getpid()}") == []  # never evaluated
    assert parser.feed(0, "{'loss': 1.0, 'epoch': 0.1" + ", 'x': 1.0" * MAX_LOGGED_DICT_CHARS) == []
    assert parser.feed(0, "{'epoch' 1}") == []


def test_the_line_unit_survives_the_record() -> None:
    sample = MetricSample(3, "loss", 2.0, 0, 10.0, step_unit="log line")
    assert MetricSample(**json.loads(json.dumps(sample_to_dict(sample)))) == sample
    assert "step_unit" not in sample_to_dict(MetricSample(3, "loss", 2.0, 0, 10.0))


def _train(tmp_path, capsys, callbacks) -> list[MetricSample]:
    from transformers import Trainer, TrainingArguments

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, x, labels):
            return {"loss": torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), labels)}

    torch.manual_seed(0)
    data = [{"x": torch.randn(4), "labels": torch.randn(())} for _ in range(24)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, logging_steps=2,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    capsys.readouterr()
    Trainer(model=Tiny(), args=args, train_dataset=data, callbacks=callbacks).train()
    parser = MetricParser()
    return [sample for line in capsys.readouterr().out.splitlines() for sample in parser.feed(0, line)]


def test_without_the_callback_the_trainers_losses_are_numbered_by_line(tmp_path, capsys) -> None:
    losses = [s for s in _train(tmp_path, capsys, []) if s.name == "loss"]
    assert [(s.step, s.step_unit) for s in losses] == [(1, "log line"), (2, "log line"), (3, "log line")]


def test_with_the_callback_every_value_is_at_the_trainers_global_step_once(tmp_path, capsys) -> None:
    from dsnb.integrations.transformers import DsnbCallback

    samples = _train(tmp_path, capsys, [DsnbCallback()])
    losses = [s for s in samples if s.name == "loss"]
    assert [(s.step, s.step_unit) for s in losses] == [(2, "step"), (4, "step"), (6, "step")]
    assert all(s.step_unit == "step" for s in samples)  # the printed dicts are no longer counted
    assert {"grad_norm", "learning_rate", "epoch"} <= {s.name for s in samples}
    assert any(s.name == "train_loss" and s.step == 6 for s in samples)


def test_the_callback_announces_itself_before_the_first_log(tmp_path, capsys) -> None:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from dsnb.integrations.transformers import DsnbCallback

    state = TrainerState()
    state.is_world_process_zero = True
    DsnbCallback().on_train_begin(TrainingArguments(output_dir=str(tmp_path), report_to=[]), state, TrainerControl())
    assert capsys.readouterr().out.startswith(REPORTS_STEPS_TAG)


def test_a_dict_written_through_tqdm_after_the_progress_bar_is_found() -> None:
    line = (" 25%|██▌       | 2/8 [00:00<00:00, 11.87it/s]                                             "
            "{'loss': '5.385', 'grad_norm': '1.023', 'learning_rate': '0.001', 'epoch': '0.125'}")
    samples = MetricParser().feed(0, line)
    assert [(s.name, s.value) for s in samples][:2] == [("loss", 5.385), ("grad_norm", 1.023)]
