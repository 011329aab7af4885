"""The Kubernetes API emulator, exercised only through the official client over HTTP.

Each test pins a behaviour of the real API server that dsnb relies on, so that tests built on
the emulator mean something for real clusters.
"""

from __future__ import annotations

import base64
import json
import queue
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from k8s.emulator import ApiError, KubeEmulator
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

NS = "ml"
MPI = ("kubeflow.org", "v2beta1")


@pytest.fixture
def api(emu: KubeEmulator) -> Iterator[client.ApiClient]:
    with client.ApiClient(emu.configuration()) as api_client:
        yield api_client


@pytest.fixture
def v1(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


def status_of(error: ApiException) -> dict[str, Any]:
    """The Status body of a failed call."""
    body = json.loads(error.body)
    assert body["kind"] == "Status" and body["status"] == "Failure" and body["code"] == error.status
    return body


def config_map(name: str, labels: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}, **extra}, "data": {"k": name}}


def pod(name: str, labels: dict[str, str] | None = None, containers: tuple[str, ...] = ("main",)) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}},
            "spec": {"containers": [{"name": c, "image": "busybox"} for c in containers]}}


def owned_by(obj: Any) -> list[dict[str, Any]]:
    kind = type(obj).__name__.removeprefix("V1")
    api_version = "apps/v1" if kind == "StatefulSet" else "v1"
    return [{"apiVersion": api_version, "kind": kind, "name": obj.metadata.name, "uid": obj.metadata.uid}]


