"""The Role ``dsnb rbac`` prints is enough, and every verb in it is used: whole jobs run as a user bound to it.

The emulator authorizes the requests of a user added with ``add_user`` by RBAC over the Roles
and bindings it stores (``tests/k8s/authorizer.py`` plays the API server's RBAC authorizer),
so a verb the printed Role lacks is a 403 here as on a real cluster. Each backend's test
applies exactly what ``dsnb rbac --user`` prints, runs a check, a job with a secret value, a
reattach, a cancelled job and (on the job backends) a served model as that user, and then
compares what RBAC granted during the run with the Role: a Role that misses a verb fails the
run, and a verb that nothing used fails the comparison.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("kubernetes")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

import yaml  # noqa: E402
from helpers import wait_until  # noqa: E402
from k8s.authorizer import Requester, allowed, rule_allows  # noqa: E402
from k8s.crds import FOLDER  # noqa: E402
from k8s.emulator import KubeEmulator  # noqa: E402
from k8s.fixtures import IMAGE, NAMESPACE, emulator, make_cluster, workload  # noqa: E402, F401 - fixtures
from k8s.kuberay_sim import KubeRaySim  # noqa: E402
from k8s.operators import MPIOperatorSim, TrainerSim  # noqa: E402
from k8s.sandbox import mpi_problem, netns_problem, sandbox_problem  # noqa: E402
from k8s.sim import ClusterSim  # noqa: E402
from rich.console import Console  # noqa: E402
from serving_servers import free_port  # noqa: E402

from dsnb import Cluster, ClusterError, JobSpec, JobState, PodOptions  # noqa: E402
from dsnb.console.cli import main  # noqa: E402
from dsnb.serving import ServeSpec  # noqa: E402

USER = "alice@example.com"
TOKEN = "tok-rbac-5d1e"
STANDIN = str(Path(__file__).parent / "k8s" / "serve_standin")
K8S_VERSION = kubernetes_validate.utils.latest_version()


# -- the authorizer plays Kubernetes' rules ------------------------------------------------------

POD_READER = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}


@pytest.mark.parametrize("rule, request_, expected", [
    (POD_READER, ("get", "", "pods", None, "p"), True),
    (POD_READER, ("delete", "", "pods", None, "p"), False),
    (POD_READER, ("get", "", "pods", "log", "p"), False),  # a resource does not grant its subresources
    (POD_READER, ("get", "apps", "pods", None, "p"), False),  # nor the same name in another group
    ({**POD_READER, "resources": ["pods/log"]}, ("get", "", "pods", "log", "p"), True),
    ({**POD_READER, "resources": ["*/log"]}, ("get", "", "pods", "log", "p"), True),
    ({**POD_READER, "resources": ["*"]}, ("get", "", "pods", "log", "p"), True),
    ({**POD_READER, "verbs": ["*"]}, ("deletecollection", "", "pods", None, None), True),
    ({**POD_READER, "apiGroups": ["*"]}, ("get", "apps", "pods", None, "p"), True),
    ({**POD_READER, "resourceNames": ["p"]}, ("get", "", "pods", None, "p"), True),
    ({**POD_READER, "resourceNames": ["p"]}, ("get", "", "pods", None, "q"), False),
    ({**POD_READER, "resourceNames": ["p"]}, ("list", "", "pods", None, None), False),  # a collection has no name
    ({**POD_READER, "verbs": ["create"], "resourceNames": ["p"]}, ("create", "", "pods", None, None), False),
], ids=lambda value: value if isinstance(value, bool) else None)
def test_rules_match_as_the_api_server_matches_them(rule, request_, expected) -> None:
    assert rule_allows(rule, *request_) is expected


def _store(*objects: dict):
    def lookup(kind: str, namespace: str | None):
        return [o for o in objects if o["kind"] == kind and (namespace is None or o["metadata"].get("namespace") == namespace)]
    return lookup


def _binding(kind: str, namespace: str | None, role_kind: str, subject: dict) -> dict:
    meta = {"name": "b", **({"namespace": namespace} if namespace else {})}
    return {"kind": kind, "metadata": meta, "subjects": [subject],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": "r"}}


def test_bindings_apply_where_kubernetes_applies_them() -> None:
    role = {"kind": "Role", "metadata": {"name": "r", "namespace": "ml"}, "rules": [POD_READER]}
    cluster_role = {"kind": "ClusterRole", "metadata": {"name": "r"}, "rules": [POD_READER]}
    alice, bob = Requester("alice", ("team", "system:authenticated")), Requester("bob")
    robot = Requester.service_account("ml", "robot")
    user = {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "alice"}
    in_ml = _store(role, _binding("RoleBinding", "ml", "Role", user))
    assert allowed(alice, "get", "", "pods", None, "ml", "p", in_ml)
    assert not allowed(bob, "get", "", "pods", None, "ml", "p", in_ml)
    assert not allowed(alice, "get", "", "pods", None, "other", "p", in_ml)  # a RoleBinding grants in its namespace only
    assert not allowed(alice, "list", "", "pods", None, None, None, in_ml)  # nor across namespaces
    assert not allowed(alice, "get", "", "pods", None, "ml", "p", _store(_binding("RoleBinding", "ml", "Role", user)))
    # A RoleBinding may grant a ClusterRole's rules, in its own namespace.
    to_cluster_role = _store(cluster_role, _binding("RoleBinding", "ml", "ClusterRole", user))
    assert allowed(alice, "get", "", "pods", None, "ml", "p", to_cluster_role)
    assert not allowed(alice, "get", "", "pods", None, "other", "p", to_cluster_role)
    everywhere = _store(cluster_role, _binding("ClusterRoleBinding", None, "ClusterRole", {"kind": "Group", "name": "team"}))
    assert allowed(alice, "list", "", "pods", None, None, None, everywhere) and not allowed(bob, "list", "", "pods", None, None, None, everywhere)
    # A ServiceAccount subject without a namespace is the binding's.
    sa = _store(role, _binding("RoleBinding", "ml", "Role", {"kind": "ServiceAccount", "name": "robot"}))
    assert allowed(robot, "get", "", "pods", None, "ml", "p", sa)
    assert not allowed(Requester.service_account("other", "robot"), "get", "", "pods", None, "ml", "p", sa)


def test_over_http_a_user_gets_403_until_a_role_is_bound(emulator: KubeEmulator) -> None:  # noqa: F811
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    token = emulator.add_user("alice")
    with client.ApiClient(emulator.configuration(token=token)) as api:
        core = client.CoreV1Api(api)
        with pytest.raises(ApiException) as info:
            core.list_namespaced_pod(NAMESPACE)
        assert info.value.status == 403
        message = json.loads(info.value.body)["message"]
        assert message == 'pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "ml"'

        review = {"spec": {"resourceAttributes": {"namespace": NAMESPACE, "verb": "list", "resource": "pods"}}}
        assert not client.AuthorizationV1Api(api).create_self_subject_access_review(review).status.allowed
        emulator.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                         "metadata": {"name": "r", "namespace": NAMESPACE}, "rules": [POD_READER]})
        emulator.create({"apiVersion": "rbac.authorization.k8s.io/v1",
                         **_binding("RoleBinding", NAMESPACE, "Role", {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "alice"})})
        assert core.list_namespaced_pod(NAMESPACE).items == []
        assert client.AuthorizationV1Api(api).create_self_subject_access_review(review).status.allowed
        with pytest.raises(ApiException, match="403"):
            core.list_namespaced_config_map(NAMESPACE)
    with client.ApiClient(emulator.configuration()) as admin:  # the admin is not bound by RBAC
        assert client.CoreV1Api(admin).list_namespaced_config_map(NAMESPACE).items == []


# -- whole jobs as a user bound to the printed Role ----------------------------------------------

def printed_role(backend: str, user: str = USER) -> list[dict]:
    console = Console(file=io.StringIO(), width=200, force_terminal=False, color_system=None)
    code = main(["rbac", "--backend", backend, "--namespace", NAMESPACE, "--user", user], console=console)
    out = console.file.getvalue()
    assert code == 0, out
    documents = list(yaml.safe_load_all(out))
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    return documents


def role_grants(role: dict) -> set[tuple[str, str, str]]:
    return {(verb, group, resource) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def used_by(emulator: KubeEmulator, user: str) -> set[tuple[str, str, str]]:  # noqa: F811
    return {(verb, group, resource) for who, verb, group, resource in emulator.granted if who == user}


#: Kubeflow Trainer v2.3.0's kubeflow-platform overlay lets every authenticated user read
#: ClusterTrainingRuntimes (manifests/overlays/kubeflow-platform/kubeflow-trainer-roles.yaml,
#: ClusterRole and ClusterRoleBinding ``kubeflow-trainer-view-cluster-runtimes``).
TRAINER_CLUSTER_RUNTIMES_VIEW = [
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "kubeflow-trainer-view-cluster-runtimes"},
     "rules": [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["clustertrainingruntimes"], "verbs": ["get", "list", "watch"]}]},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "kubeflow-trainer-view-cluster-runtimes"},
     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubeflow-trainer-view-cluster-runtimes"},
     "subjects": [{"kind": "Group", "name": "system:authenticated", "apiGroup": "rbac.authorization.k8s.io"}]},
]


@contextmanager
def simulated(emulator: KubeEmulator, backend: str) -> Iterator[ClusterSim]:  # noqa: F811
    if backend == "statefulset":
        controllers, netns_for = [], None
    elif backend == "mpijob":
        operator = MPIOperatorSim("10.231.41")
        controllers, netns_for = [operator], operator.netns_for
    elif backend == "trainjob":
        operator = TrainerSim("10.231.42", yaml.safe_load((FOLDER / "runtime-deepspeed-distributed.yaml").read_text()))
        controllers, netns_for = [operator], operator.netns_for
    else:
        controllers, netns_for = [KubeRaySim()], None
    with ClusterSim(emulator, NAMESPACE, controllers=controllers, netns_for=netns_for) as sim:
        yield sim


def as_user(emulator: KubeEmulator, backend: str, token: str, **options) -> Cluster:  # noqa: F811
    name = "ray" if backend == "kuberay" else backend
    extra = {"kuberay": True} if backend == "kuberay" else {}
    return Cluster(name, namespace=NAMESPACE, configuration=emulator.configuration(token=token), **extra, **options)


def job_spec(backend: str, mode: str, **fields) -> JobSpec:
    if backend == "statefulset":
        return workload(mode, **fields)
    return workload(mode, nodes=2, procs_per_node=1, **fields)


#: The (group, resource) of each backend's workload, which the refused submit cannot create.
WORKLOAD_KIND = {"statefulset": ("apps", "statefulsets"), "mpijob": ("kubeflow.org", "mpijobs"),
                 "trainjob": ("trainer.kubeflow.org", "trainjobs"), "kuberay": ("ray.io", "rayjobs")}


#: What the conformance workload prints on rank 0, on rank 1, and first when sleeping; KubeRay's fake driver prints steps.
TEXTS = {"kuberay": ("step 1 on rank 0", "step 1 on rank 1", "step 1 on rank")}


def run_everything(emulator: KubeEmulator, sim: ClusterSim, backend: str, token: str) -> None:  # noqa: F811
    """What a user does with dsnb: check, a job with a secret, reattach, a pending and a cancelled job,
    serve and stop, and a submit the cluster refuses."""
    rank0, rank1, started = TEXTS.get(backend, ("hello from rank 0", "hello from rank 1", "started"))
    isolated = PodOptions(network_policy=True)  # every job with its NetworkPolicy
    with as_user(emulator, backend, token, cancel_wait=30, pod_options=isolated) as cluster:
        report = cluster.check()
        assert not [c for c in report.results if c.name.startswith("permission") and not c.ok], report
        if backend == "trainjob":  # the runtimes a user may pick, and one of the namespace's own
            runtime = yaml.safe_load((FOLDER / "runtime-deepspeed-distributed.yaml").read_text())
            emulator.create({**runtime, "kind": "TrainingRuntime", "metadata": {"name": "team-runtime", "namespace": NAMESPACE}})
            assert "team-runtime" in {r["name"] for r in cluster.runtimes()}
            with as_user(emulator, backend, token, runtime="team-runtime", runtime_kind="TrainingRuntime") as own:
                assert own.check().ok, own.check()
        job = cluster.submit(job_spec(backend, "ok", env={"API_TOKEN": "tok-value-1"}))
        assert job.wait(timeout=120).state == JobState.SUCCEEDED
        assert job.metrics("loss") and any(rank0 in line.text for line in job.logs())
        with as_user(emulator, backend, token) as again:  # a new kernel, once the job's pods are gone
            found = again.attach(job.name)
            assert found.status().state == JobState.SUCCEEDED
            assert any(rank1 in line.text for line in found.logs())
            assert job.name in [s.name for s in again.jobs()]
        sleeper = cluster.submit(job_spec(backend, "sleep"))
        for line in sleeper.logs(follow=True):
            if line.text.startswith(started):
                break
        assert sleeper.cancel().state == JobState.CANCELLED
        sim.unschedulable = "0/3 nodes are available: 3 Insufficient cpu."
        waiting = cluster.submit(job_spec(backend, "ok"))
        seen: list[str] = []

        def told_why() -> bool:
            status = waiting.status()
            seen.append(f"{status.state.value}: {status.message}")
            return status.state == JobState.PENDING and "cannot be scheduled" in status.message

        wait_until(told_why, timeout=30, message=lambda: seen[-3:])
        assert waiting.cancel().state == JobState.CANCELLED
        sim.unschedulable = None
        if backend == "kuberay":  # a RayService of two replicas; tokens are for dsnb's own server
            spec = ServeSpec(name="tiny", model="tiny_models:tiny_mlp", image=IMAGE, replicas=2, env={"HF_TOKEN": "hf_value_1"})
        else:
            spec = ServeSpec(name="tiny", model="tiny_models:tiny_mlp", image=IMAGE, nodes=1 if backend == "statefulset" else 2,
                             port=free_port(), token=TOKEN, working_dir=STANDIN)
        endpoint = cluster.serve(spec, wait=90)
        assert endpoint.status().state == JobState.RUNNING
        assert [s.name for s in cluster.endpoints()] == [endpoint.name]
        with as_user(emulator, backend, token) as again:  # a new kernel finds it (and reads the token from the Secret)
            assert again.endpoint(endpoint.name).status().state == JobState.RUNNING
            if backend != "kuberay":
                assert again.backend.endpoint_headers(endpoint.name) == {"Authorization": f"Bearer {TOKEN}"}
        assert endpoint.stop().state == JobState.CANCELLED
        # The cluster refuses the workload (as an admission webhook or a quota would): the record is taken back.
        refused, before = WORKLOAD_KIND[backend], emulator.inventory(NAMESPACE)
        emulator.denied.add(("create", *refused))
        try:
            with pytest.raises(ClusterError, match="not allowed to create"):
                cluster.submit(job_spec(backend, "ok", env={"API_TOKEN": "tok-value-1"}))
        finally:
            emulator.denied.discard(("create", *refused))
        assert emulator.inventory(NAMESPACE) == before



needs_sandbox = pytest.mark.skipif(sandbox_problem() is not None, reason=sandbox_problem() or "")
needs_mpi = pytest.mark.skipif((netns_problem() or mpi_problem()) is not None, reason=netns_problem() or mpi_problem() or "")


@pytest.mark.parametrize("backend", [
    pytest.param("statefulset", marks=needs_sandbox), pytest.param("mpijob", marks=needs_mpi),
    pytest.param("trainjob", marks=needs_mpi), pytest.param("kuberay", marks=needs_sandbox),
])
def test_a_user_bound_to_the_printed_role_runs_everything_and_uses_all_of_it(emulator, backend: str) -> None:  # noqa: F811
    documents = printed_role("ray" if backend == "kuberay" else backend)
    for document in documents + (TRAINER_CLUSTER_RUNTIMES_VIEW if backend == "trainjob" else []):
        emulator.create(document)
    token = emulator.add_user(USER)
    with simulated(emulator, backend) as sim:
        run_everything(emulator, sim, backend, token)
    granted, used = role_grants(documents[0]), used_by(emulator, USER)
    cluster_wide = {("get", "trainer.kubeflow.org", "clustertrainingruntimes"), ("list", "trainer.kubeflow.org", "clustertrainingruntimes"),
                    ("watch", "trainer.kubeflow.org", "clustertrainingruntimes")}
    assert used - cluster_wide <= granted  # else the run would have failed: a sanity check of the oracle
    assert granted - used == set(), f"the Role grants what no step of a whole run used: {sorted(granted - used)}"


@needs_sandbox
@pytest.mark.parametrize("missing, said", [
    (("watch", "", "pods"), "not allowed to watch pods"),
    (("create", "", "secrets"), "not allowed to create Secret"),
    (("get", "", "pods/log"), "not allowed to read the log of pod"),
    (("patch", "apps", "statefulsets/scale"), "not allowed to create Role"),
], ids=["watch-pods", "create-secrets", "get-pods-log", "patch-scale"])
def test_a_role_without_one_verb_fails_with_the_reason_and_the_fix(emulator, missing, said) -> None:  # noqa: F811
    """The negative control of the test above: one verb fewer is a clear error, not a hang or a job without logs."""
    verb, group, resource = missing
    role, binding = printed_role("statefulset")
    for rule in role["rules"]:
        if rule["apiGroups"] == [group] and rule["resources"] == [resource]:
            rule["verbs"].remove(verb)
    emulator.create(role)
    emulator.create(binding)
    token = emulator.add_user(USER)
    with simulated(emulator, "statefulset"), as_user(emulator, "statefulset", token, cancel_wait=30) as cluster:
        report = cluster.check()
        label = f"{resource}.{group}" if group else resource
        assert [c.name for c in report.problems] == [f"permission {label}"], report
        before = emulator.inventory(NAMESPACE)
        job = None
        try:
            job = cluster.submit(workload("sleep", env={"API_TOKEN": "tok-value-1"}))
            wait_until(lambda: job.status().state == JobState.RUNNING, timeout=60)
            list(job.logs())
            told = "no error"
        except ClusterError as e:
            told = str(e)
            if job is None:
                assert emulator.inventory(NAMESPACE) == before  # a refused submit leaves nothing
        finally:
            if job is not None and resource != "pods":  # without watching pods dsnb cannot follow a cancel either
                job.cancel()
        assert said in told and "dsnb rbac --backend statefulset" in told, told
        if resource == "statefulsets/scale":  # the API server's escalation check names what the job's Role would grant
            assert 'Resources:["statefulsets/scale"]' in told, told
