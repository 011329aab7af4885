"""Kueue: the queue labels on the object Kueue manages for each backend, the LocalQueue preflight, and a queued
job's status read from its Workload, against the API emulator serving Kueue's CRDs (v0.19.2)."""

from __future__ import annotations

import hashlib

import pytest

pytest.importorskip("kubernetes")
pytest.importorskip("jsonschema")

import yaml  # noqa: E402
from k8s.crds import validate_custom  # noqa: E402
from k8s.emulator import KubeEmulator, Resource  # noqa: E402
from k8s.fixtures import IMAGE, NAMESPACE, emulator, make_cluster  # noqa: E402, F401 - fixtures

from dsnb import Cluster, InvalidSpecError, JobSpec, JobState, PodOptions  # noqa: E402
from dsnb.backends.kubernetes.kueue import PRIORITY_LABEL, QUEUE_LABEL  # noqa: E402

QUEUED = PodOptions(queue="team-a", priority_class="high")
MANAGED = {"statefulset": "StatefulSet", "mpijob": "MPIJob", "trainjob": "TrainJob", "kuberay": "RayJob"}


def spec(**fields) -> JobSpec:
    return JobSpec(**{"name": "tiny", "script": "train.py", "image": IMAGE, "procs_per_node": 2, **fields})


@pytest.mark.parametrize("backend", sorted(MANAGED))
def test_the_object_kueue_manages_carries_the_queue_and_priority_labels_and_nothing_else_does(backend: str) -> None:
    plan = Cluster(backend, namespace=NAMESPACE, pod_options=QUEUED).dryrun(spec())
    documents = list(yaml.safe_load_all(plan.to_yaml()))
    labelled = [d["kind"] for d in documents if QUEUE_LABEL in (d["metadata"].get("labels") or {})]
    assert labelled == [MANAGED[backend]]
    managed = next(d for d in documents if d["kind"] == MANAGED[backend])
    assert managed["metadata"]["labels"][QUEUE_LABEL] == "team-a" and managed["metadata"]["labels"][PRIORITY_LABEL] == "high"
    if "/" in managed["apiVersion"] and not managed["apiVersion"].startswith("apps/"):
        validate_custom(managed)  # still a valid MPIJob, TrainJob or RayJob
    record = documents[0]
    assert record["kind"] == "ConfigMap" and record["metadata"]["annotations"]["dsnb.io/queue"] == "team-a"
    unqueued = list(yaml.safe_load_all(Cluster(backend, namespace=NAMESPACE).dryrun(spec()).to_yaml()))
    assert not any(QUEUE_LABEL in (d["metadata"].get("labels") or {}) for d in unqueued)


def test_bad_queue_options_are_refused_naming_the_field() -> None:
    with pytest.raises(InvalidSpecError, match=r"options\.queue: 'Team_A' is not a valid LocalQueue name"):
        PodOptions(queue="Team_A")
    with pytest.raises(InvalidSpecError, match=r"options\.priority_class: .* no queue is named"):
        PodOptions(priority_class="high")
    with pytest.raises(InvalidSpecError, match=r"options\.queue: 'a{64}' is not a valid"):
        PodOptions(queue="a" * 64)


def test_a_served_model_on_kuberay_is_not_queued_kueue_does_not_manage_a_rayservice() -> None:
    from dsnb.serving import ServeSpec

    serve = ServeSpec(name="tiny", model="tiny_models:tiny_mlp", replicas=1, image=IMAGE)
    with pytest.raises(InvalidSpecError, match=r"options\.queue: Kueue manages none of this plan's objects \(.*RayService"):
        Cluster("kuberay", namespace=NAMESPACE, pod_options=QUEUED).dryrun(serve)


def install_kueue(api: KubeEmulator) -> None:
    """Serve Kueue's kinds as its CRDs do (both versions; v1beta2 stored), as on a cluster with Kueue installed."""
    for version in ("v1beta2", "v1beta1"):
        api.add_resource(Resource(f"kueue.x-k8s.io/{version}", "LocalQueue", "localqueues", status=True))
        api.add_resource(Resource(f"kueue.x-k8s.io/{version}", "Workload", "workloads", status=True))


