"""Code that runs inside a job: in its ranks, its pods, and the processes that start them.

Nothing here runs in the notebook. The package holds what a user's script calls
(:func:`deepspeed_config`, :func:`checkpoint_dir`), the Kubernetes pod entry
(:mod:`~dsnb.runtime.pod_entry`), the rank shim that ``mpirun`` starts on MPIJob workers
(:mod:`~dsnb.runtime.rank_shim`), the Ray Train entry (:mod:`~dsnb.runtime.ray_train_entry`) and
Ray Serve application (:mod:`~dsnb.runtime.ray_serve_app`), the local backend's detached
supervisor (:mod:`~dsnb.runtime.supervisor`) and the model server
(:mod:`dsnb.runtime.server`). Client code, in :mod:`dsnb.backends`, starts these by module name.

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


def checkpoint_dir(default: str) -> str:
    """Where this rank saves and resumes checkpoints: ``default`` unless the backend provides one.

    The Ray backend gives each worker a directory that Ray Train fills from the run's last
    checkpoint before the script starts, and takes back as a checkpoint when it ends
    (``DSNB_CHECKPOINT_DIR``). Elsewhere ``default`` is used as given (a shared volume on
    Kubernetes, a local path on this machine).

    Example:
        >>> import os; os.environ.pop("DSNB_CHECKPOINT_DIR", None)
        >>> checkpoint_dir("./checkpoints/tiny-gpt")
        './checkpoints/tiny-gpt'

    Raises:
        Nothing.
    """
    return os.environ.get("DSNB_CHECKPOINT_DIR") or default
