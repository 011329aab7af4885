"""Finished work releases the cluster with no dsnb client running.

A StatefulSet restarts every container that ends, so before this a finished job's pods idled,
holding their nodes (and GPUs), until a dsnb client looked at the job. Now each pod's entry
writes its outcome into the job's record and, when the job has ended, scales the StatefulSet to
0 through the job's own ServiceAccount, whose Role names only that record and that set. These
tests submit, close the client at once, and wait for the cluster alone to release the job:
the simulated kubelet gives the pods the API server's TLS endpoint, a token of the job's
account (honoured by RBAC as on a cluster) and its CA; the simulated StatefulSet controller
deletes the pods past the new replica count; the kubelet stops them (SIGTERM) and deletes them.
A later client then finds the outcome, the failing rank's last lines and the kept output in
the record. The other backends are checked for the same: nothing of a finished job runs on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import wait_until
from k8s.fixtures import IMAGE, NAMESPACE, emulator, make_cluster, sim, workload  # noqa: F401 - fixtures
from k8s.kuberay_sim import KubeRaySim
from k8s.netns import PodNetwork
from k8s.operators import MPIOperatorSim, TrainerSim
from k8s.sandbox import mpi_problem, netns_problem, sandbox_problem
from k8s.sim import ClusterSim
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from dsnb import JobSpec, JobState
from dsnb.runtime.pod_entry import peer_names

needs_sandbox = pytest.mark.skipif(sandbox_problem() is not None, reason=sandbox_problem() or "")
needs_netns = pytest.mark.skipif(netns_problem() is not None, reason=netns_problem() or "")
needs_mpi = pytest.mark.skipif((netns_problem() or mpi_problem()) is not None, reason=netns_problem() or mpi_problem() or "")
FOLDER = Path(__file__).parent / "k8s" / "crds"

#: Rank 1 fails; every other rank would wait for ever, so only the job's release can stop them.
FAIL_ONE = """
import os, sys, time
rank = int(os.environ["RANK"])
print(f"rank {rank} up", flush=True)
if rank == 1:
    print("about to fail: marker-51c2", flush=True)
    sys.exit(3)