def make_chain(api: client.ApiClient) -> tuple[Any, Any, Any]:
    """ConfigMap owns StatefulSet owns Service."""
    v1, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    owner = v1.create_namespaced_config_map(NS, config_map("owner"))
    sts = apps.create_namespaced_stateful_set(NS, {
        "metadata": {"name": "set", "ownerReferences": owned_by(owner)},
        "spec": {"serviceName": "svc", "selector": {"matchLabels": {"a": "b"}},
                 "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "main", "image": "x"}]}}},
    })
    svc = v1.create_namespaced_service(NS, {"metadata": {"name": "svc", "ownerReferences": owned_by(sts)},
                                            "spec": {"clusterIP": "None", "selector": {"a": "b"}}})
    return owner, sts, svc


def take(count: int, list_function: Any, *args: str, **kwargs: Any) -> list[dict[str, Any]]:
    """The first ``count`` events of a watch (or fewer, if it ends within 5 s)."""
    w, events = watch.Watch(), []
    for event in w.stream(list_function, *args, timeout_seconds=5, **kwargs):
        events.append(event)
        if len(events) == count:
            w.stop()
    return events


def exists(read: Any, *args: str) -> bool:
    try:
        read(*args)
        return True
    except ApiException as e:
        assert e.status == 404
        return False


# -- basics ---------------------------------------------------------------------------------------------


def test_version_discovery_and_keep_alive(api: client.ApiClient, emu: KubeEmulator) -> None:
    version = client.VersionApi(api).get_code()
    assert (version.git_version, version.major, version.minor) == ("v1.32.0", "1", "32")
    assert client.CoreApi(api).get_api_versions().versions == ["v1"]
    groups = {g.name for g in client.ApisApi(api).get_api_versions().groups}
    assert {"apps", "kubeflow.org", "trainer.kubeflow.org", "jobset.x-k8s.io", "ray.io"} <= groups
    for _ in range(20):
        client.CoreV1Api(api).list_namespaced_pod(NS)
    # One handler thread per connection: sequential calls share one keep-alive connection.
    assert len(emu.threads) == 2


def test_create_fills_server_fields(v1: client.CoreV1Api, emu: KubeEmulator) -> None:
    created = v1.create_namespaced_pod(NS, {"metadata": {"generateName": "worker-"}, "spec": pod("x")["spec"],
                                            "status": {"phase": "Running"}})
    meta = created.metadata
    assert re.fullmatch(r"worker-[a-z0-9]{5}", meta.name)
    assert meta.namespace == NS and meta.generation == 1 and meta.resource_version.isdigit() and len(meta.uid) == 36
    assert created.status.phase == "Pending"  # status is the kubelet's to set, not the creator's
    raw = json.loads(v1.read_namespaced_pod(meta.name, NS, _preload_content=False).data)
    assert raw["apiVersion"] == "v1" and raw["kind"] == "Pod"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", raw["metadata"]["creationTimestamp"])
    assert emu.get("v1", "Pod", NS, meta.name)["metadata"]["uid"] == meta.uid

    v1.create_namespaced_config_map(NS, config_map("dry"), dry_run="All")
    assert emu.get("v1", "ConfigMap", NS, "dry") is None


def test_list_selectors(v1: client.CoreV1Api) -> None:
    for name, labels in [("a", {"app": "web", "tier": "front"}), ("b", {"app": "web", "tier": "back"}),
                         ("c", {"app": "db"}), ("d", {})]:
        v1.create_namespaced_config_map(NS, config_map(name, labels))

    def names(**selectors: str) -> list[str]:
        return [c.metadata.name for c in v1.list_namespaced_config_map(NS, **selectors).items]

    assert names() == ["a", "b", "c", "d"]
    assert names(label_selector="app=web") == names(label_selector="app==web") == ["a", "b"]
    assert names(label_selector="app!=web") == ["c", "d"]
    assert names(label_selector="tier") == ["a", "b"]
    assert names(label_selector="!tier") == ["c", "d"]
    assert names(label_selector="tier in (front, side)") == ["a"]
    assert names(label_selector="tier notin (front)") == ["b", "c", "d"]
    assert names(label_selector="app=web,tier!=front") == ["b"]
    assert names(field_selector="metadata.name=c") == ["c"]
    assert names(field_selector="metadata.namespace=default") == []

    raw = json.loads(v1.list_namespaced_config_map(NS, _preload_content=False).data)
    assert raw["kind"] == "ConfigMapList" and raw["apiVersion"] == "v1"
    assert int(raw["metadata"]["resourceVersion"]) >= max(int(i["metadata"]["resourceVersion"]) for i in raw["items"])
    assert [c.metadata.name for c in v1.list_config_map_for_all_namespaces(label_selector="app=db").items] == ["c"]

    v1.delete_collection_namespaced_config_map(NS, label_selector="app=web")
    assert names() == ["c", "d"]


def test_errors_are_status_bodies(v1: client.CoreV1Api) -> None:
    with pytest.raises(ApiException) as missing:
        v1.read_namespaced_config_map("nope", NS)
    body = status_of(missing.value)
    assert (missing.value.status, body["reason"], body["details"]["name"]) == (404, "NotFound", "nope")
    assert body["message"] == 'configmaps "nope" not found'

    v1.create_namespaced_config_map(NS, config_map("once"))
    with pytest.raises(ApiException) as twice:
        v1.create_namespaced_config_map(NS, config_map("once"))
    assert (twice.value.status, status_of(twice.value)["reason"]) == (409, "AlreadyExists")

    with pytest.raises(ApiException) as no_namespace:
        v1.create_namespaced_config_map("elsewhere", config_map("x"))
    assert status_of(no_namespace.value)["message"] == 'namespaces "elsewhere" not found'

    for bad in ({"metadata": {}}, {"metadata": {"name": "Not_A_Name"}}, config_map("x", {"bad key!": "v"})):
        with pytest.raises(ApiException) as invalid:
            v1.create_namespaced_config_map(NS, bad)
        assert (invalid.value.status, status_of(invalid.value)["reason"]) == (422, "Invalid")


# -- updates --------------------------------------------------------------------------------------------


def test_replace_needs_the_current_resource_version(v1: client.CoreV1Api) -> None:
    first = v1.create_namespaced_config_map(NS, config_map("cfg"))
    first.data = {"k": "v2"}
    second = v1.replace_namespaced_config_map("cfg", NS, first)
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
    assert (second.metadata.uid, second.metadata.creation_timestamp) == (first.metadata.uid, first.metadata.creation_timestamp)

    first.data = {"k": "stale"}
    with pytest.raises(ApiException) as stale:
        v1.replace_namespaced_config_map("cfg", NS, first)
    assert (stale.value.status, status_of(stale.value)["reason"]) == (409, "Conflict")

    # A write that changes nothing keeps the version (and sends no watch event).
    same = v1.replace_namespaced_config_map("cfg", NS, second)
    assert same.metadata.resource_version == second.metadata.resource_version


def test_merge_and_json_patches(v1: client.CoreV1Api) -> None:
    v1.create_namespaced_config_map(NS, {"metadata": {"name": "cfg"}, "data": {"a": "1", "b": "2"}})
    # A dict body goes out as application/strategic-merge-patch+json: null deletes a key.
    patched = v1.patch_namespaced_config_map("cfg", NS, {"data": {"a": None, "c": "3"}, "metadata": {"labels": {"x": "y"}}})
    assert patched.data == {"b": "2", "c": "3"} and patched.metadata.labels == {"x": "y"}
    forced = v1.patch_namespaced_config_map("cfg", NS, {"data": {"d": "4"}}, _content_type="application/merge-patch+json")
    assert forced.data == {"b": "2", "c": "3", "d": "4"}

    # A list body goes out as application/json-patch+json.
    ops = [{"op": "replace", "path": "/data/b", "value": "20"}, {"op": "remove", "path": "/data/c"},
           {"op": "add", "path": "/metadata/annotations", "value": {"n/te": "1"}},
           {"op": "copy", "from": "/data/d", "path": "/data/e"}]
    patched = v1.patch_namespaced_config_map("cfg", NS, ops)
    assert patched.data == {"b": "20", "d": "4", "e": "4"} and patched.metadata.annotations == {"n/te": "1"}
    with pytest.raises(ApiException) as failed:
        v1.patch_namespaced_config_map("cfg", NS, [{"op": "test", "path": "/data/b", "value": "nope"}])
    assert failed.value.status == 422

    stale = [{"op": "replace", "path": "/metadata/resourceVersion", "value": "1"}]
    with pytest.raises(ApiException) as conflict:
        v1.patch_namespaced_config_map("cfg", NS, stale)
    assert conflict.value.status == 409


def test_status_subresource(v1: client.CoreV1Api) -> None:
    v1.create_namespaced_pod(NS, pod("p"))
    after = v1.patch_namespaced_pod_status("p", NS, {"status": {"phase": "Running"}, "spec": {"nodeName": "ignored"}})
    assert after.status.phase == "Running" and after.spec.node_name is None

    after = v1.patch_namespaced_pod("p", NS, {"metadata": {"labels": {"l": "1"}}, "status": {"phase": "Failed"}})
    assert after.metadata.labels == {"l": "1"} and after.status.phase == "Running"

    after.status.phase = "Succeeded"
    replaced = v1.replace_namespaced_pod_status("p", NS, after)
    assert replaced.status.phase == "Succeeded" and replaced.metadata.generation == 1


# -- deletion and garbage collection -----------------------------------------------------------------


@pytest.mark.parametrize("policy", [None, "Background", "Foreground"])
def test_delete_collects_dependents(api: client.ApiClient, policy: str | None) -> None:
    v1, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    make_chain(api)
    v1.delete_namespaced_config_map("owner", NS, propagation_policy=policy)
    assert not exists(v1.read_namespaced_config_map, "owner", NS)
    assert not exists(apps.read_namespaced_stateful_set, "set", NS)
    assert not exists(v1.read_namespaced_service, "svc", NS)


def test_orphan_delete_keeps_dependents(api: client.ApiClient) -> None:
    v1, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    _, sts, _ = make_chain(api)
    v1.delete_namespaced_config_map("owner", NS, body=client.V1DeleteOptions(propagation_policy="Orphan"))
    kept = apps.read_namespaced_stateful_set("set", NS)
    assert kept.metadata.owner_references is None
    assert v1.read_namespaced_service("svc", NS).metadata.owner_references[0].uid == sts.metadata.uid

    apps.delete_namespaced_stateful_set("set", NS)
    assert not exists(v1.read_namespaced_service, "svc", NS)


def test_job_delete_orphans_pods_unless_told(api: client.ApiClient, emu: KubeEmulator) -> None:
    batch, v1 = client.BatchV1Api(api), client.CoreV1Api(api)
    for name in ("j1", "j2"):
        job = batch.create_namespaced_job(NS, {"metadata": {"name": name}, "spec": {"template": {"spec": pod("x")["spec"]}}})
        v1.create_namespaced_pod(NS, {**pod(f"{name}-pod"), "metadata": {"name": f"{name}-pod", "ownerReferences": [
            {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job.metadata.uid}]}})
    batch.delete_namespaced_job("j1", NS)
    batch.delete_namespaced_job("j2", NS, propagation_policy="Background")
    assert exists(v1.read_namespaced_pod, "j1-pod", NS) and not exists(v1.read_namespaced_pod, "j2-pod", NS)


# -- watches ----------------------------------------------------------------------------------------------


def test_watch_from_a_list_sees_later_changes_in_order(v1: client.CoreV1Api, emu: KubeEmulator) -> None:
    rv = v1.list_namespaced_pod(NS).metadata.resource_version
    v1.create_namespaced_pod(NS, pod("p"))  # before the watch starts: replayed from history
    seen = []
    w = watch.Watch()
    for event in w.stream(v1.list_namespaced_pod, NS, resource_version=rv, timeout_seconds=5):
        obj = event["object"]
        seen.append((event["type"], obj.metadata.name, int(obj.metadata.resource_version), obj.metadata.labels))
        if event["type"] == "ADDED":
            v1.patch_namespaced_pod("p", NS, {"metadata": {"labels": {"step": "2"}}})
        elif event["type"] == "MODIFIED":
            emu.delete("v1", "Pod", NS, "p")  # a controller's delete is seen like any other
        else:
            w.stop()
    assert [s[:2] for s in seen] == [("ADDED", "p"), ("MODIFIED", "p"), ("DELETED", "p")]
    versions = [s[2] for s in seen]
    assert versions == sorted(versions) and len(set(versions)) == 3
    assert seen[-1][3] == {"step": "2"}  # DELETED carries the last state


def test_watch_without_version_lists_first_and_bookmarks(v1: client.CoreV1Api, emu: KubeEmulator) -> None:
    v1.create_namespaced_pod(NS, pod("a", {"app": "x"}))
    v1.create_namespaced_pod(NS, pod("b"))
    w = watch.Watch()
    started = time.monotonic()
    # A watch that did not end at its timeoutSeconds would fail on the client's read timeout instead.
    events = list(w.stream(v1.list_namespaced_pod, NS, label_selector="app=x", timeout_seconds=1,
                           allow_watch_bookmarks=True, _request_timeout=60))
    assert time.monotonic() - started >= 0.9  # held open until its timeout, not ended early
    assert [(e["type"], e["object"].metadata.name) for e in events[:-1]] == [("ADDED", "a")]
    assert events[-1]["type"] == "BOOKMARK"
    assert w.resource_version == events[-1]["raw_object"]["metadata"]["resourceVersion"]


def test_watch_from_a_compacted_version_raises_410(v1: client.CoreV1Api, emu: KubeEmulator) -> None:
    rv = v1.list_namespaced_pod(NS).metadata.resource_version
    v1.create_namespaced_pod(NS, pod("p"))
    emu.compact()
    for kwargs in ({"timeout_seconds": 5}, {}):  # without a timeout, Watch retries once, then raises too
        with pytest.raises(ApiException) as gone:
            list(watch.Watch().stream(v1.list_namespaced_pod, NS, resource_version=rv, **kwargs))
        assert gone.value.status == 410
        assert gone.value.reason.startswith(f"Expired: too old resource version: {rv} (")
    fresh = v1.list_namespaced_pod(NS).metadata.resource_version
    v1.create_namespaced_pod(NS, pod("q"))
    assert [e["object"].metadata.name for e in take(1, v1.list_namespaced_pod, NS, resource_version=fresh)] == ["q"]


def test_history_is_bounded() -> None:
    with KubeEmulator(namespaces=(NS,), history=3) as small, client.ApiClient(small.configuration()) as api:
        v1 = client.CoreV1Api(api)
        rv = v1.list_namespaced_config_map(NS).metadata.resource_version
        for i in range(4):  # the namespace's event and c0 fall out of the history
            v1.create_namespaced_config_map(NS, config_map(f"c{i}"))
        with pytest.raises(ApiException) as gone:
            list(watch.Watch().stream(v1.list_namespaced_config_map, NS, resource_version=rv, timeout_seconds=5))
        assert gone.value.status == 410
        recent = str(int(rv) + 2)
        events = take(2, v1.list_namespaced_config_map, NS, resource_version=recent)
        assert [e["object"].metadata.name for e in events] == ["c2", "c3"]

        # A watch with more events queued than a watcher may hold is sent to list again, too.
        small.watch_queue_limit = 1
        with pytest.raises(ApiException) as overflow:
            take(2, v1.list_namespaced_config_map, NS, resource_version=recent)
        assert overflow.value.status == 410


def test_concurrent_writes_reach_a_watch_in_order(api: client.ApiClient, v1: client.CoreV1Api) -> None:
    rv = v1.list_namespaced_config_map(NS).metadata.resource_version
    v1.create_namespaced_config_map(NS, config_map("start"))

    def write(worker: int) -> None:
        with client.ApiClient(api.configuration) as own:
            for i in range(20):
                client.CoreV1Api(own).create_namespaced_config_map(NS, config_map(f"w{worker}-{i}"))

    writers = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    w, seen = watch.Watch(), []
    for event in w.stream(v1.list_namespaced_config_map, NS, resource_version=rv, timeout_seconds=10):
        seen.append(event["object"])
        if len(seen) == 1:  # the watch is open: write from four connections at once
            for t in writers:
                t.start()
        if len(seen) == 81:
            w.stop()
    for t in writers:
        t.join(10)
    versions = [int(o.metadata.resource_version) for o in seen]
    assert versions == sorted(versions) and len({o.metadata.name for o in seen}) == 81


def test_drop_watches_ends_streams(v1: client.CoreV1Api, emu: KubeEmulator) -> None:
    v1.create_namespaced_pod(NS, pod("a"))
    events: queue.Queue[str] = queue.Queue()

    def consume(**kwargs: Any) -> None:
        for event in watch.Watch().stream(v1.list_namespaced_pod, NS, **kwargs):
            events.put(f"{event['type']} {event['object'].metadata.name}")
        events.put("END")

    reader = threading.Thread(target=consume, kwargs={"timeout_seconds": 30})
    reader.start()
    assert events.get(timeout=5) == "ADDED a"
    emu.drop_watches()
    reader.join(5)
    assert not reader.is_alive() and events.get(timeout=1) == "END"

    # Without timeout_seconds, Watch resumes by itself from the last version it saw.
    w = watch.Watch()
    stream = w.stream(v1.list_namespaced_pod, NS)
    assert next(stream)["object"].metadata.name == "a"
    emu.drop_watches()
    v1.create_namespaced_pod(NS, pod("b"))
    event = next(stream)
    assert (event["type"], event["object"].metadata.name) == ("ADDED", "b")
    stream.close()
    watches = [path for method, path in emu.requests if "watch=true" in path and "timeoutSeconds" not in path]
    assert len(watches) == 2 and "resourceVersion=" in watches[1]


def test_custom_objects(api: client.ApiClient, emu: KubeEmulator) -> None:
    custom = client.CustomObjectsApi(api)
    body = {"apiVersion": "kubeflow.org/v2beta1", "kind": "MPIJob", "metadata": {"name": "train", "labels": {"dsnb.io/job": "t"}},
            "spec": {"slotsPerWorker": 2}}
    created = custom.create_namespaced_custom_object(*MPI, NS, "mpijobs", body)
    assert created["metadata"]["uid"] and created["kind"] == "MPIJob"
    listed = custom.list_namespaced_custom_object(*MPI, NS, "mpijobs", label_selector="dsnb.io/job=t")
    assert listed["kind"] == "MPIJobList" and [o["metadata"]["name"] for o in listed["items"]] == ["train"]

    emu.patch_status("kubeflow.org/v2beta1", "MPIJob", NS, "train", {"conditions": [{"type": "Running", "status": "True"}]})
    events = take(1, custom.list_namespaced_custom_object, *MPI, NS, "mpijobs",
                  resource_version=listed["metadata"]["resourceVersion"])
    assert [(e["type"], e["object"]["status"]["conditions"][0]["type"]) for e in events] == [("MODIFIED", "Running")]

    patched = custom.patch_namespaced_custom_object(*MPI, NS, "mpijobs", "train", {"spec": {"runPolicy": {"suspend": True}}})
    assert patched["spec"] == {"slotsPerWorker": 2, "runPolicy": {"suspend": True}} and patched["metadata"]["generation"] == 2
    assert custom.delete_namespaced_custom_object(*MPI, NS, "mpijobs", "train")["metadata"]["name"] == "train"

    runtime = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime", "metadata": {"name": "deepspeed"}}
    custom.create_cluster_custom_object("trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes", runtime)
    assert emu.get("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime", None, "deepspeed") is not None


# -- logs -------------------------------------------------------------------------------------------------

STAMPED = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{9})Z (.*)")


