"""Preflight of the statefulset backend against the API emulator, and the ``dsnb check``/``dsnb rbac`` commands."""

from __future__ import annotations

import dataclasses
import io
import time
from pathlib import Path

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")
pytest.importorskip("kubernetes")

import yaml  # noqa: E402
from k8s.emulator import KubeEmulator  # noqa: E402
from kubernetes import client  # noqa: E402
from rich.console import Console  # noqa: E402

from dsnb import Cluster, JobSpec, Resources  # noqa: E402
from dsnb.backends.kubernetes.preflight import OPERATOR_INSTALL  # noqa: E402
from dsnb.backends.kubernetes.rbac import STATEFULSET_PERMISSIONS, role_manifests  # noqa: E402
from dsnb.console.cli import main  # noqa: E402
from dsnb.errors import ClusterError  # noqa: E402

K8S_VERSION = kubernetes_validate.utils.latest_version()
NAMESPACE = "ml"
RBAC_FIX = f"`dsnb rbac --backend statefulset --namespace {NAMESPACE} --user <you>`"
OPERATOR_LABELS = {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
PERMISSION_LINES = ["permission configmaps", "permission secrets", "permission pods", "permission pods/log",
                    "permission events", "permission services", "permission serviceaccounts", "permission statefulsets.apps",
                    "permission statefulsets/scale.apps", "permission roles.rbac.authorization.k8s.io",
                    "permission rolebindings.rbac.authorization.k8s.io", "permission networkpolicies.networking.k8s.io"]


@pytest.fixture
def emulator():
    with KubeEmulator(namespaces=("default", NAMESPACE)) as running:
        yield running


def gpu_spec(gpus: int, nodes: int = 1) -> JobSpec:
    return JobSpec(name="big", script="train.py", nodes=nodes, procs_per_node=gpus, resources=Resources(gpus=gpus))


def check(emulator: KubeEmulator, spec: JobSpec | None = None, namespace: str = NAMESPACE):
    with Cluster("statefulset", namespace=namespace, configuration=emulator.configuration()) as cluster:
        return cluster.check(spec)


def statuses(report) -> dict[str, str]:
    return {r.name: r.status for r in report.results}


def run_cli(*argv: str) -> tuple[int, str]:
    console = Console(file=io.StringIO(), width=200, force_terminal=False, color_system=None)
    code = main(list(argv), console=console)
    return code, console.file.getvalue()


# -- the report, check by check ------------------------------------------------------------------------
def test_all_good_with_a_gpu_node_and_the_operator(emulator):
    emulator.add_node("gpu-1", OPERATOR_LABELS, {"cpu": "64", "nvidia.com/gpu": "8"})
    emulator.add_node("gpu-2", OPERATOR_LABELS, {"cpu": "64", "nvidia.com/gpu": "8"})
    report = check(emulator, gpu_spec(8, nodes=2))
    assert report.ok, str(report)
    assert list(statuses(report)) == ["API reachable", "namespace", *PERMISSION_LINES, "GPUs", "GPU Operator"]
    assert set(statuses(report).values()) == {"passed"}
    text = str(report)
    assert f"✓ API reachable: Kubernetes v1.32.0 at {emulator.url}" in text
    assert f"✓ namespace: {NAMESPACE} exists" in text
    assert "✓ permission configmaps: create, get, list, watch, patch, delete" in text
    assert "✓ GPUs: 2 node(s) offer 8 nvidia.com/gpu or more: room for 2 pod(s), the job needs 2" in text
    assert "✓ GPU Operator: node gpu-1 is labelled nvidia.com/gpu.present=true" in text
    assert "fix:" not in text
    assert report.raise_for_problems() is report


def test_without_a_spec_gpus_are_not_checked_and_nothing_is_created(emulator):
    report = check(emulator)
    assert report.ok and "GPUs" not in statuses(report)
    assert all(method in ("GET", "POST") for method, _ in emulator.requests)
    assert {path for method, path in emulator.requests if method == "POST"} == {
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"}


def test_a_missing_namespace_fails_with_the_kubectl_fix(emulator):
    report = check(emulator, namespace="absent")
    assert not report.ok
    result = report["namespace"]
    assert result.status == "failed" and result.detail == "namespace 'absent' does not exist"
    assert result.fix.startswith("kubectl create namespace absent")
    assert "✗ namespace: namespace 'absent' does not exist\n    fix: kubectl create namespace absent" in str(report)
    with pytest.raises(ClusterError, match="check 'namespace'.*Fix: kubectl create namespace absent"):
        report.raise_for_problems()


def test_a_namespace_the_user_cannot_read_is_only_a_warning(emulator):
    emulator.denied.add(("get", "", "namespaces"))
    report = check(emulator)
    assert report.ok
    assert report["namespace"].status == "warning"
    assert "! namespace: cannot read namespace 'ml' (normal for namespaced users)" in str(report)


def test_denied_verbs_are_listed_and_the_others_pass(emulator):
    emulator.denied |= {("create", "apps", "statefulsets"), ("get", "", "pods/log")}
    report = check(emulator)
    assert not report.ok
    assert [r.name for r in report.problems] == ["permission pods/log", "permission statefulsets.apps"]
    text = str(report)
    assert "✗ permission statefulsets.apps: cannot create in namespace ml (allowed: delete)" in text
    assert "✗ permission pods/log: cannot get in namespace ml" in text
    assert f"    fix: ask your cluster admin for the Role printed by {RBAC_FIX}" in text
    assert "✓ permission pods: list, watch" in text  # pods itself is fine: only the log subresource is denied
    assert "✓ permission services: create, delete" in text
    assert statuses(report)["API reachable"] == statuses(report)["namespace"] == "passed"


def test_gpus_asked_but_no_gpu_node_fails_with_the_operator_hint(emulator):
    emulator.add_node("cpu-1")
    report = check(emulator, gpu_spec(4))
    assert not report.ok
    gpus = report["GPUs"]
    assert gpus.status == "failed" and gpus.detail == "no node offers nvidia.com/gpu (1 schedulable node(s))"
    assert "install the NVIDIA GPU Operator or device plugin" in gpus.fix and OPERATOR_INSTALL in gpus.fix
    assert report["GPU Operator"].status == "warning"
    assert "helm install --wait --generate-name -n gpu-operator --create-namespace nvidia/gpu-operator" in str(report)


def test_a_gpu_node_without_operator_signs_is_only_a_warning(emulator):
    emulator.add_node("gpu-1", allocatable={"cpu": "32", "nvidia.com/gpu": "4"})
    report = check(emulator, gpu_spec(4))
    assert report.ok, str(report)
    assert report["GPUs"].status == "passed"
    operator = report["GPU Operator"]
    assert operator.status == "warning" and operator.fix == f"install it: {OPERATOR_INSTALL}"
    assert "! GPU Operator: no sign of the NVIDIA GPU Operator" in str(report)


def test_device_plugin_pods_count_as_a_sign_of_the_operator(emulator):
    emulator.add_node("gpu-1", allocatable={"nvidia.com/gpu": "8"})
    emulator.add_namespace("gpu-operator")
    emulator.create({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": "nvidia-device-plugin-daemonset-x7k2", "namespace": "gpu-operator",
                                  "labels": {"app": "nvidia-device-plugin-daemonset"}},
                     "spec": {"containers": [{"name": "plugin", "image": "nvcr.io/nvidia/k8s-device-plugin:v0.17.1"}]}})
    report = check(emulator, gpu_spec(8))
    assert report.ok
    assert "✓ GPU Operator: 1 device plugin pod(s) in namespace gpu-operator" in str(report)


def test_too_few_or_too_small_gpu_nodes_fail_naming_what_is_there(emulator):
    emulator.add_node("gpu-1", OPERATOR_LABELS, {"nvidia.com/gpu": "8"})
    emulator.add_node("gpu-2", OPERATOR_LABELS, {"nvidia.com/gpu": "2"})
    emulator.add_node("gpu-3", OPERATOR_LABELS, {"nvidia.com/gpu": "8"})
    emulator.update({**emulator.get("v1", "Node", None, "gpu-3"), "spec": {"unschedulable": True}})  # cordoned
    too_many = check(emulator, gpu_spec(4, nodes=3))["GPUs"]
    assert too_many.status == "failed"
    assert too_many.detail == "room for 2 pod(s) with 4 nvidia.com/gpu each; the job needs 3"
    assert too_many.fix.startswith("ask for nodes=2 or fewer")
    too_big = check(emulator, JobSpec(name="huge", script="t.py", procs_per_node=8, resources=Resources(gpus=16)))["GPUs"]
    assert too_big.detail == "the job asks 16 nvidia.com/gpu per pod; the largest node offers 8"
    assert too_big.fix.startswith("ask for gpus=8 or fewer per node")


def test_nodes_the_user_cannot_list_make_gpu_capacity_a_warning(emulator):
    emulator.denied |= {("list", "", "nodes"), ("list", "", "pods")}
    report = check(emulator, gpu_spec(8))
    assert report["GPUs"].status == "warning"
    assert "! GPUs: cannot list nodes, so the GPU capacity is unknown" in str(report)
    assert report["GPU Operator"].status == "warning"
    # listing pods is also part of the backend's own permissions, so that line fails
    assert [r.name for r in report.problems] == ["permission pods"]


def test_an_unreachable_api_fails_fast_and_nothing_else_runs():
    conf = client.Configuration()
    conf.host = "http://127.0.0.1:9"
    started = time.monotonic()
    with Cluster("statefulset", namespace=NAMESPACE, configuration=conf) as cluster:
        report = cluster.check(gpu_spec(8))
    assert time.monotonic() - started < 10
    first, *rest = report.results
    assert first.name == "API reachable" and first.status == "failed"
    assert "cannot reach http://127.0.0.1:9" in first.detail and "Connection refused" in first.detail
    assert first.fix == "check the cluster is up and the kubeconfig's context (kubectl cluster-info)"
    assert [(r.name, r.status) for r in rest] == [("namespace", "not run"), ("permissions", "not run"),
                                                  ("GPUs", "not run"), ("GPU Operator", "not run")]
    assert "- namespace: not run: the API server did not answer" in str(report)
    assert report.summary() == "backend 'statefulset': 0 check(s) passed, 1 failed, 4 not run"


def test_a_missing_kubeconfig_is_a_failed_first_line(tmp_path):
    missing = tmp_path / "nope"
    report = Cluster("statefulset", namespace=NAMESPACE, kubeconfig=missing).check()
    assert report.results[0].status == "failed"
    assert report.results[0].detail == f"kubeconfig {missing}: no such file"
    assert [r.status for r in report.results[1:]] == ["not run", "not run"]


def test_the_report_shows_as_an_escaped_table_in_notebooks(emulator):
    emulator.denied.add(("create", "", "secrets"))
    page = check(emulator)._repr_html_()
    assert page.startswith("<table>") and "1 problem(s)" in page
    assert "<td>permission secrets</td><td>cannot create in namespace ml (allowed: get, delete)</td>" in page
    assert "`dsnb rbac --backend statefulset --namespace ml --user &lt;you&gt;`" in page


# -- dsnb rbac -------------------------------------------------------------------------------------------
def rules_of(role: dict) -> dict[tuple[str, str], list[str]]:
    return {(rule["apiGroups"][0], rule["resources"][0]): rule["verbs"] for rule in role["rules"]}


def test_dsnb_rbac_prints_a_valid_role_and_binding():
    """Valid objects bound to the account named; that the verbs suffice and are all used is test_k8s_rbac's."""
    code, out = run_cli("rbac", "--backend", "statefulset", "--namespace", "ml", "--service-account", "jupyter")
    assert code == 0
    assert out.startswith("# Role for dsnb's statefulset backend in namespace ml, bound to ServiceAccount ml/jupyter.")
    assert "warning" not in out.lower()
    role, binding = yaml.safe_load_all(out)
    for doc in (role, binding):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert (role["kind"], role["metadata"]) == ("Role", {"name": "dsnb", "namespace": "ml"})
    assert rules_of(role)["", "pods/log"] == ["get"] and rules_of(role)["apps", "statefulsets"] == ["create", "delete"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "jupyter", "namespace": "ml"}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "dsnb"}


