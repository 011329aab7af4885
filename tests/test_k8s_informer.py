"""The watch-based cache against the API emulator: bookmarks, deletions, resync after 410."""

from __future__ import annotations

import pytest

pytest.importorskip("kubernetes")

from helpers import wait_until  # noqa: E402
from k8s.fixtures import NAMESPACE, emulator  # noqa: E402, F401 - fixture

from dsnb.backends.kubernetes.connection import connect  # noqa: E402
from dsnb.backends.kubernetes.informer import Informer  # noqa: E402


def pod(name: str, job: str = "a") -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/managed-by": "dsnb", "dsnb.io/job": job}},
            "spec": {"containers": [{"name": "dsnb", "image": "img:1"}]}}


def watches(emulator) -> list[str]:  # noqa: F811
    return [path for method, path in emulator.requests if method == "GET" and "watch=true" in path]


def test_the_cache_follows_adds_changes_deletions_and_bookmarks(emulator) -> None:  # noqa: F811
    emulator.bookmark_interval = 0.1
    emulator.create(pod("a-0"))
    emulator.create({**pod("other"), "metadata": {"name": "other", "namespace": NAMESPACE}})  # not dsnb's
    conn = connect(configuration=emulator.configuration(), namespace=NAMESPACE)
    informer = Informer(conn.core.list_namespaced_pod, NAMESPACE, label_selector="app.kubernetes.io/managed-by=dsnb").start()
    try:
        assert informer.wait_synced(10)
        assert [p["metadata"]["name"] for p in informer.items()] == ["a-0"]
        emulator.create(pod("a-1"))
        emulator.patch_status("v1", "Pod", NAMESPACE, "a-0", {"phase": "Running"})
        emulator.delete("v1", "Pod", NAMESPACE, "a-1")
        wait_until(lambda: informer.get("a-0")["status"].get("phase") == "Running" and informer.get("a-1") is None, timeout=10)
        version = informer.version
        assert informer.wait_for_change(version, 0.5) == version  # bookmarks are not changes
        assert informer.error is None and len(watches(emulator)) == 1  # bookmarks did not break the watch
    finally:
        informer.stop()
        conn.close()
    assert not informer.running


def test_a_410_lists_again_and_replaces_the_cache(emulator) -> None:  # noqa: F811
    emulator.create(pod("a-0"))
    conn = connect(configuration=emulator.configuration(), namespace=NAMESPACE)
    informer = Informer(conn.core.list_namespaced_pod, NAMESPACE, label_selector="app.kubernetes.io/managed-by=dsnb").start()
    try:
        assert informer.wait_synced(10) and informer.get("a-0") is not None
        # A gap the watch cannot see: watching is refused while a-0 is deleted and the history forgotten.
        emulator.denied.add(("watch", "", "pods"))
        emulator.drop_watches()
        emulator.delete("v1", "Pod", NAMESPACE, "a-0")
        emulator.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": NAMESPACE}})
        emulator.compact()
        emulator.denied.discard(("watch", "", "pods"))
        wait_until(lambda: informer.resyncs == 1, timeout=10)  # the next watch got 410: it listed again
        wait_until(lambda: informer.get("a-0") is None, timeout=10)  # the cache was replaced, not merged
        emulator.create(pod("a-1"))
        wait_until(lambda: informer.get("a-1") is not None, timeout=10)
        assert [o["metadata"]["name"] for o in informer.items()] == ["a-1"]
        lists = [path for method, path in emulator.requests if method == "GET" and "/pods?" in path and "watch=true" not in path]
        assert len(lists) == 2
    finally:
        informer.stop()
        conn.close()
