"""What a 512-node job costs the StatefulSet backend: rendering, validating, and status from watch events.

Three measurements, each the median of ``--reps`` repetitions within one invocation, each
next to an anchor measured in the same run:

- render: ``StatefulSetBackend(namespace="ml").dryrun(spec)`` then ``plan.to_yaml()`` for a
  512-node, 8-GPU-per-node ZeRO-3 job; anchor: ``yaml.safe_dump_all`` of the same manifests
  (the cost of merely writing them out). The first call in the process is reported apart:
  it builds the kubernetes client's model classes.
- validate: ``kubernetes_validate.validate(m, latest, strict=True)`` of every manifest of
  the plan; anchor: loading the JSON schema files those calls read (kubernetes-validate
  reads them again on every call). The first call is reported apart (cold file cache).
- status: an in-process API emulator (``tests/k8s/emulator.py``) holds 512 pods of the job;
  dsnb's ``Informer`` lists and watches them over HTTP, as the backend does. The pods then
  go through three status patches each (scheduled, running, finished and restarted, with
  the termination message the pods' entry writes): 1,536 watch events. Measured: how long
  after the last patch the informer has applied every event, the informer thread's CPU
  time per event, and one ``compute_status(...)`` over the 512 cached pods (which must say
  SUCCEEDED with 4,096 replicas); anchor: ``json.loads`` of the same 512 pods.

The table is printed and written to ``benchmarks/results/k8s_scale.md``; the exit status
is 1 when a target (under a second for render + validate, and for status) is missed.

Example::

    python benchmarks/bench_k8s_scale.py --nodes 512 --reps 5
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from machine import describe

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the API emulator lives with the tests

RESULTS = ROOT / "benchmarks" / "results" / "k8s_scale.md"
NAMESPACE = "ml"
PROCS_PER_NODE = 8
TARGET_S = 1.0
PHASES = ("scheduled", "running", "finished")
WAIT_S = 60.0
ZERO3 = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 8,
    "gradient_clipping": 1.0,
    "bf16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}},
    "zero_optimization": {
        "stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 500_000_000,
        "stage3_prefetch_bucket_size": 500_000_000, "stage3_param_persistence_threshold": 1_000_000,
        "stage3_max_live_parameters": 1_000_000_000, "stage3_max_reuse_distance": 1_000_000_000,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def median(values: list[float]) -> float:
    return statistics.median(values)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# -- render and validate --------------------------------------------------------------------------------


def make_spec(nodes: int) -> Any:
    from dsnb import JobSpec, Resources

    return JobSpec(name="big", script="train.py", nodes=nodes, procs_per_node=PROCS_PER_NODE, image="img:1",
                   resources=Resources(gpus=8, cpu=64, memory="512Gi"), deepspeed=ZERO3)


def render_once(backend: Any, spec: Any) -> tuple[Any, str]:
    plan = backend.dryrun(spec)
    return plan, plan.to_yaml()


def schema_files(manifests: list[dict[str, Any]], version: str) -> list[Any] | None:
    """The schema files kubernetes-validate reads for these manifests (None if its layout is not the known one)."""
    import re

    base = resources.files("kubernetes_validate").joinpath("kubernetes-json-schema", f"v{version}-local-strict")
    files = []
    for m in manifests:
        api_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", m["apiVersion"])
        files += [base.joinpath(f"{m['kind'].lower()}-{api_version}.json"), base.joinpath("_definitions.json")]
    return files if all(f.is_file() for f in files) else None


def load_all(files: list[Any]) -> list[Any]:
    return [json.loads(f.read_text()) for f in files]


def bench_render_validate(nodes: int, reps: int) -> tuple[dict[str, Any], Any]:
    # First, so that the import is timed alone (kubernetes-validate shares some of its imports).
    cold_import, module = timed(importlib.import_module, "dsnb.backends.kubernetes.statefulset")
    import kubernetes_validate

    backend = module.StatefulSetBackend(namespace=NAMESPACE)
    spec = make_spec(nodes)
    version = kubernetes_validate.utils.latest_version()
    cold_render, (plan, text) = timed(render_once, backend, spec)

    def validate_all(manifests: list[dict[str, Any]]) -> None:
        for m in manifests:
            kubernetes_validate.validate(m, version, strict=True)

    cold_validate, _ = timed(validate_all, plan.manifests)
    files = schema_files(plan.manifests, version)
    render, anchor, validate, loading = [], [], [], []
    for _ in range(reps):
        t, (plan, text) = timed(render_once, backend, spec)
        render.append(t)
        anchor.append(timed(yaml.safe_dump_all, plan.manifests, sort_keys=False)[0])
        validate.append(timed(validate_all, plan.manifests)[0])
        if files is not None:
            loading.append(timed(load_all, files)[0])
    stateful_set = plan.manifests[-1]
    assert [m["kind"] for m in plan.manifests] == ["ConfigMap", "Service", "StatefulSet"], plan.manifests
    assert stateful_set["spec"]["replicas"] == nodes
    return {
        "version": version, "yaml_bytes": len(text),
        "cold_import": cold_import, "cold_render": cold_render, "cold_validate": cold_validate,
        "render": render, "render_anchor": anchor, "validate": validate, "schema_loading": loading,
    }, plan


# -- status from watch events ---------------------------------------------------------------------------


def stamp(base: datetime, seconds: float) -> str:
    return (base + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_manifest(plan: Any, node: int) -> dict[str, Any]:
    """Pod ``<job>-<node>`` as the StatefulSet controller makes it from the plan's template."""
    name = plan.name
    template = plan.manifests[-1]["spec"]["template"]
    pod_name = f"{name}-{node}"
    labels = {**template["metadata"]["labels"], "statefulset.kubernetes.io/pod-name": pod_name,
              "apps.kubernetes.io/pod-index": str(node)}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": NAMESPACE, "labels": labels},
            "spec": {**template["spec"], "hostname": pod_name, "subdomain": name}}


