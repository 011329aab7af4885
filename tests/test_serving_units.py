"""The server's parts without processes: the batch loop, the protocols, the spec's new fields."""

from __future__ import annotations

import doctest
import threading
import time

import pytest

from dsnb.errors import InvalidSpecError
from dsnb.serving import ServeSpec

torch = pytest.importorskip("torch")
pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

from dsnb.runtime.server import app as app_module  # noqa: E402
from dsnb.runtime.server import connections, kserve, openai_api, stats  # noqa: E402
from dsnb.runtime.server import engine as engine_module  # noqa: E402
from dsnb.runtime.server import model as model_module  # noqa: E402
from dsnb.runtime.server.engine import Collective, Engine, Overloaded, RankLost, Work  # noqa: E402
from dsnb.runtime.server.model import BadRequest, Completion  # noqa: E402


@pytest.mark.parametrize("module", [engine_module, stats, openai_api, kserve, model_module, app_module, connections])
def test_the_docstring_examples_hold(module: object) -> None:
    result = doctest.testmod(module)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0


class Recorder:
    """A model runner that records each batch it ran."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[object] = []
        self.delay = delay

    def encode(self, texts: list[str]) -> list[list[float]]:
        self.batches.append(list(texts))
        time.sleep(self.delay)
        return [[float(len(t))] for t in texts]

    def forward(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        self.batches.append(tuple(tensor.shape))
        return {"double": tensor * 2, "sum": tensor.sum(dim=1)}


class GatedRecorder(Recorder):
    """A Recorder that holds the batch containing ``"hold"`` until ``gate`` is set, so that others queue meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.holding = threading.Event()

    def encode(self, texts: list[str]) -> list[list[float]]:
        if "hold" in texts:
            self.holding.set()
            assert self.gate.wait(10)
        return super().encode(texts)


def submit_all(engine: Engine, works: list[tuple[str, object, int, object]],
               then_start: bool = False) -> list[tuple[object, BaseException | None]]:
    """Submit every work, start the engine if asked (so that all were waiting together), wait for the answers."""
    answers: list[tuple[object, BaseException | None]] = [None] * len(works)  # type: ignore[list-item]
    done = threading.Semaphore(0)

    def deliver_to(index: int):
        def deliver(result: object, error: BaseException | None) -> None:
            answers[index] = (result, error)
            done.release()
        return deliver

    for index, (op, data, size, key) in enumerate(works):
        engine.submit(Work(op, data, size=size, deliver=deliver_to(index), key=key))
    if then_start:
        engine.start()
    for _ in works:
        assert done.acquire(timeout=10)
    return answers


def test_compatible_requests_share_a_batch_and_each_gets_its_slice() -> None:
    runner = Recorder()
    engine = Engine(runner, Collective(1), max_batch_size=6, max_wait_s=0.2)
    rows = [torch.ones(2, 3), torch.full((1, 3), 3.0), torch.ones(1, 5)]
    works = [("texts", ["a", "bb"], 2, None), ("tensor", rows[0], 2, (3,)), ("texts", ["ccc"], 1, None),
             ("tensor", rows[1], 1, (3,)), ("tensor", rows[2], 1, (5,))]
    try:
        answers = submit_all(engine, works, then_start=True)  # all five wait together when the loop starts
    finally:
        engine.stop()
    assert answers[0] == ([[1.0], [2.0]], None) and answers[2] == ([[3.0]], None)
    assert torch.equal(answers[1][0]["double"], rows[0] * 2) and torch.equal(answers[3][0]["sum"], torch.tensor([9.0]))
    assert torch.equal(answers[4][0]["double"], rows[2] * 2)
    assert runner.batches == [["a", "bb", "ccc"], (3, 3), (1, 5)]


def test_a_full_queue_refuses_at_once_and_a_lost_rank_fails_what_waits() -> None:
    engine = Engine(Recorder(), Collective(1), max_queue=2)
    failed: list[BaseException | None] = []
    for _ in range(2):
        engine.submit(Work("texts", ["x"], size=1, deliver=lambda r, e: failed.append(e)))
    with pytest.raises(Overloaded, match="max_queue=2"):
        engine.submit(Work("texts", ["x"], size=1, deliver=lambda r, e: None))
    engine.mark_lost("rank 1 is gone")
    assert [type(e) for e in failed] == [RankLost, RankLost]
    assert not engine.ready and engine.not_ready_reason == "rank 1 is gone"
    with pytest.raises(RankLost, match="rank 1 is gone"):
        engine.submit(Work("texts", ["x"], size=1, deliver=lambda r, e: None))


