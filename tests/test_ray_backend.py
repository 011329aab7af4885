"""``Cluster("ray")`` against a real Ray: one private head on 127.0.0.1 shared by this module.

Every job here runs for real under Ray Train (TorchTrainer, gloo on CPU), submitted through
Ray's Job Submission API; the tiny GPT example runs with DeepSpeed ZeRO-2 exactly as on the
other backends. Ray takes ~15 s to start a head and a few seconds per Train run on 2 cores,
so the module shares one head (as every ``Cluster("ray")`` of a process does).
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conformance.suite import BackendConformance, process_workload

pytest.importorskip("ray")

from dsnb import (  # noqa: E402
    Cluster,
    ClusterError,
    InvalidSpecError,
    JobFailed,
    JobNotFound,
    JobSpec,
    JobState,
    SecretRef,
    ServeSpec,
)
from dsnb.backends.ray.head_guard import head_processes, stop_head  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_gpt"
HF_TRAINER = ROOT / "examples" / "hf_trainer"
SERVING_CODE = Path(__file__).parent / "serving_code"
JOB_TIMEOUT = 400


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ray-runs")


@pytest.fixture(scope="module")
def ray_cluster(storage: Path):
    with Cluster("ray", storage_path=str(storage)) as cluster:
        yield cluster
        for status in cluster.jobs():
            if not status.state.is_terminal():
                cluster.attach(status.name).cancel()


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def _pids_alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]]


def test_dryrun_shows_the_submission_and_starts_nothing(tmp_path: Path) -> None:
    cluster = Cluster("ray", storage_path=str(tmp_path))
    spec = JobSpec(name="tiny-gpt", script="train.py", working_dir=str(EXAMPLE), procs_per_node=2,
                   env={"HF_TOKEN": "hf_secret_value", "NCCL_DEBUG": "WARN"}, deepspeed={"train_micro_batch_size_per_gpu": 4})
    plan = cluster.dryrun(spec)
    text = str(plan)
    assert "hf_secret_value" not in text and "HF_TOKEN: '***'" in text
    assert "python -m dsnb.runtime.ray_train_entry" in text
    job = json.loads(plan.manifests[0]["runtime_env"]["env_vars"]["DSNB_RAY_JOB"])
    assert (job["num_workers"], job["backend"], job["run_name"], job["storage_path"]) == (2, "gloo", "tiny-gpt", str(tmp_path))
    assert plan.extra["runtime_env"]["env_vars"]["HF_TOKEN"] == "hf_secret_value"
    assert any("dashboard can read them" in note for note in plan.notes)
    assert cluster.backend._head is None and cluster.jobs() == []  # no head was started for any of this
    with pytest.raises(JobNotFound):
        cluster.attach("tiny-gpt-zzzz")


def test_every_program_renders_and_a_secret_reference_is_refused_before_a_head_starts() -> None:
    with Cluster("ray") as cluster:
        with pytest.raises(InvalidSpecError, match="names a Kubernetes Secret") as info:
            cluster.submit(JobSpec(name="x", script="t.py", env={"DB_URL": SecretRef("db", "url")}))
        assert info.value.field == "env.DB_URL"
        assert cluster.backend._head is None  # refused before a Ray head was started for it
    programs = {
        ("python", "train.py", "--steps", "2"): {"script": "train.py", "module": None, "command": None,
                                                 "args": ["--steps", "2", "--seed", "1"]},
        ("python", "-m", "pkg.train"): {"script": None, "module": "pkg.train", "command": None, "args": ["--seed", "1"]},
        ("bash", "-c", "true"): {"script": None, "module": None, "command": ["bash", "-c", "true", "--seed", "1"], "args": []},
    }
    for command, expected in programs.items():
        plan = Cluster("ray").dryrun(JobSpec(name="x", command=list(command), args=["--seed", "1"]))
        job = json.loads(plan.extra["runtime_env"]["env_vars"]["DSNB_RAY_JOB"])
        assert {key: job[key] for key in expected} == expected


def test_tiny_gpt_trains_on_two_ray_workers_and_saves_ray_checkpoints(ray_cluster: Cluster, storage: Path) -> None:
    """A second run resuming from these checkpoints is tutorial 05's (tests/test_notebooks.py expects
    "resumed from step 4" and the second run's steps [5, 6]): one run of it here is enough."""
    spec = JobSpec(name="tiny-gpt", script="train.py", working_dir=str(EXAMPLE), procs_per_node=2,
                   args=["--steps", "3"], deepspeed=str(EXAMPLE / "ds_config.json"))
    job = ray_cluster.submit(spec)
    final = job.wait(timeout=JOB_TIMEOUT)
    assert final.state == JobState.SUCCEEDED
    assert [r.rank for r in final.replicas] == [0, 1]
    losses = job.metrics("loss")
    assert [s.step for s in losses] == [1, 2, 3] and {s.rank for s in losses} == {0}
    lines = list(job.logs())
    rank0 = [line.text for line in lines if line.rank == 0]
    assert any("2 ranks" in text for text in rank0), rank0[:20]
    assert any(line.rank == 1 for line in lines)
    assert not any("DSNB_RAY_" in line.text for line in lines)  # dsnb's bookkeeping lines stay hidden
    checkpoints = list((storage / "tiny-gpt").glob("checkpoint_*"))
    assert checkpoints and any((c / "latest").is_file() for c in checkpoints)


