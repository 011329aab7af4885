"""Metrics: :func:`report` for training scripts, and the parser that finds samples in logs.

A metric travels the way logs do, as one tagged JSON line on stdout, so it reaches the
notebook from every backend (a local process, a pod, a Ray worker) with no side channel.
DeepSpeed's own progress lines are recognised too, and so are the Hugging Face Trainer's
metrics lines (``{'loss': '6.049', 'grad_norm': '1.156', 'learning_rate': '0', 'epoch': '0.03'}``).

Those lines carry no step, and dsnb does not invent one: their samples are numbered by line,
1, 2, 3... on each rank, with ``step_unit="log line"`` (the Trainer prints one every
``logging_steps`` optimizer steps, which the line does not say). For the true global step,
add :class:`dsnb.integrations.transformers.DsnbCallback` to the Trainer: it reports each
logged dict at ``state.global_step`` and announces itself (:data:`REPORTS_STEPS_TAG`), after
which that rank's printed dicts are no longer parsed, so no sample is counted twice.

Example:
    >>> parser = MetricParser()
    >>> [(s.step, s.name, s.value) for s in parser.feed(0, 'DSNB_METRIC {"step": 3, "loss": 2.5}')]
    [(3, 'loss', 2.5)]
    >>> line = "[Rank 0] step=10, skipped=0, lr=[0.001], mom=[(0.9, 0.999)]"
    >>> [(s.step, s.name, s.value) for s in parser.feed(0, line)]
    [(10, 'lr', 0.001), (10, 'skipped', 0.0)]
"""

from __future__ import annotations

import ast
import json
import re
import sys
import time
from typing import Any, TextIO

from dsnb.status import MetricSample

#: Prefix of the line :func:`report` prints.
METRIC_TAG = "DSNB_METRIC "
#: Printed once by a rank whose framework callback reports metrics with their true steps.
REPORTS_STEPS_TAG = "DSNB_REPORTS_STEPS"
#: The longest framework metrics line parsed (a logged dict of a few dozen values).
MAX_LOGGED_DICT_CHARS = 8192

_DS_STEP = re.compile(r"\bstep=(\d+), skipped=(\d+), lr=\[([^\],]+)")
_DS_THROUGHPUT = re.compile(r"global_step=(\d+), RunningAvgSamplesPerSec=([0-9.eE+-]+), CurrSamplesPerSec=([0-9.eE+-]+)")
_DS_TIMERS = re.compile(r"time \(ms\) \|(.*)")
_DS_TIMER_ITEM = re.compile(r"\s*([A-Za-z_]+): ([0-9.]+)")
_RANK_IN_LINE = re.compile(r"\[Rank (\d+)\]")


def report(step: int, *, file: TextIO | None = None, **values: float) -> None:
    """Emit one metric sample from a training script, on any backend.

    Call it from any rank; the sample carries that rank. ``total_steps=N`` is shown as
    progress by the views rather than plotted.

    Args:
        step: the training step (an integer that grows).
        file: where to write; standard output by default.
        **values: metric names and numbers, e.g. ``loss=2.31, tokens_per_s=5100``.

    Raises:
        ValueError: a step that is not an int, no values, or a value that is not a number.

    Example:
        >>> import io; out = io.StringIO()
        >>> report(step=1, loss=2.5, file=out)
        >>> out.getvalue()
        'DSNB_METRIC {"step": 1, "loss": 2.5}\\n'
    """
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"dsnb.report: step must be an int, got {step!r}")
    if not values:
        raise ValueError("dsnb.report: give at least one value, e.g. report(step=1, loss=2.3)")
    record: dict[str, Any] = {"step": step}
    for name, value in values.items():
        try:
            record[name] = float(value)  # tensors and numpy scalars convert too
        except (TypeError, ValueError) as e:
            raise ValueError(f"dsnb.report: {name}={value!r} is not a number") from e
    out = file if file is not None else sys.stdout
    out.write(METRIC_TAG + json.dumps(record, allow_nan=True) + "\n")
    out.flush()


def is_metric_line(text: str) -> bool:
    """True for a line :func:`report` printed (views show those as numbers, not as log text).

    Example:
        >>> is_metric_line('DSNB_METRIC {"step": 1, "loss": 2.0}'), is_metric_line("step 1")
        (True, False)
    """
    return text.startswith(METRIC_TAG)


