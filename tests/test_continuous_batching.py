"""Continuous batching: sequences join and leave one running batch between steps, each as it would run alone.

The running batch, the scheduler and the engine run here in one process on the tiny Llama (1 rank);
the servers at the end run them over HTTP, and ``test_serving_server.py`` on 2 tensor-parallel ranks.
"""

from __future__ import annotations

import concurrent.futures
import doctest
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("starlette")

from dsnb.runtime.server import kv_batch  # noqa: E402
from dsnb.runtime.server import scheduler as scheduler_module  # noqa: E402
from dsnb.runtime.server.engine import Abandoned, Collective, Engine, Work  # noqa: E402
from dsnb.runtime.server.kv_batch import Chunk, RunningBatch, Step  # noqa: E402
from dsnb.runtime.server.model import BadRequest, Completion, Generation, Predictor  # noqa: E402
from dsnb.runtime.server.scheduler import Scheduler  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "serving_code"))
sys.path.insert(0, str(Path(__file__).parent))
from tiny_llama import save_tiny_llama  # noqa: E402

PROMPTS = ["deep speed serving", "a much longer prompt, which the batch has to pad the others for, and then some more",
           "hi", "tensor parallel inference over two ranks", "one more", "continuous batching joins and leaves"]


@pytest.mark.parametrize("module", [kv_batch, scheduler_module])
def test_the_docstring_examples_hold(module: object) -> None:
    result = doctest.testmod(module)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def plain(llama_dir: str) -> tuple[object, object]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_dir)
    return tokenizer, transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()


def alone(plain: tuple[object, object], prompt: str, steps: int) -> list[int]:
    """Greedy tokens of ``prompt`` generated on its own by transformers' ``generate``."""
    tokenizer, model = plain
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.inference_mode():
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    return output[0, ids.shape[1]:].tolist()


def test_sequences_that_join_at_different_steps_and_a_chunked_prompt_each_get_what_they_get_alone(plain) -> None:
    tokenizer, model = plain
    steps = 9
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:4]]
    batch, made = RunningBatch(model), {seq: [] for seq in range(4)}
    joins = {0: [0, 2], 3: [3]}  # sequence 1, the long prompt, is prefilled 4 tokens a step from step 1
    prefilled = 0
    for tick in range(40):
        done = [s for s in batch.running if len(made[s]) >= steps]
        decode = [(s, made[s][-1]) for s in batch.running if s not in done]
        prefill = [Chunk(s, prompts[s], last=True) for s in joins.get(tick, [])]
        if tick >= 1 and prefilled < len(prompts[1]):
            prefill.append(Chunk(1, prompts[1][prefilled:prefilled + 4], prefilled + 4 >= len(prompts[1]), start=prefilled))
            prefilled += 4
        step = Step(drop=done, decode=decode, prefill=prefill)
        logits = batch.run(Step.from_message(step.to_message()))  # as the other ranks receive it
        for seq, row in zip(step.sequences(), logits if logits is not None else []):
            made[seq].append(int(row.argmax()))
        if tick > 3 and not batch.running:
            break
    assert [made[s] for s in range(4)] == [alone(plain, PROMPTS[s], steps) for s in range(4)]
    assert batch.running == [] and batch.cached_tokens == 0  # every row left, with its cache


def test_a_step_that_does_not_match_the_batch_is_refused(plain) -> None:
    batch = RunningBatch(plain[1])
    batch.run(Step(prefill=[Chunk(1, [5, 6, 7], last=True)]))
    with pytest.raises(ValueError, match=r"decodes \[2\], the batch runs \[1\]"):
        batch.run(Step(decode=[(2, 9)]))
    with pytest.raises(ValueError, match="starts at token 3, 0 are prefilled"):
        batch.run(Step(prefill=[Chunk(4, [1], last=True, start=3)]))


class Served:
    """An engine with continuous batching over the tiny Llama, in this process (one rank, no HTTP)."""

    def __init__(self, llama_dir: str, **bounds: int) -> None:
        self.predictor = Predictor(llama_dir, deepspeed=False)
        self.scheduler = Scheduler(self.predictor.tokenizer, self.predictor.prompt_limit, **bounds)
        self.engine = Engine(self.predictor, Collective(1), scheduler=self.scheduler)
        self.steps: list[Step] = []
        run = self.predictor.step

        def recorded(step: Step) -> object:
            self.steps.append(step)
            return run(step)

        self.predictor.step = recorded  # type: ignore[method-assign]
        self.engine.start()

    def submit(self, generation: Generation, on_text=None) -> tuple[Work, concurrent.futures.Future]:
        answer: concurrent.futures.Future = concurrent.futures.Future()

        def deliver(result: object, error: BaseException | None) -> None:
            answer.set_exception(error) if error is not None else answer.set_result(result)

        work = Work("generate", generation, size=1, deliver=deliver, on_text=on_text)
        self.engine.submit(work)
        return work, answer

    def stop(self) -> None:
        self.engine.stop()


@pytest.fixture()
def served(llama_dir: str):
    made: list[Served] = []

    def make(**bounds: int) -> Served:
        made.append(Served(llama_dir, **bounds))
        return made[-1]

    yield make
    for one in made:
        one.stop()


