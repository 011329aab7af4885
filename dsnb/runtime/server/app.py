"""Rank 0's HTTP application (Starlette under uvicorn): every route, auth, limits and errors.

Routes:

- ``GET /healthz``, ``GET /v2/health/live``: 200 while the process lives (liveness).
- ``GET /readyz``, ``GET /v2/health/ready``: 200 once every rank has loaded the model, 503
  with the reason before, while draining, or after a rank was lost (readiness).
- ``GET /metrics``: Prometheus text format.
- ``POST /`` and ``POST /predict``: dsnb's own ``{"inputs": ...}`` → ``{"outputs": ...}``.
- ``/v1/...``: the OpenAI-compatible API (:mod:`dsnb.runtime.server.openai_api`).
- ``/v2/...``: the Open Inference Protocol (:mod:`dsnb.runtime.server.kserve`).

With a token, every route but the health probes and ``/metrics`` needs
``Authorization: Bearer <token>`` (401 otherwise). A body above ``max_body_bytes`` is a
413, a full queue a 503 with ``Retry-After``, malformed input a 400 naming the problem.

Example:
    >>> from starlette.testclient import TestClient           # doctest: +SKIP
    >>> client = TestClient(build_app(server))                # doctest: +SKIP
    >>> client.get("/readyz").json()                          # doctest: +SKIP
    {'ready': True}
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import copy
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dsnb.runtime.server import kserve, kserve_binary, lora, openai_api
from dsnb.runtime.server.connections import BODY_BYTES_IN_FLIGHT, BodyBudget, SlowClient, read_body
from dsnb.runtime.server.engine import Abandoned, Draining, Engine, Overloaded, RankLost, Work
from dsnb.runtime.server.model import MAX_INPUT_ITEMS, BadRequest, Completion, chat_prompt, to_json
from dsnb.runtime.server.stats import ServerStats

log = logging.getLogger("dsnb.serving")
RETRY_AFTER_S = 1
_OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"})


#: JSON values a body may hold: every input a request may carry (``MAX_INPUT_ITEMS`` characters or
#: numbers) and room for the rest of the request.
MAX_JSON_VALUES = MAX_INPUT_ITEMS + 100_000
#: Bodies up to this size are parsed on the event loop; larger ones in a thread.
INLINE_JSON_BYTES = 64 * 1024


class TooLarge(ValueError):
    """The request body is above the limit (HTTP 413)."""


class NotJsonSafe(ValueError):
    """The model's answer holds NaN or infinity, which JSON cannot carry (HTTP 422)."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("the model's answer holds NaN or infinity, which JSON cannot carry; check the model and the inputs"
                         + (f" ({detail})" if detail else ""))


def parse_json(raw: bytes) -> Any:
    """A request body as JSON.

    Before parsing, the values the body can hold are counted from its bytes (an upper bound: every
    value but the first follows a ``,``, ``[`` or ``:``). A body of more than :data:`MAX_JSON_VALUES`
    is refused at once: parsing 15 MiB of ``[[],[],...]`` makes 5 million lists, takes seconds
    holding the interpreter's lock (so no thread helps the event loop meanwhile) and hundreds of MB,
    and no body the server would take holds that many.

    Raises:
        BadRequest: not JSON (``NaN`` and ``Infinity``, which Python reads, are not JSON either),
            too many values, or nested too deeply to parse (a 400, not a crash).

    Example:
        >>> parse_json(b"[" * 100_000 + b"]" * 100_000)
        Traceback (most recent call last):
        dsnb.runtime.server.model.BadRequest: the body is nested too deeply to be read
        >>> parse_json(b"[" + b"[]," * 2_000_000 + b"[]]")
        Traceback (most recent call last):
        dsnb.runtime.server.model.BadRequest: the body holds up to 4000002 JSON values, more than the 1100000 a request may have
    """
    values = raw.count(b",") + raw.count(b"[") + raw.count(b":")
    if values > MAX_JSON_VALUES:
        raise BadRequest(f"the body holds up to {values} JSON values, more than the {MAX_JSON_VALUES} a request may have")
    try:
        return json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise BadRequest("the body is nested too deeply to be read") from None
    except ValueError as e:
        raise BadRequest(f"the body is not valid JSON ({e})") from None


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class Unauthorized(PermissionError):
    """No or a wrong bearer token (HTTP 401)."""


