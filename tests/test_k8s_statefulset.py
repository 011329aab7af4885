"""The StatefulSet backend: rendered manifests, and its conversation with the API over real HTTP.

Manifests are validated against the Kubernetes schema in strict mode. The conversation runs
against the in-process API emulator, with ``ClusterSim`` playing the controllers and the
kubelet: watch resync after 410 Gone, dropped log streams, failing and stuck pods, cancel,
attach from a fresh Cluster, ownerReferences, and undoing a half-made submit.
"""

from __future__ import annotations

import base64
import json
import time

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

from helpers import REPO, wait_until  # noqa: E402
from k8s.fixtures import IMAGE, NAMESPACE, emulator, leftovers, make_cluster, sim, workload  # noqa: E402, F401
from k8s.sandbox import sandbox_problem  # noqa: E402
from k8s.sim import ClusterSim  # noqa: E402

from dsnb import ClusterError, InvalidSpecError, JobFailed, JobSpec, JobState, Resources  # noqa: E402
from dsnb.backends.kubernetes.pod_options import PodOptions  # noqa: E402
from dsnb.runtime.pod_entry import peer_names  # noqa: E402

K8S_VERSION = kubernetes_validate.utils.latest_version()
needs_sandbox = pytest.mark.skipif(sandbox_problem() is not None, reason=sandbox_problem() or "")


def render(**fields) -> tuple[object, list[dict]]:
    from dsnb import Cluster

    options = fields.pop("pod_options", None)
    cluster = Cluster("statefulset", namespace=NAMESPACE, pod_options=options)
    entry = {} if "command" in fields else {"script": "train.py"}
    spec = JobSpec(**{"name": "tiny-gpt", **entry, "image": "ghcr.io/org/train:1", **fields})
    plan = cluster.dryrun(spec)
    return plan, list(yaml.safe_load_all(plan.to_yaml()))


# -- rendering ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fields", [
    {},
    {"nodes": 4, "procs_per_node": 8, "resources": Resources(cpu=32, memory="256Gi", gpus=8), "timeout": 3600,
     "env": {"HF_TOKEN": "hf_secret_value", "NCCL_DEBUG": "INFO"}, "max_restarts": 2,
     "deepspeed": {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}},
     "pod_options": PodOptions(service_account="trainer", checkpoint_pvc="ckpt", image_pull_secrets=["regcred"],
                               tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])},
    {"command": ["python", "-m", "trainer.main"], "args": ["--lr", "1e-4"], "nodes": 2},
    {"working_dir": str(REPO / "examples" / "tiny_gpt"), "nodes": 2},  # shipped in ConfigMap <job>-code
], ids=["defaults", "gpus-secrets-options", "command", "shipped-working-dir"])
def test_every_manifest_validates_strictly(fields) -> None:
    plan, documents = render(**fields)
    assert [d["kind"] for d in documents][0] == "ConfigMap" and documents[-1]["kind"] == "StatefulSet"
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
        assert document["metadata"]["namespace"] == NAMESPACE
        assert document["metadata"]["labels"]["dsnb.io/job"] == plan.name
        assert "ownerReferences" not in document["metadata"]  # a uid exists only once the record is created
    assert "hf_secret_value" not in str(plan) and "hf_secret_value" not in plan.to_yaml()


