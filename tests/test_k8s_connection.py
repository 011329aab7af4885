"""Connecting with the kubeconfig a user has: every file $KUBECONFIG lists counts, as with kubectl."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dsnb import ClusterError

pytest.importorskip("kubernetes")
from dsnb.backends.kubernetes.connection import connect  # noqa: E402


def _kubeconfig(path: Path, name: str, server: str, namespace: str, current: bool) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server}}],
        "users": [{"name": name, "user": {"token": f"token-{name}"}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": namespace}}],
        **({"current-context": name} if current else {}),
    }))
    return path


def test_every_file_kubeconfig_lists_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _kubeconfig(tmp_path / "dev", "dev", "https://dev.example:6443", "dev-ns", current=True)
    second = _kubeconfig(tmp_path / "gpu", "gpu", "https://gpu.example:6443", "ml", current=False)
    monkeypatch.setenv("KUBECONFIG", f"{first}:{tmp_path / 'missing'}:{second}")
    conn = connect(context="gpu")  # a context of the second file: before, only the first was read
    try:
        assert (conn.context, conn.namespace, conn.host) == ("gpu", "ml", "https://gpu.example:6443")
    finally:
        conn.close()
    conn = connect()
    try:
        assert (conn.context, conn.namespace) == ("dev", "dev-ns")
    finally:
        conn.close()


def test_an_unknown_context_lists_the_contexts_of_every_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _kubeconfig(tmp_path / "dev", "dev", "https://dev.example:6443", "dev-ns", current=True)
    second = _kubeconfig(tmp_path / "gpu", "gpu", "https://gpu.example:6443", "ml", current=False)
    monkeypatch.setenv("KUBECONFIG", f"{first}:{second}")
    with pytest.raises(ClusterError, match=r"has no context 'prod' \(it has: dev, gpu\)"):
        connect(context="prod")


def test_no_file_at_all_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    with pytest.raises(ClusterError, match="none of these files exists") as info:
        connect()
    assert str(tmp_path / "a") in str(info.value) and str(tmp_path / "b") in str(info.value)