def read_log_since(api: client.ApiClient, name: str, since_time: str) -> list[str]:
    """The client has no since_time parameter, so build the call with its own ApiClient."""
    request = api.param_serialize("GET", "/api/v1/namespaces/{namespace}/pods/{name}/log",
                                  path_params={"namespace": NS, "name": name},
                                  query_params=[("sinceTime", since_time), ("timestamps", "true")])
    response = api.call_api(*request)
    response.read()
    assert response.status == 200
    return response.data.decode().splitlines()


def test_logs(api: client.ApiClient, v1: client.CoreV1Api, emu: KubeEmulator) -> None:
    v1.create_namespaced_pod(NS, pod("p"))
    with pytest.raises(ApiException) as waiting:
        v1.read_namespaced_pod_log("p", NS)
    assert "is waiting to start" in status_of(waiting.value)["message"]

    emu.append_log(NS, "p", "one\ntwo\n")
    emu.append_log(NS, "p", "three")
    assert v1.read_namespaced_pod_log("p", NS) == "one\ntwo\nthree\n"
    stamped = v1.read_namespaced_pod_log("p", NS, timestamps=True).splitlines()
    matches = [STAMPED.fullmatch(line) for line in stamped]
    assert [m.group(3) for m in matches] == ["one", "two", "three"]
    stamps = [f"{m.group(1)}.{m.group(2)}" for m in matches]
    assert stamps == sorted(stamps) and len(set(stamps)) == 3
    assert v1.read_namespaced_pod_log("p", NS, tail_lines=2) == "two\nthree\n"
    assert v1.read_namespaced_pod_log("p", NS, limit_bytes=6) == "one\ntw"
    assert v1.read_namespaced_pod_log("p", NS, since_seconds=60) == "one\ntwo\nthree\n"

    # sinceTime has whole-second precision: every line from that second on comes back.
    second = matches[1].group(1)
    assert read_log_since(api, "p", stamped[1].split(" ")[0]) == [line for line in stamped if line[:19] >= second]
    assert read_log_since(api, "p", "2999-01-01T00:00:00Z") == []

    emu.restart_container(NS, "p")
    emu.append_log(NS, "p", "again")
    assert v1.read_namespaced_pod_log("p", NS, previous=True) == "one\ntwo\nthree\n"
    assert v1.read_namespaced_pod_log("p", NS, container="main") == "again\n"

    v1.create_namespaced_pod(NS, pod("fresh"))
    emu.append_log(NS, "fresh", "hi")
    with pytest.raises(ApiException) as no_previous:
        v1.read_namespaced_pod_log("fresh", NS, previous=True)
    assert no_previous.value.status == 400
    assert status_of(no_previous.value)["message"] == 'previous terminated container "main" in pod "fresh" not found'
    with pytest.raises(ApiException) as missing:
        v1.read_namespaced_pod_log("ghost", NS)
    assert missing.value.status == 404

    v1.create_namespaced_pod(NS, pod("two", containers=("main", "side")))
    emu.append_log(NS, "two", "from side", container="side")
    assert v1.read_namespaced_pod_log("two", NS, container="side") == "from side\n"
    with pytest.raises(ApiException) as ambiguous:
        v1.read_namespaced_pod_log("two", NS)
    assert "a container name must be specified" in status_of(ambiguous.value)["message"]


