"""The OpenAI-compatible API: request bodies in, response bodies out (no HTTP here).

Routes (served by :mod:`dsnb.runtime.server.app`): ``GET /v1/models``, ``POST /v1/embeddings``
(embedding and classifier models), ``POST /v1/completions`` and
``POST /v1/chat/completions`` (causal language models; chat needs the tokenizer's chat
template), with ``"stream": true`` as server-sent events. Options dsnb does not honour
(``n`` > 1, ``logprobs``, ``best_of``, tools) are refused with a 400 rather than ignored.

Request bodies are read by pydantic models (:class:`CompletionPrompt` and :class:`SamplingOptions`,
:class:`ChatRequest`, :class:`EmbeddingRequest`); the first problem found becomes a :class:`BadRequest` whose message
names the field and the values it takes.

Example:
    >>> generation, streaming = parse_completion({"model": "m", "prompt": "Hi", "max_tokens": 4, "temperature": 0}, "m")
    >>> generation.max_tokens, generation.do_sample, streaming
    (4, False, Streaming(stream=False, include_usage=False))
"""

from __future__ import annotations

import base64
import secrets
import time
from typing import Annotated, Any, Literal, NamedTuple, TypeVar

import numpy
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    InstanceOf,
    ValidationError,
    model_validator,
)

from dsnb.runtime.server.choices import Choice, TokenLogprob
from dsnb.runtime.server.model import MAX_INPUT_ITEMS, BadRequest, Completion, Generation, check_unicode

#: Tokens one completion may ask for at most.
MAX_NEW_TOKENS = 4096
_UNSUPPORTED = ("best_of", "echo", "suffix", "tools", "functions", "logit_bias")
#: Sequences one request may ask for (``n``), and alternatives per token (``logprobs``, ``top_logprobs``).
MAX_CHOICES = 8
MAX_COMPLETION_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20

#: Characters a stop string may have (transformers prepares tables of vocabulary size x length for each).
MAX_STOP_CHARS = 256

#: What each field takes, said when pydantic finds it wrong.
_TAKES = {
    "n": f'"n" must be a whole number in 1..{MAX_CHOICES}',
    "logprobs": f'"logprobs" must be a whole number in 0..{MAX_COMPLETION_LOGPROBS} (completions) or true or false (chat)',
    "top_logprobs": f'"top_logprobs" must be a whole number in 0..{MAX_TOP_LOGPROBS}',
    "max_tokens": f'"max_tokens" must be a whole number in 1..{MAX_NEW_TOKENS}',
    "max_completion_tokens": f'"max_completion_tokens" must be a whole number in 1..{MAX_NEW_TOKENS}',
    "temperature": '"temperature" must be a number in 0..2',
    "top_p": '"top_p" must be a number in (0, 1]',
    "prompt": '"prompt" must be a non-empty string (one prompt per request)',
    "stop": '"stop" must be a string or a list of at most 4 non-empty strings',
    "seed": '"seed" must be a whole number from 0 to 2**63 - 1',
    "stream": '"stream" must be true or false',
    "stream_options": '"stream_options" takes only "include_usage": true or false',
    "presence_penalty": '"presence_penalty" must be a number in -2..2',
    "frequency_penalty": '"frequency_penalty" must be a number in -2..2',
    "input": '"input" must be a string or a non-empty list of strings (token ids are not accepted)',
    "encoding_format": '"encoding_format" must be "float" or "base64"',
    "dimensions": '"dimensions" is not supported by this model; leave it out',
}
_REQUIRED = {"input": '"input" is required: a string or a list of strings'}

# pydantic's own ``str`` refuses a lone surrogate with a message of its own; texts are taken as
# they are and check_unicode names the field and the character instead.
_Text = InstanceOf[str]


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _one_prompt(value: Any) -> Any:
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def _checked_prompt(prompt: str) -> str:
    if len(prompt) > MAX_INPUT_ITEMS:
        raise BadRequest(f'the prompt has {len(prompt)} characters, at most {MAX_INPUT_ITEMS}; shorten it')
    check_unicode(prompt, "prompt")
    return prompt


