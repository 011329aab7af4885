"""The MPIJob and TrainJob backends' manifests, checked against the upstream CRD schemas.

Custom resources are validated with jsonschema against the CRDs' ``openAPIV3Schema``
(unknown fields refused), their pod templates against the Kubernetes schema (strict), and
the TrainJob also round-trips through the Kubeflow SDK's models unchanged.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")
models = pytest.importorskip("kubeflow_trainer_api.models")

import yaml  # noqa: E402
from helpers import REPO  # noqa: E402
from k8s.crds import FOLDER, schemas, validate_custom  # noqa: E402
from k8s.fixtures import NAMESPACE, emulator, make_cluster  # noqa: E402, F401 - fixtures

from dsnb import Cluster, ClusterError, InvalidSpecError, JobSpec, JobState, PodOptions, Resources  # noqa: E402
from dsnb.backends.kubernetes.mpijob import MASTER_PRELUDE, RANK_SHIM, MPIJobBackend  # noqa: E402
from dsnb.backends.kubernetes.trainjob import TrainJobBackend  # noqa: E402

K8S_VERSION = kubernetes_validate.utils.latest_version()
SHARED = REPO.parent / "shared" / "k8s-schemas"  # shared/ lies beside the repository, in CI too
FULL = {"nodes": 4, "procs_per_node": 8, "resources": Resources(gpus=8, cpu=64, memory="512Gi"), "timeout": 7200,
        "env": {"HF_TOKEN": "hf_secret_value", "NCCL_DEBUG": "INFO"}, "working_dir": "/app",
        "deepspeed": {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}}}
OPTIONS = PodOptions(service_account="trainer", checkpoint_pvc="ckpt", image_pull_secrets=["regcred"],
                     node_selector={"pool": "gpu"}, nccl={"NCCL_IB_DISABLE": "1"},
                     tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])


def plan_for(backend: str, options: PodOptions | None = None, **fields):
    spec = JobSpec(**{"name": "tiny-gpt", "script": "train.py", "image": "ghcr.io/org/train:1", **fields})
    plan = Cluster(backend, namespace="ml", pod_options=options).dryrun(spec)
    return plan, list(yaml.safe_load_all(plan.to_yaml()))


def as_pod(template: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **template["metadata"]}, "spec": template["spec"]}


# -- MPIJob ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, options", [({}, None), (FULL, OPTIONS)], ids=["defaults", "gpus-secrets-options"])
def test_mpijob_validates_against_the_crd_and_its_pods_against_kubernetes(fields, options) -> None:
    plan, documents = plan_for("mpijob", options, **fields)
    kinds = [d["kind"] for d in documents]
    assert kinds[0] == "ConfigMap" and kinds[-1] == "MPIJob"
    mpijob = documents[-1]
    validate_custom(mpijob)
    for role, spec in mpijob["spec"]["mpiReplicaSpecs"].items():
        kubernetes_validate.validate(as_pod(spec["template"], f"{plan.name}-{role.lower()}"), K8S_VERSION, strict=True)
    for document in documents[:-1]:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    assert "hf_secret_value" not in plan.to_yaml() and "hf_secret_value" not in repr(plan)


def test_mpijob_fields_follow_the_spec() -> None:
    plan, documents = plan_for("mpijob", OPTIONS, **FULL, max_restarts=2)
    mpijob = documents[-1]["spec"]
    assert mpijob["slotsPerWorker"] == 8 and mpijob["mpiImplementation"] == "OpenMPI"
    assert mpijob["launcherCreationPolicy"] == "WaitForWorkersReady" and mpijob["runLauncherAsWorker"] is False
    assert mpijob["runPolicy"] == {"cleanPodPolicy": "Running", "backoffLimit": 2, "activeDeadlineSeconds": 7200}  # no TTL
    assert mpijob["sshAuthMountPath"] == "/home/mpiuser/.ssh"
    workers, launcher = mpijob["mpiReplicaSpecs"]["Worker"], mpijob["mpiReplicaSpecs"]["Launcher"]
    assert workers["replicas"] == 4 and launcher["replicas"] == 1
    worker = workers["template"]["spec"]
    assert worker["containers"][0]["command"][0] == "/usr/sbin/sshd"
    assert worker["containers"][0]["readinessProbe"]["tcpSocket"]["port"] == 2222
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert worker["securityContext"]["runAsNonRoot"] is True and worker["securityContext"]["runAsUser"] == 1000
    argv = launcher["template"]["spec"]["containers"][0]["command"]
    assert argv[:4] == ["sh", "-c", MASTER_PRELUDE, "/etc/mpi/hostfile"]
    assert argv[4:10] == ["mpirun", "--tag-output", "-np", "32", "--hostfile", "/etc/mpi/hostfile"]
    exported = {argv[i + 1] for i, a in enumerate(argv) if a == "-x"}
    assert {"MASTER_ADDR", "HF_TOKEN", "NCCL_DEBUG", "NCCL_IB_DISABLE", "DSNB_DEEPSPEED_CONFIG_JSON", "DSNB_DIST_BACKEND"} <= exported
    assert argv[argv.index("--wdir") + 1] == "/app"
    assert argv[-2:] == ["--run", "train.py"]
    env = {e["name"]: e for e in launcher["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == f"{plan.name}-env"
    assert json.loads(env["DSNB_DEEPSPEED_CONFIG_JSON"]["value"])["train_batch_size"] == 4 * 32
    for template in (worker, launcher["template"]["spec"]):
        assert template["nodeSelector"] == {"pool": "gpu"} and template["serviceAccountName"] == "trainer"


def test_an_unknown_clean_pod_policy_is_refused() -> None:
    with pytest.raises(InvalidSpecError, match="clean_pod_policy"):
        MPIJobBackend(clean_pod_policy="Sometimes")


def test_the_launcher_prelude_and_the_rank_shim_give_the_torch_distributed_environment(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("job-worker-0.job.ml.svc slots=2\njob-worker-1.job.ml.svc slots=2\n")
    env = {**os.environ, "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    show = "import os; print(*(os.environ[k] for k in ('RANK','LOCAL_RANK','WORLD_SIZE','LOCAL_SIZE','NODE_RANK','MASTER_ADDR','MASTER_PORT')))"
    argv = ["sh", "-c", MASTER_PRELUDE, str(hostfile), sys.executable, "-c", RANK_SHIM, sys.executable, "-c", show]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3", "1", "4", "2", "1", "job-worker-0.job.ml.svc", "29500"]
    # A script runs in the shim's interpreter, with its own directory on sys.path.
    script = shim_script(tmp_path)
    run = subprocess.run([sys.executable, "-c", RANK_SHIM, "--run", str(script), "--lr", "0.1"],
                         env={**env, "MASTER_ADDR": "h"}, capture_output=True, text=True)
    assert run.returncode == 3
    assert run.stdout.splitlines() == ["imported ['--lr', '0.1'] 3", "partial line"]


@pytest.mark.parametrize("me, first", [
    ("job-launcher-0-0", "job-launcher-0-0.job"),  # a TrainJob launcher that is a node too: it goes first
    ("job-launcher-x7k2q", "job-node-0-0.job"),  # an MPIJob launcher is no host of the hostfile: order kept
])
def test_the_prelude_puts_the_launchers_own_host_first(tmp_path: Path, me: str, first: str) -> None:
    """Open MPI 4 runs the first ranks on mpirun's own node wherever the hostfile lists it: the copy
    given to mpirun lists that node first, so MASTER_ADDR is where rank 0 runs, under every Open MPI."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("job-node-0-0.job slots=2\njob-node-0-1.job slots=2\njob-launcher-0-0.job slots=2\n")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "hostname").write_text(f"#!/bin/sh\necho {me}\n")
    (tmp_path / "bin" / "hostname").chmod(0o755)
    show = "import os,sys; print(os.environ['MASTER_ADDR']); print(open(sys.argv[sys.argv.index('--hostfile') + 1]).read(), end='')"
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    argv = ["sh", "-c", MASTER_PRELUDE, str(hostfile), sys.executable, "-c", show, "--hostfile", str(hostfile), "-np", "6"]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == first
    assert out[1].split()[0] == first and sorted(out[1:]) == sorted(hostfile.read_text().splitlines())


