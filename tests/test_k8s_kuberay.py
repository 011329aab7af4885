"""``Cluster("kuberay")``: RayJobs through the shared Kubernetes machinery, over real HTTP.

The plan is validated against the KubeRay CRD (unknown fields refused) and the Kubernetes
schema. The conversation runs against the API emulator, with ``tests/k8s/kuberay_sim.py``
playing the KubeRay operator: it creates the Ray cluster's pods (which run nothing: real Ray
cannot run inside the sim) and a submitter pod that runs a fake driver printing what dsnb's
Ray driver prints through ``ray job logs`` (Ray's worker prefixes, the workers' rank
announcements, metric lines, the outcome line). Ray Train itself is tested with a real local
Ray in the ``Cluster("ray")`` tests.
"""

from __future__ import annotations

import functools
import io
import json

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

import yaml  # noqa: E402
from helpers import wait_until  # noqa: E402
from k8s import crds  # noqa: E402
from k8s.emulator import KubeEmulator  # noqa: E402
from k8s.fixtures import IMAGE, NAMESPACE, emulator, make_cluster  # noqa: E402, F401
from k8s.kuberay_sim import KubeRaySim  # noqa: E402
from k8s.sandbox import sandbox_problem  # noqa: E402
from k8s.sim import ClusterSim  # noqa: E402
from rich.console import Console  # noqa: E402

from dsnb import Cluster, ClusterError, InvalidSpecError, JobFailed, JobSpec, JobState, PodOptions, Resources  # noqa: E402
from dsnb.backends.kubernetes.kuberay import KubeRayBackend  # noqa: E402
from dsnb.backends.kubernetes.preflight import KUBERAY_INSTALL  # noqa: E402
from dsnb.console.cli import main  # noqa: E402
from dsnb.status import LAUNCHER_LINE_RANK  # noqa: E402

K8S_VERSION = kubernetes_validate.utils.latest_version()
SECRET_VALUE = "hf_secret_value_do_not_leak"
needs_sandbox = pytest.mark.skipif(sandbox_problem() is not None, reason=sandbox_problem() or "")


@functools.cache
def _validator(api_version: str, kind: str):
    """A validator per CRD kind: checking a KubeRay schema takes seconds, validating milliseconds."""
    group, version = api_version.split("/")
    schema = crds._strict(crds.schemas()[group, version, kind])
    return jsonschema.validators.validator_for(schema)(schema)


def spec(mode: str = "ok", **fields) -> JobSpec:
    """Two Ray worker pods, one Ray Train worker each; ``mode`` tells the fake driver what to print."""
    return JobSpec(**{"name": "rj", "script": "train.py", "args": [mode], "nodes": 2, "image": IMAGE, **fields})


@pytest.fixture
def sim(emulator: KubeEmulator):  # noqa: F811 - fixture
    with ClusterSim(emulator, NAMESPACE, controllers=[KubeRaySim()]) as running:
        yield running


@pytest.fixture
def cluster(emulator: KubeEmulator, sim: ClusterSim):  # noqa: F811 - fixtures
    with make_cluster(emulator, "kuberay", cancel_wait=20) as made:
        yield made


def leftovers(emulator: KubeEmulator, sim: ClusterSim, name: str) -> list[str]:  # noqa: F811
    """What job ``name`` still has besides its record and log archive: objects, pods, live processes."""
    from helpers import settled

    def find() -> list[str]:
        kinds = (("v1", "Pod"), ("v1", "Secret"), ("ray.io/v1", "RayJob"), ("ray.io/v1", "RayCluster"), ("batch/v1", "Job"))
        found = [f"{kind} {o['metadata']['name']}" for api, kind in kinds for o in emulator.list(api, kind, NAMESPACE)
                 if o["metadata"]["name"].startswith(name)]
        return found + [f"process of {pod}" for pod in sim.running_processes() if pod.startswith(name + "-")]

    return settled(find)


# -- the plan ----------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [None, PodOptions(checkpoint_pvc="ckpt", image_pull_secrets=["regcred"])],
                         ids=["defaults", "checkpoint-pvc"])