def test_concurrent_requests_share_steps_and_each_gets_its_own_answer(served, plain) -> None:
    server = served()
    tokenizer = plain[0]
    asked = [(PROMPTS[i], 5 + 3 * i) for i in range(6)]
    pending = [server.submit(Generation(prompt=p, max_tokens=n, temperature=0)) for p, n in asked]
    answers: list[Completion] = [future.result(timeout=60) for _, future in pending]
    for (prompt, steps), answer in zip(asked, answers):
        assert answer.text == tokenizer.decode(alone(plain, prompt, steps), skip_special_tokens=True)
        assert answer.completion_tokens == steps and answer.finish_reason == "length" and len(answer.token_times) == steps
    assert max(len(step.decode) for step in server.steps) >= 4  # they did run together
    assert server.scheduler.running == 0 and server.predictor._batch.running == []

    # A seeded sampled request makes the same text in company as alone: each sequence has its own generator.
    sampled = Generation(prompt="deep speed", max_tokens=10, temperature=0.9, top_p=0.9, seed=11)
    by_itself = server.submit(sampled)[1].result(timeout=60).text
    crowd = [server.submit(Generation(prompt=p, max_tokens=12, temperature=1.2, seed=i)) for i, p in enumerate(PROMPTS)]
    together = server.submit(sampled)[1].result(timeout=60).text
    assert together == by_itself and len(tokenizer(together)["input_ids"]) > 2
    assert all(future.result(timeout=60).completion_tokens == 12 for _, future in crowd)


def test_stop_strings_n_and_streaming_in_one_batch(served, plain) -> None:
    server = served()
    tokenizer = plain[0]
    tokens = alone(plain, PROMPTS[0], 10)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    stop = text.split()[2]
    pieces: list[str] = []
    streamed = server.submit(Generation(prompt=PROMPTS[0], max_tokens=10, temperature=0), on_text=pieces.append)[1]
    stopped = server.submit(Generation(prompt=PROMPTS[0], max_tokens=10, temperature=0, stop=[stop]))[1]
    several = server.submit(Generation(prompt=PROMPTS[1], max_tokens=6, temperature=1.0, n=3, seed=2))[1]
    assert "".join(pieces) == text or streamed.result(timeout=60).text == text
    assert streamed.result(timeout=60).text == text and "".join(pieces) == text
    assert pieces[0] == tokenizer.decode(tokens[:1], skip_special_tokens=True)  # the first token's text, at once
    answer = stopped.result(timeout=60)
    assert answer.finish_reason == "stop" and answer.text == text[: text.index(stop)]
    assert answer.completion_tokens < 10  # it left the batch when the stop string appeared
    choices = several.result(timeout=60).choices
    assert len(choices) == 3 and len({c.text for c in choices}) > 1 and all(c.completion_tokens == 6 for c in choices)


def test_a_request_whose_client_left_frees_its_slot_at_the_next_step(served) -> None:
    server = served(max_running=1)
    long_work, long_answer = server.submit(Generation(prompt=PROMPTS[0], max_tokens=200, temperature=0))
    while not server.scheduler.running:
        time.sleep(0.001)
    _, next_answer = server.submit(Generation(prompt=PROMPTS[2], max_tokens=3, temperature=0))
    time.sleep(0.05)
    assert server.scheduler.waiting == 1  # max_running=1: it waits for the slot
    long_work.cancelled.set()
    with pytest.raises(Abandoned, match="the client went away"):
        long_answer.result(timeout=30)
    assert next_answer.result(timeout=30).completion_tokens == 3
    long_seq = server.steps[0].prefill[0].seq
    assert any(long_seq in step.drop for step in server.steps)  # every rank dropped its row
    assert sum(1 for step in server.steps for seq, _ in step.decode if seq == long_seq) < 199  # long before its 200 tokens

    timed, timed_answer = server.submit(Generation(prompt=PROMPTS[0], max_tokens=200, temperature=0))
    timed.deadline = time.monotonic() + 0.05
    with pytest.raises(Abandoned, match="its deadline passed"):
        timed_answer.result(timeout=30)


def test_the_bounds_hold_and_a_request_that_can_never_fit_is_refused(served, plain) -> None:
    server = served(max_running=2, max_cache_tokens=120, prefill_tokens=8)
    tokenizer = plain[0]
    pending = [server.submit(Generation(prompt=p, max_tokens=6, temperature=0)) for p in PROMPTS]
    for prompt, (_, future) in zip(PROMPTS, pending):
        assert future.result(timeout=60).text == tokenizer.decode(alone(plain, prompt, 6), skip_special_tokens=True)
    rows = [len(step.decode) + sum(1 for c in step.prefill if c.start == 0) for step in server.steps]
    assert max(rows) == 2  # never more than max_running sequences at once
    assert all(sum(len(c.tokens) for c in step.prefill) <= 8 for step in server.steps)
    long = [step for step in server.steps if any(c.seq == 2 for c in step.prefill)]  # the long prompt: chunks of 8
    assert len(long) > 2 and all(step.decode for step in long[1:])  # ... while the running sequence decodes on

    with pytest.raises(BadRequest, match=r"needs 140 cache tokens .* at most 120 \(its --max-cache-tokens\)"):
        server.submit(Generation(prompt="hi", max_tokens=137, temperature=0))[1].result(timeout=30)
    with pytest.raises(BadRequest, match="the prompt has .* tokens; this server takes at most"):
        server.submit(Generation(prompt="word " * 300, max_tokens=4, temperature=0))[1].result(timeout=30)
    assert server.scheduler.cache_use == 0 and server.engine.ready


def test_a_failed_step_answers_its_requests_and_the_next_request_runs(served, plain) -> None:
    server = served()
    run = server.predictor.step
    calls = {"n": 0}

    def failing_once(step: Step) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory, say")
        return run(step)

    server.predictor.step = failing_once  # type: ignore[method-assign]
    _, first = server.submit(Generation(prompt=PROMPTS[0], max_tokens=8, temperature=0))
    with pytest.raises(RuntimeError, match="out of memory, say"):
        first.result(timeout=30)
    again = server.submit(Generation(prompt=PROMPTS[0], max_tokens=8, temperature=0))[1].result(timeout=30)
    assert again.text == plain[0].decode(alone(plain, PROMPTS[0], 8), skip_special_tokens=True)
