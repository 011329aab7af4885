"""The OpenAI-compatible API: request bodies in, response bodies out (no HTTP here).

Routes (served by :mod:`dsnb.runtime.server.app`): ``GET /v1/models``, ``POST /v1/embeddings``
(embedding and classifier models), ``POST /v1/completions`` and
``POST /v1/chat/completions`` (causal language models; chat needs the tokenizer's chat
template), with ``"stream": true`` as server-sent events. Options dsnb does not honour
(``n`` > 1, ``logprobs``, ``best_of``, tools) are refused with a 400 rather than ignored.

Example:
    >>> generation, stream = parse_completion({"model": "m", "prompt": "Hi", "max_tokens": 4, "temperature": 0}, "m")
    >>> generation.max_tokens, generation.do_sample, stream
    (4, False, False)
"""

from __future__ import annotations

import base64
import secrets
import struct
import time
from typing import Any

from dsnb.runtime.server.model import MAX_INPUT_ITEMS, BadRequest, Completion, Generation, check_unicode

#: Tokens one completion may ask for at most.
MAX_NEW_TOKENS = 4096
_UNSUPPORTED = ("logprobs", "top_logprobs", "best_of", "echo", "suffix", "tools", "functions", "logit_bias")

#: Characters a stop string may have (transformers prepares tables of vocabulary size x length for each).
MAX_STOP_CHARS = 256


class UnknownModel(LookupError):
    """The request names a model this server does not serve (HTTP 404)."""


def check_model(body: Any, served: str) -> None:
    """Refuse a body that is not an object or names another model.

    Raises:
        BadRequest: not a JSON object. UnknownModel: ``model`` is set and differs from ``served``.
    """
    if not isinstance(body, dict):
        raise BadRequest("send a JSON object")
    model = body.get("model")
    if model is not None and model != served:
        raise UnknownModel(f"The model `{model}` does not exist; this server serves `{served}` (see GET /v1/models)")


def models_response(served: str, created: int) -> dict[str, Any]:
    """The body of ``GET /v1/models``."""
    return {"object": "list", "data": [{"id": served, "object": "model", "created": created, "owned_by": "dsnb"}]}


def parse_embeddings(body: Any, served: str) -> list[str]:
    """The texts of a ``/v1/embeddings`` body.

    Raises:
        BadRequest: no ``input``, token-id input, or an unsupported ``encoding_format``.
        UnknownModel: another model is named.
    """
    check_model(body, served)
    if "input" not in body:
        raise BadRequest('"input" is required: a string or a list of strings')
    texts = body["input"]
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise BadRequest('"input" must be a string or a non-empty list of strings (token ids are not accepted)')
    if body.get("encoding_format", "float") not in ("float", "base64"):
        raise BadRequest('"encoding_format" must be "float" or "base64"')
    if body.get("dimensions") is not None:
        raise BadRequest('"dimensions" is not supported by this model; leave it out')
    return texts


def embeddings_response(served: str, vectors: list[list[float]], prompt_tokens: int, encoding_format: str = "float"
                        ) -> dict[str, Any]:
    """The body answering ``/v1/embeddings``; ``"base64"`` packs each vector as little-endian float32, as OpenAI does.

    Example:
        >>> embeddings_response("m", [[1.0]], 1, "base64")["data"][0]["embedding"]
        'AACAPw=='
    """
    def encoded(vector: list[float]) -> Any:
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if encoding_format == "base64" else vector

    return {"object": "list", "model": served,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def _sampling(body: dict[str, Any], prompt: str, max_tokens_key: str = "max_tokens") -> tuple[Generation, bool]:
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, False, 0):
            raise BadRequest(f'"{name}" is not supported by this server; leave it out')
    if body.get("n", 1) != 1:
        raise BadRequest('"n" must be 1')
    max_tokens = body.get(max_tokens_key, body.get("max_tokens", 16))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_NEW_TOKENS:
        raise BadRequest(f'"{max_tokens_key}" must be a whole number in 1..{MAX_NEW_TOKENS}')
    temperature = body.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise BadRequest('"temperature" must be a number in 0..2')
    top_p = body.get("top_p", 1.0)
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise BadRequest('"top_p" must be a number in (0, 1]')
    if len(prompt) > MAX_INPUT_ITEMS:
        raise BadRequest(f'the prompt has {len(prompt)} characters, at most {MAX_INPUT_ITEMS}; shorten it')
    check_unicode(prompt, "prompt")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest('"stop" must be a string or a list of at most 4 non-empty strings')
    if any(len(s) > MAX_STOP_CHARS for s in stop):  # the tokenizer's stop-string tables grow with vocabulary x length
        raise BadRequest(f'each "stop" string may have at most {MAX_STOP_CHARS} characters')
    for text in stop:
        check_unicode(text, "stop")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**31)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise BadRequest('"seed" must be a whole number from 0 to 2**63 - 1')
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest('"stream" must be true or false')
    return Generation(prompt=prompt, max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                      stop=stop, seed=seed), stream


def parse_completion(body: Any, served: str) -> tuple[Generation, bool]:
    """The generation a ``/v1/completions`` body asks for, and whether to stream it.

    Raises:
        BadRequest: a missing or list prompt of several texts, or options out of range.
        UnknownModel: another model is named.
    """
    check_model(body, served)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest('"prompt" must be a non-empty string (one prompt per request)')
    return _sampling(body, prompt)


def chat_messages(body: Any, served: str) -> Any:
    """The ``messages`` of a ``/v1/chat/completions`` body (checked by the model's chat template).

    Raises:
        BadRequest: no messages. UnknownModel: another model is named.
    """
    check_model(body, served)
    if "messages" not in body:
        raise BadRequest('"messages" is required: [{"role": "user", "content": "..."}]')
    return body["messages"]


def parse_chat(body: dict[str, Any], prompt: str) -> tuple[Generation, bool]:
    """The generation of a chat body whose messages became ``prompt``.

    Raises:
        BadRequest: options out of range.
    """
    return _sampling(body, prompt, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens")


def new_id(prefix: str) -> str:
    """A response id like OpenAI's (``cmpl-...``, ``chatcmpl-...``)."""
    return f"{prefix}-{secrets.token_hex(12)}"


def _usage(done: Completion) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def completion_response(served: str, done: Completion, chat: bool) -> dict[str, Any]:
    """The body answering a (chat) completion that was not streamed."""
    base = {"id": new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": served, "usage": _usage(done)}
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": done.text}, "finish_reason": done.finish_reason,
                  "logprobs": None}
    else:
        choice = {"index": 0, "text": done.text, "finish_reason": done.finish_reason, "logprobs": None}
    return {**base, "choices": [choice]}


def stream_chunk(response_id: str, served: str, chat: bool, text: str | None = None, finish_reason: str | None = None,
                 first: bool = False) -> dict[str, Any]:
    """One server-sent event's body of a streamed (chat) completion."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    return {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": served, "choices": [choice]}


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    """An error in OpenAI's shape, which its clients read into their exceptions."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