def test_every_program_runs_a_timeout_stops_a_job_and_a_running_job_is_cancelled_from_a_reattached_cluster(
        ray_cluster: Cluster, storage: Path, tmp_path: Path) -> None:
    """Five jobs at once (Ray Train's start-up dominates on 2 cores; a failing rank is the conformance
    suite's): a ``python -m`` module and a ``bash`` command run on the workers, the Hugging Face Trainer
    example trains unchanged in the workers' process group, one job outlives its timeout, one runs
    until cancelled from another cluster."""
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    _script(package, "train.py", """
        import os, sys
        print(f"module {__name__} rank {os.environ['RANK']} local size {os.environ['LOCAL_SIZE']} argv {sys.argv[1:]}", flush=True)
    """)
    _script(tmp_path, "forever.py", """
        import os, time
        for i in range(100000):
            print(f"tick {i} pid {os.getpid()}", flush=True)
            time.sleep(0.2)
    """)
    module = ray_cluster.submit(JobSpec(name="mod", command=["python", "-m", "mypkg.train"], args=["--lr", "0.1"],
                                        working_dir=str(tmp_path), procs_per_node=2))
    command = ray_cluster.submit(JobSpec(name="cmd", command=["bash", "-c", 'echo "rank $RANK of $WORLD_SIZE port $MASTER_PORT"; '
                                                                          '[ "$RANK" != 1 ] || exit 4'],
                                         working_dir=str(tmp_path), procs_per_node=2))
    job = ray_cluster.submit(JobSpec(name="forever", script="forever.py", working_dir=str(tmp_path), procs_per_node=2))
    late = ray_cluster.submit(JobSpec(name="late", script="forever.py", working_dir=str(tmp_path), timeout=15))
    trainer = ray_cluster.submit(JobSpec(name="hf-trainer", script="train.py", working_dir=str(HF_TRAINER), procs_per_node=2,
                                         args=["--steps", "4", "--output-dir", str(tmp_path / "hf")]))

    # python -m runs in each worker's Python, as __main__, with the rank's variables.
    assert module.wait(timeout=JOB_TIMEOUT).state == JobState.SUCCEEDED
    for rank in (0, 1):
        assert f"module __main__ rank {rank} local size 2 argv ['--lr', '0.1']" in [line.text for line in module.logs(rank=rank)]
    # Any other command runs as the worker's child, with a rendezvous port of its own (the same on every rank).
    with pytest.raises(JobFailed) as failed:
        command.wait(timeout=JOB_TIMEOUT)
    assert (failed.value.status.failed_rank, failed.value.status.exit_code) == (1, 4)
    ports = {line.rank: line.text.split()[-1] for line in command.logs() if line.text.startswith("rank ")}
    assert set(ports) == {0, 1} and len(set(ports.values())) == 1 and next(iter(ports.values())).isdigit(), ports

    with pytest.raises(JobFailed, match="longer than its timeout of 15 s"):
        late.wait(timeout=JOB_TIMEOUT)

    # The Trainer counts the world of two Ray Train made (at step 2: 2 ranks x 2 samples x 2 steps = 8 of 64 samples).
    assert trainer.wait(timeout=JOB_TIMEOUT).state == JobState.SUCCEEDED, [str(line) for line in trainer.logs(tail=30)]
    assert trainer.metrics("epoch", rank=0)[0].value == pytest.approx(0.125)
    assert [(s.step, s.step_unit) for s in trainer.metrics("loss", rank=0)] == [(1, "log line"), (2, "log line")]

    deadline = time.monotonic() + JOB_TIMEOUT
    while job.status().state != JobState.RUNNING:
        assert time.monotonic() < deadline, job.status()
        time.sleep(0.5)
    deadline = time.monotonic() + 60
    while len({line.text.split()[-1] for line in job.logs() if line.text.startswith("tick")}) < 2:
        assert time.monotonic() < deadline, list(job.logs())[-20:]
        time.sleep(0.5)
    pids = sorted({int(line.text.split()[-1]) for line in job.logs() if line.text.startswith("tick")})

    with Cluster("ray", storage_path=str(storage)) as other:  # a second cluster of the process: same head
        assert other.backend.dashboard_url == ray_cluster.backend.dashboard_url
        attached = other.attach(job.name)
        assert attached.spec.script == "forever.py"
        assert job.name in [s.name for s in other.jobs()]
        assert any(line.text.startswith("tick") for line in attached.logs(rank=1, tail=5))
        final = attached.cancel()
    assert final.state == JobState.CANCELLED
    assert job.status().state == JobState.CANCELLED and job.cancel().state == JobState.CANCELLED
    deadline = time.monotonic() + 30
    while _pids_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _pids_alive(pids)
    assert ray_cluster.backend._head is not None and ray_cluster.backend._head.alive  # the other's close kept it