time.sleep(3600)
"""


def job_left(emulator, sim: ClusterSim, name: str) -> list[str]:  # noqa: F811
    """The pods of job ``name`` still in the API, and pod processes still running."""
    pods = [p["metadata"]["name"] for p in emulator.list("v1", "Pod", NAMESPACE, f"dsnb.io/job={name}")]
    return pods + [f"process of {pod}" for pod in sim.running_processes() if pod.startswith(name + "-")]


def released(emulator, sim: ClusterSim, name: str) -> bool:  # noqa: F811
    stateful_set = emulator.get("apps/v1", "StatefulSet", NAMESPACE, name)
    return stateful_set is not None and stateful_set["spec"]["replicas"] == 0 and not job_left(emulator, sim, name)


@needs_sandbox
def test_a_finished_job_releases_its_pods_with_no_client_running(emulator, sim) -> None:  # noqa: F811
    with make_cluster(emulator) as cluster:
        name = cluster.submit(workload("ok")).name
    wait_until(lambda: released(emulator, sim, name), timeout=90, message=lambda: job_left(emulator, sim, name))
    record = emulator.get("v1", "ConfigMap", NAMESPACE, name)["data"]
    assert '"exit_code": 0' in record["outcome-0.json"] and "rank 1 done" in record["log-0.jsonl"]
    with make_cluster(emulator) as later:
        job = later.attach(name)
        status = job.status()
        assert status.state == JobState.SUCCEEDED and status.message == "all 1 node(s) finished"
        assert [(s.step, s.value) for s in job.metrics("loss", rank=1)] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
        metric_lines = [f'DSNB_METRIC {{"step": {step}, "loss": {1 / step}, "total_steps": 3.0}}' for step in (1, 2, 3)]
        assert [line.text for line in job.logs(rank=1)] == ["hello from rank 1 of 2", *metric_lines, "rank 1 done"]  # as printed
    assert emulator.get("apps/v1", "StatefulSet", NAMESPACE, name) is None  # ended by the later client as before


@needs_sandbox
def test_a_failed_job_releases_its_pods_and_keeps_the_failing_rank(emulator, sim) -> None:  # noqa: F811
    with make_cluster(emulator) as cluster:
        name = cluster.submit(workload("fail")).name
    wait_until(lambda: released(emulator, sim, name), timeout=90, message=lambda: job_left(emulator, sim, name))
    with make_cluster(emulator) as later:
        status = later.attach(name).status()
    assert status.state == JobState.FAILED and status.failed_rank == 1 and status.exit_code == 3
    assert status.message.startswith(f"rank 1 (pod {name}-0) exited with code 3")
    assert "about to fail: marker-7f3a" in status.last_lines


@needs_sandbox
def test_a_pod_that_cannot_report_retries_until_it_can(emulator, sim) -> None:  # noqa: F811
    """The API server refuses the pod's report at first (as a webhook would): the finished pod says
    why and keeps its node; once the server accepts, the idle container's retry releases the job."""
    emulator.denied_to_service_accounts.add(("patch", "", "configmaps"))
    with make_cluster(emulator) as cluster:
        name = cluster.submit(workload("ok", procs_per_node=1)).name
    said = "dsnb: could not tell the API server the outcome (will retry): PATCH"

    def told() -> bool:
        return any(said in line for pod in sim.runners for line in emulator.log_lines(NAMESPACE, pod))

    wait_until(told, timeout=60, message=lambda: job_left(emulator, sim, name))
    assert emulator.get("apps/v1", "StatefulSet", NAMESPACE, name)["spec"]["replicas"] == 1 and job_left(emulator, sim, name)
    emulator.denied_to_service_accounts.discard(("patch", "", "configmaps"))
    wait_until(lambda: released(emulator, sim, name), timeout=60, message=lambda: job_left(emulator, sim, name))
    assert '"exit_code": 0' in emulator.get("v1", "ConfigMap", NAMESPACE, name)["data"]["outcome-0.json"]


@needs_sandbox
def test_the_jobs_service_account_may_touch_only_its_own_record_and_scale(emulator, sim) -> None:  # noqa: F811
    other = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "someone-else", "namespace": NAMESPACE},
             "spec": {"replicas": 0, "serviceName": "x", "selector": {"matchLabels": {"a": "b"}},
                      "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    emulator.create(other)
    emulator.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "team-config", "namespace": NAMESPACE}})
    with make_cluster(emulator, cancel_wait=30) as cluster:
        job = cluster.submit(workload("sleep"))
        token = emulator.service_account_token(NAMESPACE, job.name)
        with client.ApiClient(emulator.configuration(token=token)) as api:
            apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
            assert apps.patch_namespaced_stateful_set_scale(job.name, NAMESPACE, {"spec": {"replicas": 1}}, dry_run="All").spec.replicas == 1
            assert core.patch_namespaced_config_map(job.name, NAMESPACE, {"data": {"probe": "1"}}, dry_run="All")
            refused = {
                "scale another set": lambda: apps.patch_namespaced_stateful_set_scale("someone-else", NAMESPACE, {"spec": {"replicas": 1}}),
                "patch another ConfigMap": lambda: core.patch_namespaced_config_map("team-config", NAMESPACE, {"data": {"x": "1"}}),
                "read a Secret": lambda: core.list_namespaced_secret(NAMESPACE),
                "list ConfigMaps": lambda: core.list_namespaced_config_map(NAMESPACE),
                "delete its own set": lambda: apps.delete_namespaced_stateful_set(job.name, NAMESPACE),
                "read pods": lambda: core.list_namespaced_pod(NAMESPACE),
            }
            for what, call in refused.items():
                with pytest.raises(ApiException) as info:
                    call()
                assert info.value.status == 403, what
        assert job.cancel().state == JobState.CANCELLED


