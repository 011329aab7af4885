"""What a rank runs on, derived in one place: the collective backend and its OpenMP threads.

Every backend (and the rank-side server, which sees only its own machine) asks these
functions instead of deciding for itself, so a GPU job gets nccl and a CPU job gloo with
the same thread count everywhere. :class:`~dsnb.spec.Resources` and
:class:`~dsnb.spec.JobSpec` offer them as properties.

Example:
    >>> collective_backend(on_gpu=False), accelerator(on_gpu=False)
    ('gloo', 'cpu')
    >>> threads_per_rank(cpu=8, procs_per_node=3)
    2
"""

from __future__ import annotations


def collective_backend(on_gpu: bool) -> str:
    """The torch.distributed backend: ``"nccl"`` with GPUs, ``"gloo"`` on CPU.

    Example:
        >>> collective_backend(on_gpu=True)
        'nccl'
    """
    return "nccl" if on_gpu else "gloo"


def accelerator(on_gpu: bool) -> str:
    """The kind of device the ranks compute on: ``"gpu"`` or ``"cpu"``.

    On ``"cpu"`` the ranks get ``DS_ACCELERATOR=cpu``; on ``"gpu"`` DeepSpeed picks CUDA itself.

    Example:
        >>> accelerator(on_gpu=True)
        'gpu'
    """
    return "gpu" if on_gpu else "cpu"


def threads_per_rank(cpu: float | str | None, procs_per_node: int) -> int | None:
    """OpenMP threads of each rank (``OMP_NUM_THREADS``): the node's CPUs shared by its ranks,
    at least one; None when the CPUs are not a plain number (unset, or a quantity such as ``"500m"``).

    Example:
        >>> threads_per_rank(cpu=0.5, procs_per_node=1), threads_per_rank(cpu="500m", procs_per_node=1)
        (1, None)
    """
    if isinstance(cpu, bool) or not isinstance(cpu, (int, float)):
        return None
    return max(1, int(cpu // procs_per_node))