class Forbidden(PermissionError):
    """The server does not do this (HTTP 403); the message says which option allows it."""


@dataclass
class ServedModel:
    """What the HTTP side knows of the model (the engine's thread owns the model itself).

    Attributes:
        name: the model's name in the APIs (``/v1/models``, ``/v2/models/{name}``).
        kind: ``"loader"``, ``"embedding"``, ``"classifier"`` or ``"causal-lm"``.
        runner: the model runner, for checking inputs (no model calls from the HTTP side).
        tokenizer: a copy of the tokenizer for counting tokens and chat templates (a
            tokenizer must not be shared between threads).
    """

    name: str
    kind: str
    runner: Any
    tokenizer: Any = None
    adapters: list[str] = field(default_factory=list)  # the LoRA adapters a request may name as its model

    @classmethod
    def of(cls, name: str, runner: Any) -> ServedModel:
        """Describe ``runner`` (a :class:`~dsnb.runtime.server.model.Predictor`) served as ``name``."""
        tokenizer = copy.deepcopy(runner.tokenizer) if getattr(runner, "tokenizer", None) is not None else None
        adapters = list(runner.adapters.names) if getattr(runner, "adapters", None) is not None else []
        return cls(name=name, kind=runner.kind, runner=runner, tokenizer=tokenizer, adapters=adapters)

    def named(self, body: Any) -> str:
        """The model a request body names: this model's name (also when it names none) or a LoRA adapter's.

        Raises:
            UnknownModel: it names another model.
        """
        asked = body.get("model") if isinstance(body, dict) else None
        if asked is None or asked == self.name:
            return self.name
        if asked in self.adapters:
            return asked
        served = ", ".join(f"`{n}`" for n in [self.name, *self.adapters])
        raise openai_api.UnknownModel(f"The model `{asked}` does not exist; this server serves {served} (see GET /v1/models)")