def follow(v1: client.CoreV1Api, name: str) -> tuple[queue.Queue[Any], threading.Thread]:
    """Read a follow=true log in a thread: lines, then "END" or the exception that ended it."""
    response = v1.read_namespaced_pod_log(name, NS, follow=True, _preload_content=False)
    lines: queue.Queue[Any] = queue.Queue()

    def read() -> None:
        try:
            for line in response:
                lines.put(line.decode().rstrip("\n"))
            lines.put("END")
        except Exception as e:  # noqa: BLE001 - the test looks at which exception it was
            lines.put(e)
        finally:
            response.release_conn()

    reader = threading.Thread(target=read)
    reader.start()
    return lines, reader


def test_follow_streams_until_the_container_ends(v1: client.CoreV1Api, emu: KubeEmulator) -> None:
    v1.create_namespaced_pod(NS, pod("p"))
    emu.append_log(NS, "p", "before")
    lines, reader = follow(v1, "p")
    assert lines.get(timeout=5) == "before"
    emu.append_log(NS, "p", "during")
    assert lines.get(timeout=5) == "during"
    emu.end_log(NS, "p")
    assert lines.get(timeout=5) == "END"
    reader.join(5)


def test_dropped_follow_stream_raises_protocol_error(v1: client.CoreV1Api, emu: KubeEmulator) -> None:
    v1.create_namespaced_pod(NS, pod("p"))
    emu.append_log(NS, "p", "first")
    lines, reader = follow(v1, "p")
    assert lines.get(timeout=5) == "first"
    emu.drop_log_streams()
    ended = lines.get(timeout=5)
    reader.join(5)
    assert isinstance(ended, urllib3.exceptions.ProtocolError)
    assert v1.read_namespaced_pod_log("p", NS) == "first\n"  # the client recovers on a new connection


