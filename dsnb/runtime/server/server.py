"""``python -m dsnb.runtime.server``: the model server every rank of a served model runs, under any launcher.

Every rank loads the model and wraps it with ``deepspeed.init_inference`` (tensor parallel
over all ranks when there are several). Rank 0 answers HTTP (:mod:`dsnb.runtime.server.app`,
under uvicorn) and shares each batch with the other ranks (:mod:`dsnb.runtime.server.engine`).
On a node other than the first, the rank with ``LOCAL_RANK`` 0 answers only ``/healthz``
and ``/readyz`` on the same port, so one readiness probe fits every pod.

The ranks find each other through the usual ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (set by every dsnb backend and by
torchrun). A token, when served with one, comes in ``DSNB_SERVE_TOKEN``.

Rank 0 prints ``DSNB_SERVE {"ready": true, "url": ...}`` when it turns ready (and
``{"ready": false, "reason": ...}`` when it stops being ready), and a ``DSNB_METRIC`` line
of request rate, latency percentiles and errors every few seconds with traffic. With
``DSNB_JOB_DIR`` set (the local backend), it also writes ``endpoint.json`` there.

SIGTERM drains: the server turns unready, stops accepting connections, answers what it
holds (up to ``--drain-s``), tells the other ranks to stop, and exits 0. A lost rank turns
it unready and every request is answered 503 at once; after ``--lost-exit-s`` it exits 1,
so that the launcher (or Kubernetes) can start the server again.

Example:
    $ RANK=0 WORLD_SIZE=1 python -m dsnb.runtime.server --model my_models:build --port 8000
    $ curl -s localhost:8000/v1/models
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from dsnb.devices import collective_backend
from dsnb.runtime.server.connections import BODY_BYTES_IN_FLIGHT, guarded_protocol
from dsnb.runtime.server.engine import Collective, Engine, RankLost, follow
from dsnb.runtime.server.model import MAX_ADAPTERS, MAX_INPUTS
from dsnb.runtime.server.scheduler import MAX_CACHE_TOKENS, MAX_RUNNING, PREFILL_TOKENS, Scheduler

SERVE_TAG = "DSNB_SERVE "
REPORT_EVERY_S = 5.0
#: A collective that does not finish in this time counts as a lost rank (loading skew included).
COLLECTIVE_TIMEOUT_S = 600


@dataclass
class ServerOptions:
    """The server's command-line options (see ``python -m dsnb.runtime.server --help``)."""

    model: str
    served_name: str
    working_dir: str | None = None
    dtype: str = "float32"
    host: str = "0.0.0.0"
    port: int = 8000
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_body_bytes: int = 16 * 1024 * 1024
    max_inputs: int = MAX_INPUTS
    max_prompt_tokens: int | None = None
    max_concurrency: int = 512
    max_body_bytes_in_flight: int = BODY_BYTES_IN_FLIGHT
    drain_s: float = 30.0
    lost_exit_s: float = 10.0
    generation: str = "continuous"
    max_running: int = MAX_RUNNING
    max_cache_tokens: int = MAX_CACHE_TOKENS
    prefill_tokens: int = PREFILL_TOKENS
    lora: list[str] | None = None
    max_loras: int = MAX_ADAPTERS
    allow_lora_loading: bool = False

    @classmethod
    def parse(cls, argv: list[str] | None = None) -> ServerOptions:
        """Options from a command line.

        Example:
            >>> ServerOptions.parse(["--model", "m:f", "--port", "0"]).served_name
            'model'
        """
        parser = argparse.ArgumentParser(prog="python -m dsnb.runtime.server", description="Serve a model with DeepSpeed over HTTP.")
        parser.add_argument("--model", required=True, help="'module:function' loader or a Hugging Face model directory")
        parser.add_argument("--served-name", default="model", help="the model's name in the APIs")
        parser.add_argument("--working-dir", default=None, help="where a loader's module is imported from")
        parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
        parser.add_argument("--host", default="0.0.0.0")
        parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
        parser.add_argument("--max-batch-size", type=int, default=16)
        parser.add_argument("--max-wait-ms", type=float, default=5.0)
        parser.add_argument("--max-queue", type=int, default=256)
        parser.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024)
        parser.add_argument("--max-inputs", type=int, default=MAX_INPUTS, help="texts or tensor rows a request may hold")
        parser.add_argument("--max-prompt-tokens", type=int, default=None,
                            help="prompt tokens a generation takes at most (also the model's context less max_tokens)")
        parser.add_argument("--max-concurrency", type=int, default=512, help="connections served at once; more get 503")
        parser.add_argument("--max-body-bytes-in-flight", type=int, default=BODY_BYTES_IN_FLIGHT,
                            help="bytes of request bodies held at once, all connections together; more get 503")
        parser.add_argument("--drain-s", type=float, default=30.0, help="how long SIGTERM waits for requests in flight")
        parser.add_argument("--lost-exit-s", type=float, default=10.0, help="exit this long after a rank was lost")
        parser.add_argument("--generation", choices=["continuous", "one-at-a-time"], default="continuous",
                            help="continuous: generations join and leave one running batch between steps; "
                                 "one-at-a-time: each runs alone (for comparison)")
        parser.add_argument("--max-running", type=_positive, default=MAX_RUNNING, help="sequences generated at once")
        parser.add_argument("--max-cache-tokens", type=_positive, default=MAX_CACHE_TOKENS,
                            help="tokens in flight: each running sequence's prompt and every token it may still generate")
        parser.add_argument("--prefill-tokens", type=_positive, default=PREFILL_TOKENS,
                            help="prompt tokens prefilled per step; a longer prompt is prefilled in chunks")
        parser.add_argument("--lora", action="append", metavar="NAME=DIR",
                            help="a LoRA adapter (PEFT, safetensors) loaded at start, named in requests' model; repeatable")
        parser.add_argument("--max-loras", type=_positive, default=MAX_ADAPTERS, help="LoRA adapters held at once")
        parser.add_argument("--allow-lora-loading", action="store_true",
                            help="take POST /v1/load_lora_adapter and /v1/unload_lora_adapter (off: adapters only from --lora)")
        args = parser.parse_args(argv)
        for given in args.lora or []:
            if "=" not in given or not given.partition("=")[0] or not given.partition("=")[2]:
                parser.error(f"--lora takes NAME=DIR, got {given!r}")
        return cls(**{k: v for k, v in vars(args).items()})


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text}")
    return value


