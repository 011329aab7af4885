"""``cluster.serve(ServeSpec)`` on the Kubernetes job backends: statefulset, mpijob, trainjob.

Plans: every manifest validates (core kinds with kubernetes-validate in strict mode; the MPIJob
and TrainJob against their upstream CRDs, their pod templates against Kubernetes), the serving
Service ``<job>-serve`` selects rank 0's pod, probes are where the docs promise them, there is
no time limit, and the token is in no YAML.

Conversation: over real HTTP against the API emulator, with ``tests/k8s/sim.py`` (StatefulSet
controller, kubelet and its readiness prober) and ``tests/k8s/operators.py`` (MPI Operator,
Kubeflow Trainer; every pod in its own network namespace, ``mpirun`` run for real). Most tests
do **not** run dsnb's real server, which loads a model with DeepSpeed (seconds per start here,
minutes for a real model): the ServeSpec's ``working_dir`` is ``tests/k8s/serve_standin`` (the
container's working directory, as for code baked into an image), so ``python -m dsnb.runtime.server``
in every rank finds the stand-in package there first. It keeps the server's contract with the
cluster without a model: rank 0 prints ``DSNB_SERVE {...}`` lines and answers ``/healthz``,
``/readyz`` and ``POST /`` (token checked, inputs echoed); the other nodes' LOCAL_RANK 0
answers the probes. On the StatefulSet the sim's prober runs the rendered ``GET /readyz`` probe
against it; on the MPIJob and TrainJob readiness comes from rank 0's line in the launcher's log.
One test (marked ``deepspeed``) runs the real server with a tiny MLP in a StatefulSet pod.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")
pytest.importorskip("jsonschema")
models = pytest.importorskip("kubeflow_trainer_api.models")

import yaml  # noqa: E402
from helpers import wait_until  # noqa: E402
from k8s.crds import FOLDER, validate_custom  # noqa: E402
from k8s.fixtures import IMAGE, NAMESPACE, emulator, leftovers, make_cluster  # noqa: E402, F401 - fixtures
from k8s.operators import MPIOperatorSim, TrainerSim  # noqa: E402
from k8s.sandbox import mpi_problem, netns_problem, sandbox_problem  # noqa: E402
from k8s.sim import ClusterSim  # noqa: E402

from dsnb import Cluster, InvalidSpecError, JobFailed, JobNotFound, JobState, Resources  # noqa: E402
from dsnb.backends.kubernetes.serving import matches  # noqa: E402
from dsnb.serving import ServeSpec  # noqa: E402

K8S_VERSION = kubernetes_validate.utils.latest_version()
BACKENDS = ("statefulset", "mpijob", "trainjob")
TOKEN = "tok-3f9a1c77e0b24d5e"
HF_SECRET = "hf_secret_value_do_not_leak"
STANDIN = str(Path(__file__).parent / "k8s" / "serve_standin")
needs_sandbox = pytest.mark.skipif(sandbox_problem() is not None, reason=sandbox_problem() or "")
needs_mpi = pytest.mark.skipif((netns_problem() or mpi_problem()) is not None, reason=netns_problem() or mpi_problem() or "")


def serve_spec(**fields) -> ServeSpec:
    return ServeSpec(**{"name": "tiny", "model": "tiny_models:tiny_mlp", "image": IMAGE, **fields})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def as_pod(template: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **template["metadata"]}, "spec": template["spec"]}


def validate(documents: list[dict]) -> None:
    """Core kinds strictly against Kubernetes; custom resources against their CRD, their pods against Kubernetes."""
    for document in documents:
        if document["kind"] == "MPIJob":
            validate_custom(document)
            for role, replica in document["spec"]["mpiReplicaSpecs"].items():
                kubernetes_validate.validate(as_pod(replica["template"], role.lower()), K8S_VERSION, strict=True)
        elif document["kind"] == "TrainJob":
            validate_custom(document)
            assert models.TrainerV1alpha1TrainJob.from_dict(document).to_dict() == document
        else:
            kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def by_kind(documents: list[dict]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for document in documents:
        found.setdefault(document["kind"], []).append(document)
    return found


# -- plans -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_the_serving_plan_validates_and_shows_no_secret(backend: str) -> None:
    spec = serve_spec(nodes=2, procs_per_node=2, port=9000, token=TOKEN, env={"HF_TOKEN": HF_SECRET},
                      resources=Resources(cpu=8, memory="32Gi", gpus=2))
    plan = Cluster(backend, namespace=NAMESPACE).dryrun(spec)
    documents = list(yaml.safe_load_all(plan.to_yaml()))
    validate(documents)
    for shown in (str(plan), plan.to_yaml(), repr(plan), json.dumps(plan.manifests)):
        assert TOKEN not in shown and HF_SECRET not in shown
    assert plan.extra["secret_values"][f"{plan.name}-env"]["DSNB_SERVE_TOKEN"] == TOKEN  # what apply creates
    kinds = by_kind(documents)
    services = {s["metadata"]["name"]: s for s in kinds["Service"]}
    service = services[f"{plan.name}-serve"]
    assert len(services) == (2 if backend == "statefulset" else 1)  # beside the StatefulSet's headless <job>
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "http", "port": 9000, "targetPort": 9000, "protocol": "TCP"}]
    assert service["metadata"]["labels"]["dsnb.io/job"] == plan.name and service["metadata"]["namespace"] == NAMESPACE
    # An always-on server: no time limit anywhere, the record says so too.
    workload = json.dumps([d for d in documents if d["kind"] in ("StatefulSet", "MPIJob", "TrainJob")])
    assert "activeDeadlineSeconds" not in workload and '"DSNB_TIMEOUT"' not in workload
    record = json.loads(kinds["ConfigMap"][0]["data"]["spec.json"])
    assert record["timeout"] is None and record["command"] == ["python", "-m", "dsnb.runtime.server"]
    assert record["env"]["DSNB_SERVE_TOKEN"] == "***"
    assert f"svc/{plan.name}-serve 9000:9000" in str(plan)  # how to reach it from outside


def test_statefulset_pods_declare_the_port_and_probe_readyz() -> None:
    plan = Cluster("statefulset", namespace=NAMESPACE).dryrun(serve_spec(nodes=3, port=9000))
    stateful_set = by_kind(plan.manifests)["StatefulSet"][0]
    container = stateful_set["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"] == [{"name": "http", "containerPort": 9000, "protocol": "TCP"}]
    probe = container["readinessProbe"]
    assert probe["httpGet"] == {"path": "/readyz", "port": 9000}
    assert probe["periodSeconds"] == 5 and probe["failureThreshold"] == 3 and "livenessProbe" not in container
    assert stateful_set["spec"]["template"]["spec"]["restartPolicy"] == "Always"
    service = by_kind(plan.manifests)["Service"][-1]
    assert service["spec"]["selector"] == {"app.kubernetes.io/managed-by": "dsnb", "dsnb.io/job": plan.name,
                                           "dsnb.io/role": "node", "statefulset.kubernetes.io/pod-name": f"{plan.name}-0"}


def test_mpijob_workers_keep_the_sshd_probe_the_launcher_waits_for() -> None:
    plan = Cluster("mpijob", namespace=NAMESPACE).dryrun(serve_spec(nodes=2, port=9000))
    mpijob = by_kind(plan.manifests)["MPIJob"][0]["spec"]
    assert mpijob["launcherCreationPolicy"] == "WaitForWorkersReady" and mpijob["runLauncherAsWorker"] is False
    worker = mpijob["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert worker["readinessProbe"]["tcpSocket"] == {"port": 2222}  # not /readyz: it would never pass before the launcher
    assert worker["ports"] == [{"name": "http", "containerPort": 9000, "protocol": "TCP"}]
    assert "readinessProbe" not in mpijob["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    assert mpijob["runPolicy"]["backoffLimit"] == 0 and "activeDeadlineSeconds" not in mpijob["runPolicy"]
    assert mpijob["mpiReplicaSpecs"]["Worker"]["restartPolicy"] == "Never"
    selector = by_kind(plan.manifests)["Service"][0]["spec"]["selector"]
    assert selector == {"app.kubernetes.io/managed-by": "dsnb", "dsnb.io/job": plan.name, "dsnb.io/role": "worker",
                        "training.kubeflow.org/replica-index": "0"}


def test_a_trainjob_cannot_carry_probes_so_none_are_added() -> None:
    plan = Cluster("trainjob", namespace=NAMESPACE).dryrun(serve_spec(nodes=2, port=9000))
    trainjob = by_kind(plan.manifests)["TrainJob"][0]["spec"]
    for job in trainjob["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
        for container in job["template"]["spec"]["template"]["spec"]["containers"]:
            assert set(container) <= {"name", "env", "securityContext", "volumeMounts"}  # all the CRD allows
    selector = by_kind(plan.manifests)["Service"][0]["spec"]["selector"]
    assert selector == {"app.kubernetes.io/managed-by": "dsnb", "dsnb.io/job": plan.name, "dsnb.io/role": "launcher"}


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fields, field", [({"replicas": 2}, "replicas"), ({"min_replicas": 1, "max_replicas": 2}, "replicas"),
                                           ({"image": None}, "image"), ({"name": "n" * 55}, "name")],
                         ids=["replicas", "autoscaling", "no-image", "name-too-long-for-the-service"])
def test_bad_input_is_refused_and_nothing_is_created(emulator, backend: str, fields: dict, field: str) -> None:  # noqa: F811
    with make_cluster(emulator, backend) as cluster:
        with pytest.raises(InvalidSpecError) as info:
            cluster.serve(serve_spec(**fields), wait=None)
        assert info.value.field == field
    assert emulator.list("v1", "ConfigMap", NAMESPACE) == [] and emulator.list("v1", "Service", NAMESPACE) == []
    assert [r for r in emulator.requests if r[0] != "GET"] == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_unknown_endpoint_is_not_found(emulator, backend: str) -> None:  # noqa: F811
    with make_cluster(emulator, backend) as cluster:
        with pytest.raises(JobNotFound, match="endpoint 'nope-x1y2' not found"):
            cluster.endpoint("nope-x1y2")
        with pytest.raises(JobNotFound, match="endpoint"):
            cluster.backend.endpoint_url("nope-x1y2")
        assert cluster.endpoints() == []


# -- the conversation --------------------------------------------------------------------------

def selected_pods(emulator, name: str) -> tuple[dict, list[str]]:  # noqa: F811
    """The serving Service and the names of the job's pods its selector selects."""
    service = emulator.get("v1", "Service", NAMESPACE, f"{name}-serve")
    pods = emulator.list("v1", "Pod", NAMESPACE, f"dsnb.io/job={name}")
    return service, sorted(p["metadata"]["name"] for p in pods if matches(service["spec"]["selector"], p))