def test_stop_ends_open_streams() -> None:
    emulator = KubeEmulator(namespaces=(NS,)).start()
    with client.ApiClient(emulator.configuration()) as api:
        v1 = client.CoreV1Api(api)
        v1.create_namespaced_pod(NS, pod("p"))
        emulator.append_log(NS, "p", "x")
        lines, log_reader = follow(v1, "p")
        events: queue.Queue[str] = queue.Queue()
        watcher = threading.Thread(target=lambda: [events.put(e["type"]) for e in watch.Watch().stream(
            v1.list_namespaced_pod, NS, timeout_seconds=30)])
        watcher.start()
        assert lines.get(timeout=5) == "x" and events.get(timeout=5) == "ADDED"
        emulator.stop()
        log_reader.join(5)
        watcher.join(5)
        assert lines.get(timeout=1) == "END" and not watcher.is_alive()
    assert not emulator.threads


# -- access ---------------------------------------------------------------------------------------------


def test_access_reviews_and_denials(api: client.ApiClient, v1: client.CoreV1Api, emu: KubeEmulator) -> None:
    authz = client.AuthorizationV1Api(api)

    def allowed(verb: str, resource: str, subresource: str | None = None, group: str = "") -> bool:
        review = authz.create_self_subject_access_review({"spec": {"resourceAttributes": {
            "namespace": NS, "verb": verb, "group": group, "resource": resource, "subresource": subresource}}})
        return review.status.allowed

    assert allowed("create", "statefulsets", group="apps") and allowed("get", "pods", "log")
    emu.denied.add(("get", "", "pods/log"))
    emu.denied.add(("*", "kubeflow.org", "mpijobs"))
    assert not allowed("get", "pods", "log") and allowed("get", "pods")
    assert not allowed("list", "mpijobs", group="kubeflow.org")

    v1.create_namespaced_pod(NS, pod("p"))
    emu.append_log(NS, "p", "secret")
    with pytest.raises(ApiException) as forbidden:
        v1.read_namespaced_pod_log("p", NS)
    assert (forbidden.value.status, status_of(forbidden.value)["reason"]) == (403, "Forbidden")
    assert v1.read_namespaced_pod("p", NS).metadata.name == "p"