def test_dsnb_rbac_binds_no_one_unless_told_and_warns_about_the_default_account():
    code, out = run_cli("rbac", "--backend", "statefulset", "--namespace", "ml")
    assert code == 2 and "name who gets the Role: --user NAME" in out and "kind: Role" not in out
    code, out = run_cli("rbac", "--namespace", "ml", "--service-account", "default")
    assert code == 0
    assert "warning: binding to ServiceAccount 'default' gives these rights to every pod of the namespace" in out
    header = [line for line in out.splitlines() if line.startswith("#")]
    assert header[-1].startswith("# Warning: binding to ServiceAccount 'default'")  # the YAML says it too
    _, binding = yaml.safe_load_all("\n".join(line for line in out.splitlines() if not line.startswith("warning")))
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "default", "namespace": "ml"}]


@pytest.mark.parametrize(("option", "kind"), [("--user", "User"), ("--group", "Group")])
def test_dsnb_rbac_binds_users_and_groups(option, kind):
    code, out = run_cli("rbac", "--namespace", "team-a", option, "ml-team@example.com", "--name", "dsnb-train")
    assert code == 0
    role, binding = yaml.safe_load_all(out)
    kubernetes_validate.validate(binding, K8S_VERSION, strict=True)
    assert binding["subjects"] == [{"kind": kind, "apiGroup": "rbac.authorization.k8s.io", "name": "ml-team@example.com"}]
    assert binding["metadata"] == role["metadata"] == {"name": "dsnb-train", "namespace": "team-a"}