def serve_until_running(cluster: Cluster, spec: ServeSpec, timeout: float = 60):
    """Serve without waiting, then poll the endpoint until RUNNING; return it and every (state, message) seen."""
    endpoint = cluster.serve(spec, wait=None)
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        status = endpoint.status()
        if not seen or seen[-1] != (status.state, status.message):
            seen.append((status.state, status.message))
        if status.state == JobState.RUNNING or status.state.is_terminal() or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if status.state != JobState.RUNNING:
        lines = [f"[{line.rank}] {line.text}" for line in cluster.backend.read_logs(endpoint.name).lines]
        raise AssertionError(f"not RUNNING: {seen}\nlogs:\n" + "\n".join(lines[-40:]))
    return endpoint, seen


def check_lifecycle(emulator, sim, cluster: Cluster, endpoint, port: int, rank0_pod: str) -> None:  # noqa: F811
    """URL, listing, reattach, token from the Secret, ownership; then stop removes everything."""
    name, backend = endpoint.name, cluster.backend.name
    assert endpoint.url == f"http://{name}-serve.{NAMESPACE}.svc:{port}/"
    service, selected = selected_pods(emulator, name)
    assert selected == [rank0_pod]
    record = emulator.get("v1", "ConfigMap", NAMESPACE, name)
    assert service["metadata"]["ownerReferences"][0]["uid"] == record["metadata"]["uid"]
    assert TOKEN not in json.dumps(record)
    secret = emulator.get("v1", "Secret", NAMESPACE, f"{name}-env")
    assert base64.b64decode(secret["data"]["DSNB_SERVE_TOKEN"]).decode() == TOKEN
    assert [(s.name, s.state) for s in cluster.endpoints()] == [(name, JobState.RUNNING)]
    with make_cluster(emulator, backend) as other:  # a new kernel: nothing in memory
        again = other.endpoint(name)
        assert again.url == endpoint.url and again.status().state == JobState.RUNNING
        assert other.backend.endpoint_headers(name) == {"Authorization": f"Bearer {TOKEN}"}
        assert ("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/{name}-env") in emulator.requests
    final = endpoint.stop()
    assert final.state == JobState.CANCELLED
    assert leftovers(emulator, sim, name) == []  # pods, both Services, the workload, the Secret; no process
    assert emulator.get("v1", "Service", NAMESPACE, f"{name}-serve") is None
    assert endpoint.stop().state == JobState.CANCELLED  # again: nothing to do
    assert endpoint.status().state == JobState.CANCELLED


