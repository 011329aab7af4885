"""Fixtures shared by the Kubernetes tests: an API emulator, the simulated cluster, a Cluster."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from helpers import REPO, settled

from dsnb import Cluster, JobSpec
from k8s.emulator import KubeEmulator
from k8s.sim import ClusterSim

NAMESPACE = "ml"
IMAGE = "registry.example/dsnb-test:1"
CONFORMANCE_DIR = REPO / "tests" / "conformance"


@pytest.fixture
def emulator() -> Iterator[KubeEmulator]:
    """An API server with the upstream CRDs dsnb renders for installed (their schemas decide what is stored)."""
    from k8s.crds import schemas

    with KubeEmulator(namespaces=("default", NAMESPACE)) as running:
        for (group, version, kind), schema in schemas().items():
            running.add_schema(f"{group}/{version}", kind, schema)
        yield running


@pytest.fixture
def sim(emulator: KubeEmulator) -> Iterator[ClusterSim]:
    with ClusterSim(emulator, NAMESPACE) as running:
        yield running


def make_cluster(emulator: KubeEmulator, backend: str = "statefulset", **options: Any) -> Cluster:
    """A Cluster on a Kubernetes backend talking to ``emulator`` over HTTP."""
    return Cluster(backend, namespace=NAMESPACE, configuration=emulator.configuration(), **options)


def workload(mode: str, **fields: Any) -> JobSpec:
    """The conformance workload on one pod with two ranks."""
    return JobSpec(**{"name": f"wl-{mode}", "script": "workload.py", "args": [mode], "working_dir": str(CONFORMANCE_DIR),
                      "procs_per_node": 2, "image": IMAGE, **fields})


def leftovers(emulator: KubeEmulator, sim: ClusterSim, name: str) -> list[str]:
    """What job ``name`` still has: workload objects, pods and live processes (after settling)."""

    def find() -> list[str]:
        kinds = (("v1", "Pod"), ("v1", "Service"), ("apps/v1", "StatefulSet"), ("v1", "Secret"),
                 ("kubeflow.org/v2beta1", "MPIJob"), ("trainer.kubeflow.org/v1alpha1", "TrainJob"))
        found = [f"{kind} {o['metadata']['name']}" for api, kind in kinds
                 for o in emulator.list(api, kind, NAMESPACE, f"dsnb.io/job={name}")]
        found += [f"process of {pod}" for pod in sim.running_processes() if pod.startswith(name + "-")]
        return found

    return settled(find)


def footprint_of(emulator: KubeEmulator, sim: ClusterSim):
    """A callable listing every object in the emulator and every pod process still running."""
    return lambda: emulator.inventory() + [f"process of {pod}" for pod in sim.running_processes()]


#: A job script that counts its runs in ``attempts`` beside it and fails until its run number passes ``argv[1]``.
ATTEMPTS = """
import os, sys
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attempts")
with open(path, "a") as f:
    f.write("x")
attempt = os.path.getsize(path)
print(f"attempt {attempt}", flush=True)
sys.exit(0 if attempt > int(sys.argv[1]) else 3)
"""


def attempts_job(folder, fails: int, **fields: Any) -> JobSpec:
    """A one-rank job of :data:`ATTEMPTS` in ``folder`` that fails its first ``fails`` runs (exit code 3)."""
    (folder / "attempts.py").write_text(ATTEMPTS)
    return workload("ok", **{"script": "attempts.py", "args": [str(fails)], "working_dir": str(folder), "nodes": 1,
                             "procs_per_node": 1, **fields})


def controller_for(backend: str, subnet: str) -> Any:
    """The simulated operator a backend's objects need (None for the StatefulSet, which the kube sim runs),
    its pods given addresses in ``subnet`` (e.g. ``"10.231.71"``)."""
    import yaml

    from k8s.crds import FOLDER
    from k8s.kuberay_sim import KubeRaySim
    from k8s.operators import MPIOperatorSim, TrainerSim

    if backend == "mpijob":
        return MPIOperatorSim(subnet)
    if backend == "trainjob":
        return TrainerSim(subnet, yaml.safe_load((FOLDER / "runtime-deepspeed-distributed.yaml").read_text()))
    if backend == "kuberay":
        return KubeRaySim()
    return None