def test_dsnb_rbac_takes_the_namespace_from_the_kubeconfig(emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", emulator.write_kubeconfig(tmp_path / "config", namespace="from-context"))
    code, out = run_cli("rbac", "--service-account", "notebook")
    assert code == 0
    _, binding = yaml.safe_load_all(out)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "notebook", "namespace": "from-context"}]


def test_dsnb_rbac_refuses_what_it_cannot_bind():
    assert run_cli("rbac", "--backend", "local")[0] == 2
    code, out = run_cli("rbac", "--namespace", "ml", "--user", "")
    assert code == 2 and "the User name is empty" in out
    assert run_cli("rbac", "--user", "a", "--group", "b")[0] == 2  # one subject only
    with pytest.raises(ValueError, match="unknown subject kind 'Robot'"):
        role_manifests(STATEFULSET_PERMISSIONS, "ml", "Robot", "r2d2")


# -- dsnb check ------------------------------------------------------------------------------------------
def kubeconfig(emulator: KubeEmulator, tmp_path: Path) -> str:
    return emulator.write_kubeconfig(tmp_path / "config", namespace=NAMESPACE)


def test_dsnb_check_passes_on_a_ready_cluster(emulator, tmp_path):
    emulator.add_node("gpu-1", OPERATOR_LABELS, {"nvidia.com/gpu": "8"})
    code, out = run_cli("check", "--backend", "statefulset", "--kubeconfig", kubeconfig(emulator, tmp_path),
                        "--context", "emulator", "--gpus", "8")
    assert code == 0, out
    assert f"✓ API reachable: Kubernetes v1.32.0 at {emulator.url} (context emulator)" in out
    assert "✓ GPUs: 1 node(s) offer 8 nvidia.com/gpu or more" in out
    assert out.rstrip().endswith("backend 'statefulset': 16 check(s) passed")


