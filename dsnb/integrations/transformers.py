"""A Hugging Face Trainer callback that reports every logged value at the Trainer's global step.

Example:
    >>> from transformers import Trainer                                   # doctest: +SKIP
    >>> from dsnb.integrations.transformers import DsnbCallback            # doctest: +SKIP
    >>> trainer = Trainer(model, args, train_dataset=data, callbacks=[DsnbCallback()])  # doctest: +SKIP

On the Trainer's main process only (where it logs), each ``on_log`` becomes one
:func:`dsnb.report` line at ``state.global_step``; the numbers the Trainer logs as strings
(transformers 5) are converted, anything else that is not a number is left out.
``on_train_begin`` prints :data:`dsnb.metrics.REPORTS_STEPS_TAG`, so dsnb stops numbering the
Trainer's printed dicts by line for that rank and no sample is counted twice, and reports the
Trainer's ``max_steps`` as ``total_steps``, so the views show progress and the time left.
"""

from __future__ import annotations

import sys
from typing import Any

from transformers import TrainerCallback

from dsnb.metrics import REPORTS_STEPS_TAG, numeric_values, report


class DsnbCallback(TrainerCallback):
    """Reports the Trainer's logs to dsnb at their global step (see the module docstring).

    Raises:
        Nothing: a log without a number is skipped.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            print(f"{REPORTS_STEPS_TAG} transformers", file=sys.stdout, flush=True)
            if isinstance(state.max_steps, int) and state.max_steps > 0:
                report(step=int(state.global_step), total_steps=state.max_steps)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        values = numeric_values(logs or {})
        if values:
            report(step=int(state.global_step), **values)