def local_queue(name: str = "team-a", active: bool = True) -> dict:
    """A LocalQueue as Kueue's controller keeps it (pkg/controller/core/localqueue_controller.go, v0.19.2)."""
    condition = {"type": "Active", "status": "True", "reason": "Ready", "message": "Can submit new workloads to localQueue",
                 "lastTransitionTime": "2026-12-07T10:00:00Z"} if active else \
        {"type": "Active", "status": "False", "reason": "ClusterQueueIsInactive",
         "message": "Can't submit new workloads to clusterQueue", "lastTransitionTime": "2026-12-07T10:00:00Z"}
    queue = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
             "metadata": {"name": name, "namespace": NAMESPACE}, "spec": {"clusterQueue": "gpu-pool"},
             "status": {"pendingWorkloads": 3, "admittedWorkloads": 1, "conditions": [condition]}}
    validate_custom(queue)
    return queue


def test_the_preflight_checks_the_local_queue(emulator) -> None:  # noqa: F811 - fixture
    install_kueue(emulator)
    with make_cluster(emulator, pod_options=QUEUED) as cluster:
        line = cluster.check()["Kueue queue"]
        assert line.status == "failed" and line.detail == "LocalQueue 'team-a' does not exist in namespace 'ml'"
        assert "kubectl get localqueues -n ml" in line.fix
        emulator.create(local_queue())
        line = cluster.check()["Kueue queue"]
        assert line.status == "passed"
        assert line.detail == "LocalQueue 'team-a' (ClusterQueue 'gpu-pool') is active, 3 workload(s) waiting in it"
        emulator.delete("kueue.x-k8s.io/v1beta2", "LocalQueue", NAMESPACE, "team-a")
        emulator.create(local_queue(active=False))
        line = cluster.check()["Kueue queue"]
        assert line.status == "failed" and "is not active (ClusterQueueIsInactive" in line.detail
        for version in ("v1beta2", "v1beta1"):  # as on a cluster without Kueue
            emulator.remove_resource(f"kueue.x-k8s.io/{version}", "LocalQueue")
        line = cluster.check()["Kueue queue"]
        assert line.status == "failed" and line.detail == "Kueue is not installed: this cluster serves no LocalQueue"
    with make_cluster(emulator) as cluster:
        assert "Kueue queue" not in [r.name for r in cluster.check().results]  # no queue: not checked