def test_dsnb_check_exits_1_when_a_check_fails(emulator, tmp_path):
    emulator.denied.add(("delete", "", "configmaps"))
    code, out = run_cli("check", "--backend", "statefulset", "--kubeconfig", kubeconfig(emulator, tmp_path))
    assert code == 1
    assert "✗ permission configmaps: cannot delete in namespace ml (allowed: create, get, list, watch, patch)" in out
    assert f"fix: ask your cluster admin for the Role printed by {RBAC_FIX}" in out
    assert "1 failed" in out


def test_dsnb_check_in_another_namespace_and_without_gpu_nodes(emulator, tmp_path):
    config = kubeconfig(emulator, tmp_path)
    code, out = run_cli("check", "--backend", "statefulset", "--kubeconfig", config, "--namespace", "absent")
    assert code == 1 and "fix: kubectl create namespace absent" in out
    code, out = run_cli("check", "--backend", "statefulset", "--kubeconfig", config, "--gpus", "1", "--nodes", "2")
    assert code == 1 and "✗ GPUs: no node offers nvidia.com/gpu" in out


def test_dsnb_check_with_an_unknown_context(emulator, tmp_path):
    code, out = run_cli("check", "--backend", "statefulset", "--kubeconfig", kubeconfig(emulator, tmp_path), "--context", "prod")
    assert code == 1
    assert "✗ API reachable: kubeconfig" in out and "has no context 'prod' (it has: emulator)" in out


