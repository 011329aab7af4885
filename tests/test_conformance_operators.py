"""The MPIJob and TrainJob backends pass the conformance suite against the API emulator.

Test code plays the MPI Operator and Kubeflow Trainer (``tests/k8s/operators.py``): every pod
of a job gets its own network namespace, the launcher runs the rendered ``mpirun`` for real,
and Open MPI reaches the workers through an agent that enters their namespace instead of ssh.
"""

from __future__ import annotations

import pytest
import yaml
from conformance.suite import BackendConformance
from k8s.crds import FOLDER
from k8s.fixtures import NAMESPACE, emulator, footprint_of, leftovers, make_cluster, workload  # noqa: F401 - fixtures
from k8s.operators import MPIOperatorSim, TrainerSim
from k8s.sandbox import mpi_problem, netns_problem
from k8s.sim import ClusterSim

from dsnb import JobSpec

problem = netns_problem() or mpi_problem()
pytestmark = pytest.mark.skipif(problem is not None, reason=problem or "")


def two_nodes(mode: str):
    return workload(mode, nodes=2, procs_per_node=1)


class TestMPIJobConformance(BackendConformance):
    @pytest.fixture
    def sim(self, emulator):  # noqa: F811 - fixture
        with ClusterSim(emulator, NAMESPACE, controllers=[operator := MPIOperatorSim("10.231.21")],
                        netns_for=lambda pod: operator.netns_for(pod)) as running:
            yield running

    @pytest.fixture
    def cluster(self, emulator, sim):  # noqa: F811 - fixtures
        with make_cluster(emulator, "mpijob", cancel_wait=30) as cluster:
            yield cluster

    @pytest.fixture
    def workload_spec(self):
        return two_nodes

    @pytest.fixture
    def nothing_left(self, emulator, sim):  # noqa: F811 - fixtures
        return lambda name: leftovers(emulator, sim, name)

    @pytest.fixture
    def refused_specs(self):
        return [("image", JobSpec(**(two_nodes("ok").to_dict() | {"image": None}))),
                # the MPI Operator's last worker pod, <name>-worker-1, must fit 63 characters
                ("name", JobSpec(**(two_nodes("ok").to_dict() | {"name": "m" * 50})))]

    @pytest.fixture
    def footprint(self, emulator, sim):  # noqa: F811 - fixtures
        return footprint_of(emulator, sim)


class TestTrainJobConformance(TestMPIJobConformance):
    @pytest.fixture
    def sim(self, emulator):  # noqa: F811 - fixture
        runtime = yaml.safe_load((FOLDER / "runtime-deepspeed-distributed.yaml").read_text())
        with ClusterSim(emulator, NAMESPACE, controllers=[operator := TrainerSim("10.231.22", runtime)],
                        netns_for=lambda pod: operator.netns_for(pod)) as running:
            yield running

    @pytest.fixture
    def cluster(self, emulator, sim):  # noqa: F811 - fixtures
        with make_cluster(emulator, "trainjob", cancel_wait=30) as cluster:
            yield cluster

    @pytest.fixture
    def refused_specs(self):
        without_image = two_nodes("ok").to_dict() | {"image": None}
        return [
            ("image", JobSpec(**without_image)),
            # JobSet's pod <name>-launcher-0-0-<5 random> must fit 63 characters
            ("name", JobSpec(**(two_nodes("ok").to_dict() | {"name": "t" * 40}))),
        ]