def test_the_prelude_passes_the_images_environment_to_the_ranks(tmp_path: Path) -> None:
    """sshd starts the ranks with its own PATH and none of the image's ENV: mpirun is told to pass them on."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("job-worker-0.job slots=1\n")
    show = "import sys; print(' '.join(sys.argv[1:]))"
    env = {"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path), "LD_LIBRARY_PATH": "/opt/conda/lib", "NCCL_IB_DISABLE": "1",
           "CUDA_HOME": "/usr/local/cuda", "HOME": "/home/mpiuser"}
    argv = ["sh", "-c", MASTER_PRELUDE, str(hostfile), sys.executable, "-c", show, "mpirun", "-np", "1", "--hostfile", str(hostfile)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout.split()
    passed = [out[i + 1] for i, word in enumerate(out) if word == "-x"]
    assert out[0] == "mpirun" and set(passed) == {"PATH", "LD_LIBRARY_PATH", "NCCL_IB_DISABLE", "CUDA_HOME"}, out
    assert "HOME" not in passed and out[out.index("--hostfile") + 1] != str(hostfile)  # the reordered copy


def shim_script(tmp_path: Path) -> Path:
    """A job script with a helper module beside it, a line written in two prints, and exit code 3."""
    script = tmp_path / "job" / "train.py"
    script.parent.mkdir()
    (script.parent / "helper_module.py").write_text("VALUE = 'imported'\n")
    script.write_text("import os, sys, helper_module\nprint(helper_module.VALUE, sys.argv[1:], os.environ['RANK'])\n"
                      "print('partial', end='', flush=False); print(' line')\nsys.exit(3)\n")
    return script


def test_each_line_of_a_ranks_output_reaches_the_pipe_in_one_write(tmp_path: Path) -> None:
    """mpirun forwards writes as they come, so a line written in two prints must still be one write."""
    if not shutil.which("strace"):
        pytest.skip("strace is missing (Debian: apt-get install strace)")
    env = {**os.environ, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "1", "MASTER_ADDR": "h"}
    traced = subprocess.run(["strace", "-f", "-e", "trace=write", "-o", str(tmp_path / "writes"),
                             sys.executable, "-c", RANK_SHIM, "--run", str(shim_script(tmp_path)), "--lr", "0.1"],
                            env=env, capture_output=True, text=True)
    assert traced.returncode == 3, traced.stderr[-2000:]
    writes = (tmp_path / "writes").read_text()
    assert 'write(1, "partial line\\n"' in writes
    assert 'write(1, "partial"' not in writes


# -- TrainJob ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, options", [({}, None), (FULL, OPTIONS)], ids=["defaults", "gpus-secrets-options"])
def test_trainjob_validates_against_the_crd_and_the_sdk_models(fields, options) -> None:
    plan, documents = plan_for("trainjob", options, **fields)
    trainjob = documents[-1]
    validate_custom(trainjob)
    assert models.TrainerV1alpha1TrainJob.from_dict(trainjob).to_dict() == trainjob
    for document in documents[:-1]:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    assert "hf_secret_value" not in plan.to_yaml()


def test_trainjob_fields_follow_the_spec() -> None:
    plan, documents = plan_for("trainjob", OPTIONS, **FULL)
    name = documents[-1]["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63  # an RFC 1035 label
    spec = documents[-1]["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": "deepspeed-distributed"}
    trainer = spec["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert trainer["command"][4:8] == ["mpirun", "--tag-output", "-np", "32"]
    assert spec["activeDeadlineSeconds"] == 7200
    jobs = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert [j["name"] for j in jobs] == ["launcher", "node"]
    for job in jobs:
        pod = job["template"]["spec"]["template"]
        assert pod["metadata"]["labels"]["dsnb.io/job"] == plan.name
        assert pod["spec"]["nodeSelector"] == {"pool": "gpu"} and pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        mounts = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert mounts == {"/dev/shm", "/checkpoints"}


def test_a_namespaced_runtime_can_be_named() -> None:
    plan = Cluster("trainjob", namespace="ml", runtime="my-deepspeed", runtime_kind="TrainingRuntime").dryrun(
        JobSpec(name="a", script="t.py", image="img:1"))
    assert plan.manifests[-1]["spec"]["runtimeRef"]["kind"] == "TrainingRuntime"
    assert plan.manifests[-1]["spec"]["runtimeRef"]["name"] == "my-deepspeed"
    with pytest.raises(InvalidSpecError, match="runtime_kind"):
        TrainJobBackend(runtime_kind="JobSet")
    restarting = Cluster("trainjob").dryrun(JobSpec(name="a", script="t.py", image="img:1", max_restarts=1))
    assert any("1 restart(s) of the whole job" in note for note in restarting.notes)


def test_the_validator_refuses_what_the_crd_does_not_allow() -> None:
    _, documents = plan_for("trainjob")
    trainjob = documents[-1]
    with pytest.raises(jsonschema.ValidationError):
        validate_custom({**trainjob, "spec": {**trainjob["spec"], "trainer": {**trainjob["spec"]["trainer"], "numNodez": 2}}})
    with pytest.raises(jsonschema.ValidationError):
        validate_custom({**trainjob, "spec": {**trainjob["spec"], "trainer": {**trainjob["spec"]["trainer"], "numNodes": "two"}}})
    runtime = yaml.safe_load((FOLDER / "runtime-deepspeed-distributed.yaml").read_text())
    validate_custom(runtime)  # the stock runtime itself fits the schema


def test_the_stored_schemas_equal_the_upstream_crds() -> None:
    if not SHARED.is_dir():
        pytest.skip(f"the shared schema folder {SHARED} is not beside the repository")
    compared = 0
    for path in FOLDER.glob("*.json.gz"):
        with gzip.open(path, "rt") as f:
            stored = json.load(f)
        if stored["source"].startswith("kueue-"):  # Kueue's are not in the shared folder: see crds/README.md
            assert set(stored["versions"]) == {"v1beta1", "v1beta2"}, path
            continue
        crd = yaml.safe_load((SHARED / stored["source"]).read_text())
        assert stored["versions"] == {v["name"]: v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]}
        compared += 1
    assert compared >= 7 and len(schemas()) >= 11


# -- status from conditions --------------------------------------------------------------------

def condition(kind: str, message: str = "") -> dict:
    return {"type": kind, "status": "True", "message": message, "lastTransitionTime": "2026-11-28T10:05:00Z"}


@pytest.mark.parametrize("backend, workload, state, message", [
    (MPIJobBackend, {"status": {"conditions": [condition("Created")]}}, JobState.PENDING, "waiting for the MPI Operator"),
    (MPIJobBackend, {"status": {"conditions": [condition("Created"), condition("Running")]}}, JobState.RUNNING, "4 rank(s)"),
    (MPIJobBackend, {"status": {"conditions": [condition("Succeeded", "done")]}}, JobState.SUCCEEDED, "launcher finished"),
    (MPIJobBackend, {"status": {"conditions": [condition("Failed", "MPIJob ml/a has failed")]}}, JobState.FAILED, "has failed"),
    (MPIJobBackend, {"status": {"conditions": [condition("Suspended")]}}, JobState.PENDING, "suspended"),
    (TrainJobBackend, {"status": {"conditions": [condition("Complete", "jobset completed")]}}, JobState.SUCCEEDED, "completed"),
    (TrainJobBackend, {"status": {"conditions": [condition("Failed", "jobset failed")]}}, JobState.FAILED, "jobset failed"),
    (TrainJobBackend, {"status": {"conditions": [condition("Suspended")]}}, JobState.PENDING, "suspended"),
    (TrainJobBackend, {}, JobState.PENDING, "waiting for Kubeflow Trainer"),
], ids=["mpi-created", "mpi-running", "mpi-succeeded", "mpi-failed", "mpi-suspended",
        "tj-complete", "tj-failed", "tj-suspended", "tj-nothing-yet"])
def test_status_from_the_workloads_conditions(backend, workload, state, message) -> None:
    spec = JobSpec(name="a-abcd", script="t.py", nodes=2, procs_per_node=2, image="img:1")
    status = backend(namespace="ml").compute_status(spec.name, spec, 1.0, [], None, workload)
    assert status.state == state and message in status.message
    assert len(status.replicas) == 4


def test_trainjob_progress_is_shown_while_running() -> None:
    spec = JobSpec(name="a-abcd", script="t.py", nodes=1, procs_per_node=2, image="img:1")
    launcher = {"metadata": {"name": "a-abcd-launcher-0-0-x7k2q", "labels": {"dsnb.io/role": "launcher"}},
                "spec": {"nodeName": "n1", "hostname": "a-abcd-launcher-0-0"},  # JobSet sets the hostname
                "status": {"containerStatuses": [{"name": "node", "state": {"running": {"startedAt": "2026-11-28T10:00:00Z"}}}]}}
    workload = {"status": {"trainerStatus": {"progressPercentage": 42, "estimatedRemainingSeconds": 180,
                                             "metrics": [{"name": "loss", "value": "2.1"}]}}}
    status = TrainJobBackend(namespace="ml").compute_status(spec.name, spec, 1.0, [launcher], None, workload)
    assert status.state == JobState.RUNNING and status.message == "42% done, about 3 min left, loss 2.1"


def test_a_worker_being_deleted_at_the_end_is_no_failure() -> None:
    """MPI Operator v0.8.0 deletes running workers once it has written Succeeded (mpi_job_controller.go), and a
    pod being deleted is terminated gracefully: the pod watch may show that before the MPIJob's condition."""
    spec = JobSpec(name="a-abcd", script="t.py", nodes=2, procs_per_node=2, image="img:1")
    worker = {"metadata": {"name": "a-abcd-worker-1", "labels": {"dsnb.io/role": "worker"},
                           "deletionTimestamp": "2026-11-28T10:05:00Z"}, "spec": {"nodeName": "n1"},
              "status": {"phase": "Running", "containerStatuses": [{"name": "dsnb", "state": {"terminated": {"exitCode": 143}}}]}}
    status = MPIJobBackend(namespace="ml").compute_status(spec.name, spec, 1.0, [worker], None,
                                                          {"status": {"conditions": [condition("Running")]}})
    assert status.state != JobState.FAILED, status