# -- will the model fit: node labels and allocatable ------------------------------------------------
def test_the_fit_is_judged_against_the_gpu_memory_label_and_the_pods_memory(emulator):
    h100 = {**OPERATOR_LABELS, "nvidia.com/gpu.memory": "81559"}
    emulator.add_node("gpu-1", h100, {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8"})
    emulator.add_node("gpu-2", {**h100, "nvidia.com/gpu.memory": "40960"}, {"cpu": "64", "memory": "256Gi",
                                                                            "nvidia.com/gpu": "4"})
    spec = JobSpec(name="big", script="train.py", procs_per_node=8, resources=Resources(gpus=8),
                   deepspeed={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    with Cluster("statefulset", namespace=NAMESPACE, configuration=emulator.configuration()) as cluster:
        report = cluster.check(spec, model=6.7e9)
        # gpu-2 offers only 4 GPUs: the 8-GPU pod lands on gpu-1, so its 80 GiB count, and its allocatable memory
        assert (report.fit.gpu_memory, report.fit.cpu_memory) == (81559 * 2**20, 512 * 2**30)
        line = report["memory fit"]
        assert line.status == "passed" and "nvidia.com/gpu.memory of 1 node(s) with 8 GPU(s) or more" in line.detail
        limited = dataclasses.replace(spec, resources=Resources(gpus=8, memory="16Gi"), procs_per_node=8)
        report = cluster.check(limited, model=6.7e9)
        assert report.fit.cpu_memory == 16 * 2**30  # the pod's memory limit, not the node's
        half = dataclasses.replace(spec, resources=Resources(gpus=4), procs_per_node=4)
        assert cluster.check(half, model=6.7e9).fit.gpu_memory == 40960 * 2**20  # the smaller GPU it may land on


def test_without_the_gpu_memory_label_the_fit_is_a_warning_and_a_denied_node_list_says_so(emulator):
    emulator.add_node("gpu-1", OPERATOR_LABELS, {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8"})
    spec = JobSpec(name="big", script="train.py", procs_per_node=8, resources=Resources(gpus=8))
    with Cluster("statefulset", namespace=NAMESPACE, configuration=emulator.configuration()) as cluster:
        line = cluster.check(spec, model=6.7e9)["memory fit"]
        assert line.status == "warning" and "no GPU node has the nvidia.com/gpu.memory label" in line.detail
        assert "--gpu-gib" in line.fix
        emulator.denied.add(("list", "", "nodes"))
        report = cluster.check(spec, model=6.7e9)
        assert report["memory fit"].status == "warning" and "the nodes cannot be listed (forbidden)" in report[
            "memory fit"].detail
    assert all(method in ("GET", "POST") for method, _ in emulator.requests)  # nothing created


def test_dsnb_check_with_a_model_reads_the_nodes(emulator, tmp_path):
    emulator.add_node("gpu-1", {**OPERATOR_LABELS, "nvidia.com/gpu.memory": "24576"},
                      {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "1"})
    kubeconfig = emulator.write_kubeconfig(tmp_path / "config")
    code, text = run_cli("check", "--backend", "statefulset", "--namespace", NAMESPACE, "--kubeconfig", kubeconfig,
                         "--gpus", "1", "--model", "6.7e9", "--zero-stage", "2")
    assert code == 1 and "✗ memory fit:" in text and "there is 24.00 GiB per GPU" in text and "(ZeRO 2)" in text
