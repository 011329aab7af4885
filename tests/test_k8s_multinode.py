"""Multi-node proof of the StatefulSet backend: two pods, each in its own network namespace.

Each "pod" is a Linux network namespace joined to the other by a veth pair whose ends are
called ``eth0`` (what the pod template's ``GLOO_SOCKET_IFNAME`` names), with its own
``/etc/netns/<ns>/hosts`` so the headless Service's DNS names resolve as in a cluster.
``ClusterSim`` runs each replica's rendered command (entry script → torchrun → the tiny
GPT example) inside its namespace; dsnb, talking HTTP to the API emulator, must see a real
DeepSpeed ZeRO-2 job train across both and report it finished.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO
from k8s.fixtures import IMAGE, NAMESPACE, emulator, leftovers, make_cluster, shipped_example  # noqa: F401 - fixtures
from k8s.sandbox import netns_problem
from k8s.sim import ClusterSim

from dsnb import JobSpec, JobState
from dsnb.backends.kubernetes.workdir_bundle import WORKDIR
from dsnb.job import Job
from dsnb.runtime.pod_entry import peer_names

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.deepspeed, pytest.mark.skipif(netns_problem() is not None, reason=netns_problem() or "")]

EXAMPLE = REPO / "examples" / "tiny_gpt"
SUBNET = "10.231.7"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def two_pod_network() -> Iterator[list[str]]:
    """Two network namespaces joined by a veth pair, each end named eth0; removed afterwards."""
    names = [f"dsnb-pod{i}-{os.getpid()}" for i in range(2)]
    try:
        for name in names:
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("link", "add", f"dv0-{os.getpid()}", "netns", names[0], "type", "veth",
           "peer", "name", f"dv1-{os.getpid()}", "netns", names[1])
        for i, name in enumerate(names):
            ip("-n", name, "link", "set", f"dv{i}-{os.getpid()}", "name", "eth0")
            ip("-n", name, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


def write_hosts(namespaces: list[str], job: str) -> None:
    """Each namespace's /etc/hosts: localhost, and every pod's stable DNS name (as cluster DNS would)."""
    dns = peer_names(len(namespaces), job, job, NAMESPACE, "cluster.local")
    lines = ["127.0.0.1 localhost"] + [f"{SUBNET}.{i + 1} {name} {job}-{i}" for i, name in enumerate(dns)]
    for ns in namespaces:
        folder = Path("/etc/netns") / ns
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts").write_text("\n".join(lines) + "\n")


def test_deepspeed_zero2_trains_across_two_pods(emulator, two_pod_network: list[str], tmp_path: Path) -> None:  # noqa: F811
    """The job's code is a working_dir that only this machine has (hidden from the pods' "image"): it reaches both
    pods in the job's ConfigMap, and the ranks start where the entry unpacked it."""
    config = json.loads((EXAMPLE / "ds_config.json").read_text())
    assert config["zero_optimization"]["stage"] == 2
    working_dir, script = shipped_example(tmp_path)
    spec = JobSpec(name="tiny-gpt", script=script, working_dir=working_dir, nodes=2, procs_per_node=2,
                   args=["--steps", "4", "--no-save", "--no-resume"], image=IMAGE, deepspeed=config, env={"OMP_NUM_THREADS": "1"})
    with make_cluster(emulator, peer_timeout=60) as cluster:
        plan = cluster.dryrun(spec)
        write_hosts(two_pod_network, plan.name)
        netns_for = {f"{plan.name}-{i}": ns for i, ns in enumerate(two_pod_network)}.get
        with ClusterSim(emulator, NAMESPACE, netns_for=netns_for, image_lacks=(str(tmp_path),)) as sim:
            cluster.backend.apply(plan)
            job = Job(cluster.backend, plan.name)
            final = job.wait(timeout=300)
            assert final.state == JobState.SUCCEEDED, final.diagnosis()
            assert [r.host for r in final.replicas] == [f"{plan.name}-0"] * 2 + [f"{plan.name}-1"] * 2
            lines = list(job.logs())
            texts = [line.text for line in lines]
            assert any("4 ranks" in text for text in texts), texts[:40]  # one world of 4 across both pods
            assert {line.rank for line in lines if line.text.startswith("step ")} == {0}
            assert "dsnb: node 1 of 2: all peers resolve; starting 2 rank(s)" in texts
            here = os.path.realpath(WORKDIR)  # /var/run may be a link to /run
            assert {line.rank for line in lines if line.text == f"only_here: rank {line.rank} runs in {here}; left out and absent: True"} \
                == {0, 1, 2, 3}, texts[:40]
            losses = job.metrics("loss", rank=0)
            assert [s.step for s in losses] == [1, 2, 3, 4]
            assert leftovers(emulator, sim, plan.name) == []

