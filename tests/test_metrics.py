"""dsnb.report and the parser that turns output lines into metric samples."""

from __future__ import annotations

import io
import math

import pytest

from dsnb.metrics import METRIC_TAG, MetricParser, report

DS_STEP = "[2026-11-28 20:06:22,632] [INFO] [logging.py:123:log_dist] [Rank 0] step=10, skipped=0, lr=[0.001], mom=[(0.9, 0.999)]"
DS_SPEED = ("[2026-11-28 20:06:22,633] [INFO] [timer.py:264:stop] epoch=0/micro_step=10/global_step=10, "
            "RunningAvgSamplesPerSec=902.90, CurrSamplesPerSec=1016.42, MemAllocated=0.42GB, MaxMemAllocated=0.42GB")
DS_TIMERS = "[Rank 1] time (ms) | fwd: 2.07 | bwd: 22.72 | bwd_inner: 11.86 | bwd_allreduce: 10.81 | step: 21.81"


def parsed(parser: MetricParser, rank: int, line: str) -> list[tuple[int, str, float, int]]:
    return [(s.step, s.name, s.value, s.rank) for s in parser.feed(rank, line, when=1.0)]


def test_report_round_trips_through_the_parser() -> None:
    out = io.StringIO()
    report(step=4, loss=2.5, tokens_per_s=5100, file=out)
    assert out.getvalue().startswith(METRIC_TAG)
    assert parsed(MetricParser(), 1, out.getvalue().strip()) == [(4, "loss", 2.5, 1), (4, "tokens_per_s", 5100.0, 1)]


def test_report_keeps_nan_and_accepts_numpy_like_values() -> None:
    class Scalar:  # what a one-element tensor or NumPy scalar offers
        def __float__(self) -> float:
            return 0.25

    out = io.StringIO()
    report(step=1, loss=float("nan"), lr=Scalar(), file=out)
    samples = MetricParser().feed(0, out.getvalue().strip())
    assert math.isnan(samples[0].value) and samples[1].value == 0.25


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"step": 1.5, "loss": 1.0}, "step must be an int"), ({"step": 1}, "at least one value"),
     ({"step": 1, "loss": "high"}, "loss='high' is not a number")],
)
def test_report_refuses_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        report(file=io.StringIO(), **kwargs)


def test_deepspeed_progress_lines() -> None:
    parser = MetricParser()
    assert parsed(parser, 0, DS_STEP) == [(10, "lr", 0.001, 0), (10, "skipped", 0.0, 0)]
    assert parsed(parser, 0, DS_SPEED) == [(10, "samples_per_sec", 1016.42, 0), (10, "avg_samples_per_sec", 902.9, 0)]


def test_timer_breakdown_takes_the_last_step_of_its_rank() -> None:
    parser = MetricParser()
    parser.feed(1, 'DSNB_METRIC {"step": 7, "loss": 1.0}')
    parser.feed(0, 'DSNB_METRIC {"step": 99, "loss": 1.0}')
    samples = parsed(parser, 1, DS_TIMERS)
    assert samples[0] == (7, "time_ms/fwd", 2.07, 1)
    assert [name for _, name, _, _ in samples] == [f"time_ms/{n}" for n in ("fwd", "bwd", "bwd_inner", "bwd_allreduce", "step")]


@pytest.mark.parametrize("line", ["plain output", 'DSNB_METRIC {"loss": 1}', "DSNB_METRIC {broken", "stepping=3",
                                  "[Rank 0] step=1, skipped=0, lr=[warmup]", 'DSNB_METRIC {"step": Infinity, "loss": 1}'])
def test_lines_without_metrics_give_nothing(line: str) -> None:
    assert MetricParser().feed(0, line) == []
