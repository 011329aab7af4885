"""``Cluster("kuberay").serve(ServeSpec)``: a RayService through the Kubernetes machinery, over real HTTP.

The plan is validated against KubeRay v1.7's RayService CRD (unknown fields refused). The
conversation runs against the API emulator, with ``tests/k8s/kuberay_sim.py`` playing the
KubeRay operator: it creates the Ray cluster's pods (which run nothing), reports the Serve
application's statuses (DEPLOYING, then RUNNING or DEPLOY_FAILED), and creates the serve
Service. No Ray Serve runs here, so nothing answers on the endpoint's in-cluster URL:
``predict()`` is tested against a real Ray Serve in the ``Cluster("ray")`` tests.
"""

from __future__ import annotations

import functools
import json

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

import yaml  # noqa: E402
from helpers import settled  # noqa: E402
from k8s import crds  # noqa: E402
from k8s.emulator import KubeEmulator  # noqa: E402
from k8s.fixtures import IMAGE, NAMESPACE, emulator, make_cluster  # noqa: E402, F401
from k8s.kuberay_sim import KubeRaySim  # noqa: E402
from k8s.sim import ClusterSim  # noqa: E402

from dsnb import Cluster, ClusterError, InvalidSpecError, JobFailed, JobState, Resources  # noqa: E402
from dsnb.backends.kubernetes.kuberay import KubeRayBackend  # noqa: E402
from dsnb.backends.kubernetes.preflight import KUBERAY_INSTALL  # noqa: E402
from dsnb.runtime.ray_serve_app import IMPORT_PATH  # noqa: E402
from dsnb.serving import ServeSpec  # noqa: E402
from dsnb.serving.endpoint import Endpoint  # noqa: E402

K8S_VERSION = kubernetes_validate.utils.latest_version()
SECRET_VALUE = "hf_secret_value_do_not_leak"
BROKEN = "tiny_models:not_a_model"
LOADER_ERROR = "TypeError: tiny_models:not_a_model returned dict, not a torch.nn.Module"


@functools.cache
def _validator(api_version: str, kind: str):
    """A validator per CRD kind: checking a KubeRay schema takes seconds, validating milliseconds."""
    group, version = api_version.split("/")
    schema = crds._strict(crds.schemas()[group, version, kind])
    return jsonschema.validators.validator_for(schema)(schema)


def serve_spec(**fields) -> ServeSpec:
    return ServeSpec(**{"name": "tiny", "model": "tiny_models:tiny_mlp", "replicas": 2, "image": IMAGE, **fields})


@pytest.fixture
def sim(emulator: KubeEmulator):  # noqa: F811 - fixture
    with ClusterSim(emulator, NAMESPACE, controllers=[KubeRaySim(deploy_errors={BROKEN: LOADER_ERROR})]) as running:
        yield running


@pytest.fixture
def cluster(emulator: KubeEmulator, sim: ClusterSim):  # noqa: F811 - fixtures
    with make_cluster(emulator, "kuberay", cancel_wait=20) as made:
        yield made


def leftovers(emulator: KubeEmulator, name: str) -> list[str]:  # noqa: F811
    """Every object of endpoint ``name`` still there (after settling)."""

    def find() -> list[str]:
        kinds = (("v1", "ConfigMap"), ("v1", "Pod"), ("v1", "Secret"), ("v1", "Service"),
                 ("ray.io/v1", "RayService"), ("ray.io/v1", "RayCluster"))
        return [f"{kind} {o['metadata']['name']}" for api, kind in kinds for o in emulator.list(api, kind, NAMESPACE)
                if o["metadata"]["name"].startswith(name)]

    return settled(find)


# -- the plan ----------------------------------------------------------------------------------

