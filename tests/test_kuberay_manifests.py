"""KubeRay manifests (RayJob, RayService, RayCluster), checked against the upstream KubeRay v1.7.0 CRD schemas.

Custom resources are validated with jsonschema against the CRDs' ``openAPIV3Schema`` (unknown
fields refused), the head and worker pod templates against the Kubernetes schema (strict).
"""

from __future__ import annotations

import functools
import json
import shlex

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

import yaml  # noqa: E402
from k8s import crds  # noqa: E402

from dsnb import InvalidSpecError, JobSpec, PodOptions, Resources  # noqa: E402
from dsnb.backends.kubernetes.kuberay_manifests import (  # noqa: E402
    HEAD_CONTAINER,
    SUBMITTER_CONTAINER,
    WORKER_CONTAINER,
    env_secret_name,
    ray_cluster_spec,
    render_rayjob,
    render_rayservice,
)

K8S_VERSION = kubernetes_validate.utils.latest_version()
SECRET_VALUE = "hf_secret_value_do_not_leak"
ENTRYPOINT = ["python", "-m", "dsnb.runtime.ray_train_entry", "--", "train.py", "--steps", "60", "--note", "it's two words"]
FULL = {"nodes": 4, "procs_per_node": 8, "resources": Resources(gpus=8, cpu=64, memory="512Gi"), "timeout": 7200.7,
        "max_restarts": 2, "env": {"HF_TOKEN": SECRET_VALUE, "NCCL_DEBUG": "INFO"}, "working_dir": "/app"}
OPTIONS = PodOptions(service_account="trainer", checkpoint_pvc="ckpt", image_pull_secrets=["regcred"],
                     node_selector={"pool": "gpu"}, nccl={"NCCL_IB_DISABLE": "1"},
                     tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
DEPLOYMENT = {"name": "Chat", "autoscaling_config": {"min_replicas": 1, "max_replicas": 4},
              "ray_actor_options": {"num_gpus": 1, "num_cpus": 4}}
CASES = pytest.mark.parametrize("fields, options", [({}, PodOptions()), (FULL, OPTIONS)], ids=["defaults", "gpus-secrets-options"])


@functools.cache
def _validator(api_version: str, kind: str):
    group, version = api_version.split("/")
    schema = crds._strict(crds.schemas()[group, version, kind])
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate_custom(manifest: dict) -> None:
    """``crds.validate_custom`` with each schema checked once: checking a KubeRay schema takes seconds, validating milliseconds."""
    _validator(manifest["apiVersion"], manifest["kind"]).validate(manifest)


def make_spec(**fields) -> JobSpec:
    return JobSpec(**{"name": "tiny-gpt-x7k2", "script": "train.py", "image": "ghcr.io/org/train:1", **fields})


def as_pod(template: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **template["metadata"]}, "spec": template["spec"]}


def check_pods(cluster: dict) -> None:
    kubernetes_validate.validate(as_pod(cluster["headGroupSpec"]["template"], "head"), K8S_VERSION, strict=True)
    for group in cluster["workerGroupSpecs"]:
        kubernetes_validate.validate(as_pod(group["template"], group["groupName"]), K8S_VERSION, strict=True)


def container(template: dict) -> dict:
    return template["spec"]["containers"][0]


# -- schemas -----------------------------------------------------------------------------------

@CASES
def test_rayjob_validates_against_the_crd_and_its_pods_against_kubernetes(fields, options) -> None:
    job = render_rayjob(make_spec(**fields), options, ENTRYPOINT)
    validate_custom(job)
    check_pods(job["spec"]["rayClusterSpec"])
    kubernetes_validate.validate(as_pod(job["spec"]["submitterPodTemplate"], "submitter"), K8S_VERSION, strict=True)


@CASES
def test_rayservice_validates_against_the_crd_and_its_pods_against_kubernetes(fields, options) -> None:
    service = render_rayservice(make_spec(**fields), options, "serve_app:app", DEPLOYMENT)
    validate_custom(service)
    check_pods(service["spec"]["rayClusterConfig"])


@CASES
def test_a_raycluster_from_the_spec_validates_against_the_crd(fields, options) -> None:
    spec = make_spec(**fields)
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": spec.name},
               "spec": ray_cluster_spec(spec, options, "2.60.0", head_resources=Resources(cpu=2, memory="8Gi"))}
    validate_custom(cluster)
    check_pods(cluster["spec"])


