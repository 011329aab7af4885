"""Operator preflight of the mpijob and trainjob backends, ``cluster.runtimes()`` and their ``dsnb rbac`` Roles.

Everything goes over HTTP to the API emulator; tests play the operators by creating their
pods, CRDs (kinds served or not) and training runtimes.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")
pytest.importorskip("kubernetes")
pytest.importorskip("kubeflow_trainer_api")

import yaml  # noqa: E402
from k8s.crds import FOLDER  # noqa: E402
from k8s.emulator import KubeEmulator  # noqa: E402
from rich.console import Console  # noqa: E402

from dsnb import Cluster, JobSpec  # noqa: E402
from dsnb.backends.kubernetes.mpijob import OPERATOR_INSTALL  # noqa: E402
from dsnb.backends.kubernetes.rbac import MPIJOB_PERMISSIONS, TRAINJOB_PERMISSIONS, Permission  # noqa: E402
from dsnb.backends.kubernetes.trainjob import RUNTIMES_INSTALL, TRAINER_INSTALL  # noqa: E402
from dsnb.console.cli import main  # noqa: E402
from dsnb.errors import ClusterError  # noqa: E402
from dsnb.preflight import PreflightReport  # noqa: E402

K8S_VERSION = kubernetes_validate.utils.latest_version()
NAMESPACE = "ml"
TRAINER = "trainer.kubeflow.org"
TRAINER_API = f"{TRAINER}/v1alpha1"
MPI_OPERATOR_POD = "mpi-operator-7d9f8b6c5-x2k4q"
TRAINER_POD = "kubeflow-trainer-controller-manager-5c8d7-p9wz"


@pytest.fixture
def emulator() -> Iterator[KubeEmulator]:
    with KubeEmulator(namespaces=("default", NAMESPACE)) as running:
        yield running


def check(emulator: KubeEmulator, backend: str, **options: Any) -> PreflightReport:
    with Cluster(backend, namespace=NAMESPACE, configuration=emulator.configuration(), **options) as cluster:
        return cluster.check()


def runtimes(emulator: KubeEmulator) -> list[dict[str, Any]]:
    with Cluster("trainjob", namespace=NAMESPACE, configuration=emulator.configuration()) as cluster:
        return cluster.runtimes()


def statuses(report: PreflightReport) -> dict[str, str]:
    return {r.name: r.status for r in report.results}


def add_operator_pod(emulator: KubeEmulator, namespace: str, name: str, app: str, phase: str = "Running") -> None:
    """A controller pod labelled ``app.kubernetes.io/name=<app>`` in ``namespace``, in ``phase``."""
    emulator.add_namespace(namespace)
    emulator.create({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": app}},
                     "spec": {"containers": [{"name": "manager", "image": f"ghcr.io/kubeflow/{app}:v1"}]},
                     "status": {"phase": phase}})


def stock_runtime() -> dict[str, Any]:
    return yaml.safe_load((FOLDER / "runtime-deepspeed-distributed.yaml").read_text())


def namespaced_runtime(name: str) -> dict[str, Any]:
    """The stock runtime as a TrainingRuntime in the test namespace, with two nodes."""
    runtime = stock_runtime()
    runtime["kind"] = "TrainingRuntime"
    runtime["metadata"] = {**runtime["metadata"], "name": name, "namespace": NAMESPACE}
    runtime["spec"]["mlPolicy"]["numNodes"] = 2
    return runtime


def trainer_in_place(emulator: KubeEmulator) -> None:
    add_operator_pod(emulator, "kubeflow-system", TRAINER_POD, "trainer")
    emulator.create(stock_runtime())


# -- mpijob --------------------------------------------------------------------------------------------
def test_mpijob_with_the_crd_and_a_running_operator_passes(emulator: KubeEmulator) -> None:
    add_operator_pod(emulator, "mpi-operator", MPI_OPERATOR_POD, "mpi-operator")
    report = check(emulator, "mpijob")
    assert report.ok, str(report)
    assert list(statuses(report))[-4:] == ["permission mpijobs.kubeflow.org", "permission networkpolicies.networking.k8s.io",
                                          "MPIJob CRD", "MPI Operator"]
    assert set(statuses(report).values()) == {"passed"}
    text = str(report)
    assert "✓ MPIJob CRD: mpijobs.kubeflow.org/v2beta1 is served" in text
    assert "✓ MPI Operator: 1 pod(s) running in namespace mpi-operator" in text


def test_mpijob_without_the_crd_or_the_operator_fails_with_the_install_line(emulator: KubeEmulator) -> None:
    emulator.remove_resource("kubeflow.org/v2beta1", "MPIJob")
    report = check(emulator, "mpijob")
    assert not report.ok
    assert [r.name for r in report.problems] == ["MPIJob CRD", "MPI Operator"]
    crd, operator = report["MPIJob CRD"], report["MPI Operator"]
    assert crd.status == "failed" and crd.detail == "the API does not serve mpijobs.kubeflow.org/v2beta1"
    assert crd.fix == f"install it: {OPERATOR_INSTALL}"
    assert operator.status == "failed" and operator.detail == "no running pod of MPI Operator found"
    assert operator.fix == f"install it: {OPERATOR_INSTALL}"
    assert "kubectl apply --server-side -f https://raw.githubusercontent.com/kubeflow/mpi-operator/" in str(report)


def test_a_pending_operator_pod_fails_naming_the_pod(emulator: KubeEmulator) -> None:
    add_operator_pod(emulator, "mpi-operator", MPI_OPERATOR_POD, "mpi-operator", phase="Pending")
    report = check(emulator, "mpijob")
    operator = report["MPI Operator"]
    assert operator.status == "failed"
    assert operator.detail == f"its pod {MPI_OPERATOR_POD} is Pending, not Running"
    assert operator.fix == f"kubectl describe pod -n mpi-operator {MPI_OPERATOR_POD}"
    assert [r.name for r in report.problems] == ["MPI Operator"]


def test_the_older_app_label_of_the_operator_is_recognised(emulator: KubeEmulator) -> None:
    emulator.add_namespace("mpi-operator")
    emulator.create({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": MPI_OPERATOR_POD, "namespace": "mpi-operator", "labels": {"app": "mpi-operator"}},
                     "spec": {"containers": [{"name": "mpi-operator", "image": "mpioperator/mpi-operator:0.6.0"}]},
                     "status": {"phase": "Running"}})
    assert check(emulator, "mpijob")["MPI Operator"].status == "passed"


def test_a_user_who_cannot_list_pods_across_namespaces_gets_a_warning(emulator: KubeEmulator) -> None:
    add_operator_pod(emulator, "mpi-operator", MPI_OPERATOR_POD, "mpi-operator")
    emulator.denied_cluster_wide.add(("list", "", "pods"))  # a Role in the namespace only
    report = check(emulator, "mpijob")
    assert report.ok, str(report)
    operator = report["MPI Operator"]
    assert operator.status == "warning"
    assert operator.detail == "cannot list pods across namespaces, so it cannot be seen"
    assert operator.fix == "ask your cluster admin whether MPI Operator runs"
    assert report["permission pods"].status == "passed"  # listing in the namespace is still allowed


def test_a_user_who_cannot_list_mpijobs_fails_only_on_that_permission(emulator: KubeEmulator) -> None:
    add_operator_pod(emulator, "mpi-operator", MPI_OPERATOR_POD, "mpi-operator")
    emulator.denied.add(("list", "kubeflow.org", "mpijobs"))
    report = check(emulator, "mpijob")
    assert [r.name for r in report.problems] == ["permission mpijobs.kubeflow.org"]
    assert report["MPIJob CRD"].status == "passed"


def test_a_missing_crd_is_not_reported_served_to_a_user_who_cannot_list_it(emulator: KubeEmulator) -> None:
    emulator.remove_resource("kubeflow.org/v2beta1", "MPIJob")
    emulator.denied.add(("list", "kubeflow.org", "mpijobs"))  # the API server answers 403 before it looks for the kind
    assert check(emulator, "mpijob")["MPIJob CRD"].status != "passed"


# -- trainjob ------------------------------------------------------------------------------------------
def test_trainjob_with_the_trainer_and_the_stock_runtime_passes(emulator: KubeEmulator) -> None:
    trainer_in_place(emulator)
    report = check(emulator, "trainjob")
    assert report.ok, str(report)
    assert list(statuses(report))[-3:] == ["TrainJob CRD", "Kubeflow Trainer", "runtime"]
    assert set(statuses(report).values()) == {"passed"}
    text = str(report)
    assert f"✓ TrainJob CRD: trainjobs.{TRAINER}/v1alpha1 is served" in text
    assert "✓ Kubeflow Trainer: 1 pod(s) running in namespace kubeflow-system" in text
    assert "✓ runtime: ClusterTrainingRuntime 'deepspeed-distributed' exists" in text


def test_a_missing_runtime_fails_with_the_runtimes_install_line(emulator: KubeEmulator) -> None:
    add_operator_pod(emulator, "kubeflow-system", TRAINER_POD, "trainer")
    report = check(emulator, "trainjob")
    assert [r.name for r in report.problems] == ["runtime"]
    runtime = report["runtime"]
    assert runtime.status == "failed"
    assert runtime.detail == "no ClusterTrainingRuntime 'deepspeed-distributed' in the cluster"
    assert RUNTIMES_INSTALL in runtime.fix and "cluster.runtimes()" in runtime.fix


def test_trainjob_without_the_trainer_fails_with_its_install_line(emulator: KubeEmulator) -> None:
    emulator.remove_resource(TRAINER_API, "TrainJob")
    report = check(emulator, "trainjob")
    assert [r.name for r in report.problems] == ["TrainJob CRD", "Kubeflow Trainer", "runtime"]
    assert report["TrainJob CRD"].fix == report["Kubeflow Trainer"].fix == f"install it: {TRAINER_INSTALL}"


def test_a_namespaced_training_runtime_passes(emulator: KubeEmulator) -> None:
    add_operator_pod(emulator, "kubeflow-system", TRAINER_POD, "trainer")
    emulator.create(namespaced_runtime("my-ds"))
    report = check(emulator, "trainjob", runtime="my-ds", runtime_kind="TrainingRuntime")
    assert report.ok, str(report)
    assert "✓ runtime: TrainingRuntime 'my-ds' exists" in str(report)
    other = check(emulator, "trainjob", runtime="their-ds", runtime_kind="TrainingRuntime")["runtime"]
    assert other.status == "failed" and other.detail == f"no TrainingRuntime 'their-ds' in namespace {NAMESPACE}"


def test_runtimes_the_user_may_not_read_are_a_warning(emulator: KubeEmulator) -> None:
    trainer_in_place(emulator)
    emulator.denied.add(("get", TRAINER, "clustertrainingruntimes"))
    report = check(emulator, "trainjob")
    assert report.ok, str(report)
    runtime = report["runtime"]
    assert runtime.status == "warning"
    assert runtime.detail == "not allowed to read ClusterTrainingRuntime 'deepspeed-distributed', so it cannot be checked"


# -- cluster.runtimes() --------------------------------------------------------------------------------
STOCK = {"name": "deepspeed-distributed", "kind": "ClusterTrainingRuntime", "framework": "deepspeed",
         "policy": "mpi", "num_nodes": 1}
MINE = {"name": "my-ds", "kind": "TrainingRuntime", "framework": "deepspeed", "policy": "mpi", "num_nodes": 2}


def test_runtimes_lists_cluster_and_namespaced_runtimes(emulator: KubeEmulator) -> None:
    emulator.create(stock_runtime())
    emulator.create(namespaced_runtime("my-ds"))
    assert runtimes(emulator) == [STOCK, MINE]


def test_runtimes_leaves_out_cluster_runtimes_it_may_not_list(emulator: KubeEmulator) -> None:
    emulator.create(stock_runtime())
    emulator.create(namespaced_runtime("my-ds"))
    emulator.denied.add(("list", TRAINER, "clustertrainingruntimes"))
    assert runtimes(emulator) == [MINE]


def test_runtimes_refused_in_the_namespace_is_a_clear_error(emulator: KubeEmulator) -> None:
    emulator.denied.add(("list", TRAINER, "trainingruntimes"))
    with pytest.raises(ClusterError, match="not allowed to list TrainingRuntimes.*dsnb rbac --backend trainjob"):
        runtimes(emulator)


def test_runtimes_on_a_backend_without_them_says_where_they_are() -> None:
    with pytest.raises(ClusterError, match=r"backend 'local': has no training runtimes.*Cluster\('trainjob'"):
        Cluster("local").runtimes()


# -- dsnb rbac -----------------------------------------------------------------------------------------
def run_cli(*argv: str) -> tuple[int, str]:
    console = Console(file=io.StringIO(), width=200, force_terminal=False, color_system=None)
    code = main(list(argv), console=console)
    return code, console.file.getvalue()


@pytest.mark.parametrize(("backend", "permissions"), [("mpijob", MPIJOB_PERMISSIONS), ("trainjob", TRAINJOB_PERMISSIONS)])
def test_dsnb_rbac_prints_a_valid_role_for_the_operator_kinds(backend: str, permissions: tuple[Permission, ...]) -> None:
    code, out = run_cli("rbac", "--backend", backend, "--namespace", NAMESPACE, "--user", "alice")
    assert code == 0, out
    assert out.startswith(f"# Role for dsnb's {backend} backend in namespace {NAMESPACE}")
    role, binding = yaml.safe_load_all(out)
    for doc in (role, binding):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    granted = {(rule["apiGroups"][0], rule["resources"][0]): rule["verbs"] for rule in role["rules"]}
    assert len(granted) == len(role["rules"])
    workload = {"mpijob": ("kubeflow.org", "mpijobs"), "trainjob": ("trainer.kubeflow.org", "trainjobs")}[backend]
    assert granted[workload] == ["create", "list", "watch", "delete"]  # that these suffice is test_k8s_rbac's
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "dsnb"}


def test_runtimes_without_the_trainer_says_how_to_install_it(emulator: KubeEmulator) -> None:
    for kind in ("ClusterTrainingRuntime", "TrainingRuntime"):
        emulator.remove_resource("trainer.kubeflow.org/v1alpha1", kind)
    with Cluster("trainjob", namespace="ml", configuration=emulator.configuration()) as cluster:
        with pytest.raises(ClusterError, match="Kubeflow Trainer is not installed") as info:
            cluster.runtimes()
    assert TRAINER_INSTALL in str(info.value)


def test_submitting_without_the_operator_says_how_to_install_it(emulator: KubeEmulator) -> None:
    emulator.remove_resource("kubeflow.org/v2beta1", "MPIJob")
    with Cluster("mpijob", namespace=NAMESPACE, configuration=emulator.configuration()) as cluster:
        with pytest.raises(ClusterError, match="the operator is not installed") as info:
            cluster.submit(JobSpec(name="a", script="t.py", image="img:1"))
        assert OPERATOR_INSTALL in str(info.value)
        assert cluster.jobs() == []  # the record made first was removed again