@dataclass(frozen=True)
class RankPlace:
    """Where this process sits in the server, from the launcher's environment.

    Example:
        >>> RankPlace.from_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_SIZE": "2"}).node
        1
    """

    rank: int
    world_size: int
    local_rank: int
    local_size: int

    @property
    def node(self) -> int:
        """The node index (ranks are laid out node by node)."""
        return self.rank // max(self.local_size, 1)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> RankPlace:
        env = dict(os.environ if env is None else env)
        world = int(env.get("WORLD_SIZE", "1"))
        local_size = int(env.get("LOCAL_SIZE") or env.get("LOCAL_WORLD_SIZE") or world)
        return cls(rank=int(env.get("RANK", "0")), world_size=world, local_rank=int(env.get("LOCAL_RANK", "0")),
                   local_size=local_size)


def announce(ready: bool, **details: Any) -> None:
    """Print rank 0's readiness line (read by backends that cannot reach the server)."""
    print(SERVE_TAG + json.dumps({"ready": ready, **details}), flush=True)


def _init_distributed(place: RankPlace) -> None:
    if _has_cuda():
        import torch

        torch.cuda.set_device(place.local_rank % torch.cuda.device_count())  # one GPU per rank of a node
    if place.world_size == 1:
        return
    os.environ.setdefault("LOCAL_SIZE", str(place.local_size))  # DeepSpeed's CPU all-reduce reads it
    import deepspeed

    backend = os.environ.get("DSNB_DIST_BACKEND") or collective_backend(on_gpu=_has_cuda())
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"


