"""One request, one slow client or one odd model cannot hurt the server or the other clients.

Real servers (``python -m dsnb.runtime.server`` on 127.0.0.1, loader models of ``serving_code``), as
the security review's reproductions ran them: a request far above the batch size runs as
bounded batches; a namedtuple answer no longer kills the batch loop; NaN answers are a clear
422; deep JSON and out-of-range options are 400s; a client that hangs up has its queued work
dropped; a connection that never sends its head is closed; a big body is parsed off the event
loop. Each answer is checked for its status: none may hang, none may be a 5xx but the
documented 503.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_servers import SERVING_CODE, RunningServer, start_server

pytest.importorskip("torch")
pytest.importorskip("uvicorn")


@pytest.fixture
def counting(tmp_path: Path) -> Iterator[RunningServer]:
    server = start_server(tmp_path, "tiny_models:counting_mlp", args=["--max-batch-size", "4", "--max-inputs", "64"])
    yield server
    server.stop()


def test_a_request_above_the_batch_size_runs_as_bounded_batches(counting: RunningServer) -> None:
    status, _, body = counting.request("POST", "/", {"inputs": [[1.0, 2.0, 3.0, 4.0]] * 10})
    assert status == 200 and len(body["outputs"]) == 10
    sizes = [int(line.split()[2]) for line in counting.log(0).splitlines() if line.startswith("batch of")]
    assert sizes == [4, 4, 2]  # never one pass of 10
    status, _, body = counting.request("POST", "/", {"inputs": [[1.0, 2.0, 3.0, 4.0]] * 65})
    assert status == 400 and "at most 64" in body["error"]


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[RunningServer]:
    """A server whose every batch takes 3 s, so that requests queue behind one."""
    server = start_server(tmp_path, "tiny_models:slow_counting_mlp", args=["--max-batch-size", "64"])
    yield server
    server.stop()


def occupy(server: RunningServer) -> threading.Thread:
    """One long batch running (its 3 s start when its line is logged)."""
    busy = threading.Thread(target=server.request, args=("POST", "/", {"inputs": [[1.0] * 4] * 40}), daemon=True)
    busy.start()
    deadline = time.monotonic() + 30
    while "batch of 40 rows" not in server.log(0) and time.monotonic() < deadline:
        time.sleep(0.05)
    return busy


def test_queued_work_of_a_client_that_hung_up_is_dropped(slow: RunningServer) -> None:
    busy = occupy(slow)
    for _ in range(10):  # ten clients that give up at once, while the batch runs
        try:
            slow.request("POST", "/", {"inputs": [[9.0, 9.0, 9.0, 9.0]]}, timeout=0.1)
        except OSError:
            pass  # the client gave up: its connection is closed
    busy.join(60)
    assert slow.request("POST", "/", {"inputs": [[1.0] * 4] * 2})[0] == 200  # runs after anything left in the queue
    batches = [line for line in slow.log(0).splitlines() if line.startswith("batch of")]
    assert batches == ["batch of 40 rows", "batch of 2 rows"]  # none of the ten was run


def test_a_request_deadline_drops_it_unrun(slow: RunningServer) -> None:
    busy = occupy(slow)
    status, _, body = slow.request("POST", "/", {"inputs": [[1.0] * 4]}, headers={"X-Request-Timeout": "0.5"})
    busy.join(60)
    assert status == 504 and "deadline" in body["error"]
    assert [line for line in slow.log(0).splitlines() if line.startswith("batch of")] == ["batch of 40 rows"]
    status, _, body = slow.request("POST", "/", {"inputs": [[1.0] * 4]}, headers={"X-Request-Timeout": "never"})
    assert status == 400


@pytest.mark.parametrize("model, status, says", [
    ("tiny_models:named_outputs", 200, None),
    ("tiny_models:nan_mlp", 422, "NaN or infinity"),
])
def test_odd_model_answers_get_a_clear_status_and_the_server_goes_on(tmp_path: Path, model: str, status: int, says: str) -> None:
    server = start_server(tmp_path, model)
    try:
        results: list[tuple[int, object]] = []

        def ask() -> None:
            code, _, body = server.request("POST", "/", {"inputs": [[1.0, 2.0, 3.0, 4.0]]})
            results.append((code, body))

        threads = [threading.Thread(target=ask) for _ in range(3)]  # concurrent: they share a batch that is split
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert [code for code, _ in results] == [status] * 3, results
        if says:
            assert all(says in body["error"] for _, body in results)
        assert server.request("GET", "/readyz")[0] == 200
        assert server.request("POST", "/", {"inputs": [[1.0, 2.0, 3.0, 4.0]]})[0] == status  # still answering
    finally:
        server.stop()


def test_hostile_bodies_get_400s(counting: RunningServer) -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    status, _, body = counting.request("POST", "/", raw=deep)
    assert status == 400 and "nested too deeply" in body["error"]
    for request in ({"model": "m", "prompt": "x", "seed": 2**70}, {"model": "m", "prompt": "x", "stop": ["s" * 1000]}):
        assert counting.request("POST", "/v1/completions", request)[0] == 400


def test_a_connection_that_never_sends_its_request_is_closed(tmp_path: Path, counting: RunningServer) -> None:
    host, port = counting.url.removeprefix("http://").rstrip("/").split(":")
    idle = socket.create_connection((host, int(port)))
    half = socket.create_connection((host, int(port)))
    half.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Le")
    for sock in (idle, half):
        sock.settimeout(30)
        assert sock.recv(1024) == b""  # closed by the server (after its 10 s head timeout), not left open
        sock.close()


def test_bodies_received_at_once_are_bounded_in_bytes(tmp_path: Path) -> None:
    server = start_server(tmp_path, "tiny_models:counting_mlp",
                          args=["--max-body-bytes", str(1 << 20), "--max-body-bytes-in-flight", str(2 << 20)])
    host, port = server.url.removeprefix("http://").rstrip("/").split(":")
    stalled = []
    try:
        def stall() -> socket.socket:
            """A client that sends 800 KB of a 1 MB body and then nothing."""
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n")
            sock.sendall(b" " * 800_000)
            stalled.append(sock)
            return sock

        stall(), stall()
        time.sleep(1)  # the server has taken in what they sent
        third = stall()
        third.settimeout(20)
        answer = b""
        while b"too many large bodies" not in answer:
            part = third.recv(4096)
            assert part, answer
            answer += part
        assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answer.lower()
        assert server.request("GET", "/readyz")[0] == 200
        for sock in stalled:
            sock.close()  # the bytes they held are given back
        time.sleep(1)
        status, _, body = server.request("POST", "/", raw=b'{"inputs": [[1.0, 2.0, 3.0, 4.0]]}' + b" " * 900_000)
        assert status == 200 and len(body["outputs"]) == 1
    finally:
        for sock in stalled:
            sock.close()
        server.stop()


def test_a_generation_whose_client_left_stops_on_every_rank(tmp_path: Path) -> None:
    import http.client
    import json
    import re

    pytest.importorskip("transformers")
    pytest.importorskip("deepspeed")
    sys.path.insert(0, SERVING_CODE)
    from tiny_llama import save_tiny_llama

    server = start_server(tmp_path, save_tiny_llama(tmp_path / "llama"), world_size=2)
    host, port = server.url.removeprefix("http://").rstrip("/").split(":")
    try:
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        connection.request("POST", "/v1/completions", json.dumps({"model": "m", "prompt": "deep", "max_tokens": 240,
                                                                   "temperature": 0, "stream": True}),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")  # the first piece came
        connection.sock.close()  # the client leaves mid-stream
        connection.close()
        status, _, body = server.request("POST", "/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] == 2  # both ranks go on serving, in step
        made = re.findall(r"generation stopped after (\d+) of 240 tokens \(the client went away\)", server.log(0))
        assert made and int(made[0]) < 120, server.log(0)[-2000:]  # it left the batch long before max_tokens
        assert re.search(r"^dsnb_running_sequences 0\.0$", server.request("GET", "/metrics")[2], re.M)
    finally:
        server.stop()