def test_the_plan_is_a_record_a_secret_and_a_rayservice_that_fit_their_schemas() -> None:
    spec = serve_spec(min_replicas=1, max_replicas=3, replicas=1, resources=Resources(cpu=2),
                      env={"HF_TOKEN": SECRET_VALUE, "LOG_LEVEL": "debug"})
    plan = Cluster("kuberay", namespace=NAMESPACE).dryrun(spec)
    text = plan.to_yaml()
    assert SECRET_VALUE not in text and SECRET_VALUE not in str(plan) and SECRET_VALUE not in repr(plan)
    record, secret, service = yaml.safe_load_all(text)
    assert (record["kind"], secret["kind"], service["kind"]) == ("ConfigMap", "Secret", "RayService")
    assert record["metadata"]["labels"]["dsnb.io/kind"] == "endpoint" and record["metadata"]["labels"]["dsnb.io/backend"] == "ray"
    assert json.loads(record["data"]["spec.json"])["env"] == {"HF_TOKEN": "***", "LOG_LEVEL": "debug"}
    for document in (record, secret):
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    _validator("ray.io/v1", "RayService").validate(service)
    assert all(d["metadata"]["namespace"] == NAMESPACE for d in (record, secret, service))
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    [app] = config["applications"]
    from dsnb.runtime.server.server import ServerOptions

    options = ServerOptions.parse(app["args"].pop("server_args"))  # each replica runs dsnb's server with these
    assert (options.model, options.served_name, options.generation, options.working_dir) == (
        "tiny_models:tiny_mlp", plan.name, "continuous", None)
    # What Ray Serve runs: dsnb's application at the root, the model for its loader, the spec's
    # plain variables (the secret one comes from the Secret), CPU inference, autoscaling bounds.
    assert app == {
        "name": plan.name, "route_prefix": "/", "import_path": "dsnb.runtime.ray_serve_app:build",
        "args": {"model": "tiny_models:tiny_mlp", "dtype": "float32"},
        "runtime_env": {"env_vars": {"DS_ACCELERATOR": "cpu", "LOG_LEVEL": "debug"}},
        "deployments": [{"name": "DsnbModel", "autoscaling_config": {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1},
                         "ray_actor_options": {"num_cpus": 2.0}}],
    }
    assert app["import_path"] == IMPORT_PATH == "dsnb.runtime.ray_serve_app:build"
    assert app["name"] == plan.name and app["args"]["model"] == "tiny_models:tiny_mlp"
    [deployment] = app["deployments"]
    assert deployment["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1}
    assert deployment["ray_actor_options"] == {"num_cpus": 2.0}
    cluster = service["spec"]["rayClusterConfig"]
    [workers] = cluster["workerGroupSpecs"]
    assert workers["replicas"] == workers["maxReplicas"] == 3 and workers["rayStartParams"] == {"num-cpus": "2"}
    worker = workers["template"]["spec"]["containers"][0]
    assert worker["image"] == IMAGE and worker["resources"]["limits"]["cpu"] == "2"
    env = {e["name"]: e for e in worker["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": f"{plan.name}-env", "key": "HF_TOKEN"}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    notes = "\n".join(plan.notes)
    assert f"http://{plan.name}-serve-svc.{NAMESPACE}.svc.cluster.local:8000/" in notes
    assert "importable in the image" in notes and f"kubectl port-forward -n {NAMESPACE} svc/{plan.name}-serve-svc 8000" in notes


def test_a_fixed_replica_count_gives_as_many_worker_pods_and_gpus_reach_ray() -> None:
    plan = Cluster("kuberay", namespace=NAMESPACE).dryrun(serve_spec(replicas=2, resources=Resources(gpus=1)))
    service = plan.manifests[-1]
    assert [m["kind"] for m in plan.manifests] == ["ConfigMap", "RayService"]  # no secret values, no Secret
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert workers["replicas"] == 2 and workers["rayStartParams"] == {"num-gpus": "1"}
    [app] = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert app["deployments"][0]["num_replicas"] == 2 and app["deployments"][0]["ray_actor_options"]["num_gpus"] == 1
    assert "DS_ACCELERATOR" not in app["runtime_env"]["env_vars"]


def test_a_spec_without_an_image_is_refused_naming_the_field() -> None:
    with pytest.raises(InvalidSpecError) as info:
        Cluster("kuberay", namespace=NAMESPACE).dryrun(serve_spec(image=None))
    assert info.value.field == "image" and "Fix:" in str(info.value) and "rayproject/ray" in str(info.value)


# -- status from the RayService ----------------------------------------------------------------

def condition(kind: str, status: str, reason: str) -> dict:
    return {"type": kind, "status": status, "reason": reason, "message": "", "lastTransitionTime": "2030-01-01T00:00:00Z"}


def rayservice(status: dict | None) -> dict:
    return {"spec": {"rayClusterConfig": {"workerGroupSpecs": [{"replicas": 2}]}}, **({"status": status} if status else {})}


def pending_app(state: str, message: str = "") -> dict:
    return {"pendingServiceStatus": {"applicationStatuses": {"e-abcd": {"status": state, "message": message}}},
            "conditions": [condition("Ready", "False", "Initializing")]}


@pytest.mark.parametrize("service, state, message", [
    (rayservice(None), JobState.PENDING, "waiting for the KubeRay operator"),
    (rayservice({"conditions": [condition("Ready", "False", "Initializing")]}), JobState.PENDING, "KubeRay creates the Ray cluster"),
    (rayservice(pending_app("DEPLOYING")), JobState.STARTING, "the replicas load the model"),
    (rayservice(pending_app("RUNNING")), JobState.STARTING, "serve Service"),
    (rayservice(pending_app("DEPLOY_FAILED", "Traceback ...\nTypeError: bad loader")), JobState.FAILED,
     "failed to deploy: Traceback ...\nTypeError: bad loader"),
    (rayservice({"conditions": [condition("Ready", "False", "InitializingTimeout")]}), JobState.FAILED, "initializing timeout"),
    # KubeRay v1.7.0 (rayservice_controller.go): a RayService that fails validation is Ready=False/ValidationFailed for good
    (rayservice({"conditions": [{**condition("Ready", "False", "ValidationFailed"), "message": "spec.rayClusterConfig is invalid"}]}),
     JobState.FAILED, "KubeRay refused the RayService: spec.rayClusterConfig is invalid"),
    (rayservice({"conditions": [condition("Ready", "True", "NonZeroServeEndpoints")], "numServeEndpoints": 3,
                 "activeServiceStatus": {"applicationStatuses": {"e-abcd": {"status": "RUNNING"}}}}),
     JobState.RUNNING, "3 serve endpoint(s)"),
    (rayservice({"conditions": [condition("Ready", "True", "NonZeroServeEndpoints")],
                 "activeServiceStatus": {"applicationStatuses": {"e-abcd": {"status": "UNHEALTHY", "serveDeploymentStatuses": {
                     "DsnbModel": {"status": "UNHEALTHY", "message": "replica health check failed"}}}}}}),
     JobState.RUNNING, "unhealthy: replica health check failed"),
    (rayservice({"serviceStatus": "Running", "activeServiceStatus": {"applicationStatuses": {"e-abcd": {"status": "RUNNING"}}}}),
     JobState.RUNNING, "Ray Serve answers"),
    (None, JobState.CANCELLED, "deleted outside dsnb"),
], ids=["nothing-yet", "initializing", "deploying", "app-running-not-ready", "deploy-failed", "timeout", "validation-failed", "ready",
        "unhealthy", "service-status-only", "gone"])
def test_status_from_the_rayservices_conditions_and_application(service, state, message) -> None:
    status = KubeRayBackend(namespace="ml").serve_status("e-abcd", 1.0, service, [])
    assert status.state == state and message in status.message, status.message


def test_replicas_are_the_ray_worker_pods_and_a_pod_that_cannot_pull_fails_the_endpoint() -> None:
    def pod(name: str, role: str, phase: str, waiting: dict | None = None) -> dict:
        state = {"waiting": waiting} if waiting else {"running": {}}
        return {"metadata": {"name": name, "labels": {"dsnb.io/role": role}}, "spec": {"nodeName": "n1"},
                "status": {"phase": phase, "containerStatuses": [{"name": f"ray-{role}", "state": state}]}}

    ready = rayservice({"conditions": [condition("Ready", "True", "NonZeroServeEndpoints")],
                        "activeServiceStatus": {"applicationStatuses": {"e-abcd": {"status": "RUNNING"}}}})
    pods = [pod("e-abcd-x-head-1", "head", "Running"), pod("e-abcd-x-workers-worker-b", "worker", "Running"),
            pod("e-abcd-x-workers-worker-a", "worker", "Pending", {"reason": "ContainerCreating"})]
    status = KubeRayBackend(namespace="ml").serve_status("e-abcd", 1.0, ready, pods)
    assert status.state == JobState.RUNNING
    assert [(r.rank, r.state, r.host) for r in status.replicas] == [(0, JobState.STARTING, "n1"), (1, JobState.RUNNING, "n1")]
    pods[1] = pod("e-abcd-x-workers-worker-b", "worker", "Pending", {"reason": "ImagePullBackOff", "message": "no such image"})
    failed = KubeRayBackend(namespace="ml").serve_status("e-abcd", 1.0, rayservice({}), pods)
    assert failed.state == JobState.FAILED and "cannot pull the image" in failed.message


# -- against the emulator and the KubeRay sim --------------------------------------------------

def test_serve_runs_lists_and_stops_the_endpoint_leaving_nothing(emulator, sim, cluster) -> None:  # noqa: F811
    endpoint = cluster.serve(serve_spec(env={"HF_TOKEN": SECRET_VALUE}), wait=60)
    assert isinstance(endpoint, Endpoint)
    name = endpoint.name
    status = endpoint.status()
    assert status.state == JobState.RUNNING and len(status.replicas) == 2, status
    assert endpoint.url == f"http://{name}-serve-svc.{NAMESPACE}.svc.cluster.local:8000/"
    assert emulator.get("v1", "Service", NAMESPACE, f"{name}-serve-svc")["spec"]["ports"][0]["port"] == 8000
    _validator("ray.io/v1", "RayService").validate(emulator.get("ray.io/v1", "RayService", NAMESPACE, name))  # the sim's status too
    secret = emulator.get("v1", "Secret", NAMESPACE, f"{name}-env")
    assert secret is not None and SECRET_VALUE not in json.dumps(emulator.get("ray.io/v1", "RayService", NAMESPACE, name))
    assert SECRET_VALUE not in json.dumps(emulator.get("v1", "ConfigMap", NAMESPACE, name))
    assert [s.name for s in cluster.endpoints()] == [name] and cluster.endpoints()[0].state == JobState.RUNNING
    assert cluster.jobs() == []
    final = endpoint.stop()
    assert final.state == JobState.CANCELLED
    assert emulator.get("ray.io/v1", "RayService", NAMESPACE, name) is None
    assert leftovers(emulator, name) == []
    assert endpoint.stop().state == JobState.CANCELLED and endpoint.status().state == JobState.CANCELLED  # idempotent
    assert cluster.endpoints() == []


def test_a_fresh_cluster_finds_the_endpoint_and_serve_url_overrides_its_address(emulator, sim, cluster) -> None:  # noqa: F811
    endpoint = cluster.serve(serve_spec(), wait=60)
    with make_cluster(emulator, "kuberay", cancel_wait=20) as fresh:
        again = fresh.endpoint(endpoint.name)
        assert again.status().state == JobState.RUNNING and again.url == endpoint.url
        assert [s.name for s in fresh.endpoints()] == [endpoint.name]
        from dsnb import JobNotFound

        with pytest.raises(JobNotFound):
            fresh.endpoint("nope-abcd")
    with make_cluster(emulator, "kuberay", serve_url="http://127.0.0.1:8000/") as forwarded:
        assert forwarded.endpoint(endpoint.name).url == "http://127.0.0.1:8000/"
        assert forwarded.endpoint(endpoint.name).stop().state == JobState.CANCELLED
    assert leftovers(emulator, endpoint.name) == []


def test_a_loader_that_fails_to_deploy_fails_serve_with_its_message_and_leaves_nothing(emulator, sim, cluster) -> None:  # noqa: F811
    with pytest.raises(JobFailed) as info:
        cluster.serve(serve_spec(model=BROKEN, env={"HF_TOKEN": SECRET_VALUE}), wait=60)
    status = info.value.status
    assert status.state == JobState.FAILED and LOADER_ERROR in status.message and "failed to deploy" in status.message
    assert leftovers(emulator, status.name) == []
    assert cluster.endpoints() == []


def test_serving_without_the_rayservice_crd_says_how_to_install_kuberay(emulator) -> None:  # noqa: F811
    emulator.remove_resource("ray.io/v1", "RayService")
    with make_cluster(emulator, "kuberay") as cluster:
        with pytest.raises(ClusterError, match="the operator is not installed") as info:
            cluster.serve(serve_spec(env={"HF_TOKEN": SECRET_VALUE}), wait=5)
        assert KUBERAY_INSTALL in str(info.value)
        assert cluster.endpoints() == [] and cluster.jobs() == []
    assert settled(lambda: emulator.list("v1", "Secret", NAMESPACE) + emulator.list("v1", "ConfigMap", NAMESPACE)) == []
