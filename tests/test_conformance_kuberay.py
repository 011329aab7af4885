"""The KubeRay backend passes the conformance suite against the API emulator.

``tests/k8s/kuberay_sim.py`` plays the KubeRay operator with ``run_scripts``: the submitter
pod's driver runs the conformance workload for real, once per Ray Train worker, and prints it
as Ray's driver log does (worker prefixes, rank announcements, the outcome line). Real Ray
cannot run inside the sim; the ``Cluster("ray")`` suite runs the same checks on a real Ray.
"""

from __future__ import annotations

import pytest
from conformance.suite import BackendConformance
from helpers import settled
from k8s.fixtures import NAMESPACE, emulator, footprint_of, leftovers, make_cluster, workload  # noqa: F401 - fixtures
from k8s.kuberay_sim import API, KubeRaySim
from k8s.sandbox import sandbox_problem
from k8s.sim import ClusterSim

pytestmark = pytest.mark.skipif(sandbox_problem() is not None, reason=sandbox_problem() or "")


class TestKubeRayConformance(BackendConformance):
    @pytest.fixture
    def sim(self, emulator):  # noqa: F811 - fixture
        with ClusterSim(emulator, NAMESPACE, controllers=[KubeRaySim(run_scripts=True)]) as running:
            yield running

    @pytest.fixture
    def cluster(self, emulator, sim):  # noqa: F811 - fixtures
        with make_cluster(emulator, "kuberay", cancel_wait=30) as cluster:
            yield cluster

    @pytest.fixture
    def workload_spec(self):
        return workload

    @pytest.fixture
    def nothing_left(self, emulator, sim):  # noqa: F811 - fixtures
        def ray_objects(name: str) -> list[str]:
            return [f"{kind} {o['metadata']['name']}" for kind in ("RayJob", "RayCluster")
                    for o in emulator.list(API, kind, NAMESPACE, f"dsnb.io/job={name}")]
        return lambda name: leftovers(emulator, sim, name) + settled(lambda: ray_objects(name))

    @pytest.fixture
    def refused_specs(self):
        return [
            ("name", workload("ok", name="w" * 44)),  # JobSpec takes 57; KubeRay's derived names fit 40 with the suffix
            ("image", workload("ok", image=None)),  # the Ray cluster's pods run an image
        ]

    @pytest.fixture
    def footprint(self, emulator, sim):  # noqa: F811 - fixtures
        return footprint_of(emulator, sim)
