"""What the frameworks detect is what every dsnb backend gives a rank (see docs/frameworks.md).

Accelerate 1.16 (``accelerate/state.py``) and the Hugging Face Trainer read ``LOCAL_RANK``,
``RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``; Lightning 2.6's
``LightningEnvironment`` needs ``LOCAL_RANK`` (or it spawns its own processes) and takes the
node from ``NODE_RANK``/``GROUP_RANK``; the examples size the Lightning world from
``LOCAL_WORLD_SIZE``. On CPU DeepSpeed needs ``DS_ACCELERATOR=cpu``.
"""

from __future__ import annotations

import pytest

from dsnb import Cluster, JobSpec
from dsnb.runtime.rank_shim import set_torch_distributed_env

DETECTED = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"}


def test_the_local_backend_gives_each_rank_all_of_it() -> None:
    plan = Cluster("local").dryrun(JobSpec(name="fw", command=["true"], nodes=2, procs_per_node=2))
    for command in plan.commands:
        assert DETECTED <= command.env.keys() and command.env["DS_ACCELERATOR"] == "cpu"
    last = plan.commands[-1].env
    assert (last["RANK"], last["LOCAL_RANK"], last["LOCAL_WORLD_SIZE"], last["NODE_RANK"], last["GROUP_RANK"]) == ("3", "1", "2", "1", "1")


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_statefulset_pods_carry_the_local_world_size_whichever_launcher(launcher: str) -> None:
    pytest.importorskip("kubernetes")
    plan = Cluster("statefulset", namespace="ml", launcher=launcher).dryrun(
        JobSpec(name="fw", script="train.py", nodes=2, procs_per_node=3, image="registry.example/train:1"))
    (stateful_set,) = [m for m in plan.manifests if m["kind"] == "StatefulSet"]
    env = {e["name"]: e.get("value") for e in stateful_set["spec"]["template"]["spec"]["containers"][0]["env"]}
    # The deepspeed launcher sets LOCAL_SIZE but not LOCAL_WORLD_SIZE; torchrun sets both the same.
    assert env["LOCAL_WORLD_SIZE"] == env["LOCAL_SIZE"] == "3" and env["DS_ACCELERATOR"] == "cpu"


def test_the_mpi_rank_shim_turns_open_mpi_variables_into_all_of_it() -> None:
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "job-worker-0"}
    set_torch_distributed_env(env)
    assert DETECTED <= env.keys()
    assert (env["RANK"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"], env["NODE_RANK"], env["GROUP_RANK"]) == ("3", "1", "2", "1", "1")
