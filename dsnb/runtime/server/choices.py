"""The choices of one generation: each returned sequence's text, end, token count and log-probabilities.

``generate`` makes ``n`` sequences in one batch (``num_return_sequences``); a sequence that ended
before the others is padded. :func:`sequence_choices` cuts each at its end (the first end-of-text
token), applies the stop strings, and, when asked, reads each token's log-probability and the
``top`` likeliest alternatives from the raw logits of its step (``log_softmax`` of the model's
logits, before temperature, top-p or penalties, as OpenAI reports them).

Example:
    >>> import torch
    >>> rows = torch.tensor([[5, 6, 2], [7, 2, 2]])  # the second sequence ended early (2: end of text)
    >>> [ends_at(row, {2}) for row in rows]
    [3, 2]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the likeliest alternatives at its step."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Choice:
    """One returned sequence."""

    text: str
    finish_reason: str  # "stop" (end of text or a stop string) or "length"
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None


def ends_at(row: Any, end_ids: set[int]) -> int:
    """The sequence's length: up to and with its first end-of-text token (padding follows it)."""
    for index, token in enumerate(row.tolist()):
        if token in end_ids:
            return index + 1
    return len(row)


def sequence_choices(tokenizer: Any, rows: Any, logits: tuple[Any, ...] | None, max_tokens: int, stops: list[str],
                     end_ids: set[int], top: int | None) -> list[Choice]:
    """A :class:`Choice` for each row of generated tokens (``rows``: n x steps).

    Args:
        logits: the raw logits of every step (n x vocabulary each), when log-probabilities are asked for.
        top: how many alternatives to report per token (0: only the token's own); None: no log-probabilities.
    """
    choices = []
    for index, row in enumerate(rows):
        length = ends_at(row, end_ids)
        tokens = row[:length]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        finish = "length" if length >= max_tokens else "stop"
        for stop in stops:
            if stop in text:
                text, finish = text[: text.index(stop)], "stop"
        report = None
        if top is not None and logits is not None:
            report = tuple(token_logprob(tokenizer, logits[step][index], int(token), top) for step, token in enumerate(tokens))
        choices.append(Choice(text=text, finish_reason=finish, completion_tokens=length, logprobs=report))
    return choices


def token_logprob(tokenizer: Any, step_logits: Any, token: int, top: int) -> TokenLogprob:
    """``token``'s log-probability and the ``top`` likeliest alternatives, from one step's raw logits."""
    import torch

    logprobs = torch.log_softmax(step_logits.float(), dim=-1)
    best = torch.topk(logprobs, top) if top else None
    alternatives = () if best is None else tuple(
        (tokenizer.decode([int(i)]), float(v)) for v, i in zip(best.values, best.indices))
    return TokenLogprob(token=tokenizer.decode([token]), logprob=float(logprobs[token]), top=alternatives)