def load_model(options: ServerOptions, world_size: int = 1) -> Any:
    """The model runner of ``options`` over ``world_size`` tensor-parallel ranks, with its start-up LoRA adapters.

    Raises:
        Exception: whatever loading the model or an adapter raised (the caller reports it).
    """
    from dsnb.runtime.server.model import Predictor

    predictor = Predictor(options.model, dtype=options.dtype, working_dir=options.working_dir,
                          tensor_parallel=world_size, max_inputs=options.max_inputs,
                          max_prompt_tokens=options.max_prompt_tokens, max_adapters=options.max_loras)
    from dsnb.runtime.server.lora import check_name

    for given in options.lora or []:
        name, _, path = given.partition("=")
        predictor.lora({"action": "load", "name": check_name(name, options.served_name), "path": path})
    return predictor


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}/"


def build_server(options: ServerOptions, world_size: int = 1, token: str | None = None) -> tuple[Engine, Any, Any]:
    """Rank 0's engine, metrics (:class:`~dsnb.runtime.server.stats.ServerStats`) and HTTP application
    (:class:`~dsnb.runtime.server.app.ServerApp`), with no model yet (:func:`put_to_work` gives it one).

    Example:
        >>> engine, stats, app = build_server(ServerOptions(model="m:f", served_name="tiny"))
        >>> app.model is None, engine.scheduler is None
        (True, True)
    """
    from dsnb.runtime.server.app import ServerApp
    from dsnb.runtime.server.stats import ServerStats

    stats = ServerStats()
    engine = Engine(None, Collective(world_size), max_batch_size=options.max_batch_size,
                    max_wait_s=options.max_wait_ms / 1000, max_queue=options.max_queue, on_batch=stats.observe_batch)
    stats.watch_generation(engine.generation_state)
    app = ServerApp(engine, stats, token=token, max_body_bytes=options.max_body_bytes, version=_version(),
                    body_bytes_in_flight=options.max_body_bytes_in_flight, lora_loading=options.allow_lora_loading)
    return engine, stats, app


def put_to_work(app: Any, engine: Engine, runner: Any, options: ServerOptions) -> None:
    """Serve ``runner`` (from :func:`load_model`) through ``app`` and start ``engine``: a language model's
    generations are batched continuously unless ``options.generation`` says one at a time."""
    from dsnb.runtime.server.app import ServedModel

    app.model = ServedModel.of(options.served_name, runner)
    if runner.kind == "causal-lm" and options.generation == "continuous":
        engine.scheduler = Scheduler(runner.tokenizer, runner.prompt_limit, max_running=options.max_running,
                                     max_cache_tokens=options.max_cache_tokens, prefill_tokens=options.prefill_tokens)
    engine.set_runner(runner)
    engine.start()