class MetricParser:
    """Turns log lines into metric samples; one parser per job (it remembers the last step).

    Recognises :func:`report` lines and DeepSpeed's progress lines: ``step=N, skipped=K, lr=[..]``,
    ``RunningAvgSamplesPerSec=..`` and the ``time (ms) | fwd: ..`` breakdown (which carries no
    step, so it takes the last step seen from that rank).
    """

    def __init__(self) -> None:
        self._last_step: dict[int, int] = {}
        self._logged_lines: dict[int, int] = {}  # rank -> Trainer metrics lines seen
        self._own_steps: set[int] = set()  # ranks whose callback reports true steps

    def feed(self, rank: int, text: str, when: float | None = None) -> list[MetricSample]:
        """Samples found in one line of output of ``rank`` (usually none; never raises on odd text)."""
        when = time.time() if when is None else when
        try:
            return self._feed(rank, text, when)
        except (ValueError, OverflowError):
            return []  # a line that only looks like a metric line, e.g. "lr=[warmup]"

    def _feed(self, rank: int, text: str, when: float) -> list[MetricSample]:
        at = text.find(METRIC_TAG)
        if at >= 0:
            return self._parse_report(rank, text[at + len(METRIC_TAG):], when)
        if "'epoch'" in text and text.rstrip().endswith("}") and (start := text.rfind("{'")) >= 0:
            # The Trainer writes through tqdm: the dict may follow the progress bar on the same line.
            return self._parse_logged_dict(rank, text[start:], when)
        if text.startswith(REPORTS_STEPS_TAG):
            self._own_steps.add(rank)
            return []
        if "step=" not in text and "time (ms)" not in text:
            return []  # fast path: most lines carry no metric
        rank_match = _RANK_IN_LINE.search(text)
        if rank_match:
            rank = int(rank_match.group(1))
        samples: list[MetricSample] = []
        if m := _DS_STEP.search(text):
            step = int(m.group(1))
            self._last_step[rank] = step
            samples.append(MetricSample(step, "lr", float(m.group(3)), rank, when))
            samples.append(MetricSample(step, "skipped", float(m.group(2)), rank, when))
        elif m := _DS_THROUGHPUT.search(text):
            step = int(m.group(1))
            self._last_step[rank] = step
            samples.append(MetricSample(step, "samples_per_sec", float(m.group(3)), rank, when))
            samples.append(MetricSample(step, "avg_samples_per_sec", float(m.group(2)), rank, when))
        elif m := _DS_TIMERS.search(text):
            step = self._last_step.get(rank, 0)
            for name, value in _DS_TIMER_ITEM.findall(m.group(1)):
                samples.append(MetricSample(step, f"time_ms/{name}", float(value), rank, when))
        return samples

    def _parse_report(self, rank: int, payload: str, when: float) -> list[MetricSample]:
        try:
            record = json.loads(payload)
            step = int(record.pop("step"))
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
            return []
        self._last_step[rank] = step
        return [
            MetricSample(step, name, float(value), rank, when)
            for name, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        ]


    def _parse_logged_dict(self, rank: int, text: str, when: float) -> list[MetricSample]:
        """A Trainer metrics line: its numbers, numbered by line on this rank (the line has no step)."""
        if rank in self._own_steps or len(text) > MAX_LOGGED_DICT_CHARS:
            return []
        try:
            logged = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return []
        if not isinstance(logged, dict):
            return []
        values = numeric_values(logged)
        if not values:
            return []
        line = self._logged_lines[rank] = self._logged_lines.get(rank, 0) + 1
        return [MetricSample(line, name, value, rank, when, step_unit="log line") for name, value in values.items()]


def numeric_values(logged: dict[Any, Any]) -> dict[str, float]:
    """The entries of a framework's logged dict that are numbers (or numbers written as strings).

    Example:
        >>> numeric_values({"loss": "6.049", "epoch": 0.5, "note": "warmup", "done": True})
        {'loss': 6.049, 'epoch': 0.5}
    """
    found = {name: _number(value) for name, value in logged.items() if isinstance(name, str)}
    return {name: value for name, value in found.items() if value is not None}


def _number(value: Any) -> float | None:
    """``value`` as a float: transformers 5 prints its logged numbers as strings."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def sample_to_dict(sample: MetricSample) -> dict[str, Any]:
    """JSON-ready form of a sample (used for the local job directory)."""
    record = {"step": sample.step, "name": sample.name, "value": sample.value, "rank": sample.rank, "time": sample.time}
    if sample.step_unit != "step":
        record["step_unit"] = sample.step_unit
    return record
