"""``Cluster("local").serve``: the model server as an always-on local job, end to end."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")
transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from helpers import job_processes, settled  # noqa: E402
from serving_servers import SERVING_CODE  # noqa: E402

from dsnb import Cluster  # noqa: E402
from dsnb.errors import ClusterError, InvalidSpecError, JobFailed, JobNotFound  # noqa: E402
from dsnb.serving import ServeSpec  # noqa: E402
from dsnb.status import JobState  # noqa: E402

sys.path.insert(0, SERVING_CODE)
from tiny_llama import minilm_dir, save_tiny_llama  # noqa: E402

TOKEN = "local-token-0123456789"


def test_serve_query_reattach_watch_and_stop_an_embedding_endpoint(cluster: Cluster, dsnb_home: Path) -> None:
    endpoint = cluster.serve(ServeSpec(name="minilm", model=minilm_dir(), token=TOKEN), wait=180)
    assert endpoint.status().state == JobState.RUNNING and endpoint.url.startswith("http://127.0.0.1:")
    assert TOKEN not in repr(cluster.backend.spec_of(endpoint.name)) and TOKEN not in str(cluster.dryrun(
        ServeSpec(name="minilm", model=minilm_dir(), token=TOKEN)))

    vector = endpoint.predict({"inputs": "hello"})["outputs"]  # sends the token
    client = openai.OpenAI(base_url=endpoint.url + "v1", api_key=TOKEN)
    assert client.embeddings.create(model="minilm", input="hello").data[0].embedding == pytest.approx(vector, abs=1e-5)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=endpoint.url + "v1", api_key="wrong-token", max_retries=0).embeddings.create(model="minilm", input="x")

    assert [s.name for s in cluster.endpoints()] == [endpoint.name]
    again = Cluster("local").endpoint(endpoint.name)  # e.g. after a kernel restart
    assert again.url == endpoint.url and again.predict({"inputs": "hello"})["outputs"] == pytest.approx(vector, abs=1e-6)
    with pytest.raises(JobNotFound, match="endpoint 'nope' not found"):
        cluster.endpoint("nope")

    for _ in range(20):
        endpoint.predict({"inputs": ["a sentence", "another one"]})
    deadline = time.monotonic() + 20  # rank 0 reports every 5 s while there is traffic
    while not cluster.attach(endpoint.name).metrics("requests_per_s") and time.monotonic() < deadline:
        time.sleep(0.5)
    rates = cluster.attach(endpoint.name).metrics("requests_per_s")
    assert rates and rates[-1].value > 0
    assert any("listening at" in line.text for line in cluster.attach(endpoint.name).logs())

    stopped = endpoint.stop()
    assert stopped.state == JobState.CANCELLED
    assert not settled(lambda: job_processes(str(dsnb_home)))
    assert endpoint.stop().state == JobState.CANCELLED  # again: nothing to do


def test_a_two_rank_server_on_the_local_backend(cluster: Cluster, tmp_path: Path, dsnb_home: Path) -> None:
    model = save_tiny_llama(tmp_path / "llama")
    endpoint = cluster.serve(ServeSpec(name="llama", model=model, procs_per_node=2), wait=240)
    client = openai.OpenAI(base_url=endpoint.url + "v1", api_key=endpoint.token)  # made for it: local servers need one
    answer = client.completions.create(model="llama", prompt="hello", max_tokens=4, temperature=0)
    assert answer.usage.completion_tokens == 4
    assert endpoint.predict({"inputs": "hello"})["outputs"].startswith(answer.choices[0].text)  # greedy, 16 tokens
    status = endpoint.status()
    assert [r.state for r in status.replicas] == [JobState.RUNNING, JobState.RUNNING]

    os.kill(status.replicas[1].pid, signal.SIGKILL)  # a rank dies: the endpoint fails and says which
    deadline = time.monotonic() + 60
    while not endpoint.status().state.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
    failed = endpoint.status()
    assert failed.state == JobState.FAILED and failed.failed_rank == 1 and failed.exit_code == -9, failed
    with pytest.raises(JobFailed, match="rank 1"):
        endpoint.wait(timeout=5)
    assert endpoint.stop().state == JobState.FAILED
    assert not settled(lambda: job_processes(str(dsnb_home)))


def test_a_broken_loader_fails_serve_with_its_error_and_leaves_nothing(cluster: Cluster, dsnb_home: Path) -> None:
    with pytest.raises(JobFailed, match="not a torch.nn.Module"):
        cluster.serve(ServeSpec(name="broken", model="tiny_models:not_a_model", working_dir=SERVING_CODE), wait=120)
    assert not settled(lambda: job_processes(str(dsnb_home)))


@pytest.mark.parametrize(("fields", "field"), [
    ({"replicas": 2}, "replicas"),
    ({"min_replicas": 1, "max_replicas": 3}, "replicas"),
])
def test_what_one_job_cannot_serve_is_refused_before_anything_starts(cluster: Cluster, fields: dict, field: str) -> None:
    with pytest.raises(InvalidSpecError, match=f"ServeSpec.{field}") as error:
        cluster.serve(ServeSpec(name="m", model="tiny_models:tiny_mlp", working_dir=SERVING_CODE, **fields))
    assert "Cluster('ray')" in str(error.value)
    assert cluster.jobs() == [] and cluster.endpoints() == []


def test_a_job_is_not_an_endpoint(cluster: Cluster) -> None:
    from dsnb import JobSpec

    job = cluster.submit(JobSpec(name="sleeper", command=[sys.executable, "-c", "import time; time.sleep(60)"]))
    try:
        with pytest.raises(JobNotFound, match="endpoint"):
            cluster.endpoint(job.name)
        assert cluster.endpoints() == []
        with pytest.raises(ClusterError):
            cluster.backend.endpoint_url(job.name)
    finally:
        job.cancel()


def test_stopping_a_two_rank_server_drains_what_it_holds(cluster: Cluster, tmp_path: Path, dsnb_home: Path) -> None:
    import threading

    endpoint = cluster.serve(ServeSpec(name="llama", model=save_tiny_llama(tmp_path / "llama"), procs_per_node=2), wait=240)
    client = openai.OpenAI(base_url=endpoint.url + "v1", api_key=endpoint.token, max_retries=0)
    stream = client.completions.create(model="llama", prompt="deep", max_tokens=200, temperature=0, stream=True)
    chunks = [next(iter(stream))]  # the generation runs on both ranks
    stopping = threading.Thread(target=lambda: chunks.append(endpoint.stop()), daemon=True)
    stopping.start()
    pieces = [chunk for chunk in stream]  # the stream goes on to its end while the server drains
    stopping.join(60)
    stopped = chunks.pop()
    assert pieces and pieces[-1].choices[0].finish_reason in ("length", "stop")  # finished, not cut off
    assert stopped.state == JobState.CANCELLED
    assert [r.exit_code for r in stopped.replicas] == [0, 0], stopped.replicas  # both ranks drained and exited cleanly
    lines = "\n".join(line.text for line in cluster.attach(endpoint.name).logs())
    assert "KeyboardInterrupt" not in lines and "is gone" not in lines
    assert not settled(lambda: job_processes(str(dsnb_home)))
