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
        # The record and the logs' archive stay (jobs() and attach() read them); the shipped code does not.
        found += [f"ConfigMap {o['metadata']['name']}" for o in emulator.list("v1", "ConfigMap", NAMESPACE, f"dsnb.io/job={name}")
                  if (o["metadata"].get("labels") or {}).get("dsnb.io/kind") not in ("record", "logs")]
        found += [f"process of {pod}" for pod in sim.running_processes() if pod.startswith(name + "-")]
        return found

    return settled(find)


def footprint_of(emulator: KubeEmulator, sim: ClusterSim):
    """A callable listing every object in the emulator and every pod process still running."""
    return lambda: emulator.inventory() + [f"process of {pod}" for pod in sim.running_processes()]


#: A job script that counts its runs in the file ``$ATTEMPTS_FILE`` and fails until its run number passes ``argv[1]``.
#: The file is on this machine, which every pod of the simulated cluster sees: a shared volume, in effect, that
#: outlives pods (the job's shipped working_dir, unpacked in an emptyDir, does not outlive a restarted pod).
ATTEMPTS = """
import os, sys
path = os.environ["ATTEMPTS_FILE"]
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
                             "procs_per_node": 1, "env": {"ATTEMPTS_FILE": str(folder / "attempts")}, **fields})


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


#: A script that exists only in the working_dir :func:`shipped_example` makes: it says where it runs, checks that
#: what the working_dir leaves out did not travel, then trains the tiny GPT example beside it.
ONLY_HERE = '''
import os, runpy, sys
left_out = [p for p in ("notes.secret", ".env", "checkpoints") if os.path.exists(p)]
print(f"only_here: rank {os.environ.get('RANK')} runs in {os.getcwd()}; left out and absent: {not left_out}", flush=True)
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
'''


def shipped_example(folder) -> tuple[str, str]:
    """A copy of the tiny GPT example in ``folder`` with :data:`ONLY_HERE` as ``only_here.py``, a gitignored file, a
    ``.env`` and a checkpoint folder (its .gitignore leaves that out): (working_dir, script). Run it with
    ``ClusterSim(image_lacks=(folder,))``, so that the pods can only have it from the job's ConfigMap."""
    import shutil

    code = folder / "code"
    shutil.copytree(REPO / "examples" / "tiny_gpt", code, ignore=shutil.ignore_patterns("checkpoints", "__pycache__"))
    (code / "only_here.py").write_text(ONLY_HERE)
    (code / ".gitignore").write_text((code / ".gitignore").read_text() + "notes.secret\n")
    (code / "notes.secret").write_text("not for the pods\n")
    (code / ".env").write_text("HF_TOKEN=hf_not_for_the_pods\n")
    (code / "checkpoints").mkdir()
    (code / "checkpoints" / "big.pt").write_bytes(b"\0" * 1024)
    return str(code), "only_here.py"
