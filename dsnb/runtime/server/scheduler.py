"""Continuous batching on rank 0: which sequences run each step, and what each one generates.

Generation requests join and leave one running batch between decode steps (iteration-level
scheduling, as Orca, vLLM and DeepSpeed-FastGen do). Each step, :meth:`Scheduler.plan` says what
every rank runs (a :class:`~dsnb.runtime.server.kv_batch.Step`: the sequences to drop, one
token to decode for each running sequence, prompt chunks to prefill), and
:meth:`Scheduler.advance` turns the step's logits into tokens, with each request's own sampling
settings, stop strings and length, streams the new text, and answers the requests that ended.

Bounds (the server's options):

- ``max_running``: sequences in the batch at once (with their prompts being prefilled);
- ``max_cache_tokens``: tokens in flight, each running sequence counting its prompt and all
  the tokens it may still generate, so a batch never outgrows its cache; a request that could
  never fit is refused (400), the others wait their turn in arrival order;
- ``prefill_tokens``: prompt tokens prefilled per step; a longer prompt is prefilled in chunks
  of that size over several steps, while the running sequences keep decoding.

A sequence whose client went away, or whose deadline passed, leaves the batch at the next step.

Example:
    >>> scheduler = Scheduler(tokenizer=None, prompt_limit=lambda max_tokens: 100)
    >>> scheduler.plan()
    Step(drop=[], decode=[], prefill=[], reset=False)
    >>> scheduler.has_work, scheduler.running, scheduler.waiting
    (False, 0, 0)
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dsnb.runtime.server.choices import Choice, TokenLogprob, token_logprob
from dsnb.runtime.server.detokenize import TextStream
from dsnb.runtime.server.engine import Abandoned, deliver
from dsnb.runtime.server.kv_batch import Chunk, Step
from dsnb.runtime.server.model import BadRequest, Completion, Generation

log = logging.getLogger("dsnb.serving")

#: Sequences in the running batch at most, by default (``--max-running``).
MAX_RUNNING = 64
#: Tokens in flight at most, by default (``--max-cache-tokens``): prompts and what they may still generate.
MAX_CACHE_TOKENS = 32768
#: Prompt tokens prefilled per step, by default (``--prefill-tokens``); a longer prompt takes several steps.
PREFILL_TOKENS = 512


@dataclass(eq=False)
class _Request:
    """One generation request: its work item, its settings and its sequences (``n`` of them when sampling)."""

    work: Any  # dsnb.runtime.server.engine.Work
    generation: Generation
    prompt: list[int]
    sequences: list[_Sequence] = field(default_factory=list)
    copies: int = 1  # greedy n > 1: one sequence, answered n times

    def finished(self) -> bool:
        return all(s.finish is not None for s in self.sequences)


@dataclass(eq=False)
class _Sequence:
    """One generated sequence: its tokens so far and what decides the next."""

    id: int
    request: _Request
    index: int
    generator: Any = None  # a torch.Generator when sampling
    prefilled: int = 0
    tokens: list[int] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)  # generated tokens, for the penalties
    logprobs: list[TokenLogprob] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    text: TextStream | None = None  # its text a piece per token, when it streams or has stop strings
    finish: str | None = None

    @property
    def streams(self) -> bool:
        """Whether its text goes to the request's ``on_text`` (a streamed request streams its first sequence)."""
        return self.request.work.on_text is not None and self.index == 0

    @property
    def reserved(self) -> int:
        """Cache tokens this sequence may hold at most: its prompt and every token it may generate."""
        return len(self.request.prompt) + self.request.generation.max_tokens


