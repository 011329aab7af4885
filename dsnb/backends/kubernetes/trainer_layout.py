"""Where the ranks of a TrainJob run: Kubeflow Trainer's pods on an MPI runtime, and mpirun's placement.

Trainer v2.3.0 (``pkg/runtime/framework/plugins/mpi/mpi.go``) makes, when the runtime runs the
launcher as a node (``runLauncherAsNode``, as the stock ``deepspeed-distributed`` does),
``max(numNodes - 1, 1)`` ``node`` pods plus the ``launcher`` pod, gives both ``resourcesPerNode``,
and lists them all in the hostfile, in the order of the runtime's ``replicatedJobs``: the stock
runtimes of v2.3.0 list ``node`` first, v2.0 to v2.2 the launcher. Whatever that order, Open MPI
4 starts the first ranks on mpirun's own node when the hostfile lists it, and dsnb's launcher
prelude puts that node first in the hostfile it gives mpirun (so ``MASTER_ADDR`` is rank 0's
host under every Open MPI): ranks ``0..P-1`` run on the launcher, the next on ``node-0-0``, and
so on. With ``nodes=1`` there are still two pods, and the node pod runs no rank.

JobSet names each pod's host ``<jobset>-<replicatedJob>-<job index>-<pod index>`` (the JobSet is
named after the TrainJob; the pod's name adds a random part).

Example:
    >>> rank_hosts("tiny-x7k2", nodes=3)
    ['tiny-x7k2-launcher-0-0', 'tiny-x7k2-node-0-0', 'tiny-x7k2-node-0-1']
    >>> rank_hosts("tiny-x7k2", nodes=1)
    ['tiny-x7k2-launcher-0-0']
    >>> node_pods(1), node_pods(1, launcher_is_node=False)
    (1, 1)
    >>> rank_hosts("tiny-x7k2", nodes=2, launcher_is_node=False)
    ['tiny-x7k2-node-0-0', 'tiny-x7k2-node-0-1']
"""

from __future__ import annotations


def node_pods(nodes: int, launcher_is_node: bool = True) -> int:
    """How many ``node`` pods Trainer makes for ``numNodes``."""
    return max(nodes - 1, 1) if launcher_is_node else nodes


def launcher_host(name: str) -> str:
    """The launcher pod's hostname."""
    return f"{name}-launcher-0-0"


def rank_hosts(name: str, nodes: int, launcher_is_node: bool = True) -> list[str]:
    """The hosts of TrainJob ``name`` that run ranks, in rank order (``procs_per_node`` ranks each)."""
    hosts = [launcher_host(name)] if launcher_is_node else []
    hosts += [f"{name}-node-0-{i}" for i in range(node_pods(nodes, launcher_is_node))]
    return hosts[:nodes]
