"""The running batch of a continuously batching server, as every rank holds it: sequences and their KV cache.

Rank 0's scheduler (:mod:`dsnb.runtime.server.scheduler`) decides each step; every rank applies
the same :class:`Step` to its own :class:`RunningBatch` (its part of a tensor-parallel model's
heads), so the ranks' caches stay in line without ever being sent. A step:

1. drops the sequences that ended or whose client left (their rows leave the cache);
2. decodes one token for every running sequence (one forward pass over the whole batch);
3. prefills prompts: new prompts that fit the step's token budget together in one pass,
   and one chunk of a prompt too long for it (chunked prefill: a long prompt takes several
   steps, and the running sequences go on decoding meanwhile). A prompt whose last chunk ran
   joins the running batch.

Sequences of different lengths share one cache by left padding: each row's real tokens end at
the right, its padding is masked out, and each row's positions count its own tokens only, so
a sequence's logits are those it would get alone. Leading columns that only padding fills
are cut when rows leave.

Example:
    >>> step = Step(drop=[3], decode=[(1, 42)], prefill=[Chunk(seq=5, tokens=[8, 9], last=True, start=30),
    ...                                                  Chunk(seq=4, tokens=[5, 6, 7], last=True)])
    >>> step.sequences()
    [1, 4, 5]
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens of one sequence to prefill in a step, from position ``start``; ``last``: the prompt ends with them."""

    seq: int
    tokens: list[int]
    last: bool
    start: int = 0
    adapter: str | None = None  # the sequence's LoRA adapter (dsnb.runtime.server.lora); None: the base model

    @property
    def whole(self) -> bool:
        """A whole prompt in one chunk: it runs with the step's other whole prompts, in one pass."""
        return self.start == 0 and self.last


@dataclass(frozen=True)
class Step:
    """What every rank does in one step (rank 0 decides, the others receive it).

    Attributes:
        drop: sequences to remove before anything runs.
        decode: ``(sequence, token)`` for every running sequence, in the batch's row order:
            the token it generated last, fed to get the next.
        prefill: prompt chunks; whole prompts run together, a long prompt's chunk on its own.
        reset: forget every sequence first (after a failed step, whose effect on each rank is unknown).
    """

    drop: list[int] = field(default_factory=list)
    decode: list[tuple[int, int]] = field(default_factory=list)
    prefill: list[Chunk] = field(default_factory=list)
    reset: bool = False

    def sequences(self) -> list[int]:
        """The sequences this step produces logits for, in order: the decoded ones, the whole prompts,
        then the long prompts whose last chunk it runs."""
        return ([seq for seq, _ in self.decode] + [c.seq for c in self.prefill if c.whole]
                + [c.seq for c in self.prefill if c.last and not c.whole])

    def to_message(self) -> dict[str, Any]:
        """A plain dict (what :class:`~dsnb.runtime.server.engine.Collective` sends to the other ranks)."""
        return {"op": "step", "drop": self.drop, "decode": self.decode, "reset": self.reset,
                "prefill": [(c.seq, c.tokens, c.last, c.start, c.adapter) for c in self.prefill]}

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Step:
        """Inverse of :meth:`to_message`."""
        return cls(drop=list(message["drop"]), decode=[tuple(d) for d in message["decode"]], reset=message["reset"],
                   prefill=[Chunk(seq, list(tokens), last, start, adapter) for seq, tokens, last, start, adapter in message["prefill"]])


class _Rows:
    """Sequences sharing one KV cache: per layer ``(keys, values)`` of shape [rows, heads, length, dim],
    a mask [rows, length] (1: a real token, 0: left padding), and each row's LoRA adapter."""

    def __init__(self, seqs: list[int], layers: list[tuple[Any, Any]], mask: Any, adapters: list[str | None]) -> None:
        self.seqs, self.layers, self.mask, self.adapters = seqs, layers, mask, adapters

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def positions(self) -> Any:
        """The next position of each row: the real tokens it holds."""
        return self.mask.sum(dim=1, keepdim=True)

    def padded_to(self, length: int) -> _Rows:
        """These rows with ``length - self.length`` masked columns added on the left."""
        extra = length - self.length
        if extra <= 0:
            return self
        import torch.nn.functional as F

        layers = [(F.pad(k, (0, 0, extra, 0)), F.pad(v, (0, 0, extra, 0))) for k, v in self.layers]
        return _Rows(self.seqs, layers, F.pad(self.mask, (extra, 0)), self.adapters)

    def select(self, keep: list[int]) -> _Rows:
        """The rows at indices ``keep``, less the leading columns that only padding fills now."""
        import torch

        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        layers = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:]) for k, v in self.layers]
        return _Rows([self.seqs[i] for i in keep], layers, mask[:, start:], [self.adapters[i] for i in keep])


def _joined(a: _Rows | None, b: _Rows) -> _Rows:
    """The rows of ``a`` then ``b`` in one cache (the shorter padded on the left)."""
    if a is None or not a.seqs:
        return b
    import torch

    length = max(a.length, b.length)
    a, b = a.padded_to(length), b.padded_to(length)
    layers = [(torch.cat([ka, kb]), torch.cat([va, vb])) for (ka, va), (kb, vb) in zip(a.layers, b.layers)]
    return _Rows(a.seqs + b.seqs, layers, torch.cat([a.mask, b.mask]), a.adapters + b.adapters)