def test_bearer_token() -> None:
    with KubeEmulator(token="s3cret") as guarded:
        with client.ApiClient(guarded.configuration()) as api:
            assert client.CoreV1Api(api).list_namespace().items
        for token in (None, "wrong"):
            conf = guarded.configuration()
            conf.api_key = {"authorization": f"Bearer {token}"} if token else {}
            with client.ApiClient(conf) as api, pytest.raises(ApiException) as denied:
                client.CoreV1Api(api).list_namespace()
            assert (denied.value.status, status_of(denied.value)["reason"]) == (401, "Unauthorized")


@pytest.mark.parametrize("token", [None, "t0ken"])
def test_kubeconfig(tmp_path: Path, token: str | None) -> None:
    with KubeEmulator(namespaces=("default", NS), token=token) as emulator:
        path = emulator.write_kubeconfig(tmp_path / "config", namespace=NS, context="emu")
        contexts, current = config.list_kube_config_contexts(path)
        assert current["name"] == "emu" and current["context"]["namespace"] == NS
        with config.new_client_from_config(path) as api:
            assert {n.metadata.name for n in client.CoreV1Api(api).list_namespace().items} == {"default", NS}


def test_nodes_and_namespaces(v1: client.CoreV1Api, emu: KubeEmulator) -> None:
    emu.add_node("gpu-1", {"pool": "a100"}, {"cpu": "96", "memory": "1Ti", "nvidia.com/gpu": "8"})
    emu.add_node("cpu-1")
    nodes = v1.list_node(label_selector="pool=a100").items
    assert [n.metadata.name for n in nodes] == ["gpu-1"] and nodes[0].status.allocatable["nvidia.com/gpu"] == "8"
    assert v1.read_node("cpu-1").status.allocatable["cpu"] == "8"

    emu.add_namespace("team")
    v1.create_namespaced_config_map("team", config_map("c"))
    v1.delete_namespace("team")
    assert emu.get("v1", "ConfigMap", "team", "c") is None and emu.get("v1", "Namespace", None, "team") is None