@needs_sandbox
def test_statefulset_serves_until_stopped(emulator) -> None:  # noqa: F811
    port = free_port()
    spec = serve_spec(procs_per_node=2, port=port, token=TOKEN,
                      working_dir=STANDIN, env={"DSNB_STANDIN_LOAD_S": "1.5"})
    with ClusterSim(emulator, NAMESPACE) as sim, make_cluster(emulator, "statefulset", cancel_wait=20) as cluster:
        endpoint, seen = serve_until_running(cluster, spec)
        name = endpoint.name
        starting = [message for state, message in seen if state == JobState.STARTING]
        # What the real server shows while it loads: no line yet, and the probe not passing.
        assert any(m == f"starting the server on rank 0 (pod {name}-0): waiting for GET /readyz on port {port} to answer 200"
                   for m in starting), seen
        assert seen[-1][1] == f"ready: rank 0 (pod {name}-0) passes its readiness probe, GET /readyz on port {port}"
        pod = emulator.get("v1", "Pod", NAMESPACE, f"{name}-0")
        assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "True"
        # Through a port-forward (here: the pod's port on this host), with the token read from the Secret.
        with make_cluster(emulator, "statefulset", serve_url=f"http://127.0.0.1:{port}") as outside:
            reached = outside.endpoint(name)
            assert reached.url == f"http://127.0.0.1:{port}/"
            assert reached.predict({"inputs": [[1.0, 2.0]]}) == {"outputs": [[1.0, 2.0]], "rank": 0}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=b'{"inputs": [[1.0]]}', method="POST")
        with pytest.raises(urllib.error.HTTPError, match="401"):  # the token reached rank 0: a request without it is refused
            urllib.request.urlopen(request, timeout=10)
        check_lifecycle(emulator, sim, cluster, endpoint, port, f"{name}-0")