class BrokenCollective(Collective):
    """A collective that raises ``error`` from its second message on (by default: its peers are gone)."""

    def __init__(self, error: BaseException | None = None, world_size: int = 2) -> None:
        super().__init__(world_size=world_size)
        self.error = error or RankLost("a rank of the server is gone (Connection closed by peer)")
        self.sent = 0

    def share(self, message: object = None) -> object:
        self.sent += 1
        if self.sent > 1:
            raise self.error
        return message


def test_a_lost_peer_turns_the_engine_unready_and_answers_rank_lost() -> None:
    engine = Engine(Recorder(), BrokenCollective(), max_wait_s=0)
    engine.start()
    try:
        first = submit_all(engine, [("texts", ["a"], 1, None)])
        second = submit_all(engine, [("texts", ["b"], 1, None)])
    finally:
        engine.stop()
    assert first == [([[1.0]], None)]
    assert isinstance(second[0][1], RankLost) and engine.lost and not engine.ready


def test_a_model_output_that_is_not_batch_major_is_an_error_for_its_requests() -> None:
    with pytest.raises(ValueError, match="max_batch_size=1"):
        engine_module._split_rows(torch.ones(3), [1, 1])
    parts = engine_module._split_rows((torch.arange(3), [torch.ones(3, 2)]), [2, 1])
    assert parts[0][0].tolist() == [0, 1] and parts[1][1][0].shape == (1, 2)


@pytest.mark.parametrize(("body", "says"), [
    ({"model": "m"}, '"prompt" must be'),
    ({"model": "m", "prompt": ["a", "b"]}, "one prompt per request"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, '"max_tokens" must be'),
    ({"model": "m", "prompt": "x", "temperature": 3}, '"temperature"'),
    ({"model": "m", "prompt": "x", "top_p": 0}, '"top_p"'),
    ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, '"stop"'),
    ({"model": "m", "prompt": "x", "logprobs": 6}, '"logprobs" must be a whole number in 0..5'),
    ({"model": "m", "prompt": "x", "best_of": 2}, '"best_of" is not supported'),
    ({"model": "m", "prompt": "x", "stream": "yes"}, '"stream"'),
    ({"model": "m", "prompt": "x", "seed": 1.5}, '"seed"'),
])
def test_completion_options_out_of_range_are_refused(body: dict, says: str) -> None:
    with pytest.raises(BadRequest, match=says):
        openai_api.parse_completion(body, "m")


@pytest.mark.parametrize(("body", "says"), [
    ({"max_completion_tokens": 0, "max_tokens": 8}, '^"max_completion_tokens" must be a whole number in 1..4096$'),
    ({"max_completion_tokens": None}, '^"max_completion_tokens" must be'),
    ({"max_tokens": True}, '^"max_tokens" must be'),
    ({"n": 9}, '^"n" must be a whole number in 1..8$'),
    ({"top_logprobs": 2}, '^"top_logprobs" needs "logprobs": true$'),
    ({"logprobs": True, "top_logprobs": 21}, '^"top_logprobs" must be a whole number in 0..20$'),
    ({"n": 2, "stream": True}, '^a streamed answer has one sequence'),
    ({"stop": ["a", ""]}, '^"stop" must be a string or a list of at most 4 non-empty strings$'),
    ({"stop": ["s" * 257]}, '^each "stop" string may have at most 256 characters$'),
    ({"stop": ["ok", "\ud800"]}, '^"stop" holds a lone surrogate'),
    ({"seed": 2**63}, '^"seed" must be a whole number from 0 to 2\\*\\*63 - 1$'),
    ({"top_p": 0.5, "tools": [{}]}, '^"tools" is not supported by this server; leave it out$'),
])
def test_chat_options_are_refused_with_the_field_and_what_it_takes(body: dict, says: str) -> None:
    with pytest.raises(BadRequest, match=says):
        openai_api.parse_chat(body, "<user>Hi")


def test_chat_options_become_a_generation() -> None:
    generation, stream = openai_api.parse_chat({"max_completion_tokens": 5, "max_tokens": 0, "temperature": 1, "n": 1.0,
                                                "stop": "END", "seed": 7, "stream": True, "logprobs": False}, "<user>Hi")
    assert (generation.prompt, generation.max_tokens, generation.temperature, generation.stop, generation.seed) == (
        "<user>Hi", 5, 1.0, ["END"], 7)
    assert isinstance(generation.temperature, float) and stream == (True, False)


