"""An Accelerate tracker that reports every ``accelerator.log(values, step=...)`` to dsnb at that step.

Example:
    >>> from accelerate import Accelerator                                  # doctest: +SKIP
    >>> from dsnb.integrations.accelerate import DsnbTracker               # doctest: +SKIP
    >>> accelerator = Accelerator(log_with=[DsnbTracker()])                # doctest: +SKIP
    >>> accelerator.init_trackers("my-run")                                # doctest: +SKIP
    >>> accelerator.log({"loss": loss.item()}, step=step)                  # doctest: +SKIP

Accelerate prints nothing of what a script logs (its trackers write to TensorBoard, W&B...),
so without this tracker dsnb sees no metric from an Accelerate loop. Accelerate calls it on
the main process only; each ``log`` becomes one :func:`dsnb.report` line at the step the
script gave. A call without ``step=`` has no step to report at, and dsnb does not invent
one: it is left out, with one warning on stderr. ``start`` (called by ``init_trackers``)
prints :data:`dsnb.metrics.REPORTS_STEPS_TAG`.
"""

from __future__ import annotations

import sys
from typing import Any

from accelerate.tracking import GeneralTracker

from dsnb.metrics import REPORTS_STEPS_TAG, numeric_values, report


class DsnbTracker(GeneralTracker):
    """Reports ``accelerator.log`` values to dsnb at their step (see the module docstring).

    Raises:
        Nothing: values that are not numbers, and calls without a step, are skipped.
    """

    name = "dsnb"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self) -> None:
        super().__init__()
        self._warned = False

    @property
    def tracker(self) -> None:
        """No run object: the samples go to standard output."""
        return None

    def start(self) -> None:
        print(f"{REPORTS_STEPS_TAG} accelerate", file=sys.stdout, flush=True)

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        if step is None:
            if not self._warned:
                self._warned = True
                print("dsnb: accelerator.log(...) without step= is not reported; pass step=", file=sys.stderr, flush=True)
            return
        found = numeric_values(values)
        if found:
            report(step=int(step), **found)