class Scheduler:
    """Rank 0's continuous batcher (see the module docstring).

    Args:
        tokenizer: the model's tokenizer (a transformers one).
        prompt_limit: the prompt tokens a generation of ``max_tokens`` may start from
            (:meth:`~dsnb.runtime.server.model.Predictor.prompt_limit`).
        max_running, max_cache_tokens, prefill_tokens: the bounds above.
        end_token: the token that ends a text (the tokenizer's end of text by default).
    """

    def __init__(self, tokenizer: Any, prompt_limit: Callable[[int], int], max_running: int = MAX_RUNNING,
                 max_cache_tokens: int = MAX_CACHE_TOKENS, prefill_tokens: int = PREFILL_TOKENS,
                 end_token: int | None = None) -> None:
        if max_running < 1 or max_cache_tokens < 1 or prefill_tokens < 1:
            raise ValueError("max_running, max_cache_tokens and prefill_tokens must be at least 1")
        self.tokenizer, self.prompt_limit = tokenizer, prompt_limit
        self.max_running, self.max_cache_tokens, self.prefill_tokens = max_running, max_cache_tokens, prefill_tokens
        self.end_token = end_token if end_token is not None else getattr(tokenizer, "eos_token_id", None)
        self._ids = itertools.count(1)
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._rows: list[_Sequence] = []  # the running batch, in its row order on every rank
        self._prefilling: list[_Sequence] = []  # admitted, prompt not (wholly) prefilled yet
        self._ended: list[int] = []  # sequences to drop at the next step
        self._reset = False
        self._reserved = 0

    # -- state ---------------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        """Whether a step has anything to do."""
        return bool(self._waiting or self._rows or self._prefilling or self._ended or self._reset)

    @property
    def running(self) -> int:
        """Sequences admitted to the batch (decoding, or their prompt being prefilled)."""
        return len(self._rows) + len(self._prefilling)

    @property
    def waiting(self) -> int:
        """Sequences waiting for room in the batch."""
        return len(self._waiting)

    def uses(self, adapter: str) -> bool:
        """Whether a sequence admitted or waiting generates with the LoRA adapter ``adapter``."""
        return any(seq.request.generation.adapter == adapter for seq in [*self._rows, *self._prefilling, *self._waiting])

    @property
    def cache_use(self) -> float:
        """The fraction of ``max_cache_tokens`` that the admitted sequences hold or may grow to."""
        return self._reserved / self.max_cache_tokens

    # -- requests ------------------------------------------------------------------------------
    def add(self, work: Any) -> None:
        """Take a ``generate`` work item; its ``deliver`` gets a :class:`Completion` when every sequence ended.

        Raises:
            BadRequest: the prompt is longer than the model takes, or the request could never fit the cache.
        """
        import torch

        generation: Generation = work.data
        prompt = self.tokenizer(generation.prompt)["input_ids"]
        limit = self.prompt_limit(generation.max_tokens)
        if len(prompt) > limit:
            raise BadRequest(f"the prompt has {len(prompt)} tokens; this server takes at most {limit} "
                             f"with max_tokens={generation.max_tokens}; shorten it")
        sampled = generation.n if generation.do_sample else 1
        needed = sampled * (len(prompt) + generation.max_tokens)
        if needed > self.max_cache_tokens:
            raise BadRequest(f"the request needs {needed} cache tokens ({sampled} x ({len(prompt)} prompt + "
                             f"max_tokens={generation.max_tokens})); this server holds at most {self.max_cache_tokens} "
                             "(its --max-cache-tokens): lower max_tokens or n")
        request = _Request(work, generation, prompt, copies=generation.n // sampled)
        for index in range(sampled):
            generator = torch.Generator().manual_seed(generation.seed * 8 + index) if generation.do_sample else None
            seq = _Sequence(next(self._ids), request, index, generator)
            if seq.streams or generation.stop:
                seq.text = TextStream(self.tokenizer)
            request.sequences.append(seq)
        self._waiting.extend(request.sequences)

    def fail_all(self, error: BaseException) -> None:
        """Answer every request in flight with ``error``; the next step resets every rank's batch."""
        for seq in [*self._rows, *self._prefilling, *self._waiting]:
            _answer(seq.request, None, error)
        self._rows, self._prefilling, self._waiting, self._ended = [], [], collections.deque(), []
        self._reserved, self._reset = 0, True

    # -- a step --------------------------------------------------------------------------------
    def plan(self) -> Step:
        """The next step: drop what ended or was abandoned, decode the running, prefill what fits."""
        self._drop_abandoned()
        drop, self._ended = self._ended, []
        reset, self._reset = self._reset, False
        decode = [(seq.id, seq.tokens[-1]) for seq in self._rows]
        return Step(drop=drop, decode=decode, prefill=self._prefill(), reset=reset)

    def advance(self, step: Step, logits: Any) -> None:
        """Take the step's logits: each sequence's next token; stream, end and answer as it comes."""
        ids = step.sequences()
        if not ids:
            return
        now = time.monotonic()
        by_id = {seq.id: seq for seq in [*self._rows, *self._prefilling]}
        greedy = logits.argmax(dim=-1).tolist()
        for row, seq_id in enumerate(ids):
            seq = by_id.get(seq_id)
            if seq is None:
                continue  # answered meanwhile (its request failed)
            if seq in self._prefilling:
                self._prefilling.remove(seq)
                self._rows.append(seq)
            token = greedy[row] if self._plain(seq) else self._sample(seq, logits[row])
            if seq.request.generation.logprobs is not None:
                seq.logprobs.append(token_logprob(self.tokenizer, logits[row], token, seq.request.generation.logprobs))
            seq.tokens.append(token)
            seq.counts[token] = seq.counts.get(token, 0) + 1
            seq.times.append(now)
            self._after_token(seq)

    # -- inside --------------------------------------------------------------------------------
    def _drop_abandoned(self) -> None:
        for seq in [*self._rows, *self._prefilling, *self._waiting]:
            if seq.finish is None and (why := seq.request.work.abandoned()) is not None:
                print(f"dsnb.serving: generation stopped after {len(seq.tokens)} of {seq.request.generation.max_tokens} "
                      f"tokens ({why}); its sequence leaves the batch", flush=True)
                self._end_request(seq.request, Abandoned(f"stopped: {why}"))

    def _prefill(self) -> list[Chunk]:
        """Prompt chunks for this step, in arrival order, within the step's budget and the batch's bounds."""
        chunks: list[Chunk] = []
        budget = self.prefill_tokens
        for seq in list(self._prefilling):  # a long prompt under way goes on first
            size = min(budget, len(seq.request.prompt) - seq.prefilled)
            if size > 0:
                chunks.append(self._chunk(seq, size))
                budget -= size
        while self._waiting and budget > 0:
            seq = self._waiting[0]
            whole = len(seq.request.prompt)
            if self.running >= self.max_running or self._reserved + seq.reserved > self.max_cache_tokens:
                break  # it waits for room; the ones behind it wait behind it
            if whole > budget and (chunks or self._prefilling):
                break  # a long prompt starts on a step of its own
            self._waiting.popleft()
            self._prefilling.append(seq)
            self._reserved += seq.reserved
            size = min(budget, whole)
            chunks.append(self._chunk(seq, size))
            budget -= size
        return chunks

    def _chunk(self, seq: _Sequence, size: int) -> Chunk:
        start = seq.prefilled
        seq.prefilled += size
        return Chunk(seq.id, seq.request.prompt[start:seq.prefilled], last=seq.prefilled == len(seq.request.prompt),
                     start=start, adapter=seq.request.generation.adapter)

    @staticmethod
    def _plain(seq: _Sequence) -> bool:
        """Greedy without penalties: the batch's arg-max is the token."""
        generation = seq.request.generation
        return not generation.do_sample and not generation.presence_penalty and not generation.frequency_penalty

    def _sample(self, seq: _Sequence, logits: Any) -> int:
        """The next token of ``seq``: penalties (OpenAI's formula, over the completion), then temperature and
        top-p sampling with the sequence's own generator, or the likeliest token."""
        import torch

        generation = seq.request.generation
        scores = logits.float()
        if seq.counts and (generation.presence_penalty or generation.frequency_penalty):
            scores = scores.clone()
            tokens = torch.tensor(list(seq.counts), dtype=torch.long)
            counts = torch.tensor(list(seq.counts.values()), dtype=scores.dtype)
            scores[tokens] -= generation.frequency_penalty * counts + generation.presence_penalty
        if not generation.do_sample:
            return int(scores.argmax())
        probs = torch.softmax(scores / generation.temperature, dim=-1)
        if generation.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            outside = ordered.cumsum(dim=-1) - ordered > generation.top_p  # keeps at least the likeliest token
            ordered[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, ordered)
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def _after_token(self, seq: _Sequence) -> None:
        """End ``seq`` if its last token ends it; stream the text the token completes (all of it at the end)."""
        generation = seq.request.generation
        piece = seq.text.add(seq.tokens[-1]) if seq.text is not None else ""
        if seq.tokens[-1] == self.end_token:
            seq.finish = "stop"
        elif piece and generation.stop and any(stop in seq.text.text for stop in generation.stop):
            seq.finish = "stop"
        elif len(seq.tokens) >= generation.max_tokens:
            seq.finish = "length"
        if seq.finish is not None and seq.text is not None:
            piece += seq.text.flush()
        if piece and seq.streams:
            seq.request.work.on_text(piece)
        if seq.finish is not None:
            self._leave(seq)
            if seq.request.finished():
                self._end_request(seq.request, None)

    def _leave(self, seq: _Sequence) -> None:
        """Take ``seq`` out of the batch; every rank drops it at the next step."""
        if seq in self._rows:
            self._rows.remove(seq)
            self._ended.append(seq.id)
        elif seq in self._prefilling:
            self._prefilling.remove(seq)
            self._ended.append(seq.id)
        else:
            self._waiting.remove(seq)
            return
        self._reserved -= seq.reserved

    def _end_request(self, request: _Request, error: BaseException | None) -> None:
        for seq in request.sequences:
            if seq.finish is None:
                seq.finish = "abandoned"
                self._leave(seq)
        _answer(request, None if error is not None else self._completion(request), error)

    def _completion(self, request: _Request) -> Completion:
        choices = [self._choice(seq) for seq in request.sequences] * request.copies
        first = request.sequences[0]
        return Completion(text=choices[0].text, finish_reason=choices[0].finish_reason, prompt_tokens=len(request.prompt),
                          completion_tokens=sum(c.completion_tokens for c in choices), choices=choices,
                          token_times=first.times)

    def _choice(self, seq: _Sequence) -> Choice:
        text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        cut = min((text.index(stop) for stop in seq.request.generation.stop if stop in text), default=None)
        logprobs = tuple(seq.logprobs) if seq.request.generation.logprobs is not None else None
        return Choice(text=text if cut is None else text[:cut], finish_reason=seq.finish or "stop",
                      completion_tokens=len(seq.tokens), logprobs=logprobs)


def _answer(request: _Request, completion: Completion | None, error: BaseException | None) -> None:
    deliver(request.work, completion, error)  # once per request, whatever its sequences do
