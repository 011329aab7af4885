"""A Lightning logger that reports every logged metric to dsnb at Lightning's own step.

Example:
    >>> import lightning as L                                              # doctest: +SKIP
    >>> from dsnb.integrations.lightning import DsnbLogger                 # doctest: +SKIP
    >>> trainer = L.Trainer(logger=DsnbLogger(), log_every_n_steps=2)      # doctest: +SKIP
    >>> fabric = L.Fabric(loggers=[DsnbLogger()])                          # doctest: +SKIP

It works for the Lightning ``Trainer`` (``self.log`` in a ``LightningModule``) and for
``Fabric`` (``fabric.log``/``fabric.log_dict``). On global rank 0 only (``rank_zero_only``,
as Lightning's own loggers), each ``log_metrics(metrics, step)`` becomes one
:func:`dsnb.report` line at ``step``: the step Lightning gives every logger, the same that
TensorBoard or the CSV logger records. The Trainer counts it from 0: a loss logged in the
training step of the k-th optimizer step (1, 2, ...) is at step k - 1, and ``epoch`` comes
with it. A call without a step is left out (dsnb does not invent one). The first report is
preceded by :data:`dsnb.metrics.REPORTS_STEPS_TAG`.

Without this logger dsnb reads no metric from Lightning: it prints the values logged with
``prog_bar=True`` only inside its progress bar, redrawn in place and numbered by the batch
within the epoch, which is not parsed.
"""

from __future__ import annotations

import sys
from argparse import Namespace
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers.logger import Logger

from dsnb.metrics import REPORTS_STEPS_TAG, numeric_values, report


class DsnbLogger(Logger):
    """Reports Lightning's logged metrics to dsnb at their step (see the module docstring).

    Raises:
        Nothing: values that are not numbers, and calls without a step, are skipped.
    """

    def __init__(self) -> None:
        super().__init__()
        self._announced = False

    @property
    def name(self) -> str:
        return "dsnb"

    @property
    def version(self) -> None:
        """None, so the progress bar shows no ``v_num``."""
        return None

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if step is None:
            return
        found = numeric_values(metrics)
        if not found:
            return
        if not self._announced:
            self._announced = True
            print(f"{REPORTS_STEPS_TAG} lightning", file=sys.stdout, flush=True)
        report(step=int(step), **found)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Hyperparameters are not metrics: nothing is reported."""
