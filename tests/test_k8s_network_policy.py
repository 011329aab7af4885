"""``PodOptions(network_policy=True)``: a job's pods take traffic only from each other, a served model also
from whom the user names, a Ray head also from the KubeRay operator.

No network plugin runs here, so the policy is not enforced; what is tested is what decides
whether it works on a cluster: it validates against the Kubernetes schema, and its selectors
pick exactly the pods the (simulated) controllers create for the job, on every backend, and
none of another job's.
"""

from __future__ import annotations

from typing import Any

import pytest
from k8s.fixtures import IMAGE, NAMESPACE, controller_for, emulator, make_cluster, workload  # noqa: F401 - fixtures
from k8s.sandbox import mpi_problem, netns_problem, sandbox_problem
from k8s.sim import ClusterSim

from dsnb import Cluster, InvalidSpecError, JobState, ServeSpec
from dsnb.backends.kubernetes.pod_options import PodOptions

kubernetes_validate = pytest.importorskip("kubernetes_validate")
needs_sandbox = pytest.mark.skipif(sandbox_problem() is not None, reason=sandbox_problem() or "")
needs_mpi = pytest.mark.skipif((netns_problem() or mpi_problem()) is not None, reason=netns_problem() or mpi_problem() or "")
WEB = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "web"}}}
ISOLATED = PodOptions(network_policy=True, serve_ingress_from=[WEB])


def selects(selector: dict[str, Any], pod: dict[str, Any]) -> bool:
    labels = pod["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


@pytest.mark.parametrize("backend, options", [("statefulset", {}), ("mpijob", {}), ("trainjob", {}), ("ray", {"kuberay": True})],
                         ids=["statefulset", "mpijob", "trainjob", "kuberay"])
def test_the_policy_is_valid_and_lets_in_the_job_and_for_serving_whom_the_user_names(backend: str, options: dict) -> None:
    cluster = Cluster(backend, namespace=NAMESPACE, pod_options=ISOLATED, **options)
    batch = next(m for m in cluster.dryrun(workload("ok", nodes=2)).manifests if m["kind"] == "NetworkPolicy")
    serve = ServeSpec(name="tiny", model="m:f", image=IMAGE, **({"replicas": 2} if backend == "ray" else {}))
    served = next(m for m in cluster.dryrun(serve).manifests if m["kind"] == "NetworkPolicy")
    for policy in (batch, served):
        kubernetes_validate.validate(policy, kubernetes_validate.utils.latest_version(), strict=True)
        assert policy["spec"]["policyTypes"] == ["Ingress"]
    name = batch["metadata"]["name"]
    assert batch["spec"]["ingress"][0] == {"from": [{"podSelector": {"matchLabels": {"dsnb.io/job": name}}}]}
    operator = [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}],
                 "ports": [{"port": 8265}]}] if backend == "ray" else []
    assert batch["spec"]["ingress"][1:] == operator
    assert served["spec"]["ingress"][-1] == {"from": [WEB], "ports": [{"port": 8000, "protocol": "TCP"}]}
    assert Cluster(backend, namespace=NAMESPACE, **options).dryrun(workload("ok")).manifests[-1]["kind"] != "NetworkPolicy"


def test_serve_ingress_needs_a_policy_and_takes_only_peers() -> None:
    with pytest.raises(InvalidSpecError, match="set network_policy=True"):
        PodOptions(serve_ingress_from=[WEB])
    with pytest.raises(InvalidSpecError, match="not a NetworkPolicy peer"):
        PodOptions(network_policy=True, serve_ingress_from=[{"ports": [80]}])


@pytest.mark.parametrize("backend", [pytest.param("statefulset", marks=needs_sandbox), pytest.param("mpijob", marks=needs_mpi),
                                     pytest.param("trainjob", marks=needs_mpi), pytest.param("kuberay", marks=needs_sandbox)])
def test_the_policy_selects_every_pod_of_its_job_and_none_of_another(emulator, backend: str) -> None:  # noqa: F811
    operator = controller_for(backend, "10.231.81")
    seen: list[dict[str, Any]] = []
    emulator.admission.append(lambda obj: seen.append(obj) if obj.get("kind") == "Pod" else None)
    options = {"kuberay": True} if backend == "kuberay" else {}
    fields = {} if backend == "statefulset" else {"nodes": 2, "procs_per_node": 1}
    with ClusterSim(emulator, NAMESPACE, controllers=[operator] if operator else [], netns_for=operator.netns_for if operator else None):
        with make_cluster(emulator, "ray" if backend == "kuberay" else backend, pod_options=ISOLATED, **options) as cluster:
            jobs = [cluster.submit(workload("ok", **fields)) for _ in range(2)]
            assert all(job.wait(timeout=120).state == JobState.SUCCEEDED for job in jobs)
    for job in jobs:
        policy = emulator.get("networking.k8s.io/v1", "NetworkPolicy", NAMESPACE, job.name)
        assert policy is not None, job.name
        assert policy["metadata"]["ownerReferences"][0]["name"] == job.name  # it goes with the record
        # The controllers name every pod they make for a job after it (the StatefulSet's, the MPI Operator's,
        # JobSet's, KubeRay's cluster and submitter): the policy must cover exactly those.
        created = {p["metadata"]["name"] for p in seen if p["metadata"]["name"].startswith(job.name + "-")}
        covered = {p["metadata"]["name"] for p in seen if selects(policy["spec"]["podSelector"], p)}
        allowed = {p["metadata"]["name"] for p in seen if selects(policy["spec"]["ingress"][0]["from"][0]["podSelector"], p)}
        assert created and created == covered == allowed, (sorted(created), sorted(covered))