def test_store_api_raises_like_the_server(emu: KubeEmulator) -> None:
    made = emu.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": NS}})
    assert emu.list("v1", "ConfigMap", NS) == [made]
    with pytest.raises(ApiError) as exists_already:
        emu.create(made)
    assert exists_already.value.code == 409
    emu.update({**made, "data": {"a": "b"}})
    with pytest.raises(ApiError) as stale:
        emu.update({**made, "data": {"a": "c"}})
    assert stale.value.code == 409
    emu.delete("v1", "ConfigMap", NS, "c")
    with pytest.raises(ApiError) as missing:
        emu.delete("v1", "ConfigMap", NS, "c")
    assert missing.value.code == 404


def test_config_maps_and_secrets_over_a_mebibyte_are_refused_as_the_api_server_does(v1: client.CoreV1Api, emu: KubeEmulator) -> None:
    """kube-apiserver's ValidateConfigMap and ValidateSecret (k8s.io/kubernetes pkg/apis/core/validation):
    ``data`` plus ``binaryData`` (decoded) may hold at most ``MaxSecretSize`` = 1048576 bytes; 422 past it."""
    limit = 1024 * 1024
    half = limit // 2
    fits = {"metadata": {"name": "fits"}, "data": {"a.txt": "x" * half}, "binaryData": {"b.bin": base64.b64encode(b"\0" * half).decode()}}
    v1.create_namespaced_config_map(NS, fits)  # its base64 is past 1 MiB: what counts is the decoded size
    with pytest.raises(ApiException) as too_big:
        v1.create_namespaced_config_map(NS, {**fits, "metadata": {"name": "big"}, "data": {"a.txt": "x" * (half + 1)}})
    body = status_of(too_big.value)
    assert too_big.value.status == 422 and body["reason"] == "Invalid"
    assert body["message"] == 'ConfigMap "big" is invalid: : Too long: may not be more than 1048576 bytes'
    assert body["details"]["causes"][0]["reason"] == "FieldValueTooLong"
    with pytest.raises(ApiException) as secret:
        v1.create_namespaced_secret(NS, {"metadata": {"name": "big"}, "stringData": {"a": "x" * (limit + 1)}})
    assert secret.value.status == 422 and "Too long" in status_of(secret.value)["message"]
    with pytest.raises(ApiException) as twice:  # one key in both bags
        v1.create_namespaced_config_map(NS, {"metadata": {"name": "twice"}, "data": {"k": "1"}, "binaryData": {"k": "MQ=="}})
    assert twice.value.status == 422 and "duplicate of key present in binaryData" in status_of(twice.value)["message"]
    with pytest.raises(ApiException) as key:
        v1.create_namespaced_config_map(NS, {"metadata": {"name": "key"}, "data": {"a/b": "1"}})
    assert key.value.status == 422 and "a valid config key" in status_of(key.value)["message"]
    assert emu.get("v1", "ConfigMap", NS, "big") is None and emu.get("v1", "Secret", NS, "big") is None


def test_an_immutable_config_map_keeps_its_data(v1: client.CoreV1Api) -> None:
    """ValidateConfigMapUpdate: the data, binaryData and immutability of an immutable ConfigMap cannot change."""
    v1.create_namespaced_config_map(NS, {"metadata": {"name": "code"}, "immutable": True, "binaryData": {"c": "MQ=="}})
    with pytest.raises(ApiException) as changed:
        v1.patch_namespaced_config_map("code", NS, {"binaryData": {"c": "Mg=="}})
    assert changed.value.status == 422 and "field is immutable when `immutable` is set" in status_of(changed.value)["message"]
    v1.patch_namespaced_config_map("code", NS, {"metadata": {"labels": {"a": "b"}}})  # its metadata may change
    v1.delete_namespaced_config_map("code", NS)