def test_the_permissions_kueue_needs_are_checked_and_dsnb_rbac_grants_them(emulator, tmp_path) -> None:  # noqa: F811 - fixture
    import io

    from rich.console import Console

    from dsnb.console.cli import main

    install_kueue(emulator)
    emulator.create(local_queue())
    emulator.denied.add(("list", "kueue.x-k8s.io", "workloads"))
    with make_cluster(emulator, pod_options=QUEUED) as cluster:
        report = cluster.check()
    assert report["permission workloads.kueue.x-k8s.io"].status == "failed"
    assert report["permission localqueues.kueue.x-k8s.io"].status == "passed"
    assert report["permission localqueues/pendingworkloads.visibility.kueue.x-k8s.io"].status == "passed"
    console = Console(file=io.StringIO(), width=200, color_system=None)
    assert main(["rbac", "--namespace", NAMESPACE, "--user", "alice", "--kueue"], console=console) == 0
    rules = [d for d in yaml.safe_load_all(console.file.getvalue()) if d["kind"] == "Role"][0]["rules"]
    assert {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads"], "verbs": ["list"]} in rules
    assert any("visibility.kueue.x-k8s.io" in r["apiGroups"] for r in rules)


def workload_for(owner: dict, queue: str, conditions: list[dict]) -> dict:
    """The Workload Kueue's job reconciler makes for ``owner`` (pkg/controller/jobframework/reconciler.go and
    workload_names.go, v0.19.2): named after the owner's kind and name with a hash of kind, group, name and uid,
    owned by the object, labelled with its uid, in its queue, with its pods as one pod set."""
    kind, group = owner["kind"], owner["apiVersion"].rpartition("/")[0]
    meta = owner["metadata"]
    digest = hashlib.sha1(f"{kind}\n{group}\n{meta['name']}\n{meta['uid']}".encode()).hexdigest()[:5]
    workload = {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
        "metadata": {"name": f"{kind.lower()}-{meta['name']}-{digest}", "namespace": NAMESPACE,
                     "labels": {"kueue.x-k8s.io/job-uid": meta["uid"]},
                     "ownerReferences": [{"apiVersion": owner["apiVersion"], "kind": kind, "name": meta["name"],
                                          "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]},
        "spec": {"queueName": queue, "podSets": [{"name": "main", "count": 1,
                                                  "template": owner["spec"]["template"]}]},
        "status": {"conditions": conditions},
    }
    validate_custom(workload)
    return workload


def test_a_queued_job_is_pending_with_kueues_reason_until_kueue_admits_it(emulator) -> None:  # noqa: F811 - fixture
    install_kueue(emulator)
    emulator.create(local_queue())
    with make_cluster(emulator, pod_options=QUEUED) as cluster:
        job = cluster.submit(spec())
        try:
            status = job.status()
            assert status.state == JobState.PENDING
            assert status.message == "queued in LocalQueue 'team-a': waiting for Kueue to make its Workload"
            owner = emulator.get("apps/v1", "StatefulSet", NAMESPACE, job.name)
            assert owner["metadata"]["labels"][QUEUE_LABEL] == "team-a"
            no_quota = ("couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in "
                        "flavor a100, 8 more needed")
            emulator.create(workload_for(owner, "team-a", [
                {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": no_quota,
                 "lastTransitionTime": "2026-12-07T10:00:00Z"}]))
            status = job.status()
            assert status.state == JobState.PENDING
            assert status.message == f"queued in LocalQueue 'team-a' (Kueue): {no_quota}"
            workload = emulator.list("kueue.x-k8s.io/v1beta2", "Workload", NAMESPACE)[0]
            # Kueue's visibility API (pkg/visibility/api/v1beta2/pending_workloads_lq.go, v0.19.2): positions from 0.
            emulator.aggregated[f"/apis/visibility.kueue.x-k8s.io/v1beta2/namespaces/{NAMESPACE}/localqueues/team-a/"
                                "pendingworkloads"] = lambda: {
                "kind": "PendingWorkloadsSummary", "apiVersion": "visibility.kueue.x-k8s.io/v1beta2", "metadata": {},
                "items": [{"metadata": {"name": "someone-elses", "namespace": NAMESPACE}, "priority": 100,
                           "localQueueName": "team-a", "positionInClusterQueue": 0, "positionInLocalQueue": 0},
                          {"metadata": {"name": workload["metadata"]["name"], "namespace": NAMESPACE}, "priority": 0,
                           "localQueueName": "team-a", "positionInClusterQueue": 4, "positionInLocalQueue": 1}]}
            status = job.status()
            assert status.message == f"queued in LocalQueue 'team-a' (Kueue, position 2 in the queue): {no_quota}"
            emulator.denied.add(("get", "visibility.kueue.x-k8s.io", "localqueues/pendingworkloads"))
            assert job.status().message == f"queued in LocalQueue 'team-a' (Kueue): {no_quota}"  # refused: no position
            emulator.denied.clear()
            workload["status"]["conditions"] = [
                {"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved", "message": "Quota reserved in "
                 "ClusterQueue gpu-pool", "lastTransitionTime": "2026-12-07T10:01:00Z"},
                {"type": "Admitted", "status": "True", "reason": "Admitted", "message": "The workload is admitted",
                 "lastTransitionTime": "2026-12-07T10:01:00Z"}]
            emulator.update(workload)
            assert "queued in LocalQueue" not in job.status().message  # admitted: the pods' story again
        finally:
            job.cancel()