class ServerApp:
    """The routes of one server (see the module docstring).

    Args:
        engine: rank 0's batch loop.
        stats: counters for ``/metrics`` and the notebook.
        token: bearer token; None serves without auth.
        max_body_bytes: larger bodies are refused with 413.
        body_bytes_in_flight: bytes of bodies held at once; a body that would pass it gets 503.
        version: reported by ``GET /v2``.
        lora_loading: whether LoRA adapters may be loaded and unloaded through the API.
    """

    def __init__(self, engine: Engine, stats: ServerStats, token: str | None = None,
                 max_body_bytes: int = 16 * 1024 * 1024, version: str = "0",
                 body_bytes_in_flight: int = BODY_BYTES_IN_FLIGHT, lora_loading: bool = False) -> None:
        self.engine = engine
        self.lora_loading = lora_loading
        self.stats = stats
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.bodies = BodyBudget(max(body_bytes_in_flight, max_body_bytes))
        # One thread parses large bodies, one at a time: the event loop stays free and at most one
        # large parsed document exists at once (a 16 MiB '[[],[],...]' is ~300 MB of Python lists).
        self._parser = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsnb-json")
        self.version = version
        self.model: ServedModel | None = None
        self.created = int(time.time())
        self._loop_outbox: Outbox | None = None

    def _outbox(self, loop: asyncio.AbstractEventLoop) -> Outbox:
        if self._loop_outbox is None or self._loop_outbox.loop is not loop:
            self._loop_outbox = Outbox(loop)
        return self._loop_outbox

    def starlette(self) -> Starlette:
        """The ASGI application."""
        routes = [
            Route("/healthz", self._route("/healthz", self.live), methods=["GET"]),
            Route("/v2/health/live", self._route("/v2/health/live", self.live), methods=["GET"]),
            Route("/readyz", self._route("/readyz", self.ready), methods=["GET"]),
            Route("/v2/health/ready", self._route("/v2/health/ready", self.ready), methods=["GET"]),
            Route("/metrics", self._route("/metrics", self.metrics), methods=["GET"]),
            Route("/", self._route("/predict", self.predict), methods=["POST"]),
            Route("/predict", self._route("/predict", self.predict), methods=["POST"]),
            Route("/v1/models", self._route("/v1/models", self.models, openai=True), methods=["GET"]),
            Route("/v1/embeddings", self._route("/v1/embeddings", self.embeddings, openai=True), methods=["POST"]),
            Route("/v1/completions", self._route("/v1/completions", self.completions, openai=True), methods=["POST"]),
            Route("/v1/chat/completions", self._route("/v1/chat/completions", self.chat, openai=True), methods=["POST"]),
            Route("/v1/load_lora_adapter", self._route("/v1/load_lora_adapter", self.load_lora, openai=True), methods=["POST"]),
            Route("/v1/unload_lora_adapter", self._route("/v1/unload_lora_adapter", self.unload_lora, openai=True),
                  methods=["POST"]),
            Route("/v2", self._route("/v2", self.v2_server), methods=["GET"]),
            Route("/v2/models/{name}", self._route("/v2/models", self.v2_model), methods=["GET"]),
            Route("/v2/models/{name}/ready", self._route("/v2/models/ready", self.v2_model_ready), methods=["GET"]),
            Route("/v2/models/{name}/infer", self._route("/v2/models/infer", self.v2_infer), methods=["POST"]),
        ]
        return Starlette(routes=routes)

    # -- plumbing ------------------------------------------------------------------------------
    def _route(self, label: str, handler: Callable[[Request], Awaitable[Response]], openai: bool = False
               ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                if request.url.path not in _OPEN_PATHS:
                    self._authorize(request)
                response = await handler(request)
            except Exception as e:  # noqa: BLE001 - every error becomes an HTTP answer
                response = self._error_response(e, openai)
            self.stats.observe(label, response.status_code, time.perf_counter() - started)
            return response

        return endpoint

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise Unauthorized("send the endpoint's token as 'Authorization: Bearer <token>'")

    def _error_response(self, error: Exception, openai: bool) -> Response:
        headers: dict[str, str] = {}
        if isinstance(error, BadRequest):
            status, kind = 400, "invalid_request_error"
        elif isinstance(error, SlowClient):
            status, kind = 408, "invalid_request_error"
        elif isinstance(error, Abandoned):
            status, kind = 504 if "deadline" in str(error) else 499, "timeout_error"
        elif isinstance(error, NotJsonSafe):
            status, kind = 422, "server_error"
        elif isinstance(error, openai_api.UnknownModel):
            status, kind = 404, "not_found_error"
        elif isinstance(error, TooLarge):
            status, kind = 413, "invalid_request_error"
        elif isinstance(error, Forbidden):
            status, kind = 403, "permission_error"
        elif isinstance(error, Unauthorized):
            status, kind = 401, "authentication_error"
            headers["WWW-Authenticate"] = "Bearer"
        elif isinstance(error, (Overloaded, Draining)):
            status, kind = 503, "overloaded_error"
            headers["Retry-After"] = str(RETRY_AFTER_S)
        elif isinstance(error, RankLost):
            status, kind = 503, "server_error"
        else:
            log.exception("request failed")
            status, kind = 500, "server_error"
        message = str(error) or type(error).__name__
        body = openai_api.error_body(message, kind) if openai else {"error": message}
        return JSONResponse(body, status_code=status, headers=headers)

    async def _json(self, request: Request) -> Any:
        return await self._parsed_body(request, parse_json)

    async def _parsed_body(self, request: Request, parse: Callable[[bytes], Any]) -> Any:
        """The body read within the server's limits and its budget of bytes in flight, then ``parse``d."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise TooLarge(f"the body is {declared} bytes, above the server's limit of {self.max_body_bytes}")
        raw = await read_body(request.stream(), self.max_body_bytes, TooLarge, self.bodies, Overloaded)
        try:
            if len(raw) <= INLINE_JSON_BYTES:
                return parse(raw)
            # Parsed in a thread, so that probes (and every other request) are answered meanwhile.
            return await asyncio.get_running_loop().run_in_executor(self._parser, parse, raw)
        finally:
            self.bodies.give(len(raw))

    def _served(self) -> ServedModel:
        if self.model is None or not self.engine.ready:
            raise RankLost(self.engine.lost) if self.engine.lost else Draining(self.engine.not_ready_reason or "not ready")
        return self.model

    async def _run(self, op: str, data: Any, size: int, key: Any = None, request: Request | None = None) -> Any:
        """The engine's answer to one request; a request above ``max_batch_size`` items runs as several
        batches (so that one request is never one unbounded forward pass), one after the other."""
        limit = self.engine.max_batch_size
        if op in ("texts", "tensor") and size > limit:
            parts = [await self._run_one(op, data[start:start + limit], min(limit, size - start), key, request)
                     for start in range(0, size, limit)]
            return _concatenate(parts)
        return await self._run_one(op, data, size, key, request)

    async def _run_one(self, op: str, data: Any, size: int, key: Any, request: Request | None,
                       on_text: Callable[[str], None] | None = None) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        outbox = self._outbox(loop)

        def deliver(result: Any, error: BaseException | None) -> None:
            outbox.post(_settle, future, result, error)

        work = Work(op, data, size=size, deliver=deliver, key=key, on_text=on_text, deadline=_deadline(request))
        self.engine.submit(work)
        self.stats.queue.set(self.engine.queued)
        try:
            while True:  # a client that hangs up is noticed within a poll: its work is dropped or stopped
                done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
                if done:
                    return future.result()
                if work.deadline is not None and time.monotonic() >= work.deadline:
                    raise Abandoned("its deadline passed before it was answered")  # the engine drops or stops it
                if request is not None and await request.is_disconnected():
                    raise Abandoned("the client went away")
        finally:
            if not future.done():
                work.cancelled.set()

    # -- health and metrics --------------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = self.engine.ready and self.model is not None
        self.stats.ready.set(1 if ready else 0)
        if ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "reason": self.engine.not_ready_reason or "loading"}, status_code=503)

    async def metrics(self, request: Request) -> Response:
        self.stats.queue.set(self.engine.queued)
        return Response(self.stats.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- dsnb's own protocol -------------------------------------------------------------------
    async def predict(self, request: Request) -> Response:
        model = self._served()
        body = await self._json(request)
        if not isinstance(body, dict) or "inputs" not in body:
            raise BadRequest('send a JSON object with "inputs", e.g. {"inputs": [[1.0, 2.0]]}')
        inputs = body["inputs"]
        if model.kind == "causal-lm":
            texts = model.runner.check_texts(inputs)
            outputs = []
            for text in texts:
                generation, _ = openai_api.parse_completion({"prompt": text, "temperature": 0}, model.name)
                outputs.append((await self._run("generate", generation, size=1, request=request)).text)
            return JSONResponse({"outputs": outputs[0] if isinstance(inputs, str) else outputs})
        if model.tokenizer is not None:
            texts = model.runner.check_texts(inputs)
            vectors = await self._run("texts", texts, size=len(texts), request=request)
            return SafeJSONResponse({"outputs": vectors[0] if isinstance(inputs, str) else vectors})
        tensor = model.runner.check_tensor(inputs)
        output = await self._run("tensor", tensor, size=int(tensor.shape[0]), key=(tuple(tensor.shape[1:]), tensor.dtype),
                                 request=request)
        return SafeJSONResponse({"outputs": to_json(output)})

    # -- OpenAI --------------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        model = self._served()
        return JSONResponse(openai_api.models_response(model.name, self.created, model.adapters))

    async def embeddings(self, request: Request) -> Response:
        model = self._served()
        body = await self._json(request)
        texts = openai_api.parse_embeddings(body, model.name)
        if model.kind not in ("embedding", "classifier"):
            raise BadRequest(f"model {model.name!r} is a {model.kind} model and makes no embeddings")
        model.runner.check_texts(texts, "input")
        rows = await self._run("embed", texts, size=len(texts), request=request)
        vectors = [row.vector for row in rows]
        if not all(numpy.isfinite(vector).all() for vector in vectors):
            raise NotJsonSafe()
        return FastJSONResponse(openai_api.embeddings_response(model.name, vectors, sum(row.tokens for row in rows),
                                                               body.get("encoding_format", "float")))

    async def completions(self, request: Request) -> Response:
        model = self._served()
        body = await self._json(request)
        name = model.named(body)
        generation, streaming = openai_api.parse_completion(body, name)
        generation.adapter = name if name != model.name else None
        return await self._generate(model, generation, streaming, chat=False, request=request, name=name)

    async def chat(self, request: Request) -> Response:
        model = self._served()
        body = await self._json(request)
        name = model.named(body)
        messages = openai_api.chat_messages(body, name)
        if model.kind != "causal-lm":
            raise BadRequest(f"model {model.name!r} is a {model.kind} model and does not chat")
        generation, streaming = openai_api.parse_chat(body, chat_prompt(model.tokenizer, messages))
        generation.adapter = name if name != model.name else None
        return await self._generate(model, generation, streaming, chat=True, request=request, name=name)

    async def _generate(self, model: ServedModel, generation: Any, streaming: openai_api.Streaming, chat: bool,
                        request: Request, name: str) -> Response:
        """Generate for one request; ``name``: the model it named (the base model's, or a LoRA adapter's)."""
        if model.kind != "causal-lm":
            raise BadRequest(f"model {model.name!r} is a {model.kind} model and does not generate text; use /v1/embeddings")
        arrived = time.monotonic()
        if not streaming.stream:
            done: Completion = await self._run("generate", generation, size=1, request=request)
            self.stats.observe_generation(arrived, done.token_times, done.completion_tokens)
            return FastJSONResponse(openai_api.completion_response(name, done, chat))
        pieces: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        outbox = self._outbox(asyncio.get_running_loop())

        def on_text(text: str) -> None:
            outbox.post(pieces.put_nowait, ("text", text))

        def deliver(result: Any, error: BaseException | None) -> None:
            outbox.post(pieces.put_nowait, ("error", error) if error else ("done", result))

        work = Work("generate", generation, size=1, deliver=deliver, on_text=on_text, deadline=_deadline(request))
        self.engine.submit(work)
        return StreamingResponse(self._events(name, generation.stop, chat, pieces, work, streaming.include_usage, arrived),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _events(self, served: str, stops: list[str], chat: bool, pieces: asyncio.Queue[tuple[str, Any]],
                      work: Work, include_usage: bool, arrived: float) -> AsyncIterator[bytes]:
        try:
            async for event in self._event_stream(served, stops, chat, pieces, include_usage, arrived):
                yield event
        finally:  # the client hung up (Starlette ends the stream), or it ended: stop the generation either way
            work.cancelled.set()

    async def _event_stream(self, served: str, stops: list[str], chat: bool, pieces: asyncio.Queue[tuple[str, Any]],
                            include_usage: bool = False, arrived: float | None = None) -> AsyncIterator[bytes]:
        response_id = openai_api.new_id("chatcmpl" if chat else "cmpl")
        if chat:
            yield _event(openai_api.stream_chunk(response_id, served, chat, first=True))
        stop_filter = StopFilter(stops)
        while True:
            kind, value = await pieces.get()
            if kind == "text":
                send = stop_filter.feed(value)
                if send:
                    yield _event(openai_api.stream_chunk(response_id, served, chat, text=send))
                continue
            if kind == "error":
                yield _event(openai_api.error_body(str(value), "server_error"))
                break
            done: Completion = value
            self.stats.observe_generation(time.monotonic() if arrived is None else arrived, done.token_times,
                                          done.completion_tokens)
            rest = stop_filter.rest()
            if rest:
                yield _event(openai_api.stream_chunk(response_id, served, chat, text=rest))
            yield _event(openai_api.stream_chunk(response_id, served, chat, finish_reason=done.finish_reason))
            if include_usage:
                yield _event(openai_api.usage_chunk(response_id, served, chat, done))
            break
        yield b"data: [DONE]\n\n"

    # -- LoRA adapters (vLLM's routes) ---------------------------------------------------------
    async def load_lora(self, request: Request) -> Response:
        model, body = await self._lora_request(request)
        name = lora.check_name(body.get("lora_name"), model.name)
        path = str(lora.check_directory(body.get("lora_path")))
        model.adapters[:] = await self._run_one("lora", {"action": "load", "name": name, "path": path}, 1, object(), request)
        return JSONResponse({"loaded": name, "adapters": model.adapters})

    async def unload_lora(self, request: Request) -> Response:
        model, body = await self._lora_request(request)
        name = body.get("lora_name")
        if name not in model.adapters:
            raise lora.AdapterRefused(f"no adapter is named {name!r}; loaded: {', '.join(model.adapters) or 'none'}")
        model.adapters[:] = await self._run_one("lora", {"action": "unload", "name": name}, 1, object(), request)
        return JSONResponse({"unloaded": name, "adapters": model.adapters})

    async def _lora_request(self, request: Request) -> tuple[ServedModel, dict[str, Any]]:
        model = self._served()
        if not self.lora_loading:
            raise Forbidden("this server does not load LoRA adapters at run time; serve with allow_lora_loading=True "
                            "(--allow-lora-loading), or name them at start (lora_adapters / --lora NAME=DIR)")
        if model.kind != "causal-lm":
            raise BadRequest(f"LoRA adapters apply to text generation; model {model.name!r} is a {model.kind} model")
        body = await self._json(request)
        if not isinstance(body, dict):
            raise BadRequest('send a JSON object, e.g. {"lora_name": "sql", "lora_path": "/adapters/sql"}')
        return model, body

    # -- Open Inference Protocol (KServe v2) ---------------------------------------------------
    async def v2_server(self, request: Request) -> Response:
        return JSONResponse(kserve.server_metadata(self.version))

    def _v2_model(self, request: Request) -> ServedModel:
        model = self._served()
        name = request.path_params["name"]
        if name != model.name:
            raise openai_api.UnknownModel(f"model {name!r} is not served here; this server serves {model.name!r}")
        return model

    async def v2_model(self, request: Request) -> Response:
        model = self._v2_model(request)
        return JSONResponse(kserve.model_metadata(model.name, model.kind))

    async def v2_model_ready(self, request: Request) -> Response:
        self._v2_model(request)
        return JSONResponse({"name": request.path_params["name"], "ready": True})

    async def v2_infer(self, request: Request) -> Response:
        model = self._v2_model(request)
        body = await self._v2_body(request)
        if model.kind == "causal-lm":
            raise BadRequest(f"model {model.name!r} generates text; use /v1/completions")
        if model.tokenizer is not None:
            texts = model.runner.check_texts(kserve.parse_texts(body), "data")  # the same limits as every text route
            vectors = await self._run("texts", texts, size=len(texts), request=request)
            import torch

            output: Any = torch.tensor(vectors)
        else:
            tensor = kserve.parse_tensor(body, model.runner.dtype)
            output = await self._run("tensor", tensor, size=int(tensor.shape[0]), key=(tuple(tensor.shape[1:]), tensor.dtype),
                                     request=request)
        return self._v2_answer(model.name, body, kserve.named_outputs(output))

    async def _v2_body(self, request: Request) -> Any:
        """The request's JSON; with the binary extension's header, its binary inputs decoded into it."""
        declared = request.headers.get(kserve_binary.HEADER)
        if declared is None:
            return await self._json(request)

        def decode(raw: bytes) -> Any:
            return kserve_binary.decode_request(raw, kserve_binary.header_length(declared, len(raw)))  # type: ignore[arg-type]

        return await self._parsed_body(request, decode)

    def _v2_answer(self, served: str, body: Any, named: list[tuple[str, Any, str]]) -> Response:
        """JSON, or the binary extension's form when the request asked for any output in binary."""
        chosen = kserve_binary.chosen_outputs(body if isinstance(body, dict) else {}, [name for name, _, _ in named])
        by_name = {name: (value, datatype) for name, value, datatype in named}
        tensors = [kserve.json_tensor(name, *by_name[name]) if not binary else
                   {"name": name, "shape": list(by_name[name][0].shape), "datatype": by_name[name][1]}
                   for name, binary in chosen]
        response = kserve.infer_response(served, body.get("id") if isinstance(body, dict) else None, tensors)
        raw = {name: kserve_binary.tensor_bytes(*by_name[name]) for name, binary in chosen if binary}
        if not raw:
            return SafeJSONResponse(response)
        content, length = kserve_binary.encode_response(response, raw)
        return Response(content, media_type="application/octet-stream", headers={kserve_binary.HEADER: str(length)})


#: How often a waiting request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25
#: The header a client may send to bound its request: seconds from its arrival (at most an hour).
DEADLINE_HEADER = "x-request-timeout"


class StopFilter:
    """Streamed text with its first stop string and all that follows cut out.

    A stop string may arrive split over pieces, so the last ``len(longest stop) - 1``
    characters are held back until the next piece (or the end) shows whether they start one.

    Example:
        >>> stops = StopFilter(["END"])
        >>> [stops.feed("Hello wor"), stops.feed("ld. EN"), stops.feed("D of text"), stops.feed(" more"), stops.rest()]
        ['Hello w', 'orld. ', '', '', '']
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The text that can be sent once ``text`` was generated ("" after a stop string)."""
        if self.stopped:
            return ""
        self.pending += text
        cut = min((self.pending.index(s) for s in self.stops if s in self.pending), default=None)
        if cut is not None:
            self.pending, self.stopped = self.pending[:cut], True
        if self.stopped or self.hold == 0:
            send, self.pending = self.pending, ""
        else:
            send, self.pending = self.pending[:-self.hold], self.pending[-self.hold:]
        return send

    def rest(self) -> str:
        """The text held back, sent when the generation ends without a stop string."""
        return "" if self.stopped else self.pending


def _deadline(request: Request | None) -> float | None:
    """``time.monotonic()`` at which the request's own deadline (``X-Request-Timeout: <seconds>``) passes.

    Raises:
        BadRequest: a header that is not a number of seconds between 0 and 3600.
    """
    text = request.headers.get(DEADLINE_HEADER) if request is not None else None
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 3600:
        raise BadRequest(f'"X-Request-Timeout" must be seconds between 0 and 3600, got {text!r}')
    return time.monotonic() + seconds


def _concatenate(parts: list[Any]) -> Any:
    """One answer from the answers of a request's batches (lists of rows, or tensors)."""
    if all(isinstance(part, list) for part in parts):
        return [row for part in parts for row in part]
    import torch

    if all(isinstance(part, torch.Tensor) for part in parts):
        return torch.cat(parts)
    raise BadRequest("this model's answer cannot be put together from parts; send at most max_batch_size inputs")


class Outbox:
    """Calls from the engine's thread to run on the event loop, handed over in bunches.

    A generation step streams a piece of text to each of up to ``max_running`` requests; one
    ``call_soon_threadsafe`` each would wake the loop (a write to its self-pipe) that many times a
    step. :meth:`post` queues the call and wakes the loop only when no wake-up is pending, and the
    loop then runs everything queued, in order.

    Example:
        >>> loop = asyncio.new_event_loop(); seen = []
        >>> outbox = Outbox(loop)
        >>> outbox.post(seen.append, 1); outbox.post(seen.append, 2)
        >>> loop.run_until_complete(asyncio.sleep(0)); seen
        [1, 2]
        >>> loop.close()
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._calls: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._lock = threading.Lock()
        self._woken = False

    def post(self, call: Callable[..., Any], *args: Any) -> None:
        """Run ``call(*args)`` on the loop, after every call posted before it."""
        with self._lock:
            self._calls.append((call, args))
            if self._woken:
                return
            self._woken = True
        self.loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        with self._lock:
            calls, self._calls, self._woken = self._calls, collections.deque(), False
        for call, args in calls:
            try:
                call(*args)
            except Exception:  # noqa: BLE001 - one request's callback must not cost the others theirs
                log.exception("a callback from the engine failed")


class FastJSONResponse(JSONResponse):
    """A JSON answer written by orjson, numpy arrays included (Python's ``json`` writes a float at a time,
    holding the interpreter lock the model's thread needs). It writes NaN as null: check before."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class SafeJSONResponse(JSONResponse):
    """A JSON answer that says so, as a 422, when the model's output holds NaN or infinity."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except ValueError as e:
            raise NotJsonSafe(str(e)) from None


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _event(body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"