def test_a_worker_that_stops_fails_the_mpijob_with_the_sshd_hint() -> None:
    spec = JobSpec(name="a-abcd", script="t.py", nodes=2, procs_per_node=2, image="img:1")
    worker = {"metadata": {"name": "a-abcd-worker-1", "labels": {"dsnb.io/role": "worker"}}, "spec": {"nodeName": "n1"},
              "status": {"phase": "Failed", "containerStatuses": [{"name": "dsnb", "state": {"terminated": {"exitCode": 127}}}]}}
    workload = {"status": {"conditions": [condition("Created")]}}
    status = MPIJobBackend(namespace="ml").compute_status(spec.name, spec, 1.0, [worker], None, workload)
    assert status.state == JobState.FAILED and status.failed_rank == 2 and status.exit_code == 127
    assert "sshd" in status.message and "kubectl logs a-abcd-worker-1" in status.message



# -- an older operator's CRD ------------------------------------------------------------------------

def test_a_trainer_without_runtime_patches_is_refused_with_the_upgrade(emulator) -> None:  # noqa: F811
    """Kubeflow Trainer v2.0/v2.1's TrainJob CRD has no spec.runtimePatches: the server would prune dsnb's
    labels, volumes and scheduling silently, and dsnb would never see the pods. Strict creates refuse instead."""
    import copy

    schema = copy.deepcopy(schemas()["trainer.kubeflow.org", "v1alpha1", "TrainJob"])
    del schema["properties"]["spec"]["properties"]["runtimePatches"]  # as in v2.1.0's CRD
    emulator.add_schema("trainer.kubeflow.org/v1alpha1", "TrainJob", schema)
    emulator.create(yaml.safe_load((FOLDER / "runtime-deepspeed-distributed.yaml").read_text()))
    with make_cluster(emulator, "trainjob") as cluster:
        fields = cluster.check(JobSpec(name="old", script="t.py", image="img:1"))["TrainJob fields"]
        assert fields.failed and "does not know spec.runtimePatches" in fields.detail and "v2.2 or later" in fields.fix
        with pytest.raises(ClusterError) as info:
            cluster.submit(JobSpec(name="old", script="t.py", image="img:1"))
        assert 'does not know spec.runtimePatches' in str(info.value) and "Kubeflow Trainer v2.2 or later" in info.value.fix
    assert emulator.inventory(NAMESPACE) == ["ServiceAccount ml/default"]  # the record and the runtime copy were taken back
    # Without Strict (the server's default, as for a plain kubectl apply of the plan's YAML), it is dropped.
    from kubernetes import client

    with client.ApiClient(emulator.configuration()) as api:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            "trainer.kubeflow.org", "v1alpha1", NAMESPACE, "trainjobs",
            {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": {"name": "pruned"},
             "spec": {"runtimeRef": {"name": "x"}, "runtimePatches": [{"manager": "a.b/c"}]}})
    assert "runtimePatches" not in emulator.get("trainer.kubeflow.org/v1alpha1", "TrainJob", NAMESPACE, "pruned")["spec"]