def test_serve_answers_on_loopback_with_the_plain_models_outputs(ray_cluster: Cluster) -> None:
    import torch

    sys.path.insert(0, str(SERVING_CODE))
    try:
        from tiny_models import tiny_mlp
    finally:
        sys.path.remove(str(SERVING_CODE))
    inputs = [[0.0, 1.0, 2.0, 3.0], [-1.5, 0.25, 4.0, 2.0]]
    expected = tiny_mlp()(torch.tensor(inputs)).tolist()

    endpoint = ray_cluster.serve(ServeSpec(name="tiny-mlp", model="tiny_models:tiny_mlp", working_dir=str(SERVING_CODE)))
    try:
        assert endpoint.url.startswith("http://127.0.0.1:") and endpoint.url.endswith("/" + endpoint.name)
        status = endpoint.status()
        assert status.state == JobState.RUNNING and len(status.replicas) == 1
        outputs = endpoint.predict({"inputs": inputs})["outputs"]
        assert torch.allclose(torch.tensor(outputs), torch.tensor(expected), atol=1e-6)
        with pytest.raises(ClusterError, match="HTTP 400.*non-empty list"):
            endpoint.predict({"inputs": "not a batch"})
        with pytest.raises(ClusterError, match="HTTP 400.*could not take rows of shape"):
            endpoint.predict({"inputs": [[1.0, 2.0]]})
        assert endpoint.name in [s.name for s in ray_cluster.endpoints()]
        single = ray_cluster.endpoint(endpoint.name).predict({"inputs": inputs[:1]})["outputs"]
        assert torch.allclose(torch.tensor(single), torch.tensor(expected[:1]), atol=1e-6)
    finally:
        assert endpoint.stop().state == JobState.CANCELLED
    assert endpoint.name not in [s.name for s in ray_cluster.endpoints()]
    with pytest.raises(JobNotFound):
        endpoint.status()