def test_the_validator_refuses_what_the_crd_does_not_allow() -> None:
    job = render_rayjob(make_spec(**FULL), OPTIONS, ENTRYPOINT)
    spec = job["spec"]
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    misspelt_group = {("replica" if k == "replicas" else k): v for k, v in group.items()}
    wrong = [
        {**spec, "entryPoint": spec["entrypoint"]},
        {**spec, "rayClusterSpec": {**spec["rayClusterSpec"], "workerGroupSpecs": [misspelt_group]}},
        # rayStartParams are strings for `ray start`: a number is refused.
        {**spec, "rayClusterSpec": {**spec["rayClusterSpec"], "workerGroupSpecs": [{**group, "rayStartParams": {"num-gpus": 8}}]}},
        {**spec, "backoffLimit": "2"},
    ]
    reasons = ["'entryPoint' was unexpected", "'replica' was unexpected", "8 is not of type 'string'", "'2' is not of type 'integer'"]
    for bad, reason in zip(wrong, reasons):
        with pytest.raises(jsonschema.ValidationError, match=reason):
            validate_custom({**job, "spec": bad})
    validate_custom(job)  # the variants above left it unchanged
    cluster = spec["rayClusterSpec"]
    without_head = {k: v for k, v in cluster.items() if k != "headGroupSpec"}
    with pytest.raises(jsonschema.ValidationError, match="headGroupSpec"):
        validate_custom({"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "a"}, "spec": without_head})


# -- the cluster -------------------------------------------------------------------------------

def test_workers_are_a_fixed_group_of_one_per_node_with_the_spec_resources() -> None:
    cluster = ray_cluster_spec(make_spec(**FULL), OPTIONS, "2.60.0")
    (group,) = cluster["workerGroupSpecs"]
    assert group["groupName"] == "workers"
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    assert group["rayStartParams"] == {"num-cpus": "64", "num-gpus": "8"}
    worker = container(group["template"])
    assert worker["name"] == WORKER_CONTAINER and worker["image"] == "ghcr.io/org/train:1"
    assert worker["resources"]["limits"] == {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8"}
    assert worker["workingDir"] == "/app"
    pod = group["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "ckpt"
    assert {m["mountPath"] for m in worker["volumeMounts"]} == {"/dev/shm", "/checkpoints"}
    assert pod["nodeSelector"] == {"pool": "gpu"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["serviceAccountName"] == "trainer" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert group["template"]["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "dsnb",
                                                       "dsnb.io/job": "tiny-gpt-x7k2", "dsnb.io/role": "worker"}


def test_the_head_runs_no_training_and_exposes_rays_ports() -> None:
    cluster = ray_cluster_spec(make_spec(**FULL), OPTIONS, "2.60.0")
    head = cluster["headGroupSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    assert head["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-cpus": "0"}
    main = container(head["template"])
    assert main["name"] == HEAD_CONTAINER and main["image"] == "ghcr.io/org/train:1"
    assert {p["name"]: p["containerPort"] for p in main["ports"]} == {"gcs-server": 6379, "dashboard": 8265,
                                                                       "client": 10001, "serve": 8000}
    assert main["resources"]["limits"] == {"cpu": "1", "memory": "4Gi"}  # the documented default; no GPUs
    assert head["template"]["metadata"]["labels"]["dsnb.io/role"] == "head"
    # Shared storage for Ray Train's checkpoints: the driver on the head reads it too.
    assert "/checkpoints" in {m["mountPath"] for m in main["volumeMounts"]}
    custom = ray_cluster_spec(make_spec(**FULL), OPTIONS, "2.60.0", head_resources=Resources(cpu="500m", memory="2Gi"))
    assert container(custom["headGroupSpec"]["template"])["resources"]["requests"] == {"cpu": "500m", "memory": "2Gi"}


def test_kuberay_writes_the_ray_containers_command() -> None:
    cluster = ray_cluster_spec(make_spec(**FULL), OPTIONS, "2.60.0")
    for template in [cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]]:
        main = container(template)
        assert "command" not in main and "args" not in main


@pytest.mark.parametrize("resources, params", [
    (Resources(), {}),
    (Resources(cpu=2.5), {"num-cpus": "3"}),  # Ray counts whole CPUs; KubeRay rounds limits up too
    (Resources(cpu="1500m", gpus=1), {"num-gpus": "1"}),  # a quantity is left to KubeRay (from the limit)
])
def test_worker_ray_start_params_follow_the_resources(resources, params) -> None:
    group = ray_cluster_spec(make_spec(resources=resources), PodOptions(), "2.60.0")["workerGroupSpecs"][0]
    assert group["rayStartParams"] == params


# -- RayJob ------------------------------------------------------------------------------------

def test_rayjob_fields_follow_the_spec() -> None:
    job = render_rayjob(make_spec(**FULL), OPTIONS, ENTRYPOINT, "2.60.0", ttl_seconds_after_finished=600)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"] == {"name": "tiny-gpt-x7k2", "labels": {"app.kubernetes.io/managed-by": "dsnb",
                                                                   "dsnb.io/job": "tiny-gpt-x7k2"}}
    spec = job["spec"]
    assert shlex.split(spec["entrypoint"]) == ENTRYPOINT
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    assert spec["ttlSecondsAfterFinished"] == 600
    assert spec["activeDeadlineSeconds"] == 7200 and spec["backoffLimit"] == 2
    assert spec["rayClusterSpec"]["rayVersion"] == "2.60.0"
    assert spec["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 4


def test_the_submitter_carries_dsnbs_labels_and_leaves_its_command_to_kuberay() -> None:
    submitter = render_rayjob(make_spec(**FULL), OPTIONS, ENTRYPOINT)["spec"]["submitterPodTemplate"]
    assert submitter["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "dsnb", "dsnb.io/job": "tiny-gpt-x7k2",
                                               "dsnb.io/role": "submitter"}
    pod = submitter["spec"]
    assert pod["restartPolicy"] == "Never" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    (main,) = pod["containers"]
    assert main["name"] == SUBMITTER_CONTAINER and main["image"] == "ghcr.io/org/train:1"
    assert "command" not in main and "args" not in main and "env" not in main and "volumeMounts" not in main
    assert "nvidia.com/gpu" not in main["resources"]["limits"]  # it only submits and follows the log
    assert "nodeSelector" not in pod and "tolerations" not in pod and pod["securityContext"]["runAsNonRoot"] is True


def test_env_vars_join_the_runtime_env_and_the_spec_wins() -> None:
    job = render_rayjob(make_spec(**FULL), OPTIONS, ENTRYPOINT,
                        env_vars={"DSNB_RAY_JOB": "{}", "NCCL_DEBUG": "WARN", "RAY_DEDUP_LOGS": "0"})
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == {
        "env_vars": {"DSNB_RAY_JOB": "{}", "NCCL_DEBUG": "INFO", "RAY_DEDUP_LOGS": "0"}}
    assert SECRET_VALUE not in job["spec"]["runtimeEnvYAML"]
    only_extra = render_rayjob(make_spec(), PodOptions(), ENTRYPOINT, env_vars={"A": "1"})
    assert yaml.safe_load(only_extra["spec"]["runtimeEnvYAML"]) == {"env_vars": {"A": "1"}}


def test_rayjob_defaults() -> None:
    spec = render_rayjob(make_spec(), PodOptions(), ["python", "train.py"])["spec"]
    assert spec["ttlSecondsAfterFinished"] == 0 and spec["backoffLimit"] == 0  # the Ray cluster goes as the job ends
    assert "activeDeadlineSeconds" not in spec and "runtimeEnvYAML" not in spec
    assert spec["rayClusterSpec"]["rayVersion"] == "2.60.0"
    assert spec["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 1


def test_secrets_stay_out_of_the_manifests_and_reach_the_pods_from_a_secret() -> None:
    spec = make_spec(**FULL)
    job = render_rayjob(spec, OPTIONS, ENTRYPOINT)
    service = render_rayservice(spec, OPTIONS, "serve_app:app", DEPLOYMENT)
    for manifest in (job, service):
        assert SECRET_VALUE not in json.dumps(manifest) and SECRET_VALUE not in yaml.safe_dump(manifest)
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == {"env_vars": {"NCCL_DEBUG": "INFO"}}
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert app["runtime_env"] == {"env_vars": {"NCCL_DEBUG": "INFO"}}
    assert env_secret_name(spec) == "tiny-gpt-x7k2-env"
    cluster = job["spec"]["rayClusterSpec"]
    for template in [cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]]:
        env = {e["name"]: e for e in container(template)["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "tiny-gpt-x7k2-env", "key": "HF_TOKEN"}
        assert env["NCCL_DEBUG"]["value"] == "INFO" and env["NCCL_IB_DISABLE"]["value"] == "1"
    assert env_secret_name(make_spec(env={"NCCL_DEBUG": "INFO"})) is None


# -- RayService --------------------------------------------------------------------------------

def test_rayservice_serves_one_application_with_the_deployment_as_given() -> None:
    given = json.loads(json.dumps(DEPLOYMENT))
    service = render_rayservice(make_spec(**FULL), OPTIONS, "serve_app:app", given, "2.60.0")
    assert given == DEPLOYMENT  # not modified
    assert service["kind"] == "RayService" and service["metadata"]["name"] == "tiny-gpt-x7k2"
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert config == {"applications": [{"name": "tiny-gpt-x7k2", "import_path": "serve_app:app", "route_prefix": "/",
                                        "runtime_env": {"env_vars": {"NCCL_DEBUG": "INFO"}}, "deployments": [DEPLOYMENT]}]}
    assert service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] == "8"
    plain = render_rayservice(make_spec(), PodOptions(), "pkg.app", {"name": "M", "num_replicas": "auto",
                                                                     "autoscaling_config": {"max_replicas": 2}})
    assert yaml.safe_load(plain["spec"]["serveConfigV2"])["applications"][0]["runtime_env"] == {}


def test_rayservice_takes_a_whole_application_and_keeps_its_secrets_out() -> None:
    app = {"import_path": "dsnb.runtime.ray_serve_app:build", "args": {"model": "m:f"},
           "runtime_env": {"env_vars": {"NCCL_DEBUG": "INFO", "HF_TOKEN": SECRET_VALUE, "MY_API_KEY": "k-123"}},
           "deployments": [DEPLOYMENT]}
    given = json.loads(json.dumps(app))
    service = render_rayservice(make_spec(**FULL), OPTIONS, application=given)
    validate_custom(service)
    assert given == app  # not modified
    assert SECRET_VALUE not in json.dumps(service) and "k-123" not in json.dumps(service)
    [served] = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert served == {**app, "runtime_env": {"env_vars": {"NCCL_DEBUG": "INFO"}}, "name": "tiny-gpt-x7k2", "route_prefix": "/"}
    named = render_rayservice(make_spec(), PodOptions(), application={**app, "name": "other", "route_prefix": "/x"})
    assert yaml.safe_load(named["spec"]["serveConfigV2"])["applications"][0]["route_prefix"] == "/x"


# -- bad input ---------------------------------------------------------------------------------

def test_bad_input_names_its_field() -> None:
    options = PodOptions()
    spec = make_spec()
    cases = [
        ("image", lambda: render_rayjob(make_spec(image=None), options, ENTRYPOINT)),
        ("ray_version", lambda: render_rayjob(spec, options, ENTRYPOINT, "2.60")),
        ("ray_version", lambda: ray_cluster_spec(spec, options, "v2.60.0")),
        ("entrypoint", lambda: render_rayjob(spec, options, "python train.py")),
        ("entrypoint", lambda: render_rayjob(spec, options, [])),
        ("ttl_seconds_after_finished", lambda: render_rayjob(spec, options, ENTRYPOINT, ttl_seconds_after_finished=-1)),
        ("env_vars", lambda: render_rayjob(spec, options, ENTRYPOINT, env_vars={"STEPS": 60})),
        ("env_vars", lambda: render_rayjob(spec, options, ENTRYPOINT, env_vars=["A=1"])),
        ("name", lambda: render_rayjob(make_spec(name="a" * 48), options, ENTRYPOINT)),
        ("name", lambda: render_rayservice(make_spec(name="a" * 48), options, "app:app", {"name": "M"})),
        ("head_resources.gpus", lambda: ray_cluster_spec(spec, options, "2.60.0", head_resources=Resources(gpus=1))),
        ("head_resources", lambda: ray_cluster_spec(spec, options, "2.60.0", head_resources={"cpu": 1})),
        ("import_path", lambda: render_rayservice(spec, options, "serve app", {"name": "M"})),
        ("deployment.name", lambda: render_rayservice(spec, options, "app:app", {"num_replicas": 1})),
        ("deployment.num_replicas", lambda: render_rayservice(
            spec, options, "app:app", {"name": "M", "num_replicas": 2, "autoscaling_config": {"max_replicas": 4}})),
        ("deployment", lambda: render_rayservice(spec, options, "app:app", {"name": "M", "user_config": object()})),
        ("import_path", lambda: render_rayservice(spec, options)),
        ("application", lambda: render_rayservice(spec, options, "app:app", application={"import_path": "app:app"})),
        ("application", lambda: render_rayservice(spec, options, application=["app:app"])),
        ("application.import_path", lambda: render_rayservice(spec, options, application={"import_path": "no path"})),
        ("application.deployments.name", lambda: render_rayservice(
            spec, options, application={"import_path": "app:app", "deployments": [{}]})),
        ("application.runtime_env.env_vars", lambda: render_rayservice(
            spec, options, application={"import_path": "app:app", "runtime_env": {"env_vars": ["A=1"]}})),
    ]
    for field, call in cases:
        with pytest.raises(InvalidSpecError) as info:
            call()
        assert info.value.field == field, (field, str(info.value))
        assert "Fix:" in str(info.value)


def test_nodes_are_checked_again_when_rendering() -> None:
    spec = make_spec()
    object.__setattr__(spec, "nodes", 0)  # forced past the frozen spec's checks
    with pytest.raises(InvalidSpecError) as info:
        ray_cluster_spec(spec, PodOptions(), "2.60.0")
    assert info.value.field == "nodes"
