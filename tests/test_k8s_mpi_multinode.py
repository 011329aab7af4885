"""Multi-node proof of the MPI path: an MPIJob trains DeepSpeed ZeRO-2 across two workers.

The simulated MPI Operator (``tests/k8s/operators.py``) gives the launcher and each worker its
own network namespace on a bridge, with the DNS names of the operator's Service; the
launcher runs the rendered ``mpirun`` for real and Open MPI starts its daemons in the
workers' namespaces through an agent instead of ssh. dsnb, talking HTTP to the API
emulator, must see the job train with 4 ranks (2 workers × 2 slots) and report it finished.
"""

from __future__ import annotations

import json

import pytest
from helpers import REPO
from k8s.fixtures import IMAGE, NAMESPACE, emulator, leftovers, make_cluster  # noqa: F401 - fixture
from k8s.operators import MPIOperatorSim
from k8s.sandbox import mpi_problem, netns_problem
from k8s.sim import ClusterSim

from dsnb import JobSpec, JobState

pytest.importorskip("deepspeed")
problem = netns_problem() or mpi_problem()
pytestmark = [pytest.mark.deepspeed, pytest.mark.skipif(problem is not None, reason=problem or "")]

EXAMPLE = REPO / "examples" / "tiny_gpt"


def test_deepspeed_zero2_trains_across_two_mpi_workers(emulator) -> None:  # noqa: F811
    config = json.loads((EXAMPLE / "ds_config.json").read_text())
    assert config["zero_optimization"]["stage"] == 2
    spec = JobSpec(name="tiny-gpt", script="train.py", working_dir=str(EXAMPLE), nodes=2, procs_per_node=2,
                   args=["--steps", "4", "--no-save", "--no-resume"], image=IMAGE, deepspeed=config,
                   env={"OMP_NUM_THREADS": "1"})
    operator = MPIOperatorSim("10.231.23")
    with ClusterSim(emulator, NAMESPACE, controllers=[operator], netns_for=operator.netns_for) as sim, \
            make_cluster(emulator, "mpijob") as cluster:
        job = cluster.submit(spec)
        final = job.wait(timeout=300)
        assert final.state == JobState.SUCCEEDED, final.diagnosis()
        assert [r.host for r in final.replicas] == [f"{job.name}-worker-0"] * 2 + [f"{job.name}-worker-1"] * 2
        lines = list(job.logs())
        texts = [line.text for line in lines]
        assert any("4 ranks" in text for text in texts), texts[:40]  # one world across both workers
        assert {line.rank for line in lines if line.text.startswith("step ")} == {0}
        assert [s.step for s in job.metrics("loss", rank=0)] == [1, 2, 3, 4]
        assert leftovers(emulator, sim, job.name) == []