def test_the_statefulset_and_headless_service_wire_the_pods_together() -> None:
    plan, documents = render(nodes=3, procs_per_node=2)
    kinds = {d["kind"]: d for d in documents}
    service, stateful_set = kinds["Service"], kinds["StatefulSet"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert stateful_set["spec"]["podManagementPolicy"] == "Parallel"
    assert stateful_set["spec"]["replicas"] == 3 and stateful_set["spec"]["serviceName"] == service["metadata"]["name"]
    template = stateful_set["spec"]["template"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert stateful_set["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    container = template["spec"]["containers"][0]
    master = peer_names(3, plan.name, plan.name, NAMESPACE, "cluster.local")[0]
    assert master == f"{plan.name}-0.{plan.name}.{NAMESPACE}.svc.cluster.local"
    assert container["args"][:6] == ["torchrun", "--nnodes=3", "--nproc_per_node=2", "--node_rank={node_rank}",
                                     f"--master_addr={master}", "--master_port=29500"]
    env = {e["name"]: e.get("value") or e["valueFrom"] for e in container["env"]}
    assert env["DSNB_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["GLOO_SOCKET_IFNAME"] == "eth0" and env["DS_ACCELERATOR"] == "cpu"
    record = kinds["ConfigMap"]
    assert record["data"]["entry.py"].startswith('"""The entry point')
    assert json.loads(record["data"]["spec.json"])["nodes"] == 3


def test_secret_env_goes_into_a_secret_referenced_by_the_pods() -> None:
    plan, documents = render(env={"HF_TOKEN": "hf_secret_value", "NCCL_DEBUG": "WARN"})
    secret = next(d for d in documents if d["kind"] == "Secret")
    assert secret["stringData"] == {"HF_TOKEN": "***"}
    assert "hf_secret_value" not in repr(plan) and "hf_secret_value" not in str(plan.manifests)
    assert plan.extra["secret_values"] == {f"{plan.name}-env": {"HF_TOKEN": "hf_secret_value"}}  # what apply creates
    container = documents[-1]["spec"]["template"]["spec"]["containers"][0]
    token = next(e for e in container["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": f"{plan.name}-env", "key": "HF_TOKEN"}
    assert json.loads(documents[0]["data"]["spec.json"])["env"]["HF_TOKEN"] == "***"


def test_bad_input_is_refused_before_anything_is_made() -> None:
    with pytest.raises(InvalidSpecError, match="image"):
        render(image=None)
    with pytest.raises(InvalidSpecError, match="too long for a StatefulSet"):
        render(name="n" * 50)
    with pytest.raises(InvalidSpecError, match="launcher"):
        from dsnb import Cluster

        Cluster("statefulset", launcher="mpirun")


def test_deepspeed_launcher_uses_a_hostfile_without_ssh() -> None:
    from dsnb import Cluster

    plan = Cluster("statefulset", namespace=NAMESPACE, launcher="deepspeed").dryrun(
        JobSpec(name="ds", script="train.py", nodes=2, procs_per_node=4, image="img:1"))
    args = plan.manifests[-1]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:4] == ["deepspeed", "--hostfile={hostfile}", "--no_ssh", "--node_rank={node_rank}"]


def test_dryrun_needs_no_cluster(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    from dsnb import Cluster

    plan = Cluster("statefulset").dryrun(JobSpec(name="a", script="t.py", image="img:1"))
    assert plan.manifests[0]["metadata"]["namespace"] == "default"
    with pytest.raises(ClusterError, match="no such file"):
        Cluster("statefulset").jobs()


# -- the API conversation ----------------------------------------------------------------------

def counting_script(count: int, delay: float) -> list[str]:
    code = f"import time\nfor i in range({count}):\n    print('line', i, flush=True)\n    time.sleep({delay})\n"
    return ["python3", "-u", "-c", code]


@needs_sandbox
def test_a_dropped_log_stream_loses_and_repeats_nothing(emulator, sim) -> None:  # noqa: F811
    with make_cluster(emulator) as cluster:
        job = cluster.submit(JobSpec(name="count", command=counting_script(60, 0.05), procs_per_node=1, image="img:1"))
        seen = []
        for line in job.logs(follow=True, rank=0):
            seen.append(line.text)
            if len(seen) in (5, 20, 35):
                emulator.drop_log_streams()
        assert job.status().state == JobState.SUCCEEDED
        assert seen == [f"line {i}" for i in range(60)]
        followers = cluster.backend._followers.get(job.name, {})
        assert not followers  # stopped once the job ended
        reopened = [r for r in emulator.requests if "/log?" in r[1] and "follow=true" in r[1]]
        assert len(reopened) >= 2  # the stream was opened again after being cut


@needs_sandbox
def test_watch_resyncs_after_410_and_never_polls_pods(emulator, sim) -> None:  # noqa: F811
    with make_cluster(emulator) as cluster:
        job = cluster.submit(workload("sleep"))
        wait_until(lambda: job.status().state == JobState.RUNNING, timeout=60)
        informer = cluster.backend._informer("pods")
        emulator.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "unrelated", "namespace": NAMESPACE}})
        emulator.compact()
        emulator.drop_watches()
        wait_until(lambda: informer.resyncs >= 1, timeout=20)
        job.cancel()
        # The cache followed the deletion after the resync.
        assert informer.items(lambda p: p["metadata"]["labels"].get("dsnb.io/job") == job.name) == []
        pod_reads = [path for method, path in emulator.requests
                     if method == "GET" and "/pods/" in path and "/log" not in path]
        assert pod_reads == []  # status never reads a pod directly
        lists = [path for method, path in emulator.requests
                 if method == "GET" and path.startswith(f"/api/v1/namespaces/{NAMESPACE}/pods?") and "watch=true" not in path]
        assert len(lists) == 1 + informer.resyncs


@needs_sandbox
def test_a_pod_that_cannot_pull_its_image_fails_the_job_and_is_removed(emulator) -> None:  # noqa: F811
    with ClusterSim(emulator, NAMESPACE, image_pull_error="pull access denied for img, repository does not exist") as sim_:
        with make_cluster(emulator) as cluster:
            job = cluster.submit(workload("ok"))
            with pytest.raises(JobFailed) as info:
                job.wait(timeout=30)
            message = str(info.value)
            assert "cannot pull" in message and "image_pull_secrets" in message
            assert leftovers(emulator, sim_, job.name) == []


@needs_sandbox
def test_an_unschedulable_pod_keeps_the_job_pending_with_the_reason(emulator) -> None:  # noqa: F811
    reason = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    with ClusterSim(emulator, NAMESPACE, unschedulable=reason) as sim_:
        with make_cluster(emulator) as cluster:
            job = cluster.submit(workload("ok"))
            wait_until(lambda: "nvidia.com/gpu" in job.status().message, timeout=30)
            status = job.status()
            assert status.state == JobState.PENDING and "GPU Operator" in status.message
            assert job.cancel().state == JobState.CANCELLED
            assert leftovers(emulator, sim_, job.name) == []


def test_a_pod_waiting_for_its_volume_says_so_from_its_events(emulator) -> None:  # noqa: F811
    with ClusterSim(emulator, NAMESPACE, hold=True) as sim_:
        with make_cluster(emulator, pod_options=PodOptions(checkpoint_pvc="ckpt")) as cluster:
            job = cluster.submit(workload("ok"))
            wait_until(lambda: emulator.get("v1", "Pod", NAMESPACE, f"{job.name}-0") is not None, timeout=10)
            emulator.create({"apiVersion": "v1", "kind": "Event", "metadata": {"name": f"{job.name}-0.1", "namespace": NAMESPACE},
                             "involvedObject": {"kind": "Pod", "name": f"{job.name}-0", "namespace": NAMESPACE},
                             "reason": "FailedMount", "type": "Warning", "lastTimestamp": "2026-11-28T10:00:00Z",
                             "message": 'MountVolume.SetUp failed for volume "checkpoints": persistentvolumeclaim "ckpt" not found'})
            wait_until(lambda: "cannot mount a volume" in job.status().message, timeout=15)
            assert job.status().state in (JobState.PENDING, JobState.STARTING)
            assert "checkpoint_pvc" in job.status().message
            event_lists = [path for method, path in emulator.requests if method == "GET" and "/events" in path]
            # Warnings only, and of this job's objects only: never every event of the namespace
            assert event_lists and all("fieldSelector=type%3DWarning%2CinvolvedObject.name%3D" in path for path in event_lists)
            assert any(path.endswith(f"involvedObject.name%3D{job.name}-0") for path in event_lists)
            job.cancel()
            assert leftovers(emulator, sim_, job.name) == []


@needs_sandbox
def test_attach_from_a_fresh_cluster_to_a_running_job(emulator, sim) -> None:  # noqa: F811
    with make_cluster(emulator) as first:
        job = first.submit(workload("sleep"))
        started = set()
        for line in job.logs(follow=True):  # until both ranks have started: they print in no set order
            if line.text.startswith("started"):
                started.add(line.text)
                if len(started) == 2:
                    break
    with make_cluster(emulator) as second:
        assert job.name in [s.name for s in second.jobs()]
        again = second.attach(job.name)
        assert again.status().state == JobState.RUNNING
        assert again.spec.world_size == 2 and again.spec.image == IMAGE
        texts = [line.text for line in again.logs()]
        assert "started rank 0" in texts and "started rank 1" in texts
        assert again.cancel().state == JobState.CANCELLED
    with make_cluster(emulator) as third:
        assert third.attach(job.name).status().state == JobState.CANCELLED
    assert leftovers(emulator, sim, job.name) == []


@needs_sandbox
def test_everything_is_owned_by_the_record(emulator, sim) -> None:  # noqa: F811
    with make_cluster(emulator) as cluster:
        job = cluster.submit(workload("sleep", env={"API_TOKEN": "tok"}))
        wait_until(lambda: job.status().state == JobState.RUNNING, timeout=60)
        record = emulator.get("v1", "ConfigMap", NAMESPACE, job.name)
        owned = [(api, kind) for api, kind in (("v1", "Service"), ("apps/v1", "StatefulSet"), ("v1", "Secret"))
                 if emulator.list(api, kind, NAMESPACE, f"dsnb.io/job={job.name}")[0]["metadata"]["ownerReferences"][0]["uid"]
                 == record["metadata"]["uid"]]
        assert len(owned) == 3
        secret = emulator.list("v1", "Secret", NAMESPACE, f"dsnb.io/job={job.name}")[0]
        stored = secret.get("stringData") or {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert stored == {"API_TOKEN": "tok"}
        emulator.delete("v1", "ConfigMap", NAMESPACE, job.name)  # what `kubectl delete configmap <job>` does
        assert leftovers(emulator, sim, job.name) == []


def test_a_refused_create_undoes_what_was_made(emulator) -> None:  # noqa: F811
    with make_cluster(emulator) as cluster:
        plan = cluster.dryrun(workload("ok"))
        emulator.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": plan.name, "namespace": NAMESPACE}})
        with pytest.raises(ClusterError, match="Service"):
            cluster.backend.apply(plan)
        assert emulator.get("v1", "ConfigMap", NAMESPACE, plan.name) is None
        assert plan.name not in [s.name for s in cluster.jobs()]


def test_an_unreachable_api_is_a_clear_error() -> None:
    from kubernetes import client

    from dsnb import Cluster

    configuration = client.Configuration(host="http://127.0.0.1:9")
    import dsnb.backends.kubernetes.backend as backend_module
    backend_module.SYNC_TIMEOUT_S, saved = 2, backend_module.SYNC_TIMEOUT_S
    try:
        with Cluster("statefulset", namespace=NAMESPACE, configuration=configuration) as cluster:
            started = time.monotonic()
            with pytest.raises(ClusterError, match="did not answer"):
                cluster.jobs()
            assert time.monotonic() - started < 10
    finally:
        backend_module.SYNC_TIMEOUT_S = saved


@needs_sandbox
def test_a_finished_job_keeps_its_logs_and_metrics_for_a_later_session(emulator, sim) -> None:  # noqa: F811
    with make_cluster(emulator) as cluster:
        job = cluster.submit(workload("ok"))
        job.wait(timeout=60)
    with make_cluster(emulator) as later:
        again = later.attach(job.name)
        assert again.status().state == JobState.SUCCEEDED
        assert [(s.step, s.value) for s in again.metrics("loss", rank=1)] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
        assert "rank 1 done" in [line.text for line in again.logs(rank=1)]


@needs_sandbox
def test_the_command_line_runs_and_lists_a_statefulset_job(emulator, sim, tmp_path) -> None:  # noqa: F811
    import io

    from rich.console import Console

    from dsnb.console.cli import main

    kubeconfig = emulator.write_kubeconfig(tmp_path / "config", namespace=NAMESPACE)

    def run(*argv: str) -> tuple[int, str]:
        out = io.StringIO()
        code = main(list(argv), console=Console(file=out, width=200))
        return code, out.getvalue()

    common = ("--backend", "statefulset", "--kubeconfig", kubeconfig)
    code, text = run("dryrun", "workload.py", "ok", "--procs", "2", "--image", IMAGE, *common)
    assert code == 0 and "kind: StatefulSet" in text and f"image: {IMAGE}" in text
    code, text = run("run", "workload.py", "--procs", "2", "--image", IMAGE, "--working-dir", str(workload("ok").working_dir),
                     "--name", "cli", *common, "--", "ok")
    assert code == 0, text
    code, text = run("jobs", *common)
    assert code == 0 and "cli-" in text and "SUCCEEDED" in text
    with make_cluster(emulator) as listing:
        name = listing.jobs()[0].name
    code, text = run("logs", name, "--rank", "1", *common)
    assert code == 0 and "[rank 1] hello from rank 1 of 2" in text


def test_a_job_is_found_right_after_submit_while_the_watch_lags(emulator) -> None:  # noqa: F811
    """The API answers a create before its watchers hear of it: status, jobs and attach must not say "not found"."""
    with make_cluster(emulator) as cluster:
        assert cluster.jobs() == []  # the watch caches are running
        emulator.watch_delay = 1.0
        job = cluster.submit(workload("ok"))
        assert job.status().state == JobState.PENDING
        assert job.name in [s.name for s in cluster.jobs()]
        assert cluster.attach(job.name).spec.name == job.name
        emulator.watch_delay = 0.0
        job.cancel()