@needs_sandbox
def test_statefulset_selects_only_pod_zero(emulator) -> None:  # noqa: F811
    """Three nodes, pods made but not run (``hold``): the Service selects ``<job>-0`` and no other."""
    with ClusterSim(emulator, NAMESPACE, hold=True) as sim, make_cluster(emulator, "statefulset", cancel_wait=20) as cluster:
        endpoint = cluster.serve(serve_spec(nodes=3, port=free_port()), wait=None)
        name = endpoint.name
        pods = lambda: sorted(p["metadata"]["name"] for p in emulator.list("v1", "Pod", NAMESPACE, f"dsnb.io/job={name}"))  # noqa: E731
        wait_until(lambda: len(pods()) == 3, timeout=30, message=pods)
        assert pods() == [f"{name}-0", f"{name}-1", f"{name}-2"]
        assert selected_pods(emulator, name)[1] == [f"{name}-0"]
        status = endpoint.status()
        assert status.state in (JobState.PENDING, JobState.STARTING) and "pod(s)" in status.message, status
        [listed] = cluster.endpoints()
        assert (listed.name, listed.state, listed.message) == (name, status.state, status.message)
        endpoint.stop()
        assert leftovers(emulator, sim, name) == []


@needs_sandbox
def test_a_server_that_exits_fails_the_endpoint_and_serve_removes_it(emulator) -> None:  # noqa: F811
    spec = serve_spec(port=free_port(), working_dir=STANDIN, env={"DSNB_STANDIN_FAIL": "ValueError: cannot load tiny_mlp"})
    with ClusterSim(emulator, NAMESPACE) as sim, make_cluster(emulator, "statefulset", cancel_wait=20) as cluster:
        with pytest.raises(JobFailed) as info:
            cluster.serve(spec, wait=60)
        status = info.value.status
        assert status.failed_rank == 0 and "ValueError: cannot load tiny_mlp" in "\n".join(status.last_lines)
        [listed] = cluster.endpoints()
        assert listed.state == JobState.FAILED
        assert leftovers(emulator, sim, listed.name) == []