def _checked_stop(stop: list[str]) -> list[str]:
    if not all(stop):
        raise BadRequest(_TAKES["stop"])
    if any(len(s) > MAX_STOP_CHARS for s in stop):  # the tokenizer's stop-string tables grow with vocabulary x length
        raise BadRequest(f'each "stop" string may have at most {MAX_STOP_CHARS} characters')
    for text in stop:
        check_unicode(text, "stop")
    return stop


def _whole(value: Any) -> Any:
    """1.0 and true are 1 too, as Python compares them."""
    if isinstance(value, bool) or (isinstance(value, float) and value.is_integer()):
        return int(value)
    return value


def _zero_if_null(value: Any) -> Any:
    return 0.0 if value is None else value


class Streaming(NamedTuple):
    """How to answer: streamed or not, and with a last chunk of token counts (``stream_options.include_usage``)."""

    stream: bool
    include_usage: bool = False


class StreamOptions(BaseModel):
    """``stream_options`` of a streamed (chat) completion."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    include_usage: bool = False


def _stream_options(value: Any) -> Any:
    if value is not None and not isinstance(value, dict):
        raise BadRequest('"stream_options" must be an object such as {"include_usage": true}')
    return value


def _stop_list(value: Any) -> Any:
    return _as_list(value or [])  # null, "" and [] all mean no stop strings


def _new_seed() -> int:
    return secrets.randbelow(2**31)


def _seed_or_new(value: Any) -> Any:
    return _new_seed() if value is None else value


class CompletionPrompt(BaseModel):
    """The prompt of a ``/v1/completions`` body: one non-empty string (a list of exactly one is taken too).

    It is read before the options, so a body without a usable prompt is told so first.

    Example:
        >>> CompletionPrompt.model_validate({"prompt": ["Once"], "max_tokens": 8}).prompt
        'Once'
    """

    model_config = ConfigDict(strict=True, frozen=True)

    prompt: Annotated[_Text, BeforeValidator(_one_prompt), Field(min_length=1)]


class SamplingOptions(BaseModel):
    """The sampling options of a completion or chat body; fields are checked in the order written here.

    ``prompt`` is the text to continue (a chat's messages put through the chat template).
    Options dsnb does not honour are refused when set to anything but ``null``, ``false`` or 0.

    Example:
        >>> SamplingOptions.model_validate({"prompt": "Hi", "stop": "END", "seed": 3}).stop
        ['END']
    """

    model_config = ConfigDict(strict=True, frozen=True)

    n: Annotated[int, BeforeValidator(_whole), Field(ge=1, le=MAX_CHOICES)] = 1
    max_tokens: int = Field(16, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    prompt: Annotated[_Text, AfterValidator(_checked_prompt)]
    stop: Annotated[list[_Text], BeforeValidator(_stop_list), Field(max_length=4), AfterValidator(_checked_stop)] = []
    seed: Annotated[int, BeforeValidator(_seed_or_new), Field(ge=0, lt=2**63)] = Field(default_factory=_new_seed)
    presence_penalty: Annotated[float, BeforeValidator(_zero_if_null), Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, BeforeValidator(_zero_if_null), Field(ge=-2, le=2)] = 0.0
    stream: bool = False
    stream_options: Annotated[StreamOptions | None, BeforeValidator(_stream_options)] = None
    logprobs: Annotated[int | None, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] = None

    def alternatives(self) -> int | None:
        """Alternatives to report per token; None when no log-probabilities are asked for."""
        return self.logprobs

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, body: Any) -> Any:
        for name in _UNSUPPORTED if isinstance(body, dict) else ():
            if body.get(name) not in (None, False, 0):
                raise BadRequest(f'"{name}" is not supported by this server; leave it out')
        return body

    def generation(self) -> Generation:
        """What to generate, as the model runner takes it."""
        return Generation(prompt=self.prompt, max_tokens=self.max_tokens, temperature=self.temperature,
                          top_p=self.top_p, stop=list(self.stop), seed=self.seed,
                          presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                          n=self.n, logprobs=self.alternatives())

    def streaming(self) -> Streaming:
        """Whether to stream, and whether a streamed answer ends with a chunk of token counts.

        Raises:
            BadRequest: ``stream_options`` without ``stream``, as OpenAI refuses it.
        """
        if self.stream_options is not None and not self.stream:
            raise BadRequest('"stream_options" is only for a streamed answer: set "stream": true or leave it out')
        if self.stream and (self.n > 1 or self.alternatives() is not None):
            raise BadRequest('a streamed answer has one sequence and no log-probabilities here: leave out "stream", '
                             'or "n" and "logprobs"')
        return Streaming(self.stream, bool(self.stream_options and self.stream_options.include_usage))


class ChatRequest(SamplingOptions):
    """A ``/v1/chat/completions`` body; ``max_completion_tokens``, when present, is read instead of ``max_tokens``.

    Example:
        >>> ChatRequest.model_validate({"prompt": "<user>Hi", "max_completion_tokens": 5, "max_tokens": 0}).max_tokens
        5
    """

    max_tokens: int = Field(16, ge=1, le=MAX_NEW_TOKENS,
                            validation_alias=AliasChoices("max_completion_tokens", "max_tokens"))
    logprobs: bool | None = None  # type: ignore[assignment]  # chat says yes or no; top_logprobs says how many more
    top_logprobs: Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS)] = None

    def alternatives(self) -> int | None:
        """``top_logprobs`` alternatives (0 without it) when ``logprobs`` is true.

        Raises:
            BadRequest: ``top_logprobs`` without ``logprobs``, as OpenAI refuses it.
        """
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest('"top_logprobs" needs "logprobs": true')
        return (self.top_logprobs or 0) if self.logprobs else None


class EmbeddingRequest(BaseModel):
    """A ``/v1/embeddings`` body: texts (not token ids), answered as floats or base64.

    Example:
        >>> EmbeddingRequest.model_validate({"input": "a sentence"}).input
        ['a sentence']
    """

    model_config = ConfigDict(strict=True, frozen=True)

    input: Annotated[list[_Text], BeforeValidator(_as_list), Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: None = None


_Request = TypeVar("_Request", bound=BaseModel)


def _read(model: type[_Request], body: dict[str, Any]) -> _Request:
    """``body`` read into ``model``.

    Raises:
        BadRequest: the first problem pydantic found, said as :data:`_TAKES` says it (or as the
            server's own check said it, for the checks the models run themselves).
    """
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _bad_request(e) from e


def _bad_request(error: ValidationError) -> BadRequest:
    """The :class:`BadRequest` that says what the first field pydantic found wrong takes."""
    problem = error.errors()[0]
    cause = problem.get("ctx", {}).get("error")
    if isinstance(cause, BadRequest):
        return cause
    name = str(problem["loc"][0]) if problem["loc"] else ""
    if problem["type"] == "missing" and name in _REQUIRED:
        return BadRequest(_REQUIRED[name])
    return BadRequest(_TAKES.get(name, problem["msg"]))


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


def models_response(served: str, created: int, adapters: list[str] | None = None) -> dict[str, Any]:
    """The body of ``GET /v1/models``: the model, then its LoRA adapters (``parent``: the model, as vLLM lists them)."""
    data = [{"id": served, "object": "model", "created": created, "owned_by": "dsnb"}]
    data += [{"id": name, "object": "model", "created": created, "owned_by": "dsnb", "parent": served} for name in adapters or []]
    return {"object": "list", "data": data}


def parse_embeddings(body: Any, served: str) -> list[str]:
    """The texts of a ``/v1/embeddings`` body.

    Raises:
        BadRequest: no ``input``, token-id input, or an unsupported ``encoding_format``.
        UnknownModel: another model is named.
    """
    check_model(body, served)
    return _read(EmbeddingRequest, body).input


def embeddings_response(served: str, vectors: list[Any], prompt_tokens: int, encoding_format: str = "float"
                        ) -> dict[str, Any]:
    """The body answering ``/v1/embeddings`` (``vectors``: lists or numpy arrays of numbers); ``"base64"`` packs
    each vector as little-endian float32, as OpenAI does.

    Example:
        >>> embeddings_response("m", [[1.0]], 1, "base64")["data"][0]["embedding"]
        'AACAPw=='
    """
    def encoded(vector: Any) -> Any:
        return base64.b64encode(numpy.asarray(vector, dtype="<f4").tobytes()).decode() if encoding_format == "base64" else vector

    return {"object": "list", "model": served,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def parse_completion(body: Any, served: str) -> tuple[Generation, Streaming]:
    """The generation a ``/v1/completions`` body asks for, and how to stream it.

    Raises:
        BadRequest: a missing or list prompt of several texts, or options out of range.
        UnknownModel: another model is named.
    """
    check_model(body, served)
    prompt = _read(CompletionPrompt, body).prompt
    request = _read(SamplingOptions, {**body, "prompt": prompt})
    return request.generation(), request.streaming()


def chat_messages(body: Any, served: str) -> Any:
    """The ``messages`` of a ``/v1/chat/completions`` body (checked by the model's chat template).

    Raises:
        BadRequest: no messages. UnknownModel: another model is named.
    """
    check_model(body, served)
    if "messages" not in body:
        raise BadRequest('"messages" is required: [{"role": "user", "content": "..."}]')
    return body["messages"]


def parse_chat(body: dict[str, Any], prompt: str) -> tuple[Generation, Streaming]:
    """The generation of a chat body whose messages became ``prompt``.

    Raises:
        BadRequest: options out of range.
    """
    request = _read(ChatRequest, {**body, "prompt": prompt})
    return request.generation(), request.streaming()


def new_id(prefix: str) -> str:
    """A response id like OpenAI's (``cmpl-...``, ``chatcmpl-...``)."""
    return f"{prefix}-{secrets.token_hex(12)}"


def _usage(done: Completion) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def completion_response(served: str, done: Completion, chat: bool) -> dict[str, Any]:
    """The body answering a (chat) completion that was not streamed: a choice per sequence."""
    base = {"id": new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": served, "usage": _usage(done)}
    choices = []
    for index, one in enumerate(done.choices or [Choice(done.text, done.finish_reason, done.completion_tokens)]):
        if chat:
            choices.append({"index": index, "message": {"role": "assistant", "content": one.text},
                            "finish_reason": one.finish_reason, "logprobs": _chat_logprobs(one.logprobs)})
        else:
            choices.append({"index": index, "text": one.text, "finish_reason": one.finish_reason,
                            "logprobs": _completion_logprobs(one.logprobs)})
    return {**base, "choices": choices}


def _completion_logprobs(tokens: tuple[TokenLogprob, ...] | None) -> dict[str, Any] | None:
    """The legacy completions' shape: parallel lists, and the alternatives as {token: logprob}."""
    if tokens is None:
        return None
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token.token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": offsets}


def _chat_logprobs(tokens: tuple[TokenLogprob, ...] | None) -> dict[str, Any] | None:
    """The chat shape: a list of tokens, each with its UTF-8 bytes and its alternatives."""
    if tokens is None:
        return None

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(*alt) for alt in t.top]} for t in tokens],
            "refusal": None}


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


def usage_chunk(response_id: str, served: str, chat: bool, done: Completion) -> dict[str, Any]:
    """The last event of a stream that asked for ``include_usage``: no choices, the token counts."""
    return {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": served, "choices": [], "usage": _usage(done)}


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    """An error in OpenAI's shape, which its clients read into their exceptions."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
