"""Framework scripts train unchanged across two StatefulSet pods, each in its own network namespace.

The pods are :class:`k8s.netns.PodNetwork` namespaces with the headless Service's DNS names;
``ClusterSim`` runs each replica's rendered command. The Hugging Face Trainer example runs
under torchrun (the default launcher) and must count a world of two across the pods; the
Lightning example runs under the deepspeed launcher, which sets no ``NODE_RANK``/``GROUP_RANK``
(only ``CROSS_RANK``): Lightning's default environment takes the node from them, so it trains
as two ranks only because dsnb's pod entry exports them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import REPO
from k8s.fixtures import IMAGE, NAMESPACE, emulator, leftovers, make_cluster  # noqa: F401 - fixtures
from k8s.netns import PodNetwork
from k8s.sandbox import netns_problem
from k8s.sim import ClusterSim

from dsnb import JobSpec, JobState
from dsnb.job import Job
from dsnb.runtime.pod_entry import peer_names

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")
pytest.importorskip("lightning")
pytestmark = [pytest.mark.deepspeed, pytest.mark.skipif(netns_problem() is not None, reason=netns_problem() or "")]


def run_on_two_pods(emulator, spec: JobSpec, subnet: str, **options) -> Job:  # noqa: F811
    """Submit ``spec`` (2 nodes) to a StatefulSet cluster whose pods run in two network namespaces; wait for it."""
    with make_cluster(emulator, peer_timeout=60, **options) as cluster:
        plan = cluster.dryrun(spec)
        pods = [f"{plan.name}-{i}" for i in range(2)]
        dns = peer_names(2, plan.name, plan.name, NAMESPACE, "cluster.local")
        with PodNetwork(pods, subnet=subnet) as network:
            network.hosts({pod: [name, pod] for pod, name in zip(pods, dns)})
            with ClusterSim(emulator, NAMESPACE, netns_for=network.namespace) as sim:
                cluster.backend.apply(plan)
                job = Job(cluster.backend, plan.name)
                final = job.wait(timeout=300)
                assert final.state == JobState.SUCCEEDED, final.diagnosis()
                assert [r.host for r in final.replicas] == pods
                assert leftovers(emulator, sim, plan.name) == []
                return job


def test_the_trainer_and_lightning_scripts_train_across_two_pods(emulator, tmp_path: Path) -> None:  # noqa: F811
    trainer_dir = REPO / "examples" / "hf_trainer"
    spec = JobSpec(name="hf-trainer", script="train.py", working_dir=str(trainer_dir), nodes=2, procs_per_node=1, image=IMAGE,
                   args=["--steps", "4", "--output-dir", str(tmp_path / "hf")], env={"OMP_NUM_THREADS": "1"})
    job = run_on_two_pods(emulator, spec, "10.231.91")
    # A world of two across the pods: at the first log (step 2) 2 steps x 2 ranks x 2 samples = 8 of 64 samples.
    assert job.metrics("epoch", rank=0)[0].value == pytest.approx(0.125)
    assert [(s.step, s.step_unit) for s in job.metrics("loss", rank=0)] == [(1, "log line"), (2, "log line")]

    lightning_dir = REPO / "examples" / "lightning"
    spec = JobSpec(name="lightning", script="train.py", working_dir=str(lightning_dir), nodes=2, procs_per_node=1, image=IMAGE,
                   args=["--steps", "4", "--logger", "--output-dir", str(tmp_path / "pl")],
                   env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})  # the pods' dsnb (for its logger) is this checkout's
    job = run_on_two_pods(emulator, spec, "10.231.92", launcher="deepspeed")
    said = sorted(line.text for line in job.logs() if line.text.startswith("rank "))
    assert said == [f"rank {rank} of 2: 4 steps, CPUDeepSpeedStrategy with ZeRO stage 2" for rank in (0, 1)]
    assert [s.step for s in job.metrics("loss")] == [1, 3]
