"""Helpers for code running inside a rank.

Example:
    >>> import os; os.environ.pop("DSNB_DEEPSPEED_CONFIG", None)
    >>> deepspeed_config() is None
    True
    >>> os.environ["DSNB_DEEPSPEED_CONFIG_JSON"] = '{"train_batch_size": 8}'
    >>> deepspeed_config()
    {'train_batch_size': 8}
    >>> del os.environ["DSNB_DEEPSPEED_CONFIG_JSON"]
"""

from __future__ import annotations

import json
import os
from typing import Any


def deepspeed_config() -> dict[str, Any] | None:
    """The job's checked DeepSpeed config (batch sizes filled), or None outside a dsnb job.

    Pass it to ``deepspeed.initialize(config=dsnb.deepspeed_config(), ...)``. It comes from
    the file named by ``DSNB_DEEPSPEED_CONFIG``, or inline from ``DSNB_DEEPSPEED_CONFIG_JSON``
    (backends whose ranks cannot mount a file, e.g. ranks started by ``mpirun``).

    Raises:
        OSError: the file named by ``DSNB_DEEPSPEED_CONFIG`` cannot be read.
    """
    inline = os.environ.get("DSNB_DEEPSPEED_CONFIG_JSON")
    if inline:
        return json.loads(inline)
    path = os.environ.get("DSNB_DEEPSPEED_CONFIG")
    if not path:
        return None
    with open(path) as f:
        return json.load(f)