def test_choices_and_log_probabilities_become_a_generation() -> None:
    assert openai_api.parse_completion({"prompt": "x", "n": 3, "logprobs": 2}, "m")[0].n == 3
    assert openai_api.parse_completion({"prompt": "x", "logprobs": 0}, "m")[0].logprobs == 0
    assert openai_api.parse_completion({"prompt": "x"}, "m")[0].logprobs is None
    assert openai_api.parse_chat({"logprobs": True}, "<user>Hi")[0].logprobs == 0
    assert openai_api.parse_chat({"logprobs": True, "top_logprobs": 4}, "<user>Hi")[0].logprobs == 4
    assert openai_api.parse_chat({"logprobs": False}, "<user>Hi")[0].logprobs is None


def test_penalties_and_stream_options_are_read_and_checked() -> None:
    generation, streaming = openai_api.parse_completion(
        {"prompt": "x", "presence_penalty": 1, "frequency_penalty": -0.5, "stream": True,
         "stream_options": {"include_usage": True}}, "m")
    assert (generation.presence_penalty, generation.frequency_penalty, streaming) == (1.0, -0.5, (True, True))
    assert openai_api.parse_completion({"prompt": "x", "presence_penalty": None}, "m")[0].presence_penalty == 0.0
    for body, says in (({"frequency_penalty": 2.5}, '^"frequency_penalty" must be a number in -2..2$'),
                       ({"presence_penalty": "1"}, '^"presence_penalty" must be a number in -2..2$'),
                       ({"stream": True, "stream_options": {"include_usage": True, "chunked": 1}}, '"stream_options" takes only'),
                       ({"stream": True, "stream_options": "usage"}, '"stream_options" must be an object'),
                       ({"stream_options": {"include_usage": True}}, '"stream_options" is only for a streamed answer')):
        with pytest.raises(BadRequest, match=says):
            openai_api.parse_completion({"prompt": "x", **body}, "m")


def test_the_first_problem_is_reported_in_the_order_the_fields_are_checked() -> None:
    with pytest.raises(BadRequest, match='"prompt" must be'):
        openai_api.parse_completion({"prompt": "", "logprobs": 1, "temperature": 9}, "m")
    with pytest.raises(BadRequest, match="the prompt has 1000001 characters"):
        openai_api.parse_completion({"prompt": "a" * 1_000_001, "seed": -1}, "m")
    with pytest.raises(BadRequest, match='"temperature"'):
        openai_api.parse_completion({"prompt": "a" * 1_000_001, "temperature": 9}, "m")


@pytest.mark.parametrize(("body", "says"), [
    ({}, '^"input" is required: a string or a list of strings$'),
    ({"input": []}, '^"input" must be a string or a non-empty list of strings'),
    ({"input": [101, 102]}, "token ids are not accepted"),
    ({"input": "a", "encoding_format": None}, '^"encoding_format" must be "float" or "base64"$'),
    ({"input": "a", "dimensions": 8}, '^"dimensions" is not supported by this model; leave it out$'),
])
def test_embedding_bodies_that_are_refused(body: dict, says: str) -> None:
    with pytest.raises(BadRequest, match=says):
        openai_api.parse_embeddings(body, "m")


def test_embedding_texts_keep_what_the_tokenizer_checks_later() -> None:
    assert openai_api.parse_embeddings({"input": "one"}, "m") == ["one"]
    assert openai_api.parse_embeddings({"input": ["a", "\ud800"], "encoding_format": "base64"}, "m") == ["a", "\ud800"]


@pytest.mark.parametrize(("body", "says"), [
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0]}]}, "2 numbers"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "COMPLEX", "data": [1.0]}]}, "not supported"),
    ({"inputs": [{"name": "x", "shape": [0], "datatype": "FP32", "data": []}]}, "positive whole numbers"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}, '"data"'),
    ({"inputs": []}, "one input"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "INT8", "data": [1, 1000]}]}, "does not fit"),
])
def test_kserve_inputs_that_do_not_make_a_tensor_are_refused(body: dict, says: str) -> None:
    with pytest.raises(BadRequest, match=says):
        kserve.parse_tensor(body, torch.float32)


