"""The minimal backend of docs/backends.md ("Writing a backend") passes the conformance suite."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conformance.suite import BackendConformance, process_workload
from example_backend import ChildProcessBackend

from dsnb import Cluster, JobSpec, Resources
from dsnb.backends.base import register_backend, unregister_backend


def test_the_example_backend_is_small() -> None:
    lines = Path(__file__).with_name("example_backend.py").read_text().splitlines()
    assert len(lines) < 150, len(lines)


class TestExampleBackendConformance(BackendConformance):
    @pytest.fixture
    def cluster(self) -> Cluster:
        register_backend("children", ChildProcessBackend)
        try:
            with Cluster("children") as cluster:
                yield cluster
        finally:
            unregister_backend("children")

    @pytest.fixture
    def workload_spec(self, tmp_path: Path):
        return process_workload(tmp_path)

    @pytest.fixture
    def nothing_left(self, cluster: Cluster):
        def alive(name: str) -> list[int]:
            return [p.pid for p in cluster.backend._runs[name].processes if p.poll() is None]
        return alive

    @pytest.fixture
    def refused_specs(self) -> list[tuple[str, JobSpec]]:
        return [("resources.gpus", JobSpec(name="conf-gpus", command=[sys.executable, "-c", "pass"], resources=Resources(gpus=1)))]

    @pytest.fixture
    def footprint(self, cluster: Cluster):
        return lambda: sorted(cluster.backend._runs)
