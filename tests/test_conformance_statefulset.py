"""The StatefulSet backend passes the conformance suite against the API emulator.

dsnb talks HTTP to the emulator; ``ClusterSim`` plays the StatefulSet controller and the
kubelet, running each pod's rendered command (entry script, torchrun, the workload) as
real processes in their own mount namespaces.
"""

from __future__ import annotations

import pytest
from conformance.suite import BackendConformance
from k8s.fixtures import emulator, footprint_of, leftovers, make_cluster, sim, workload  # noqa: F401 - fixtures
from k8s.sandbox import sandbox_problem

pytestmark = pytest.mark.skipif(sandbox_problem() is not None, reason=sandbox_problem() or "")


class TestStatefulSetConformance(BackendConformance):
    @pytest.fixture
    def cluster(self, emulator, sim):  # noqa: F811 - fixtures
        with make_cluster(emulator, cancel_wait=30) as cluster:
            yield cluster

    @pytest.fixture
    def workload_spec(self):
        return workload

    @pytest.fixture
    def nothing_left(self, emulator, sim):  # noqa: F811 - fixtures
        return lambda name: leftovers(emulator, sim, name)

    @pytest.fixture
    def refused_specs(self):
        return [
            ("name", workload("ok", name="w" * 50)),  # JobSpec takes 57; a StatefulSet's pods' hash label fits 52 with the suffix
            ("image", workload("ok", image=None)),  # a pod runs an image
        ]

    @pytest.fixture
    def footprint(self, emulator, sim):  # noqa: F811 - fixtures
        return footprint_of(emulator, sim)