def test_kserve_nested_data_and_integer_tensors() -> None:
    tensor = kserve.parse_tensor({"inputs": [{"name": "ids", "shape": [2, 2], "datatype": "INT64", "data": [[1, 2], [3, 4]]}]},
                                 torch.float16)
    assert tensor.dtype == torch.int64 and tensor.tolist() == [[1, 2], [3, 4]]
    outputs = kserve.output_tensors({"logits": torch.zeros(1, 2, dtype=torch.bfloat16), "ids": torch.tensor([7])})
    assert [(o["name"], o["datatype"], o["shape"]) for o in outputs] == [("logits", "BF16", [1, 2]), ("ids", "INT64", [1])]


class Streamer:
    """A causal-lm runner that hands out fixed pieces of text."""

    kind = "causal-lm"
    tokenizer = None

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def generate(self, request: object, on_text=None, should_stop=None) -> Completion:
        for piece in self.pieces:
            if on_text is not None:
                on_text(piece)
        return Completion(text="".join(self.pieces), finish_reason="length", prompt_tokens=1, completion_tokens=len(self.pieces))


def test_a_stop_string_split_across_streamed_pieces_is_never_sent() -> None:
    from starlette.testclient import TestClient

    from dsnb.runtime.server.app import ServedModel, ServerApp
    from dsnb.runtime.server.stats import ServerStats

    engine = Engine(Streamer(["Hello wor", "ld. EN", "D of text", " more"]), Collective(1))
    app = ServerApp(engine, ServerStats())
    app.model = ServedModel(name="m", kind="causal-lm", runner=engine.runner)
    engine.start()
    try:
        with TestClient(app.starlette()) as client:
            response = client.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True, "stop": ["END"]})
            events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    finally:
        engine.stop()
    assert events[-1] == "[DONE]"
    import json

    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello world. "
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "END" not in response.text


@pytest.mark.parametrize(("fields", "field"), [
    ({"port": 80}, "port"), ({"port": "8000"}, "port"), ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_queue": -1}, "max_queue"), ({"max_wait_ms": -1}, "max_wait_ms"), ({"token": "short"}, "token"),
    ({"token": "has a space in it"}, "token"), ({"env": {"DSNB_SERVE_TOKEN": "x" * 10}}, "env.DSNB_SERVE_TOKEN"),
    ({"nodes": 0}, "nodes"), ({"procs_per_node": 0}, "procs_per_node"), ({"max_running": 0}, "max_running"),
    ({"max_cache_tokens": 0}, "max_cache_tokens"), ({"prefill_tokens": 1.5}, "prefill_tokens"),
    ({"generation": "static"}, "generation"), ({"lora_adapters": {"../x": "/a"}}, r"lora_adapters\.\.\./x"),
    ({"lora_adapters": {"m": "/a"}}, r"lora_adapters\.m"), ({"lora_adapters": {"sql": ""}}, r"lora_adapters\.sql"),
])
def test_serve_spec_refuses_bad_server_fields(fields: dict, field: str) -> None:
    with pytest.raises(InvalidSpecError, match=rf"ServeSpec\.{field}"):
        ServeSpec(name="m", model="models:build", **fields)


def test_the_serving_job_carries_the_token_as_a_secret_variable_only() -> None:
    spec = ServeSpec(name="m", model="models:build", token="tok-0123456789", procs_per_node=2, max_batch_size=4)
    job = spec.to_job_spec()
    assert job.env == {"DSNB_SERVE_TOKEN": "tok-0123456789"} and "tok-0123456789" not in " ".join(job.args)
    assert job.world_size == 2 and job.args[job.args.index("--max-batch-size") + 1] == "4"
    generating = ServeSpec(name="m", model="models:build", max_running=8, max_cache_tokens=4096, prefill_tokens=64).server_args()
    from dsnb.runtime.server.server import ServerOptions

    options = ServerOptions.parse(generating)  # the server takes what the spec writes
    assert (options.generation, options.max_running, options.max_cache_tokens, options.prefill_tokens) == ("continuous", 8, 4096, 64)
    adapters = ServeSpec(name="m", model="models:build", lora_adapters={"sql": "/adapters/sql"}, allow_lora_loading=True)
    options = ServerOptions.parse(adapters.server_args())
    assert options.lora == ["sql=/adapters/sql"] and options.allow_lora_loading
    from dsnb.runtime import ray_serve_app

    ray_serve_app.check_servable(adapters)  # a Ray Serve replica runs the same server
    replica = ServerOptions.parse(ray_serve_app.serve_config(adapters, route_prefix="/m")["args"]["server_args"])
    assert replica.lora == ["sql=/adapters/sql"] and replica.allow_lora_loading and replica.served_name == "m"
    assert "tok-0123456789" not in repr(spec) and "tok-0123456789" not in repr(job)


