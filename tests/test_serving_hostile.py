"""Hostile requests against real servers: each gets a clear 4xx (or the documented 503), none hangs, none 5xx.

Three servers, as ``python -m dsnb.runtime.server`` runs them on 127.0.0.1 with a token: a tiny Llama
(completions, chat), the MiniLM sentence embedder (embeddings, KServe ``BYTES``) and a loader
MLP (tensors). Every request below is one a client
could send by mistake or on purpose; each row names the status it must get and a word of the
answer, so that the reason is the right one. After all of them every server still answer a
plain request. ``-v`` lists the tally.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from serving_servers import SERVING_CODE, RunningServer, start_server

pytest.importorskip("torch")
pytest.importorskip("uvicorn")
pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

TOKEN = "hostile-test-token-0123456789"
DEEP = b"[" * 200_000 + b"]" * 200_000
HEAD_ONLY = b""  # the request head alone: its Content-Length is refused before any body is sent
CHUNKED = b"chunked"  # 5 MiB sent in chunks, with no Content-Length to refuse early


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RunningServer]]:
    sys.path.insert(0, SERVING_CODE)
    from tiny_llama import minilm_dir, save_tiny_llama

    llama = save_tiny_llama(tmp_path_factory.mktemp("llama"))
    started = {"llm": start_server(tmp_path_factory.mktemp("llm"), llama, token=TOKEN,
                                   args=["--max-body-bytes", str(4 << 20), "--max-inputs", "64"]),
               "emb": start_server(tmp_path_factory.mktemp("emb"), minilm_dir(), token=TOKEN, args=["--max-inputs", "64"]),
               "mlp": start_server(tmp_path_factory.mktemp("mlp"), "tiny_models:tiny_mlp", token=TOKEN,
                                   args=["--max-inputs", "64"])}
    yield started
    for server in started.values():
        server.stop()


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "hello", "max_tokens": 2, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


def infer_bytes(data: list[Any], shape: list[int] | None = None) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "shape": shape or [len(data)], "datatype": "BYTES", "data": data}]}


# (server, method, path, JSON body or raw bytes, extra headers, status, a word of the answer)
HOSTILE = {
    "no token": ("llm", "POST", "/v1/completions", completion(), {"Authorization": "Bearer wrong"}, 401, "token"),
    "nested 200,000 deep": ("llm", "POST", "/v1/completions", DEEP, {}, 400, "nested too deeply"),
    "3 MiB of empty lists": ("mlp", "POST", "/", b'{"inputs": [' + b"[]," * (1 << 20) + b"[]]}", {}, 400, "JSON values"),
    "not JSON": ("llm", "POST", "/v1/completions", b"{'model': 'm'", {}, 400, "not valid JSON"),
    "NaN literal": ("mlp", "POST", "/", b'{"inputs": [[NaN, 1, 2, 3]]}', {}, 400, "NaN is not a JSON number"),
    "5,000-digit number": ("llm", "POST", "/v1/completions", b'{"model": "m", "prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}",
                           {}, 400, "not valid JSON"),
    "JSON that is not an object": ("llm", "POST", "/v1/completions", [1, 2, 3], {}, 400, "object"),
    "Content-Length above --max-body-bytes": ("llm", "POST", "/v1/completions", HEAD_ONLY, {"Content-Length": str(5 << 20)},
                                               413, "limit"),
    "chunked body above --max-body-bytes": ("llm", "POST", "/v1/completions", CHUNKED, {}, 413, "limit"),
    "wrong model name": ("llm", "POST", "/v1/completions", completion(model="gpt-4"), {}, 404, "gpt-4"),
    "prompt of 3 MB": ("llm", "POST", "/v1/completions", completion(prompt="a" * 3_000_000), {}, 400, "characters"),
    "prompt past the context": ("llm", "POST", "/v1/completions", completion(prompt="hello " * 400), {}, 400, "at most"),
    "max_tokens of 10**9": ("llm", "POST", "/v1/completions", completion(max_tokens=10**9), {}, 400, "max_tokens"),
    "negative max_tokens": ("llm", "POST", "/v1/completions", completion(max_tokens=-1), {}, 400, "max_tokens"),
    "100 stop strings": ("llm", "POST", "/v1/completions", completion(stop=["x"] * 100), {}, 400, "stop"),
    "a 1,000-character stop string": ("llm", "POST", "/v1/completions", completion(stop=["s" * 1000]), {}, 400, "256"),
    "seed 2**70": ("llm", "POST", "/v1/completions", completion(seed=2**70), {}, 400, "seed"),
    "negative seed": ("llm", "POST", "/v1/completions", completion(seed=-1), {}, 400, "seed"),
    "top_p 5": ("llm", "POST", "/v1/completions", completion(top_p=5), {}, 400, "top_p"),
    "n = 9 (past the 8 a request may ask for)": ("llm", "POST", "/v1/completions", completion(n=9), {}, 400, "1..8"),
    "a list of prompts": ("llm", "POST", "/v1/completions", completion(prompt=["a"] * 1000), {}, 400, "prompt"),
    "lone surrogate in the prompt": ("llm", "POST", "/v1/completions", b'{"model": "m", "prompt": "\\ud800", "max_tokens": 2}',
                                     {}, 400, "lone surrogate"),
    "lone surrogate in a stop string": ("llm", "POST", "/v1/completions", b'{"model": "m", "prompt": "x", "stop": "\\udfff"}',
                                        {}, 400, "lone surrogate"),
    "messages not a list": ("llm", "POST", "/v1/chat/completions", chat(messages="hi"), {}, 400, "messages"),
    "a streamed request with bad options": ("llm", "POST", "/v1/chat/completions", chat(stream=True, temperature=-3), {}, 400,
                                            "temperature"),
    "3,000 texts to embed": ("emb", "POST", "/v1/embeddings", {"model": "m", "input": ["a"] * 3000}, {}, 400, "at most 64"),
    "a 3 MB text to embed": ("emb", "POST", "/v1/embeddings", {"model": "m", "input": "a" * 3_000_000}, {}, 400, "characters"),
    "embedding a lone surrogate": ("emb", "POST", "/v1/embeddings", b'{"model": "m", "input": ["ok", "\\ud800"]}', {}, 400,
                                   "lone surrogate"),
    "encoding_format that does not exist": ("emb", "POST", "/v1/embeddings", {"model": "m", "input": "a",
                                                                               "encoding_format": "pickle"}, {}, 400,
                                            "encoding_format"),
    "KServe BYTES of 3 MB": ("emb", "POST", "/v2/models/m/infer", infer_bytes(["a" * 3_000_000]), {}, 400, "characters"),
    "KServe shape that lies": ("emb", "POST", "/v2/models/m/infer", infer_bytes(["a"], shape=[1000]), {}, 400, "shape"),
    "KServe BYTES that are numbers": ("emb", "POST", "/v2/models/m/infer", infer_bytes([1, 2]), {}, 400, "string"),
    "2,000 rows (above --max-inputs)": ("mlp", "POST", "/", {"inputs": [[1.0] * 4] * 2000}, {}, 400, "at most 64"),
    "rows of the wrong width": ("mlp", "POST", "/", {"inputs": [[1.0] * 5]}, {}, 400, "could not take rows of shape [5]"),
    "ragged rows": ("mlp", "POST", "/", {"inputs": [[1.0] * 4, [1.0]]}, {}, 400, "inputs"),
    "strings for a tensor model": ("mlp", "POST", "/", {"inputs": ["a", "b"]}, {}, 400, "inputs"),
    "1e308 inputs (outputs overflow)": ("mlp", "POST", "/", {"inputs": [[1e308] * 4]}, {}, 422, "NaN or infinity"),
    "X-Request-Timeout of -1": ("mlp", "POST", "/", {"inputs": [[1.0] * 4]}, {"X-Request-Timeout": "-1"}, 400,
                                "X-Request-Timeout"),
    "X-Request-Timeout not a number": ("mlp", "POST", "/", {"inputs": [[1.0] * 4]}, {"X-Request-Timeout": "soon"}, 400,
                                       "X-Request-Timeout"),
}


def raw_exchange(server: RunningServer, method: str, path: str, headers: dict[str, str], chunked: bool) -> tuple[int, str]:
    """Send a request head (and, if ``chunked``, 5 MiB of chunks as the server reads them) on a socket; read the answer."""
    host, port = server.url.removeprefix("http://").rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
                 f"Authorization: Bearer {server.token}", *(f"{k}: {v}" for k, v in headers.items())]
        if chunked:
            lines.append("Transfer-Encoding: chunked")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        if chunked:
            piece = b" " * (256 << 10)
            try:
                for _ in range(20):
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            except OSError:
                pass  # the server answered and closed before the last chunk: what a limit should do
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            part = sock.recv(65536)
            if not part:
                break
            answer += part
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_request_gets_a_clear_answer_in_time(servers: dict[str, RunningServer], name: str) -> None:
    which, method, path, body, headers, status, says = HOSTILE[name]
    if body is HEAD_ONLY or body is CHUNKED:
        got, answer = raw_exchange(servers[which], method, path, headers, chunked=body is CHUNKED)
    else:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, _, answer = servers[which].request(method, path, raw=raw, headers=headers, timeout=30)  # a hang fails here
    assert got == status, (got, answer)
    assert says.lower() in json.dumps(answer).lower(), answer


def test_both_servers_still_answer_after_the_hostile_requests(servers: dict[str, RunningServer]) -> None:
    assert servers["llm"].request("POST", "/v1/completions", completion())[0] == 200
    assert servers["mlp"].request("POST", "/", {"inputs": [[1.0] * 4]})[0] == 200
    assert servers["emb"].request("POST", "/v1/embeddings", {"model": "m", "input": "a"})[0] == 200
    for server in servers.values():
        assert server.request("GET", "/readyz")[0] == 200 and all(rank.poll() is None for rank in server.ranks)