@needs_netns
def test_one_failed_node_releases_every_node(emulator, tmp_path: Path) -> None:  # noqa: F811
    """Two pods, each in its own network namespace (reaching the API through a relay): node 1's rank fails;
    node 0's rank would sleep for an hour, so only the release stops it."""
    (tmp_path / "fail_one.py").write_text(FAIL_ONE)
    spec = JobSpec(name="split", script="fail_one.py", working_dir=str(tmp_path), nodes=2, procs_per_node=1, image=IMAGE)
    with make_cluster(emulator, peer_timeout=60) as cluster:
        plan = cluster.dryrun(spec)
        name = plan.name
        pods = [f"{name}-{i}" for i in range(2)]
        with PodNetwork(pods, subnet="10.231.61") as network:
            network.hosts({pod: [dns, pod] for pod, dns in zip(pods, peer_names(2, name, name, NAMESPACE, "cluster.local"))})
            with ClusterSim(emulator, NAMESPACE, netns_for=network.namespace) as sim:
                cluster.backend.apply(plan)
                cluster.close()  # nobody watches from here on
                wait_until(lambda: released(emulator, sim, name), timeout=120, message=lambda: job_left(emulator, sim, name))
                record = emulator.get("v1", "ConfigMap", NAMESPACE, name)["data"]
                assert "outcome-1.json" in record and "outcome-0.json" not in record  # node 0 was stopped, it did not end
                with make_cluster(emulator) as later:
                    status = later.attach(name).status()
    assert status.state == JobState.FAILED and status.failed_rank == 1 and status.exit_code == 3
    assert f"pod {name}-1" in status.message and "about to fail: marker-51c2" in status.last_lines


@pytest.mark.parametrize("backend", [pytest.param("mpijob", marks=needs_mpi), pytest.param("trainjob", marks=needs_mpi),
                                     pytest.param("kuberay", marks=needs_sandbox)])
def test_operator_jobs_leave_nothing_running_with_no_client(emulator, backend: str) -> None:  # noqa: F811
    """MPIJob: cleanPodPolicy Running has the MPI Operator delete the workers; TrainJob: the finished JobSet deletes
    its active node Job; KubeRay: ``shutdownAfterJobFinishes`` with dsnb's TTL of 0 deletes the Ray cluster at once.
    Either way only the finished launcher (or submitter) pod is left, holding nothing."""
    if backend == "mpijob":
        operator: Any = MPIOperatorSim("10.231.62")
    elif backend == "trainjob":
        operator = TrainerSim("10.231.63", yaml.safe_load((FOLDER / "runtime-deepspeed-distributed.yaml").read_text()))
    else:
        operator = KubeRaySim()
    options = {"kuberay": True} if backend == "kuberay" else {}
    with ClusterSim(emulator, NAMESPACE, controllers=[operator], netns_for=operator.netns_for) as sim:  # noqa: F811
        with make_cluster(emulator, "ray" if backend == "kuberay" else backend, **options) as cluster:
            name = cluster.submit(workload("ok", nodes=2, procs_per_node=1)).name

        def only_finished_pods() -> bool:
            pods = emulator.list("v1", "Pod", NAMESPACE, f"dsnb.io/job={name}")
            return bool(pods) and all((p.get("status") or {}).get("phase") in ("Succeeded", "Failed") for p in pods) \
                and not [pod for pod in sim.running_processes() if pod.startswith(name)]

        wait_until(only_finished_pods, timeout=120, message=lambda: [
            (p["metadata"]["name"], (p.get("status") or {}).get("phase")) for p in emulator.list("v1", "Pod", NAMESPACE)])
        if backend == "kuberay":
            assert emulator.list("ray.io/v1", "RayCluster", NAMESPACE) == []
        with make_cluster(emulator, "ray" if backend == "kuberay" else backend, **options) as later:
            assert later.attach(name).status().state == JobState.SUCCEEDED