@needs_sandbox
@pytest.mark.deepspeed
def test_the_real_server_answers_through_the_pod_port(emulator) -> None:  # noqa: F811
    """dsnb's own ``python -m dsnb.runtime.server`` (tiny MLP, DeepSpeed on CPU) in the rendered pod: the
    ``/readyz`` probe turns the pod Ready, a request with the token from the Secret is answered."""
    pytest.importorskip("deepspeed")
    port = free_port()
    spec = serve_spec(working_dir=str(Path(__file__).parent / "serving_code"), port=port, token=TOKEN)
    with ClusterSim(emulator, NAMESPACE) as sim, \
            make_cluster(emulator, "statefulset", cancel_wait=30, serve_url=f"http://127.0.0.1:{port}") as cluster:
        endpoint = cluster.serve(spec, wait=120)
        assert endpoint.status().message.startswith(f"ready: rank 0 (pod {endpoint.name}-0) passes its readiness probe")
        answer = endpoint.predict({"inputs": [[0.0, 1.0, 2.0, 3.0]]})
        assert len(answer["outputs"]) == 1 and len(answer["outputs"][0]) == 3
        assert endpoint.stop().state == JobState.CANCELLED
        assert leftovers(emulator, sim, endpoint.name) == []


def answer_from(network, from_pod: str, to_pod: str, port: int) -> dict:
    """``POST /`` with the token, from one pod's network namespace to another pod's address (as the Service routes)."""
    code = ("import json,sys,urllib.request as u\n"
            "r=u.Request(sys.argv[1],data=b'{\"inputs\": [[1.0, 2.0]]}',method='POST',"
            "headers={'Content-Type':'application/json','Authorization':'Bearer '+sys.argv[2]})\n"
            "print(u.urlopen(r,timeout=10).read().decode())")
    done = subprocess.run(["ip", "netns", "exec", network.namespace(from_pod), sys.executable, "-c", code,
                           f"http://{network.address(to_pod)}:{port}/", TOKEN], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@needs_mpi
@pytest.mark.parametrize("backend", ["mpijob", "trainjob"])
def test_operator_backends_serve_until_stopped(emulator, backend: str) -> None:  # noqa: F811
    """Two nodes of one process each: the Service selects the pod where rank 0 runs and no other."""
    if backend == "mpijob":
        operator = MPIOperatorSim("10.231.31")
    else:
        operator = TrainerSim("10.231.32", yaml.safe_load((FOLDER / "runtime-deepspeed-distributed.yaml").read_text()))
    port = free_port()
    spec = serve_spec(nodes=2, port=port, token=TOKEN, working_dir=STANDIN, env={"DSNB_STANDIN_LOAD_S": "1"})
    with ClusterSim(emulator, NAMESPACE, controllers=[operator], netns_for=operator.netns_for) as sim, \
            make_cluster(emulator, backend, cancel_wait=20) as cluster:
        endpoint, seen = serve_until_running(cluster, spec)
        name = endpoint.name
        # Hosts on the job's network. Trainer v2.3.0's stock runtime lists the node before the launcher, and
        # Open MPI runs rank 0 on mpirun's own node anyway: the launcher (its pod name adds a random part).
        rank0_host, other = (f"{name}-worker-0", f"{name}-launcher") if backend == "mpijob" else (f"{name}-launcher-0-0", f"{name}-node-0-0")
        rank0 = operator.pod_name(rank0_host)
        assert any(m == f"loading the model: rank 0 (pod {rank0}) has not reported ready yet"
                   for s, m in seen if s == JobState.STARTING), seen
        assert seen[-1][1] == f"ready: rank 0 (pod {rank0}) answers on port {port}"
        pods = sorted(p["metadata"]["name"] for p in emulator.list("v1", "Pod", NAMESPACE, f"dsnb.io/job={name}"))
        assert len(pods) == (3 if backend == "mpijob" else 2), pods  # launcher and two workers; the launcher and node 0
        assert answer_from(operator.networks[name], other, rank0_host, port) == {"outputs": [[1.0, 2.0]], "rank": 0}
        check_lifecycle(emulator, sim, cluster, endpoint, port, rank0)