def test_a_lone_request_does_not_wait_for_company_but_concurrent_ones_do() -> None:
    """With max_wait_s far beyond the test's limits, a wait for company would hang the test instead of timing it."""
    runner = GatedRecorder()
    engine = Engine(runner, Collective(1), max_batch_size=2, max_wait_s=600.0)
    engine.start()
    try:
        assert submit_all(engine, [("texts", ["a"], 1, None)]) == [([[1.0]], None)]  # not held back for company
        # Two requests that queue while a batch runs are one batch; the engine is then under load.
        held: list[object] = []
        engine.submit(Work("texts", ["hold"], size=1, deliver=lambda r, e: held.append(r)))
        assert runner.holding.wait(10)
        pair: list[object] = []
        both = threading.Semaphore(0)
        for text in ("x", "y"):
            engine.submit(Work("texts", [text], size=1, deliver=lambda r, e: (pair.append(r), both.release())))
        runner.gate.set()
        assert both.acquire(timeout=10) and both.acquire(timeout=10)
        # Under load, a first request waits for company (here up to 600 s): the next one joins it.
        answers: list[object] = []
        done = threading.Event()
        engine.submit(Work("texts", ["d"], size=1, deliver=lambda r, e: answers.append(r)))
        engine.submit(Work("texts", ["ee"], size=1, deliver=lambda r, e: (answers.append(r), done.set())))
        assert done.wait(10)
    finally:
        engine.stop()
    assert runner.batches == [["a"], ["hold"], ["x", "y"], ["d", "ee"]]


class SplitHostile(Recorder):
    """A runner whose first answer cannot be split per request (a scalar, as a loader model may return)."""

    def encode(self, texts: list[str]) -> object:
        answer = super().encode(texts)
        return 1.0 if len(self.batches) == 1 else answer


def test_an_answer_that_cannot_be_split_fails_its_batch_and_the_next_batch_runs() -> None:
    engine = Engine(SplitHostile(), Collective(1), max_batch_size=4, max_wait_s=0.2)
    try:
        first = submit_all(engine, [("texts", ["a"], 1, None), ("texts", ["b"], 1, None)], then_start=True)
        second = submit_all(engine, [("texts", ["cc"], 1, None)])
        assert engine.ready
    finally:
        engine.stop()
    assert all(result is None and isinstance(error, TypeError) for result, error in first)
    assert second == [([[2.0]], None)]


def test_a_batch_loop_that_dies_turns_the_server_unready_and_fails_what_waits() -> None:
    exploding = BrokenCollective(MemoryError("out of memory while broadcasting"), world_size=1)  # not RankLost: unexpected
    engine = Engine(Recorder(), exploding, max_wait_s=0)
    engine.start()
    try:
        first = submit_all(engine, [("texts", ["a"], 1, None)])
        second = submit_all(engine, [("texts", ["b"], 1, None)])  # the loop dies while sharing this one
    finally:
        engine.stop()
    assert first == [([[1.0]], None)]
    assert isinstance(second[0][1], RankLost) and "the batch loop stopped (MemoryError" in str(second[0][1])
    assert not engine.ready and "the batch loop stopped" in engine.not_ready_reason
    with pytest.raises(RankLost):
        engine.submit(Work("texts", ["c"], size=1, deliver=lambda r, e: None))


def test_a_closed_loop_of_clients_does_not_split_into_half_batches() -> None:
    """Eight clients, each sending its next request 1-12 ms after its answer (as HTTP clients do): the batch
    formed after a batch ran waits for the clients that batch answered, so batches stay near eight."""
    import random

    runner = Recorder(delay=0.03)
    engine = Engine(runner, Collective(1), max_batch_size=16, max_wait_s=0.008)
    engine.start()
    stop_at = time.monotonic() + 2.0
    shuffle = random.Random(7)

    def client(index: int) -> None:
        while time.monotonic() < stop_at:
            done = threading.Event()
            engine.submit(Work("texts", [f"c{index}"], size=1, deliver=lambda r, e, done=done: done.set()))
            assert done.wait(10)
            time.sleep(shuffle.uniform(0.001, 0.012))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=20)
    finally:
        engine.stop()
    sizes = [len(batch) for batch in runner.batches[5:]]  # after the first few, the loop's steady state
    assert sum(sizes) / len(sizes) >= 5, sizes  # counted from the first request: about 4, two halves
