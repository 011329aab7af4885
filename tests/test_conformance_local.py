"""The local backend passes the conformance suite."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conformance.suite import BackendConformance, process_workload
from helpers import job_processes, settled

from dsnb import Cluster, JobSpec, Resources
from dsnb.backends.local.jobdir import jobs_root


class TestLocalConformance(BackendConformance):
    @pytest.fixture
    def cluster(self) -> Cluster:
        with Cluster("local") as cluster:
            yield cluster

    @pytest.fixture
    def workload_spec(self, tmp_path: Path):
        return process_workload(tmp_path)

    @pytest.fixture
    def nothing_left(self):
        return lambda name: settled(lambda: job_processes(name))

    @pytest.fixture
    def refused_specs(self, tmp_path: Path) -> list[tuple[str, JobSpec]]:
        python = [sys.executable, "-c", "pass"]
        return [
            # 128 GPUs: more than this machine (or any one machine) has.
            ("resources.gpus", JobSpec(name="conf-gpus", command=python, nodes=16, procs_per_node=8, resources=Resources(gpus=8))),
            ("script", JobSpec(name="conf-script", script="no-such-script.py", working_dir=str(tmp_path))),
            ("command", JobSpec(name="conf-command", command=["no-such-program-zz"], working_dir=str(tmp_path))),
            ("working_dir", JobSpec(name="conf-cwd", command=python, working_dir=str(tmp_path / "missing"))),
        ]

    @pytest.fixture
    def footprint(self, dsnb_home: Path):
        def snapshot() -> list[str]:
            root = jobs_root()
            records = sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []
            return records + [f"process {pid}" for pid in job_processes(str(dsnb_home))]
        return snapshot