def status_patch(phase: str, node: int, base: datetime) -> dict[str, Any]:
    """What the scheduler and the kubelet report for one node at one phase."""
    scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp(base, 1)}
    if phase == "scheduled":
        return {"phase": "Pending", "hostIP": f"10.0.{node // 250}.{node % 250 + 1}", "conditions": [scheduled]}
    container = {"name": "dsnb", "image": "img:1", "imageID": "img@sha256:" + "0" * 64,
                 "containerID": f"containerd://{node:064x}", "ready": True, "started": True}
    if phase == "running":
        return {"phase": "Running", "podIP": f"10.1.{node // 250}.{node % 250 + 1}", "startTime": stamp(base, 2),
                "conditions": [scheduled, {"type": "Ready", "status": "True", "lastTransitionTime": stamp(base, 5)}],
                "containerStatuses": [{**container, "restartCount": 0, "state": {"running": {"startedAt": stamp(base, 5)}},
                                       "lastState": {}}]}
    outcome = {"node": node, "exit_code": 0, "failed_rank": None, "rank_exit_code": 0, "message": "", "last_lines": []}
    finished = {"exitCode": 0, "reason": "Completed", "startedAt": stamp(base, 5), "finishedAt": stamp(base, 3600 + node % 7),
                "message": json.dumps(outcome), "containerID": f"containerd://{node:064x}"}
    # restartPolicy Always: the finished container is started again, its run kept in lastState.
    return {"containerStatuses": [{**container, "containerID": f"containerd://{node + 10**6:064x}", "restartCount": 1,
                                   "state": {"running": {"startedAt": stamp(base, 3601 + node % 7)}},
                                   "lastState": {"terminated": finished}}]}


def thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds a thread has used so far (Linux), or NaN where that cannot be read."""
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident or 0))
    except (AttributeError, OSError):
        return float("nan")


def wait_version(informer: Any, target: int) -> None:
    deadline = time.monotonic() + WAIT_S
    seen = informer.version
    while seen < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the informer applied {seen} of {target} events within {WAIT_S:g} s ({informer.error})")
        seen = informer.wait_for_change(seen, 1.0)


def bench_status(nodes: int, reps: int) -> dict[str, Any]:
    from k8s.emulator import KubeEmulator

    from dsnb import JobState
    from dsnb.backends.kubernetes.backend import CREATED
    from dsnb.backends.kubernetes.connection import connect
    from dsnb.backends.kubernetes.informer import Informer
    from dsnb.backends.kubernetes.labels import JOB, MANAGED_SELECTOR
    from dsnb.backends.kubernetes.statefulset import StatefulSetBackend

    backend = StatefulSetBackend(namespace=NAMESPACE)
    spec = make_spec(nodes)
    before = set(threading.enumerate())
    emulator = KubeEmulator(namespaces=(NAMESPACE,), history=4 * nodes * (len(PHASES) + 2)).start()
    conn = connect(configuration=emulator.configuration(), namespace=NAMESPACE)
    informer = Informer(conn.core.list_namespaced_pod, NAMESPACE, label_selector=MANAGED_SELECTOR)
    result: dict[str, list[float]] = {k: [] for k in ("create", "patch", "drain", "pipeline", "cpu_per_event",
                                                      "status", "status_anchor")}
    try:
        informer.start()
        if not informer.wait_synced(WAIT_S):
            raise RuntimeError(f"the informer did not list the pods ({informer.error})")
        (watcher,) = [t for t in threading.enumerate() if t.name.startswith("dsnb-informer-")]
        base = datetime.now(timezone.utc).replace(microsecond=0)
        for _ in range(reps):
            plan = backend.dryrun(spec)  # a fresh job name each time
            name, created = plan.name, float(plan.manifests[0]["metadata"]["annotations"][CREATED])
            pods = [pod_manifest(plan, node) for node in range(nodes)]
            v0 = informer.version
            start = time.perf_counter()
            for pod in pods:
                emulator.create(pod)
            wait_version(informer, v0 + nodes)
            result["create"].append(time.perf_counter() - start)

            v1, cpu0 = informer.version, thread_cpu(watcher)
            start = time.perf_counter()
            for phase in PHASES:
                for node in range(nodes):
                    emulator.patch_status("v1", "Pod", NAMESPACE, f"{name}-{node}", status_patch(phase, node, base))
            last_patch = time.perf_counter()
            wait_version(informer, v1 + len(PHASES) * nodes)
            applied = time.perf_counter()
            events = informer.version - v1
            result["patch"].append(last_patch - start)
            result["drain"].append(applied - last_patch)
            result["pipeline"].append(applied - start)
            result["cpu_per_event"].append((thread_cpu(watcher) - cpu0) / events)

            cached = informer.items(lambda p, n=name: (p["metadata"].get("labels") or {}).get(JOB) == n)
            assert len(cached) == nodes and events == len(PHASES) * nodes, (len(cached), events)
            text = json.dumps(cached)
            for _ in range(3):  # interleaved, so that noise hits both alike
                t, status = timed(backend.compute_status, name, plan.spec, created, cached)
                result["status"].append(t)
                result["status_anchor"].append(timed(json.loads, text)[0])
            assert status.state is JobState.SUCCEEDED, status
            assert len(status.replicas) == nodes * PROCS_PER_NODE, len(status.replicas)
            assert all(r.state is JobState.SUCCEEDED and r.exit_code == 0 for r in status.replicas)
            result.setdefault("pods_json_bytes", []).append(len(text))

            v2 = informer.version
            for pod in pods:
                emulator.delete("v1", "Pod", NAMESPACE, pod["metadata"]["name"])
            wait_version(informer, v2 + nodes)
        result["resyncs"] = [informer.resyncs]
    finally:
        informer.stop()
        conn.close()
        emulator.stop()
    deadline = time.monotonic() + 5
    while (leaked := [t for t in threading.enumerate() if t not in before and t.is_alive()]) and time.monotonic() < deadline:
        time.sleep(0.05)
    result["leaked_threads"] = [t.name for t in leaked]  # type: ignore[misc]
    return result


# -- report ---------------------------------------------------------------------------------------------


def machine() -> str:
    import kubernetes

    import dsnb
    return describe(**{"kubernetes client": kubernetes.__version__, "PyYAML": yaml.__version__, "dsnb": dsnb.__version__})


def report(nodes: int, reps: int, rv: dict[str, Any], st: dict[str, Any]) -> tuple[str, bool]:
    events = len(PHASES) * nodes
    render, render_anchor = median(rv["render"]), median(rv["render_anchor"])
    validate = median(rv["validate"])
    status, status_anchor = median(st["status"]), median(st["status_anchor"])
    drain, pipeline = median(st["drain"]), median(st["pipeline"])
    rows = [
        "| measurement | median | anchor (same run) | ratio |",
        "| --- | --- | --- | --- |",
        f"| render: `dryrun` + `to_yaml` ({rv['yaml_bytes'] / 1024:.0f} KiB of YAML) | {ms(render)} "
        f"| `yaml.safe_dump_all` of the manifests: {ms(render_anchor)} | {render / render_anchor:.2f}× |",
        f"| validate: 3 manifests, strict, Kubernetes {rv['version']} | {ms(validate)} "
        + (f"| loading the schema files it reads: {ms(median(rv['schema_loading']))} "
           f"| {validate / median(rv['schema_loading']):.2f}× |" if rv["schema_loading"] else "| - | - |"),
        f"| render + validate | {ms(render + validate)} | | |",
        f"| status: `compute_status` over {nodes} cached pods ({nodes * PROCS_PER_NODE} replicas) | {ms(status)} "
        f"| `json.loads` of the same pods ({median(st['pods_json_bytes']) / 2**20:.1f} MiB): {ms(status_anchor)} "
        f"| {status / status_anchor:.2f}× |",
        f"| watch: informer done after the last of {events} status patches | {ms(drain)} | | |",
        f"| watch: first patch → every event applied ({events / pipeline:,.0f} events/s) | {ms(pipeline)} "
        f"| patching alone, in the emulator: {ms(median(st['patch']))} | {pipeline / median(st['patch']):.2f}× |",
        f"| watch: informer thread CPU per event | {median(st['cpu_per_event']) * 1e6:.0f} µs | | |",
    ]
    first = (f"First calls in the process (not in the medians): importing the backend {ms(rv['cold_import'])}, "
             f"render {ms(rv['cold_render'])} "
             f"(builds the kubernetes client's model classes), validate {ms(rv['cold_validate'])}; "
             f"creating the {nodes} pods and seeing their ADDED events: {ms(median(st['create']))}.")
    ok_render = render + validate < TARGET_S
    ok_status = status < TARGET_S and drain < TARGET_S
    verdict = "PASS" if ok_render and ok_status else "FAIL"
    lines = [f"# Kubernetes StatefulSet backend at scale, {date.today().isoformat()}", "",
             f"Machine: {machine()}.", "",
             f"Job: {nodes} nodes × {PROCS_PER_NODE} ranks, 8 GPUs, ZeRO-3 config; median of {reps} repetitions "
             f"(status: {len(st['status'])} calls).", "",
             *rows, "", first,
             f"Informer resyncs: {st['resyncs'][0]}; threads left after stopping: {', '.join(st['leaked_threads']) or 'none'}.",
             "",
             f"{verdict}: render + validate {ms(render + validate)} (target < {TARGET_S:g} s: {'met' if ok_render else 'NOT met'}); "
             f"status {ms(status)}, events applied {ms(drain)} after the last patch "
             f"(target < {TARGET_S:g} s: {'met' if ok_status else 'NOT met'}).", ""]
    return "\n".join(lines), verdict == "PASS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=512, help="nodes (pods) of the job (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown output (default: %(default)s)")
    args = parser.parse_args(argv)
    wall = time.perf_counter()
    print(f"render and validate, {args.reps} reps ...", flush=True)
    rv, _ = bench_render_validate(args.nodes, args.reps)
    print(f"status from watch events, {args.nodes} pods, {args.reps} reps ...", flush=True)
    st = bench_status(args.nodes, args.reps)
    text, ok = report(args.nodes, args.reps, rv, st)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print()
    print(text)
    print(f"written to {args.out}")
    print(f"benchmark wall time: {time.perf_counter() - wall:.1f} s")
    if st["leaked_threads"]:
        print(f"threads still running: {st['leaked_threads']}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