class RunningBatch:
    """One rank's sequences and their KV cache; :meth:`run` applies a :class:`Step`.

    Args:
        model: a Hugging Face causal language model (``forward`` takes ``past_key_values``,
            ``attention_mask``, ``position_ids``, ``logits_to_keep``), or its tensor-parallel part.
        device: where the inputs go.
        adapters: the model's LoRA adapters (:class:`~dsnb.runtime.server.lora.Adapters`), whose ``model``
            then runs each pass, each row with its own adapter.

    Example:
        >>> batch = RunningBatch(model=None)
        >>> batch.running, batch.cached_tokens
        ([], 0)
    """

    def __init__(self, model: Any, device: Any = "cpu", adapters: Any = None) -> None:
        self.model, self.device, self.adapters = model, device, adapters
        # transformers 5.x names the cache ``cache``; 4.x ``past_key_values``
        parameters = inspect.signature(model.forward).parameters if model is not None else {}
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._rows: _Rows | None = None
        self._partial: dict[int, _Rows] = {}  # prompts prefilled in part (one row each)

    @property
    def running(self) -> list[int]:
        """The running sequences, in row order."""
        return list(self._rows.seqs) if self._rows is not None else []

    @property
    def cached_tokens(self) -> int:
        """Cache slots in use (padding included), over the running batch and the partial prompts."""
        rows = [self._rows] if self._rows is not None else []
        return sum(len(r.seqs) * r.length for r in [*rows, *self._partial.values()])

    def run(self, step: Step) -> Any:
        """Apply ``step``; the last-position logits of :meth:`Step.sequences`, one row each, in that order
        (None when it produces none).

        Raises:
            ValueError: the step does not match this batch (a decode list out of the rows' order).
        """
        import torch

        if step.reset:
            self._rows, self._partial = None, {}
        self._drop(set(step.drop))
        outputs = []
        with torch.inference_mode():
            if step.decode:
                outputs.append(self._decode(step.decode))
            whole = [c for c in step.prefill if c.whole]
            if whole:
                outputs.append(self._prefill_whole(whole))
            for chunk in step.prefill:
                if not chunk.whole:
                    logits = self._prefill_chunk(chunk)
                    if logits is not None:
                        outputs.append(logits)
        return torch.cat(outputs) if outputs else None

    def _drop(self, seqs: set[int]) -> None:
        for seq in seqs:
            self._partial.pop(seq, None)
        if self._rows is not None and seqs & set(self._rows.seqs):
            keep = [i for i, seq in enumerate(self._rows.seqs) if seq not in seqs]
            self._rows = self._rows.select(keep) if keep else None

    def _forward(self, ids: Any, mask: Any, positions: Any, layers: list[tuple[Any, Any]] | None,
                 adapters: list[str | None]) -> tuple[Any, list[tuple[Any, Any]]]:
        """Logits of the last position of each row, and the cache's layers after the pass."""
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=layers) if layers else DynamicCache()
        model, by_row = self.model, {}
        if self.adapters is not None:
            model, by_row = self.adapters.model, self.adapters.row_names(adapters)
        output = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                       **{self._cache_argument: cache}, **by_row)
        cache = output[self._cache_argument]
        return output.logits[:, -1, :], [(layer.keys, layer.values) for layer in cache.layers]

    def _decode(self, feed: list[tuple[int, int]]) -> Any:
        import torch

        rows = self._rows
        if rows is None or [seq for seq, _ in feed] != rows.seqs:
            raise ValueError(f"the step decodes {[s for s, _ in feed]}, the batch runs {self.running}")
        ids = torch.tensor([[token] for _, token in feed], dtype=torch.long, device=self.device)
        mask = torch.cat([rows.mask, torch.ones_like(rows.mask[:, :1])], dim=1)
        logits, layers = self._forward(ids, mask, rows.positions(), rows.layers, rows.adapters)
        self._rows = _Rows(rows.seqs, layers, mask, rows.adapters)
        return logits

    def _prefill_whole(self, chunks: list[Chunk]) -> Any:
        """Whole new prompts, left padded to the longest, in one pass; they join the running batch."""
        import torch

        length = max(len(c.tokens) for c in chunks)
        ids = torch.zeros((len(chunks), length), dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for row, chunk in enumerate(chunks):
            ids[row, length - len(chunk.tokens):] = torch.tensor(chunk.tokens, dtype=torch.long)
            mask[row, length - len(chunk.tokens):] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        adapters = [c.adapter for c in chunks]
        logits, layers = self._forward(ids, mask, positions, None, adapters)
        self._rows = _joined(self._rows, _Rows([c.seq for c in chunks], layers, mask, adapters))
        return logits

    def _prefill_chunk(self, chunk: Chunk) -> Any:
        """One chunk of a long prompt (its own row); its logits when it is the prompt's last."""
        import torch

        before = self._partial.pop(chunk.seq, None)
        past = before.length if before is not None else 0
        if past != chunk.start:
            raise ValueError(f"sequence {chunk.seq}: the chunk starts at token {chunk.start}, {past} are prefilled")
        ids = torch.tensor([chunk.tokens], dtype=torch.long, device=self.device)
        mask = torch.ones((1, past + len(chunk.tokens)), dtype=torch.long, device=self.device)
        positions = torch.arange(past, past + len(chunk.tokens), device=self.device).unsqueeze(0)
        logits, layers = self._forward(ids, mask, positions, before.layers if before is not None else None, [chunk.adapter])
        rows = _Rows([chunk.seq], layers, mask, [chunk.adapter])
        if not chunk.last:
            self._partial[chunk.seq] = rows
            return None
        self._rows = _joined(self._rows, rows)
        return logits
