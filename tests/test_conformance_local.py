"""The local backend passes the conformance suite."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conformance.suite import BackendConformance
from helpers import WORKLOAD, job_processes, settled

from dsnb import Cluster, JobSpec


class TestLocalConformance(BackendConformance):
    @pytest.fixture
    def cluster(self) -> Cluster:
        with Cluster("local") as cluster:
            yield cluster

    @pytest.fixture
    def workload_spec(self, tmp_path: Path):
        def make(mode: str) -> JobSpec:
            return JobSpec(name=f"conf-{mode}", command=[sys.executable, str(WORKLOAD), mode], procs_per_node=2,
                           working_dir=str(tmp_path))
        return make

    @pytest.fixture
    def nothing_left(self):
        return lambda name: settled(lambda: job_processes(name))
