"""The Ray Serve servers ``bench_generate.py`` measures: the same tiny Llama, on a private Ray head.

- ``--app user`` (the default): a Ray Serve deployment as a user writes it by default (one
  replica, ``num_cpus=threads``, FastAPI ingress, a plain ``def`` endpoint, ``generate`` per
  request) answers ``POST /v1/completions`` with an OpenAI completion body and ``GET /readyz``;
- ``--app dsnb``: the application ``Cluster("ray").serve`` deploys
  (:func:`dsnb.runtime.ray_serve_app.build`, one replica): dsnb's own server, continuous batching.

It runs until SIGTERM or SIGINT, then shuts Serve and Ray down. Example::

    python benchmarks/generate_baselines.py --model <dir> --port 8000 --threads 2 --ray-temp-dir /tmp/rg

Annotations here are evaluated when defined (no ``from __future__ import annotations``): FastAPI
reads the request body's model from them inside the Ray replica.
"""

import argparse
import os
import sys
from typing import Any

from pydantic import BaseModel
from serve_baselines import wait_for_signal

SERVED_NAME = "tiny-llama"


class CompletionRequest(BaseModel):
    model: str = SERVED_NAME
    prompt: str
    max_tokens: int = 16
    temperature: float = 1.0


def ray_app(model_dir: str, threads: int) -> Any:
    """A Ray Serve application completing one prompt per ``generate`` call (greedy when temperature is 0)."""
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": threads})
    @serve.ingress(app)
    class CompletionDeployment:
        def __init__(self) -> None:
            import torch
            import transformers

            torch.set_num_threads(threads)
            self.torch = torch
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()

        @app.get("/readyz")
        def readyz(self) -> dict[str, str]:
            return {"status": "ready"}

        @app.post("/v1/completions")
        def completions(self, body: CompletionRequest) -> dict[str, Any]:
            encoded = self.tokenizer(body.prompt, return_tensors="pt")
            with self.torch.inference_mode():
                output = self.model.generate(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                                             max_new_tokens=body.max_tokens, do_sample=body.temperature > 0,
                                             pad_token_id=self.tokenizer.pad_token_id)
            row = output[0, encoded["input_ids"].shape[1]:]
            return {"object": "text_completion", "model": SERVED_NAME,
                    "choices": [{"index": 0, "text": self.tokenizer.decode(row, skip_special_tokens=True),
                                 "finish_reason": "length" if len(row) >= body.max_tokens else "stop"}],
                    "usage": {"prompt_tokens": int(encoded["input_ids"].shape[1]), "completion_tokens": len(row)}}

    return CompletionDeployment.bind()


def dsnb_app(model_dir: str) -> Any:
    """The application dsnb deploys on Ray Serve, serving ``model_dir`` as ``SERVED_NAME`` (one replica; its torch
    threads come from ``OMP_NUM_THREADS``, which the benchmark sets and Ray's workers inherit)."""
    from dsnb.runtime import ray_serve_app

    return ray_serve_app.build({"model": model_dir, "server_args": ["--model", model_dir, "--served-name", SERVED_NAME]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ray-temp-dir", default=None, help="Ray's session directory (default: Ray's own)")
    parser.add_argument("--app", choices=["user", "dsnb"], default="user", help="which application (see above)")
    args = parser.parse_args(argv)
    import ray
    from ray import serve

    ray.init(num_cpus=args.threads, include_dashboard=False, _temp_dir=args.ray_temp_dir, log_to_driver=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = ray_app(args.model, args.threads) if args.app == "user" else dsnb_app(args.model)
        serve.run(app, name=SERVED_NAME, route_prefix="/")
        print("ready", flush=True)
        wait_for_signal()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