def serve_rank0(options: ServerOptions, place: RankPlace) -> int:
    """Rank 0: load, connect, answer HTTP until SIGTERM (returns the exit code)."""
    import uvicorn

    engine, stats, app = build_server(options, place.world_size, token=os.environ.get("DSNB_SERVE_TOKEN") or None)
    sock = _bind(options.host, options.port)
    url = _url(options.host, sock)
    print(f"dsnb.serving: rank 0 of {place.world_size} listening at {url} (loading {options.model})", flush=True)
    exit_code = {"code": 0}
    server = _draining_server(uvicorn.Config(app.starlette(), log_level="warning", access_log=False, lifespan="off",
                                             timeout_graceful_shutdown=options.drain_s, http=guarded_protocol(),
                                             limit_concurrency=options.max_concurrency), engine)

    def start_engine() -> None:
        try:
            runner = load_model(options, place.world_size)
            _init_distributed_ready(place)
            put_to_work(app, engine, runner, options)
        except Exception as e:  # noqa: BLE001 - the server cannot serve; say why and stop
            print(f"dsnb.serving: cannot serve {options.model}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            exit_code["code"] = 1
            server.should_exit = True
            return
        stats.ready.set(1)
        _write_address(url)
        announce(True, url=url, model=options.served_name, kind=runner.kind, ranks=place.world_size)
        _watch(engine, server, stats, options, exit_code)

    _init_distributed(place)
    threading.Thread(target=start_engine, name="dsnb-load", daemon=True).start()
    server.run(sockets=[sock])
    engine.draining = True
    engine.stop(timeout=options.drain_s)
    if engine.lost is None and exit_code["code"] == 0:
        announce(False, reason="stopped")
    return exit_code["code"]


def _init_distributed_ready(place: RankPlace) -> None:
    if place.world_size > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank has loaded its part of the model


def _watch(engine: Engine, server: Any, stats: Any, options: ServerOptions, exit_code: dict[str, int]) -> None:
    """Report metrics every few seconds; after a lost rank, announce it and exit after ``lost_exit_s``."""
    while not server.should_exit:
        time.sleep(0.2)
        if engine.lost is not None:
            stats.ready.set(0)
            announce(False, reason=engine.lost)
            print(f"dsnb.serving: {engine.lost}; answering 503 and exiting in {options.lost_exit_s:g} s", file=sys.stderr, flush=True)
            time.sleep(options.lost_exit_s)
            exit_code["code"] = 1
            server.should_exit = True
            return
        if time.monotonic() - stats.window_start >= REPORT_EVERY_S:
            stats.report_window(queued=engine.queued)


def _draining_server(config: Any, engine: Engine) -> Any:
    """uvicorn's server, turning unready before it drains on SIGTERM/SIGINT."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not engine.draining:
                engine.draining = True
                announce(False, reason="shutting down")
            super().handle_exit(sig, frame)
            # uvicorn raises the signal again once it has stopped, which would end the
            # process before the other ranks are told to stop; the drain ends with exit 0.
            self._captured_signals.clear()

    return DrainingServer(config)


def serve_follower(options: ServerOptions, place: RankPlace) -> int:
    """A rank other than 0: load, connect, run every batch rank 0 shares (returns the exit code)."""
    health = None
    state = {"ready": False, "reason": "loading the model"}
    if place.local_rank == 0 and place.node > 0:
        health = _health_server(options.host, options.port, state)
    # Followers outlive SIGTERM until rank 0, draining, tells them to stop.
    signal.signal(signal.SIGTERM, lambda *_: None)
    _init_distributed(place)
    try:
        runner = load_model(options, place.world_size)
        _init_distributed_ready(place)
        state.update(ready=True, reason="")
        follow(runner, Collective(place.world_size))
        return 0
    except RankLost as e:
        state.update(ready=False, reason=str(e))
        print(f"dsnb.serving: rank {place.rank}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if health is not None:
            health.shutdown()


def _health_server(host: str, port: int, state: dict[str, Any]) -> Any:
    """``/healthz`` and ``/readyz`` for the first rank of a node that does not answer requests."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/healthz":
                code, body = 200, {"live": True}
            elif self.path == "/readyz":
                code, body = (200, {"ready": True}) if state["ready"] else (503, {"ready": False, "reason": state["reason"]})
            else:
                code, body = 404, {"error": "this node answers only /healthz and /readyz; requests go to rank 0"}
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            return

    server = ThreadingHTTPServer((host, port), Health)
    threading.Thread(target=server.serve_forever, name="dsnb-health", daemon=True).start()
    return server


def _write_address(url: str) -> None:
    job_dir = os.environ.get("DSNB_JOB_DIR")
    if not job_dir:
        return
    target = Path(job_dir) / "endpoint.json"
    temporary = target.with_suffix(".tmp")
    temporary.write_text(json.dumps({"url": url}))
    temporary.replace(target)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("dsnb")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "0"


def main(argv: list[str] | None = None) -> int:
    """Run this rank's part of the server.

    Raises:
        SystemExit: bad options (argparse's message).
    """
    logging.basicConfig(level=logging.WARNING, format="dsnb.serving: %(message)s")
    options = ServerOptions.parse(argv)
    place = RankPlace.from_env()
    if place.rank == 0:
        return serve_rank0(options, place)
    return serve_follower(options, place)