def test_the_plan_is_a_record_a_secret_and_a_rayjob_that_fit_their_schemas(options) -> None:
    cluster = Cluster("kuberay", namespace=NAMESPACE, pod_options=options)
    plan = cluster.dryrun(spec(env={"HF_TOKEN": SECRET_VALUE, "NCCL_DEBUG": "INFO"}, resources=Resources(cpu=4, gpus=1),
                               deepspeed={"train_micro_batch_size_per_gpu": 2}))
    text = plan.to_yaml()
    assert SECRET_VALUE not in text and SECRET_VALUE not in repr(plan) and SECRET_VALUE not in str(plan)
    record, secret, rayjob = yaml.safe_load_all(text)
    assert (record["kind"], secret["kind"], rayjob["kind"]) == ("ConfigMap", "Secret", "RayJob")
    assert record["metadata"]["labels"]["dsnb.io/backend"] == "ray" and record["metadata"]["labels"]["dsnb.io/kind"] == "record"
    for document in (record, secret):
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    _validator("ray.io/v1", "RayJob").validate(rayjob)
    assert all(d["metadata"]["namespace"] == NAMESPACE for d in (record, secret, rayjob))
    job = rayjob["spec"]
    assert job["entrypoint"] == "python -m dsnb.runtime.ray_train_entry" and job["submissionMode"] == "K8sJobMode"
    # The driver's environment travels in the runtime env; the secret only through the Secret.
    env = yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]
    driver = json.loads(env["DSNB_RAY_JOB"])
    assert (driver["num_workers"], driver["use_gpu"], driver["backend"], driver["args"]) == (2, True, "nccl", ["ok"])
    storage = "/checkpoints/ray-runs" if options else "/home/ray/ray-runs"
    assert driver["storage_path"] == storage and storage in str(plan)
    assert json.loads(env["DSNB_DEEPSPEED_CONFIG_JSON"])["train_micro_batch_size_per_gpu"] == 2
    assert env["NCCL_DEBUG"] == "INFO" and "HF_TOKEN" not in env
    # The submitter carries dsnb's labels, so its log (the driver's) is followed like any pod's.
    submitter = job["submitterPodTemplate"]
    assert submitter["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "dsnb", "dsnb.io/job": plan.name,
                                               "dsnb.io/role": "submitter"}
    assert submitter["spec"]["restartPolicy"] == "Never" and "command" not in submitter["spec"]["containers"][0]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "s", **submitter["metadata"]}, "spec": submitter["spec"]}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    if options:
        assert submitter["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        worker = job["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        assert "/checkpoints" in {m["mountPath"] for m in worker["volumeMounts"]}


def test_the_validator_refuses_a_misspelt_submitter_field() -> None:
    rayjob = Cluster("kuberay", namespace=NAMESPACE).dryrun(spec()).manifests[-1]
    bad = json.loads(json.dumps(rayjob))
    bad["spec"]["submitterPodTemplate"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(jsonschema.ValidationError, match="restartPolicyy"):
        _validator("ray.io/v1", "RayJob").validate(bad)


def test_a_relative_script_is_found_from_the_working_dir_and_options_are_checked() -> None:
    rayjob = Cluster("kuberay", namespace=NAMESPACE, storage_path="s3://bucket/runs").dryrun(
        spec(working_dir="/app")).manifests[-1]
    driver = json.loads(yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["env_vars"]["DSNB_RAY_JOB"])
    assert driver["script"] == "/app/train.py" and driver["storage_path"] == "s3://bucket/runs"
    from dsnb import InvalidSpecError

    with pytest.raises(InvalidSpecError, match="ray_version"):
        Cluster("kuberay", ray_version="2.60")
    # Any command runs on the Ray Train workers (as each worker's child), as on every backend.
    other = Cluster("kuberay").dryrun(JobSpec(name="a", command=["bash", "run.sh"], image=IMAGE)).manifests[-1]
    program = json.loads(yaml.safe_load(other["spec"]["runtimeEnvYAML"])["env_vars"]["DSNB_RAY_JOB"])
    assert (program["script"], program["command"]) == (None, ["bash", "run.sh"])


# -- status from the RayJob --------------------------------------------------------------------

def rayjob_status(**status) -> dict:
    return {"status": status}


@pytest.mark.parametrize("workload, state, message", [
    (None, JobState.PENDING, "waiting for the KubeRay operator"),
    (rayjob_status(jobDeploymentStatus="Initializing"), JobState.PENDING, "KubeRay creates the Ray cluster"),
    (rayjob_status(jobDeploymentStatus="Running", jobStatus="PENDING"), JobState.STARTING, "driver is starting"),
    (rayjob_status(jobDeploymentStatus="Waiting"), JobState.STARTING, "driver is starting"),
    (rayjob_status(jobDeploymentStatus="Running", jobStatus="RUNNING"), JobState.RUNNING, "Ray Train: 4 worker(s)"),
    (rayjob_status(jobDeploymentStatus="Retrying", jobStatus="FAILED", failed=1), JobState.STARTING, "attempt 1 failed"),
    (rayjob_status(jobDeploymentStatus="Suspended"), JobState.PENDING, "suspended"),
    # KubeRay v1.7.0 (rayjob_controller.go): a RayJob that fails validation is ValidationFailed for good
    (rayjob_status(jobDeploymentStatus="ValidationFailed", reason="ValidationFailed",
                   message="The RayJob metadata is invalid: name exceeds 47 characters"),
     JobState.FAILED, "KubeRay refused the RayJob: The RayJob metadata is invalid: name exceeds 47 characters"),
    (rayjob_status(jobDeploymentStatus="Complete", jobStatus="SUCCEEDED"), JobState.SUCCEEDED, "succeeded"),
    (rayjob_status(jobDeploymentStatus="Complete", jobStatus="STOPPED"), JobState.CANCELLED, "stopped outside dsnb"),
    (rayjob_status(jobDeploymentStatus="Complete", jobStatus="FAILED"), JobState.FAILED, "the Ray job failed"),
    (rayjob_status(jobDeploymentStatus="Failed", jobStatus="FAILED", reason="AppFailed", message="Job failed"),
     JobState.FAILED, "the Ray job failed: Job failed"),
    (rayjob_status(jobDeploymentStatus="Failed", reason="DeadlineExceeded", message="past 600 s"),
     JobState.FAILED, "longer than its timeout"),
    (rayjob_status(jobDeploymentStatus="Failed", reason="SubmissionFailed", message="submitter failed"),
     JobState.FAILED, "kubectl logs -n ml job/a-abcd"),
], ids=["nothing-yet", "initializing", "driver-pending", "waiting", "running", "retrying", "suspended", "validation-failed", "succeeded",
        "stopped", "complete-failed", "app-failed", "deadline", "submission-failed"])
def test_status_from_the_rayjobs_deployment_and_job_status(workload, state, message) -> None:
    job = JobSpec(name="a-abcd", script="t.py", nodes=2, procs_per_node=2, image="img:1")
    status = KubeRayBackend(namespace="ml").compute_status(job.name, job, 1.0, [], None, workload)
    assert status.state == state and message in status.message, status.message
    assert len(status.replicas) == 4


def test_a_ray_pod_that_cannot_pull_its_image_fails_the_job() -> None:
    job = JobSpec(name="a-abcd", script="t.py", image="img:1")
    head = {"metadata": {"name": "a-abcd-x-head-1", "labels": {"dsnb.io/role": "head"}}, "spec": {"nodeName": "n1"},
            "status": {"phase": "Pending", "containerStatuses": [{"name": "ray-head", "state": {
                "waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}]}}
    status = KubeRayBackend(namespace="ml").compute_status(job.name, job, 1.0, [head], None,
                                                          rayjob_status(jobDeploymentStatus="Initializing"))
    assert status.state == JobState.FAILED and "cannot pull the image" in status.message


def test_a_worker_killed_for_memory_is_left_to_ray() -> None:
    job = JobSpec(name="a-abcd", script="t.py", image="img:1")
    worker = {"metadata": {"name": "a-abcd-x-workers-worker-1", "labels": {"dsnb.io/role": "worker"}}, "spec": {"nodeName": "n1"},
              "status": {"phase": "Running", "containerStatuses": [{"name": "ray-worker", "state": {
                  "terminated": {"reason": "OOMKilled", "exitCode": 137}}}]}}
    status = KubeRayBackend(namespace="ml").compute_status(job.name, job, 1.0, [worker], None,
                                                          rayjob_status(jobDeploymentStatus="Running", jobStatus="RUNNING"))
    assert status.state == JobState.RUNNING


# -- against the emulator and the KubeRay sim --------------------------------------------------

@needs_sandbox
def test_a_job_succeeds_with_per_rank_logs_and_metrics_and_leaves_nothing_running(emulator, sim, cluster) -> None:  # noqa: F811
    job = cluster.submit(spec(env={"HF_TOKEN": SECRET_VALUE}))
    final = job.wait(timeout=30)
    assert final.state == JobState.SUCCEEDED and final.message == "the Ray job succeeded"
    rank1 = [line.text for line in job.logs(rank=1)]
    assert [t for t in rank1 if t.startswith("step")] == ["step 1 on rank 1", "step 2 on rank 1", "step 3 on rank 1"]
    assert len(rank1) == 6  # and its three metric lines
    launcher = [line.text for line in job.logs() if line.rank == LAUNCHER_LINE_RANK]
    assert "(TrainController) Started training worker group of size 2" in launcher
    assert not any("DSNB_RAY" in line.text for line in job.logs())  # dsnb's bookkeeping lines are not shown
    loss = job.metrics("loss")
    assert sorted((s.rank, s.step, s.value) for s in loss) == [(r, s, 3.0 - 0.5 * s) for r in (0, 1) for s in (1, 2, 3)]
    assert leftovers(emulator, sim, job.name) == []
    record = emulator.get("v1", "ConfigMap", NAMESPACE, job.name)
    assert json.loads(record["data"]["status.json"])["state"] == "SUCCEEDED"
    assert SECRET_VALUE not in json.dumps(emulator.get("v1", "ConfigMap", NAMESPACE, f"{job.name}-logs"))


@needs_sandbox
def test_the_ray_cluster_asks_for_a_token_and_only_kuberays_secret_holds_it(emulator, sim, cluster) -> None:  # noqa: F811
    """authOptions.mode token (KubeRay v1.7.0): every Ray container and the submitter get RAY_AUTH_MODE=token and
    RAY_AUTH_TOKEN from the Secret KubeRay made for the cluster; the sim's driver refuses to submit without it."""
    plan = cluster.dryrun(spec())
    rayjob = next(m for m in plan.manifests if m["kind"] == "RayJob")
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    seen: list[dict] = []
    emulator.admission.append(lambda obj: seen.append(obj) if obj.get("kind") == "Pod" else None)
    job = cluster.submit(spec())
    assert job.wait(timeout=30).state == JobState.SUCCEEDED  # the submitter authenticated
    pods = [p for p in seen if (p["metadata"].get("labels") or {}).get("dsnb.io/job") == job.name]
    assert {(p["metadata"].get("labels") or {}).get("dsnb.io/role") for p in pods} == {"head", "worker", "submitter"}
    for pod in pods:
        env = {var["name"]: var for var in pod["spec"]["containers"][0].get("env") or []}
        assert env["RAY_AUTH_MODE"]["value"] == "token", pod["metadata"]["name"]
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == "auth_token" and ref["name"].startswith(job.name)  # the cluster's own Secret
    assert "RAY_AUTH_TOKEN" not in json.dumps(rayjob)  # the token never passes through dsnb


@needs_sandbox
def test_a_failing_rank_is_named_with_its_exit_code(emulator, sim, cluster) -> None:  # noqa: F811
    job = cluster.submit(spec("fail"))
    with pytest.raises(JobFailed) as info:
        job.wait(timeout=30)
    status = info.value.status
    assert status.state == JobState.FAILED and status.failed_rank == 1 and status.exit_code == 3
    # dsnb's words from the driver's outcome line, before what KubeRay said (which names no rank).
    assert status.message.startswith("rank 1 exited with code 3; the Ray job failed: Job entrypoint command failed"), status.message
    assert "RuntimeError: rank 1 ran out of data" in status.last_lines
    assert leftovers(emulator, sim, job.name) == []


@needs_sandbox
def test_the_failing_rank_is_named_when_kuberay_reports_the_end_before_the_log_has_it(emulator) -> None:  # noqa: F811
    with ClusterSim(emulator, NAMESPACE, controllers=[KubeRaySim(end_early=True)]) as running, \
            make_cluster(emulator, "kuberay") as cluster:
        job = cluster.submit(spec("fail"))
        with pytest.raises(JobFailed) as info:
            job.wait(timeout=30)
        assert (info.value.status.failed_rank, info.value.status.exit_code) == (1, 3)
        assert leftovers(emulator, running, job.name) == []


@needs_sandbox
def test_cancel_mid_run_removes_the_rayjob_and_its_pods(emulator, sim, cluster) -> None:  # noqa: F811
    job = cluster.submit(spec("sleep"))
    wait_until(lambda: job.status().state == JobState.RUNNING and job.metrics("loss"), timeout=20)
    final = job.cancel()
    assert final.state == JobState.CANCELLED
    assert emulator.get("ray.io/v1", "RayJob", NAMESPACE, job.name) is None
    assert leftovers(emulator, sim, job.name) == []
    assert job.cancel().state == JobState.CANCELLED  # idempotent
    assert job.metrics("loss")  # what was seen before the cancel is kept


@needs_sandbox
def test_attach_from_a_fresh_cluster_and_list_jobs(emulator, sim, cluster) -> None:  # noqa: F811
    job = cluster.submit(spec("sleep"))
    wait_until(lambda: job.status().state == JobState.RUNNING, timeout=20)
    with make_cluster(emulator, "kuberay", cancel_wait=20) as fresh:
        assert [s.name for s in fresh.jobs()] == [job.name]
        again = fresh.attach(job.name)
        assert again.status().state == JobState.RUNNING
        wait_until(lambda: any(line.rank == 1 for line in again.logs()), timeout=10)
        again.cancel()
    assert job.status().state == JobState.CANCELLED
    with make_cluster(emulator, "kuberay") as later:  # after the end: from the record and the archive
        ended = later.attach(job.name)
        assert ended.status().state == JobState.CANCELLED and any(line.rank == 0 for line in ended.logs())
    assert leftovers(emulator, sim, job.name) == []


# -- without KubeRay, preflight, RBAC ----------------------------------------------------------

def test_submitting_without_the_rayjob_crd_says_how_to_install_kuberay(emulator) -> None:  # noqa: F811
    emulator.remove_resource("ray.io/v1", "RayJob")
    with make_cluster(emulator, "kuberay") as cluster:
        with pytest.raises(ClusterError, match="the operator is not installed") as info:
            cluster.submit(spec(env={"HF_TOKEN": SECRET_VALUE}))
        assert KUBERAY_INSTALL in str(info.value)
        assert cluster.jobs() == []  # the record made first was removed, and the Secret with it
    assert emulator.list("v1", "Secret", NAMESPACE) == [] and emulator.list("v1", "ConfigMap", NAMESPACE) == []


def add_kuberay_operator(emulator: KubeEmulator) -> None:  # noqa: F811
    emulator.add_namespace("kuberay-system")
    emulator.create({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": "kuberay-operator-6b9f4c7d8-q2x7z", "namespace": "kuberay-system",
                                  "labels": {"app.kubernetes.io/name": "kuberay-operator"}},
                     "spec": {"containers": [{"name": "kuberay-operator", "image": "quay.io/kuberay/operator:v1.7.0"}]},
                     "status": {"phase": "Running"}})


def test_preflight_reports_the_crd_and_the_operator(emulator) -> None:  # noqa: F811
    add_kuberay_operator(emulator)
    with make_cluster(emulator, "kuberay") as cluster:
        report = cluster.check()
    assert report.ok, str(report)
    names = [r.name for r in report.results]
    assert names[-5:] == ["permission rayjobs.ray.io", "permission rayservices.ray.io", "permission networkpolicies.networking.k8s.io",
                         "RayJob CRD", "KubeRay operator"]
    text = str(report)
    assert "✓ RayJob CRD: rayjobs.ray.io/v1 is served" in text
    assert "✓ KubeRay operator: 1 pod(s) running in namespace kuberay-system" in text


def test_preflight_without_kuberay_fails_with_the_helm_install(emulator) -> None:  # noqa: F811
    emulator.remove_resource("ray.io/v1", "RayJob")
    with make_cluster(emulator, "kuberay") as cluster:
        report = cluster.check()
    assert [r.name for r in report.problems] == ["RayJob CRD", "KubeRay operator"]
    assert report["RayJob CRD"].fix == report["KubeRay operator"].fix == f"install it: {KUBERAY_INSTALL}"
    assert "helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0" in str(report)


def test_dsnb_rbac_for_ray_prints_a_valid_role_for_rayjobs() -> None:
    console = Console(file=io.StringIO(), width=200, force_terminal=False, color_system=None)
    code = main(["rbac", "--backend", "ray", "--namespace", NAMESPACE, "--user", "alice"], console=console)
    out = console.file.getvalue()
    assert code == 0, out
    assert out.startswith(f"# Role for dsnb's ray backend in namespace {NAMESPACE}")
    role, binding = yaml.safe_load_all(out)
    for doc in (role, binding):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    granted = {(rule["apiGroups"][0], rule["resources"][0]): rule["verbs"] for rule in role["rules"]}
    assert granted["ray.io", "rayjobs"] == ["create", "list", "watch", "delete"]  # that these suffice is test_k8s_rbac's
    assert granted["ray.io", "rayservices"] == ["create", "get", "list"]


def test_specs_kuberay_cannot_run_are_refused_and_create_nothing(emulator: KubeEmulator, cluster: Cluster) -> None:  # noqa: F811
    """Specs that JobSpec accepts but KubeRay would not: refused by the backend, nothing created."""
    before = emulator.inventory()
    refused = [
        ("name", spec(name="r" * 48)),  # KubeRay's MaxRayJobNameLength is 47 (utils/constant.go, v1.7.0)
        ("image", spec(image=None)),
        ("timeout", spec(timeout=2**31)),  # past the int32 of activeDeadlineSeconds
    ]
    for field, refused_spec in refused:
        with pytest.raises(InvalidSpecError) as info:
            cluster.submit(refused_spec)
        assert info.value.field == field, str(info.value)
    assert emulator.inventory() == before and cluster.jobs() == []


@needs_sandbox
def test_a_retried_submitter_replaying_the_driver_log_adds_no_line_twice(emulator) -> None:  # noqa: F811
    """The submitter's follow drops after the first step; its Job starts another pod, whose `ray job logs
    --follow` prints the driver log from the start. Every line and metric is kept once."""
    operator = KubeRaySim(drop_submitter_once=True)
    with ClusterSim(emulator, NAMESPACE, controllers=[operator]) as running, \
            make_cluster(emulator, "kuberay") as cluster:
        job = cluster.submit(spec("ok"))
        assert job.wait(timeout=60).state == JobState.SUCCEEDED
        assert operator.submitter_pods[job.name] == 2  # the dropped one and its retry
        steps = [line.text for line in job.logs() if line.text.startswith("step ")]
        assert steps == sorted(set(steps), key=steps.index) and len(steps) == 6, steps  # 3 steps x 2 ranks, once each
        assert [(s.step, s.rank) for s in job.metrics("loss")] == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
        assert leftovers(emulator, running, job.name) == []