def test_a_language_model_on_ray_serve_streams_batches_generations_together_and_takes_lora(ray_cluster: Cluster,
                                                                                            tmp_path: Path) -> None:
    import concurrent.futures
    import urllib.request

    openai = pytest.importorskip("openai")
    pytest.importorskip("peft")
    sys.path.insert(0, str(SERVING_CODE))
    try:
        from tiny_llama import save_lora_adapter, save_tiny_llama
    finally:
        sys.path.remove(str(SERVING_CODE))
    base = save_tiny_llama(tmp_path / "llama")
    spec = ServeSpec(name="tiny-llama", model=base, lora_adapters={"sql": save_lora_adapter(base, tmp_path / "sql", seed=1)})
    endpoint = ray_cluster.serve(spec)
    try:
        client = openai.OpenAI(base_url=endpoint.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        greedy = {"model": endpoint.name, "prompt": "deep speed serving", "max_tokens": 64, "temperature": 0}
        alone = client.completions.create(**greedy).choices[0].text

        def streamed(_: int) -> list[tuple[float, str]]:
            return [(time.monotonic(), chunk.choices[0].text) for chunk in client.completions.create(**greedy, stream=True)
                    if chunk.choices and chunk.choices[0].text]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            streams = list(pool.map(streamed, range(4)))
        assert all("".join(text for _, text in pieces) == alone for pieces in streams)
        assert all(len(pieces) > 32 for pieces in streams)  # a piece per token, not one at the end
        # one running batch: every stream had begun before any ended (one at a time, each waits for the last)
        assert max(pieces[0][0] for pieces in streams) < min(pieces[-1][0] for pieces in streams)
        assert client.completions.create(**{**greedy, "model": "sql"}).choices[0].text != alone
        with urllib.request.urlopen(endpoint.url + "/metrics", timeout=30) as response:
            metrics = response.read().decode()
        assert "dsnb_time_to_first_token_seconds_count" in metrics and "dsnb_running_sequences" in metrics
    finally:
        assert endpoint.stop().state == JobState.CANCELLED


def test_a_broken_loader_fails_serve_with_its_error_and_leaves_nothing(ray_cluster: Cluster) -> None:
    with pytest.raises(JobFailed, match="not a torch.nn.Module") as failed:
        ray_cluster.serve(ServeSpec(name="broken", model="tiny_models:not_a_model", working_dir=str(SERVING_CODE)), wait=300)
    assert failed.value.status.state == JobState.FAILED
    assert not [s for s in ray_cluster.endpoints() if s.name.startswith("broken-")]


class _TokenDashboard(http.server.BaseHTTPRequestHandler):
    """Answers /api/version like a Ray dashboard with token authentication."""

    token = "s3cret-token"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b"Unauthorized: token authentication is enabled")
            return
        body = json.dumps({"ray_version": "2.60.0", "version": "4"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_address_placement_sends_the_token_and_names_it_when_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/nonexistent/token")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenDashboard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        refused = Cluster("ray", address=address).check()
        [line] = [r for r in refused.results if r.name == "Ray cluster"]
        assert not line.ok and "HTTP 401" in line.detail and "token=" in line.fix
        with pytest.raises(ClusterError, match="authentication.*token="):
            Cluster("ray", address=address).jobs()
        accepted = Cluster("ray", address=address, token="s3cret-token")
        assert "s3cret-token" not in repr(accepted) + repr(accepted.backend)
        [line] = [r for r in accepted.check().results if r.name == "Ray cluster"]
        assert line.ok and "2.60.0" in line.detail
        monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cret-token")  # Ray's own variable is read too
        assert [r for r in Cluster("ray", address=address).check().results if r.name == "Ray cluster"][0].ok
    finally:
        server.shutdown()


def test_a_real_head_with_token_authentication(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ray start --head`` with token auth (Ray's default): dsnb sends the token; without it, a clear refusal."""
    import secrets
    import shutil

    from dsnb.backends.ray.head import free_port

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token-here"))
    token = secrets.token_hex(16)
    gcs, dashboard, client = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    temp_dir = Path(f"/tmp/dsnbtok-{secrets.token_hex(3)}")
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--disable-usage-stats",
                             "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}", "--num-cpus=1",
                             f"--temp-dir={temp_dir}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while not Cluster("ray", address=address, token=token).check().ok:
            assert time.monotonic() < deadline and head.poll() is None, "the token-auth head did not come up"
            time.sleep(1)
        with Cluster("ray", address=address, token=token) as cluster:
            assert cluster.jobs() == [] and cluster.endpoints() == []
        with pytest.raises(ClusterError, match="authentication.*token="):
            Cluster("ray", address=address).jobs()
        with pytest.raises(ClusterError, match="token was refused"):
            Cluster("ray", address=address, token="wrong").jobs()
    finally:
        stop_head(head, head.pid, str(temp_dir))
        head.wait(timeout=10)
        assert not head_processes(head.pid, str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_the_existing_cluster_placement_sees_the_jobs_of_that_cluster(ray_cluster: Cluster, tmp_path: Path) -> None:
    script = _script(tmp_path, "wait.py", "import time\ntime.sleep(600)\n")
    job = ray_cluster.submit(JobSpec(name="seen", script=script.name, working_dir=str(tmp_path), procs_per_node=1))
    try:
        names = {s.name for s in ray_cluster.jobs()}
        assert job.name in names
        address, token = ray_cluster.backend.dashboard_url, ray_cluster.backend._local_head().token
        # The private head takes no one without its token, on loopback too.
        with pytest.raises(ClusterError, match="authentication"):
            Cluster("ray", address=address, token="").jobs()
        with Cluster("ray", address=address, token=token) as remote:
            assert {s.name for s in remote.jobs()} == names
            assert remote.attach(job.name).spec.name == job.name
            assert remote.check().ok
    finally:
        job.cancel()


def test_the_private_head_stops_on_close_at_exit_and_when_its_owner_is_killed() -> None:
    """Closing the last cluster, a normal exit, and a SIGKILLed owner all leave no Ray process.

    A Ray job's driver runs in a session of its own (a plain one here, submitted with Ray's own
    client, so no Train start-up is needed); it must go too.
    """
    code = textwrap.dedent("""
        import sys, time
        from ray.job_submission import JobSubmissionClient
        from dsnb import Cluster
        a, b = Cluster("ray"), Cluster("ray")
        assert b.backend.dashboard_url == a.backend.dashboard_url
        head = a.backend._head
        client = JobSubmissionClient(head.dashboard_url, headers={"Authorization": f"Bearer {head.token}"})
        for attempt in range(120):  # a head that just started answers before its job agent registered
            try:
                job = client.submit_job(entrypoint="python -c 'import time; print(\\"up\\", flush=True); time.sleep(600)'")
                break
            except RuntimeError as e:  # the agent not registered yet, or restarting
                assert "No available agent" in str(e) or "Server disconnected" in str(e), e
                time.sleep(0.5)
        while "up" not in client.get_job_logs(job):
            time.sleep(0.3)
        print(head.process.pid, head.temp_dir, flush=True)
        a.close()
        assert head.alive, "the other cluster still uses it"
        if sys.argv[1] == "close":
            b.close()
            assert not head.alive
        elif sys.argv[1] == "kill":
            time.sleep(600)  # killed by the test
    """)
    for mode in ("close", "exit", "kill"):
        owner = subprocess.Popen([sys.executable, "-c", code, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        first = owner.stdout.readline().split()
        assert len(first) == 2, f"{mode}: {owner.wait(timeout=60)} {owner.stderr.read()[-3000:]}"
        session, temp_dir = first
        assert head_processes(int(session), temp_dir), "the head and the job run"
        if mode == "kill":
            owner.kill()
        assert owner.wait(timeout=180) == (-9 if mode == "kill" else 0), owner.stderr.read()[-2000:]
        deadline = time.monotonic() + 30
        while head_processes(int(session), temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not head_processes(int(session), temp_dir), f"{mode}: the head's processes outlived it"


def _train_actors(job: str | None = None) -> list[str]:
    """Ray Train's actor processes on this machine (its controller and workers), as ``pid name``;
    with ``job``, only that job's (Ray starts them with the job's runtime environment, ``DSNB_JOB_NAME``)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        first = (proc.info["cmdline"] or [""])[0]
        if not first.startswith(("ray::RayTrainWorker", "ray::TrainController", "ray::_TrainSession")):
            continue
        try:
            if job is not None and proc.environ().get("DSNB_JOB_NAME") != job:
                continue
        except psutil.Error:
            continue  # gone meanwhile
        found.append(f"{proc.info['pid']} {first}")
    return found


def _settled(read, seconds: float = 30.0) -> list[str]:
    """``read()`` once it is empty, or what it still returns after ``seconds`` (Ray ends actors asynchronously)."""
    deadline = time.monotonic() + seconds
    while (left := read()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


class TestRayConformance(BackendConformance):
    """The conformance suite on the private head this module shares: real Ray Train runs."""

    @pytest.fixture
    def cluster(self, ray_cluster: Cluster) -> Cluster:
        return ray_cluster

    @pytest.fixture
    def workload_spec(self, tmp_path: Path):
        return process_workload(tmp_path)

    @pytest.fixture
    def nothing_left(self):
        return lambda name: _settled(lambda: _train_actors(name))

    @pytest.fixture
    def refused_specs(self, tmp_path: Path) -> list[tuple[str, JobSpec]]:
        # A SecretRef names a Kubernetes Secret, which Ray cannot read.
        return [("env.DB_URL", JobSpec(name="conf-ref", script="workload.py", working_dir=str(tmp_path),
                                       env={"DB_URL": SecretRef("db", "url")}))]

    @pytest.fixture
    def footprint(self, ray_cluster: Cluster, storage: Path):
        return lambda: sorted(str(p) for p in storage.rglob("*")) + _train_actors()
