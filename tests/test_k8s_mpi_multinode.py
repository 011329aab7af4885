"""Multi-node proof of the MPI path: an MPIJob, and a TrainJob on Trainer v2.3.0's stock runtime, train
DeepSpeed ZeRO-2 across two pods.

The simulated MPI Operator (``tests/k8s/operators.py``) gives the launcher and each worker its
own network namespace on a bridge, with the DNS names of the operator's Service; the
launcher runs the rendered ``mpirun`` for real and Open MPI starts its daemons in the
workers' namespaces through an agent instead of ssh. dsnb, talking HTTP to the API
emulator, must see the job train with 4 ranks (2 workers × 2 slots) and report it finished.

The job's code is a working_dir that only this machine has (hidden from the pods' "image"): it reaches
the pods in the job's ConfigMap, which the rank shim unpacks on each pod before the rank starts there.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml
from helpers import REPO, wait_until
from k8s.crds import FOLDER
from k8s.fixtures import IMAGE, NAMESPACE, emulator, leftovers, make_cluster, shipped_example  # noqa: F401 - fixture
from k8s.operators import MPIOperatorSim, TrainerSim
from k8s.sandbox import mpi_problem, netns_problem
from k8s.sim import ClusterSim

from dsnb import JobSpec, JobState
from dsnb.backends.kubernetes.workdir_bundle import WORKDIR

pytest.importorskip("deepspeed")
problem = netns_problem() or mpi_problem()
pytestmark = [pytest.mark.deepspeed, pytest.mark.skipif(problem is not None, reason=problem or "")]

EXAMPLE = REPO / "examples" / "tiny_gpt"


def ran_shipped(lines) -> set[int]:
    """The ranks that said they run the shipped code where the shim unpacked it (/var/run may be a link to /run)."""
    here = os.path.realpath(WORKDIR)
    return {line.rank for line in lines if line.text == f"only_here: rank {line.rank} runs in {here}; left out and absent: True"}


def test_deepspeed_zero2_trains_across_two_mpi_workers(emulator, tmp_path) -> None:  # noqa: F811
    config = json.loads((EXAMPLE / "ds_config.json").read_text())
    assert config["zero_optimization"]["stage"] == 2
    working_dir, script = shipped_example(tmp_path)
    spec = JobSpec(name="tiny-gpt", script=script, working_dir=working_dir, nodes=2, procs_per_node=2,
                   args=["--steps", "4", "--no-save", "--no-resume"], image=IMAGE, deepspeed=config,
                   env={"OMP_NUM_THREADS": "1"})
    operator = MPIOperatorSim("10.231.23")
    with ClusterSim(emulator, NAMESPACE, controllers=[operator], netns_for=operator.netns_for, image_lacks=(str(tmp_path),)) as sim, \
            make_cluster(emulator, "mpijob") as cluster:
        job = cluster.submit(spec)
        final = job.wait(timeout=300)
        assert final.state == JobState.SUCCEEDED, final.diagnosis()
        assert [r.host for r in final.replicas] == [f"{job.name}-worker-0"] * 2 + [f"{job.name}-worker-1"] * 2
        lines = list(job.logs())
        texts = [line.text for line in lines]
        assert any("4 ranks" in text for text in texts), texts[:40]  # one world across both workers
        assert ran_shipped(lines) == {0, 1, 2, 3}, texts[:40]
        assert {line.rank for line in lines if line.text.startswith("step ")} == {0}
        assert [s.step for s in job.metrics("loss", rank=0)] == [1, 2, 3, 4]
        assert leftovers(emulator, sim, job.name) == []


def test_deepspeed_zero2_trains_across_the_launcher_and_a_node_of_a_trainjob(emulator, tmp_path) -> None:  # noqa: F811
    """Trainer v2.3.0 lists the node pod before the launcher in the hostfile, and Open MPI runs the first
    ranks on mpirun's own node: rank 0 and MASTER_ADDR must agree, or the ranks never meet. Both pods run
    ranks, so both unpack the shipped code."""
    config = json.loads((EXAMPLE / "ds_config.json").read_text())
    working_dir, script = shipped_example(tmp_path)
    spec = JobSpec(name="tiny-gpt", script=script, working_dir=working_dir, nodes=2, procs_per_node=2,
                   args=["--steps", "4", "--no-save", "--no-resume"], image=IMAGE, deepspeed=config,
                   env={"OMP_NUM_THREADS": "1"})
    operator = TrainerSim("10.231.24", yaml.safe_load((FOLDER / "runtime-deepspeed-distributed.yaml").read_text()))
    with ClusterSim(emulator, NAMESPACE, controllers=[operator], netns_for=operator.netns_for, image_lacks=(str(tmp_path),)) as sim, \
            make_cluster(emulator, "trainjob") as cluster:
        job = cluster.submit(spec)
        hostfile = wait_until(lambda: (emulator.get("v1", "ConfigMap", NAMESPACE, f"{job.name}-mpi-hostfile") or {}).get("data"),
                              timeout=60)["hostfile"]  # it goes with the TrainJob at the end
        launcher, node = (operator.pod_name(f"{job.name}-{host}") for host in ("launcher-0-0", "node-0-0"))
        # While the job runs (from the launcher's creation to the JobSet's end, tens of seconds here), every pod is known.
        def every_pod_known():
            status = job.status()
            return status if all(r.host for r in status.replicas) else None

        running = wait_until(every_pod_known, timeout=120)
        final = job.wait(timeout=300)
        assert final.state == JobState.SUCCEEDED, final.diagnosis()
        assert [line.split(".")[0] for line in hostfile.splitlines()] == [f"{job.name}-node-0-0", f"{job.name}-launcher-0-0"]
        assert [r.host for r in running.replicas] == [launcher] * 2 + [node] * 2
        # The finished JobSet deleted its node Job and pod (jobset v0.12.0): only the launcher's is still known.
        assert [r.host for r in final.replicas] == [launcher] * 2 + [None] * 2
        lines = list(job.logs())
        texts = [line.text for line in lines]
        assert any("4 ranks" in text for text in texts), texts[:40]
        assert ran_shipped(lines) == {0, 1, 2, 3}, texts[:40]
        assert [s.step for s in job.metrics("loss", rank=0)] == [1, 2, 3, 4]
        assert leftovers(emulator, sim, job.name) == []


def test_the_accelerate_script_trains_unchanged_across_two_mpi_workers(emulator) -> None:  # noqa: F811
    """Accelerate reads the rank shim's torch.distributed variables (from Open MPI's) and counts a world of two."""
    pytest.importorskip("accelerate")
    example = REPO / "examples" / "accelerate"
    spec = JobSpec(name="accelerate", script="train.py", working_dir=str(example), nodes=2, procs_per_node=1,
                   args=["--steps", "4", "--tracker"], image=IMAGE,
                   env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})  # the workers' dsnb (for its tracker) is this checkout's
    operator = MPIOperatorSim("10.231.25")
    with ClusterSim(emulator, NAMESPACE, controllers=[operator], netns_for=operator.netns_for) as sim, \
            make_cluster(emulator, "mpijob") as cluster:
        job = cluster.submit(spec)
        final = job.wait(timeout=300)
        assert final.state == JobState.SUCCEEDED, final.diagnosis()
        assert [r.host for r in final.replicas] == [f"{job.name}-worker-0", f"{job.name}-worker-1"]
        said = {line.rank: line.text for line in job.logs() if line.text.startswith("rank ")}
        # Accelerate filled the "auto" batch size for a world of two: 4 per rank x 1 step x 2 ranks.
        assert said == {rank: f"rank {rank} of 2: 4 steps, DEEPSPEED ZeRO stage 2, train_batch_size 8" for rank in (0, 1)}
        assert [(s.step, s.step_unit) for s in job.metrics("loss", rank=0)] == [(step, "step") for step in range(1, 5)]
        assert leftovers(emulator, sim, job.name) == []
