"""Pieces of the Ray backend that need no Ray: the driver log parser, the driver's job, the Serve config."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from dsnb import InvalidSpecError, JobSpec, Resources, ServeSpec
from dsnb.backends.kubernetes.status_rules import first_status
from dsnb.backends.logbuffer import JobLogs
from dsnb.backends.ray.job_status import JOB_RULES, SPEC_KEY, RayJobReading
from dsnb.backends.ray.logs import DriverLogParser
from dsnb.backends.ray.serve import app_state
from dsnb.runtime import ray_serve_app, ray_train_entry
from dsnb.status import LAUNCHER_LINE_RANK, JobState


def test_driver_log_lines_are_attributed_to_ranks() -> None:
    parser = DriverLogParser()
    raw = [
        "2026-01-01 00:00:00,000\tINFO worker.py:2029 -- Connected to Ray cluster.",
        "(TrainController pid=7) Attempting to start training worker group of size 2",
        # stderr of rank 1 read before its stdout announcement: the controller's list names it
        "(RayTrainWorker pid=12) Setting up process group for: env:// [rank=1, world_size=2]",
        "(TrainController pid=7) - (ip=10.0.0.3, pid=12) world_rank=1, local_rank=1, node_rank=0",
        '\x1b[36m(RayTrainWorker pid=11)\x1b[0m DSNB_RAY_WORKER {"rank": 0, "pid": 11, "node": 0}',
        '(RayTrainWorker pid=12, ip=10.0.0.3) DSNB_RAY_WORKER {"rank": 1, "pid": 12, "node": 0}',
        "(RayTrainWorker pid=11) step 1 loss 2.5",
        "(RayTrainWorker pid=12, ip=10.0.0.3) step 1 loss 2.6",
        "(RayTrainWorker pid=99) a worker that never announced itself",
        'DSNB_RAY_OUTCOME {"exit_code": 1, "failed_rank": 1, "rank_exit_code": 3, "error": "rank 1 exited with code 3"}',
    ]
    seen = [parser.feed(line) for line in raw]
    kept = [entry for entry in seen if entry is not None]
    assert kept == [
        (LAUNCHER_LINE_RANK, "2026-01-01 00:00:00,000\tINFO worker.py:2029 -- Connected to Ray cluster."),
        (LAUNCHER_LINE_RANK, "(TrainController) Attempting to start training worker group of size 2"),
        (LAUNCHER_LINE_RANK, "(RayTrainWorker) Setting up process group for: env:// [rank=1, world_size=2]"),
        (LAUNCHER_LINE_RANK, "(TrainController) - (ip=10.0.0.3, pid=12) world_rank=1, local_rank=1, node_rank=0"),
        (0, "step 1 loss 2.5"),
        (1, "step 1 loss 2.6"),
        (LAUNCHER_LINE_RANK, "(RayTrainWorker) a worker that never announced itself"),
    ]
    assert parser.ranks == {11: 0, 12: 1}
    assert parser.outcome == {"exit_code": 1, "failed_rank": 1, "rank_exit_code": 3, "error": "rank 1 exited with code 3"}


def test_the_driver_job_carries_world_size_gpus_deepspeed_and_restarts() -> None:
    spec = JobSpec(name="big-x7k2", script="train.py", nodes=2, procs_per_node=4, max_restarts=2, timeout=60,
                   resources=Resources(cpu=16, gpus=4), deepspeed={"train_micro_batch_size_per_gpu": 2})
    env = ray_train_entry.driver_env(spec, "s3://bucket/runs")
    job = json.loads(env[ray_train_entry.JOB_ENV])
    assert (job["num_workers"], job["use_gpu"], job["backend"], job["cpus_per_worker"]) == (8, True, "nccl", 4.0)
    assert (job["max_failures"], job["timeout"], job["run_name"]) == (2, 60, "big")
    assert "DS_ACCELERATOR" not in env and env["DSNB_DIST_BACKEND"] == "nccl"
    assert json.loads(env["DSNB_DEEPSPEED_CONFIG_JSON"])["train_batch_size"] == 16
    assert env["RAY_DEDUP_LOGS"] == "0" and env["RAY_CHDIR_TO_TRIAL_DIR"] == "0"


def test_the_driver_outcome_names_the_first_failed_rank() -> None:
    class Failure(Exception):
        worker_failures = {2: RuntimeError("Traceback ...\nRankFailed: rank 2 exited with code 7"), 3: RuntimeError("x")}

    outcome = ray_train_entry._outcome_of(Failure("Training failed"))
    assert (outcome["failed_rank"], outcome["rank_exit_code"], outcome["exit_code"]) == (2, 7, 1)
    assert ray_train_entry._outcome_of(ValueError("no workers\nat all"))["error"] == "at all"


def test_serve_config_for_fixed_and_autoscaled_replicas() -> None:
    fixed = ray_serve_app.serve_config(ServeSpec(name="m-x7k2", model="models:build", replicas=2, env={"A": "1"},
                                             resources=Resources(cpu=2)), route_prefix="/m-x7k2", working_dir="gcs://pkg.zip")
    assert fixed["import_path"] == "dsnb.runtime.ray_serve_app:build"
    assert fixed["deployments"] == [{"name": "DsnbModel", "num_replicas": 2, "ray_actor_options": {"num_cpus": 2.0}}]
    assert fixed["runtime_env"] == {"env_vars": {"DS_ACCELERATOR": "cpu", "A": "1"}, "working_dir": "gcs://pkg.zip"}
    gpu = ray_serve_app.serve_config(ServeSpec(name="g", model="models:build", min_replicas=0, max_replicas=4,
                                           resources=Resources(gpus=1)), route_prefix="/")
    assert gpu["deployments"][0]["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 1}
    assert gpu["deployments"][0]["ray_actor_options"]["num_gpus"] == 1 and "DS_ACCELERATOR" not in gpu["runtime_env"]["env_vars"]


def test_serve_application_states() -> None:
    failed = app_state({"status": "DEPLOY_FAILED", "message": "Failed to update the deployments ['DsnbModel'].",
                        "deployments": {"DsnbModel": {"message": "Traceback (most recent call last):\n  File ...\n"
                                                                 "TypeError: m:f returned str, not a torch.nn.Module\n"}}})
    assert failed[:2] == (JobState.FAILED, "Failed to update the deployments ['DsnbModel'].; TypeError: m:f returned str, not a torch.nn.Module")
    starting = app_state({"status": "DEPLOYING", "deployments": {"DsnbModel": {"replicas": [{"state": "STARTING"}, {"state": "RUNNING"}]}}})
    assert starting[0] == JobState.STARTING and [r.state for r in starting[2]] == [JobState.STARTING, JobState.RUNNING]
    assert app_state({"status": "UNHEALTHY", "message": "replica died"})[:2] == (JobState.RUNNING, "unhealthy: replica died")


@pytest.mark.parametrize(("app", "state", "message"), [
    (None, JobState.CANCELLED, "not deployed"),
    ({"status": "RUNNING", "message": ""}, JobState.RUNNING, ""),
    ({"status": "NOT_STARTED", "deployments": {"M": {"message": "loading\nweights 3/4\n"}}}, JobState.STARTING, "weights 3/4"),
    ({"status": "UNHEALTHY", "message": "", "deployments": {"M": {"message": "oom"}}}, JobState.RUNNING, "unhealthy"),
    ({"status": "DELETING", "message": " going "}, JobState.CANCELLED, "going"),
    ({"status": "SOMETHING_NEW"}, JobState.STARTING, ""),
    ({"status": "DEPLOY_FAILED", "message": "", "deployments": {"A": {"message": "x\nValueError: a"}, "B": {"message": "KeyError: b"}}},
     JobState.FAILED, "ValueError: a; KeyError: b"),
])
def test_serve_application_rules(app, state, message) -> None:
    assert app_state(app)[:2] == (state, message)


def _ray_job(status: str, message: str = "", exit_code: int | None = None, nodes: int = 1, procs: int = 2) -> SimpleNamespace:
    return SimpleNamespace(status=status, message=message, driver_exit_code=exit_code, start_time=1_000_000,
                           end_time=2_000_000 if status in ("SUCCEEDED", "FAILED", "STOPPED") else None,
                           metadata={SPEC_KEY: json.dumps({"nodes": nodes, "procs_per_node": procs})})


OUTCOME = {"failed_rank": 1, "rank_exit_code": 3, "error": "rank 1 exited with code 3"}


@pytest.mark.parametrize(("info", "announced", "outcome", "state", "message", "replica_states", "failed"), [
    (_ray_job("PENDING"), (), None, JobState.PENDING, "", ["STARTING", "STARTING"], (None, None)),
    (_ray_job("RUNNING", "Job is running.\nmore"), (0,), None, JobState.STARTING, "Job is running.", ["STARTING", "STARTING"], (None, None)),
    (_ray_job("RUNNING", nodes=2), (0, 1, 2, 3), None, JobState.RUNNING, "", ["RUNNING"] * 4, (None, None)),
    (_ray_job("SUCCEEDED", "done"), (0, 1), None, JobState.SUCCEEDED, "done", ["SUCCEEDED"] * 2, (None, None)),
    (_ray_job("STOPPED", "Job was intentionally stopped."), (0,), None, JobState.CANCELLED, "cancelled", ["CANCELLED"] * 2, (None, None)),
    (_ray_job("FAILED", "driver died", exit_code=None), (), None, JobState.FAILED, "driver died", ["FAILED"] * 2, (None, 1)),
    (_ray_job("FAILED", "driver died", exit_code=2), (0, 1), OUTCOME, JobState.FAILED, "rank 1 exited with code 3",
     ["FAILED"] * 2, (1, 3)),
])
def test_ray_job_rules(info, announced, outcome, state, message, replica_states, failed) -> None:
    logs = JobLogs()
    for rank, text in [(0, "a"), (1, "b"), (1, "Traceback"), (0, "c")]:
        logs.add(rank, text, 0.0)
    status = first_status(RayJobReading("t-x7k2", "ray", info, frozenset(announced), outcome, logs), JOB_RULES)
    assert (status.state, status.message) == (state, message)
    assert [r.state.value for r in status.replicas] == replica_states
    assert (status.failed_rank, status.exit_code) == failed
    assert (status.started_at, status.finished_at) == (1000.0, 2000.0 if info.end_time else None)
    if failed == (1, 3):
        assert status.last_lines == ("b", "Traceback") and [r.exit_code for r in status.replicas] == [None, 3]
    elif state == JobState.FAILED:
        assert status.last_lines == ("a", "b", "Traceback", "c")
    else:
        assert status.last_lines == ()


@pytest.mark.parametrize(("fields", "field"), [
    ({"model": "nope"}, "model"),
    ({"model": ""}, "model"),
    ({"model": "m:f", "replicas": 0}, "replicas"),
    ({"model": "m:f", "min_replicas": 1}, "max_replicas"),
    ({"model": "m:f", "min_replicas": 3, "max_replicas": 2}, "min_replicas"),
    ({"model": "m:f", "min_replicas": 1, "max_replicas": 2, "replicas": 5}, "replicas"),
    ({"model": "m:f", "dtype": "int8"}, "dtype"),
    ({"model": "m:f", "name": "Bad_Name"}, "name"),
    ({"model": "m:f", "env": {"RANK": "1"}}, "env.RANK"),
    ({"model": "m:f", "resources": {"memory": "4GB"}}, "resources.memory"),
])
def test_bad_serve_specs_name_their_field(fields: dict, field: str) -> None:
    with pytest.raises(InvalidSpecError) as error:
        ServeSpec(**{"name": "m", **fields})
    assert error.value.field == field and str(error.value).startswith(f"ServeSpec.{field}:") and "Fix:" in str(error.value)


def test_a_serve_spec_round_trips() -> None:
    spec = ServeSpec(name="m", model="models:build", min_replicas=1, max_replicas=3, resources=Resources(cpu=2))
    assert ServeSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(InvalidSpecError, match="ServeSpec.replica: is not a ServeSpec field"):
        ServeSpec.from_dict({"name": "m", "model": "m:f", "replica": 2})


def test_the_command_line_takes_ray_placements(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from dsnb.console.cli import main

    def dsnb(*argv: str) -> tuple[int, str]:
        console = Console(file=io.StringIO(), width=200, color_system=None)
        return main(list(argv), console=console), console.file.getvalue()

    pytest.importorskip("ray")
    (tmp_path / "train.py").write_text("print(1)\n")
    monkeypatch.chdir(tmp_path)
    code, out = dsnb("dryrun", "train.py", "--backend", "ray", "--procs", "2", "--address", "http://ray-head:8265")
    assert code == 0 and "address: http://ray-head:8265" in out and "python -m dsnb.runtime.ray_train_entry" in out
    pytest.importorskip("kubernetes")
    code, out = dsnb("dryrun", "train.py", "--backend", "ray", "--kuberay", "--namespace", "ml", "--image", "ghcr.io/org/t:1")
    assert code == 0 and "kind: RayJob" in out and "namespace: ml" in out
    code, out = dsnb("jobs", "--address", "http://ray-head:8265")
    assert code == 1 and "takes no --address" in out and "--address is for ray" in out


@pytest.mark.parametrize(("fields", "field"), [
    ({"token": "a-token-0123456789"}, "token"), ({"procs_per_node": 2}, "procs_per_node"), ({"nodes": 2}, "nodes")])
def test_ray_serve_refuses_a_token_or_a_model_split_over_ranks(fields: dict, field: str) -> None:
    from dsnb.errors import InvalidSpecError
    from dsnb.runtime.ray_serve_app import check_servable

    with pytest.raises(InvalidSpecError, match=rf"ServeSpec\.{field}: .*Cluster\('local'\)"):
        check_servable(ServeSpec(name="m", model="models:build", **fields))


def test_the_first_job_client_of_a_private_head_does_not_wait_on_its_own_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client reads the head's URL and token, which take the backend's lock: no self-deadlock."""
    import subprocess
    import sys
    import threading
    from pathlib import Path

    from dsnb.backends.ray import backend as ray_backend
    from dsnb.errors import ClusterError

    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        head = ray_backend.LocalHead(dashboard_url="http://127.0.0.1:9", gcs_address="127.0.0.1:9", serve_port=9,
                                     temp_dir=Path("/nonexistent"), process=idle, token="t0ken")
        monkeypatch.setattr(ray_backend, "acquire_head", lambda num_cpus=None: head)
        monkeypatch.setattr(ray_backend, "release_head", lambda head: None)
        backend = ray_backend.RayBackend()
        outcome: list[BaseException | None] = []

        def first_client() -> None:
            try:
                backend._client()
                outcome.append(None)
            except BaseException as e:  # noqa: BLE001 - the test reads it below
                outcome.append(e)

        worker = threading.Thread(target=first_client, daemon=True)
        worker.start()
        worker.join(timeout=20)
        assert not worker.is_alive(), "the backend's first _client() call is stuck on its own lock"
        # Nothing listens on port 9: the client is refused, and says where it tried.
        assert isinstance(outcome[0], ClusterError) and "127.0.0.1:9" in str(outcome[0])
    finally:
        idle.kill()
        idle.wait()
