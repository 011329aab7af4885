"""The conformance suite every backend passes (design.md §4, after fsspec's tests/abstract).

A backend's test module subclasses :class:`BackendConformance` and provides five fixtures:

- ``cluster``: a Cluster on that backend, ready to run the workload;
- ``workload_spec``: a factory ``(mode) -> JobSpec`` running ``workload.py MODE`` on 2 ranks;
- ``nothing_left``: a callable ``(job_name) -> list`` of whatever the job left running
  or created (processes, pods, services); the suite requires it empty after cancel and end;
- ``refused_specs``: ``[(field, spec), ...]``, specs that ``JobSpec`` accepts but this backend
  cannot run (more GPUs than it can place, a name past its limit, a field it does not take),
  with the field its ``InvalidSpecError`` must name;
- ``footprint``: a callable ``() -> list`` of everything the backend has created or started
  (records, objects, processes), compared before and after a refused submit.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from dsnb import Cluster, InvalidSpecError, JobFailed, JobNotFound, JobSpec, JobState, WaitTimeout
from dsnb.backends.base import available_backends

WAIT_S = 120
WORKLOAD = Path(__file__).resolve().with_name("workload.py")


def process_workload(working_dir: Path) -> Callable[[str], JobSpec]:
    """A ``workload_spec`` for backends that run commands on this machine: ``workload.py MODE`` on 2 ranks."""
    def make(mode: str) -> JobSpec:
        return JobSpec(name=f"conf-{mode}", command=[sys.executable, str(WORKLOAD), mode], procs_per_node=2,
                       working_dir=str(working_dir))
    return make


class BackendConformance:
    """Behaviour the public contract promises on every backend."""

    def test_backend_is_registered(self, cluster: Cluster) -> None:
        assert cluster.backend.name in available_backends()

    def test_dryrun_creates_nothing_and_renders(self, cluster: Cluster, workload_spec) -> None:
        before = [s.name for s in cluster.jobs()]
        spec = workload_spec("ok")
        plan = cluster.dryrun(spec)
        assert plan.name.startswith(spec.name + "-") and len(plan.name) == len(spec.name) + 5
        assert plan.backend == cluster.backend.name
        assert plan.name in str(plan)
        documents = [d for d in yaml.safe_load_all(plan.to_yaml()) if d is not None]
        assert documents and all(isinstance(d, dict) for d in documents), plan.to_yaml()[:500]
        assert [s.name for s in cluster.jobs()] == before

    def test_dryrun_names_are_unique(self, cluster: Cluster, workload_spec) -> None:
        spec = workload_spec("ok")
        assert cluster.dryrun(spec).name != cluster.dryrun(spec).name

    def test_secrets_are_not_rendered(self, cluster: Cluster, workload_spec) -> None:
        spec = workload_spec("ok")
        spec.env["API_TOKEN"] = "tok-secret-value"
        plan = cluster.dryrun(spec)
        assert "tok-secret-value" not in str(plan) and "tok-secret-value" not in plan.to_yaml()
        assert "tok-secret-value" not in repr(spec)

    def test_success_logs_and_metrics(self, cluster: Cluster, workload_spec, nothing_left) -> None:
        job = cluster.submit(workload_spec("ok"))
        final = job.wait(timeout=WAIT_S)
        assert final.state == JobState.SUCCEEDED
        assert len(final.replicas) == 2 and all(r.state == JobState.SUCCEEDED for r in final.replicas)
        texts = [line.text for line in job.logs()]
        assert "hello from rank 0 of 2" in texts and "hello from rank 1 of 2" in texts
        assert {line.rank for line in job.logs(rank=1)} == {1}
        assert [line.text for line in job.logs(tail=1, rank=0)] == ["rank 0 done"]
        losses = job.metrics("loss", rank=0)
        assert [(s.step, s.value) for s in losses] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
        assert {s.rank for s in job.metrics("loss")} == {0, 1}
        assert final.started_at is not None and final.finished_at is not None and final.elapsed >= 0
        assert nothing_left(job.name) == []

    def test_a_function_runs_on_every_rank_and_rank_0_returns_its_value(self, cluster: Cluster, workload_spec,
                                                                          nothing_left) -> None:
        offset = 40  # a closure: the function travels by value, with what it uses

        def greet(word: str) -> dict:
            import os

            rank = int(os.environ["RANK"])
            print(f"{word} from function rank {rank} of {os.environ['WORLD_SIZE']}", flush=True)
            return {"rank": rank, "answer": offset + 2, "word": word}

        spec = dataclasses.replace(workload_spec("ok"), script=None, command=None, args=[], function=greet, kwargs={"word": "hey"})
        job = cluster.submit(spec)
        assert job.result(timeout=WAIT_S) == {"rank": 0, "answer": 42, "word": "hey"}
        texts = [line.text for line in job.logs()]
        assert "hey from function rank 0 of 2" in texts and "hey from function rank 1 of 2" in texts, texts
        again = cluster.attach(job.name)  # the result is read from the job's logs, by any handle
        assert again.result(timeout=WAIT_S)["answer"] == 42
        assert nothing_left(job.name) == []

    def test_follow_yields_every_line_then_ends(self, cluster: Cluster, workload_spec) -> None:
        job = cluster.submit(workload_spec("ok"))
        lines = list(job.logs(follow=True))
        texts = [line.text for line in lines]
        assert job.status().state.is_terminal()
        for rank in (0, 1):
            assert f"hello from rank {rank} of 2" in texts and f"rank {rank} done" in texts, [str(x) for x in lines]

    def test_failure_names_rank_exit_code_and_last_lines(self, cluster: Cluster, workload_spec, nothing_left) -> None:
        job = cluster.submit(workload_spec("fail"))
        with pytest.raises(JobFailed) as info:
            job.wait(timeout=WAIT_S)
        status = info.value.status
        assert status.state == JobState.FAILED
        assert status.failed_rank == 1 and status.exit_code == 3
        assert any("marker-7f3a" in line for line in status.last_lines)
        assert "rank 1" in str(info.value) and "3" in str(info.value) and "marker-7f3a" in str(info.value)
        assert nothing_left(job.name) == []

    def test_cancel_stops_everything_and_is_idempotent(self, cluster: Cluster, workload_spec, nothing_left) -> None:
        job = cluster.submit(workload_spec("sleep"))
        for line in job.logs(follow=True):
            if line.text.startswith("started"):
                break
        assert job.cancel().state == JobState.CANCELLED
        assert job.cancel().state == JobState.CANCELLED
        assert job.status().state == JobState.CANCELLED
        assert nothing_left(job.name) == []

    def test_wait_timeout_leaves_job_running(self, cluster: Cluster, workload_spec) -> None:
        job = cluster.submit(workload_spec("sleep"))
        try:
            with pytest.raises(WaitTimeout, match="keeps running"):
                job.wait(timeout=0.3)
            assert not job.status().state.is_terminal()
        finally:
            job.cancel()

    def test_jobs_and_attach_find_a_job_by_name(self, cluster: Cluster, workload_spec) -> None:
        job = cluster.submit(workload_spec("ok"))
        job.wait(timeout=WAIT_S)
        assert job.name in [s.name for s in cluster.jobs()]
        again = cluster.attach(job.name)
        assert again.status().state == JobState.SUCCEEDED
        assert again.spec.name == job.name and again.spec.world_size == 2
        first = [str(line) for line in again.logs(rank=0)]
        # Rank 0's lines with their prefix; a runtime's own line of that rank (Ray Train's "Setting up process
        # group") may come before the script's, in whichever order the runtime's two streams arrive.
        assert first and all(line.startswith("[rank 0] ") for line in first), first
        assert [line for line in first if "hello" in line] == ["[rank 0] hello from rank 0 of 2"], first

    def test_unknown_job_is_not_found(self, cluster: Cluster) -> None:
        with pytest.raises(JobNotFound, match="cluster.jobs"):
            cluster.attach("no-such-job-zzzz")

    def test_specs_the_backend_cannot_run_are_refused_and_create_nothing(self, cluster: Cluster, refused_specs,
                                                                         footprint) -> None:
        assert refused_specs, "name at least one spec that JobSpec accepts and this backend refuses"
        jobs_before, before = [s.name for s in cluster.jobs()], footprint()
        for field, spec in refused_specs:
            assert isinstance(spec, JobSpec)  # JobSpec itself accepted it: the refusal is the backend's
            with pytest.raises(InvalidSpecError) as info:
                cluster.submit(spec)
            assert info.value.field == field, (field, str(info.value))
            assert info.value.fix, str(info.value)
            with pytest.raises(InvalidSpecError):
                cluster.dryrun(spec)
        assert footprint() == before
        assert [s.name for s in cluster.jobs()] == jobs_before


