"""Helpers for code running inside a rank.

Example:
    >>> import os; os.environ.pop("DSNB_DEEPSPEED_CONFIG", None)
    >>> deepspeed_config() is None
    True
"""

from __future__ import annotations

import json
import os
from typing import Any


def deepspeed_config() -> dict[str, Any] | None:
    """The job's checked DeepSpeed config (batch sizes filled), or None outside a dsnb job.

    Pass it to ``deepspeed.initialize(config=dsnb.deepspeed_config(), ...)``.

    Raises:
        OSError: the file named by ``DSNB_DEEPSPEED_CONFIG`` cannot be read.
    """
    path = os.environ.get("DSNB_DEEPSPEED_CONFIG")
    if not path:
        return None
    with open(path) as f:
        return json.load(f)
