"""Load test of text generation: dsnb's continuous batching against one request at a time, Ray Serve, and a static batch.

Every server serves the same tiny Llama (``tests/serving_code/tiny_llama.py``: random weights
from a config, the MiniLM tokenizer; float32, CPU, ``--threads`` intra-op threads) at
``POST /v1/completions``, greedy, ``max_tokens`` tokens per request, one server at a time:

- ``dsnb``: ``python -m dsnb.runtime.server`` with continuous batching (its default);
- ``dsnb-one``: the same server with ``--generation one-at-a-time`` (each request runs
  transformers' ``generate`` alone, as dsnb did before continuous batching);
- ``ray``: a Ray Serve deployment as a user writes it by default (one replica, FastAPI ingress,
  ``generate`` per request; ``benchmarks/generate_baselines.py``), on a private Ray head;
- ``dsnb-ray``: what ``Cluster("ray").serve`` deploys there instead: dsnb's server in a Ray Serve
  replica, behind Serve's proxy, with continuous batching.

First ``generate`` runs in this process on a static batch of C prompts at once, without HTTP:
the ceiling a server can approach at concurrency C. Before a server is measured its greedy
answer to one prompt must equal ``generate``'s. The load generator (asyncio + aiohttp, in this
process, on the same cores as the server) runs a closed loop per concurrency: C workers each
send one request after the other (prompts round-robin from a fixed list), for ``--warmup``
seconds (not counted) then ``--seconds`` seconds. dsnb's servers are asked to stream
(``stream: true`` with ``stream_options.include_usage``): the time to first token is when the
first text arrives, the inter-token latency of a request is the time from its first text to its
end over its tokens less one. Ray's deployment answers whole: its first token arrives with the
last. Tokens/s counts the tokens made inside the measured window (a stream's spread evenly from its
first text to its end); the latencies are those of the requests that end inside it. Raw results go to
``benchmarks/results/generate-<date>.json``.

Example::

    python benchmarks/bench_generate.py                                # all servers, 10 s, C = 1, 8, 64
    python benchmarks/bench_generate.py --servers dsnb,dsnb-one --seconds 5 --concurrency 1,8
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import bench_serve
from bench_serve import (
    HOST,
    REQUEST_TIMEOUT_S,
    CpuSample,
    Server,
    contention_warning,
    cpu_notes,
    free_port,
    leftovers,
    log_tail,
    percentile,
    process_tree,
    stop_server,
    versions,
)
from machine import describe

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
BASELINES = Path(__file__).resolve().parent / "generate_baselines.py"
SERVED_NAME = "tiny-llama"
MAX_TOKENS = 32
ANCHOR = "dsnb-one"
LABELS = {
    "dsnb": "dsnb, continuous batching",
    "dsnb-one": "dsnb, one request at a time (`--generation one-at-a-time`)",
    "ray": "Ray Serve (defaults, `generate` per request)",
    "dsnb-ray": "dsnb's server on Ray Serve (`Cluster(\"ray\")`'s replica, continuous batching)",
}
PROMPTS = [
    "The quick brown fox jumps over the lazy dog while",
    "Researchers announced on Monday that the new battery",
    "Please remember to water the plants",
    "The committee postponed its decision on the budget because several members",
    "A light rain fell over the harbour as",
    "Deep learning models are trained on",
    "In the morning the market opens early and",
    "Tensor parallelism splits each layer of a model over several devices so that",
]


@dataclass
class Measurement:
    """One server at one concurrency: what the measured window saw."""

    server: str
    concurrency: int
    seconds: float
    requests: int
    errors: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    client_cpu_cores: float = 0.0
    server_cpu_cores: float = 0.0
    other_cpu_cores: float = 0.0
    error_kinds: dict[str, int] = field(default_factory=dict)


@dataclass
class Record:
    started: float
    first: float
    ended: float
    tokens: int
    outcome: str


def server_command(name: str, model: str, port: int, threads: int, workdir: Path) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start server ``name`` on ``port``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    if name in ("dsnb", "dsnb-one"):
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR=HOST, MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu")
        command = [sys.executable, "-m", "dsnb.runtime.server", "--model", model, "--served-name", SERVED_NAME,
                   "--port", str(port), "--host", HOST]
        return command + (["--generation", "one-at-a-time"] if name == "dsnb-one" else []), env
    return [sys.executable, str(BASELINES), "--model", model, "--port", str(port), "--host", HOST,
            "--threads", str(threads), "--ray-temp-dir", str(workdir / "ray"), "--app", "dsnb" if name == "dsnb-ray" else "user"], env


def start_server(name: str, model: str, threads: int, workdir: Path) -> Server:
    """Start server ``name`` (:func:`bench_serve.start_server` with this benchmark's command lines)."""
    return bench_serve.start_server(name, model, threads, workdir, command_of=server_command)


class Generator:
    """transformers' ``generate`` in this process: the reference answer and the static-batch ceiling."""

    def __init__(self, model_dir: str, threads: int) -> None:
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def generate(self, prompts: list[str], max_tokens: int) -> tuple[list[str], int]:
        """Greedy completions of ``prompts`` as one left-padded batch, and the tokens generated."""
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True)
        with self.torch.inference_mode():
            output = self.model.generate(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                                         max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                         pad_token_id=self.tokenizer.pad_token_id)
        rows = output[:, encoded["input_ids"].shape[1]:]
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in rows], int(rows.numel())

    def ceiling(self, concurrency: int, max_tokens: int, seconds: float = 3.0) -> float:
        """Tokens per second of ``generate`` on static batches of ``concurrency`` prompts (after one untimed batch)."""
        prompts = itertools.cycle(PROMPTS)
        self.generate([next(prompts) for _ in range(concurrency)], max_tokens)
        tokens, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            tokens += self.generate([next(prompts) for _ in range(concurrency)], max_tokens)[1]
        return tokens / (time.perf_counter() - started)


def check_answer(server: Server, expected: str, max_tokens: int) -> None:
    """Raise unless the server's greedy completion of ``PROMPTS[0]`` is ``expected``."""
    import httpx

    response = httpx.post(f"{server.url}/v1/completions", timeout=REQUEST_TIMEOUT_S,
                          json={"model": SERVED_NAME, "prompt": PROMPTS[0], "max_tokens": max_tokens, "temperature": 0})
    if response.status_code != 200:
        raise RuntimeError(f"{server.name} answered {response.status_code}: {response.text[:500]}")
    text = response.json()["choices"][0]["text"]
    if text != expected:
        raise RuntimeError(f"{server.name} completed {PROMPTS[0]!r} with {text!r}; generate gives {expected!r}")


async def one_request(session: Any, url: str, prompt: str, max_tokens: int, stream: bool) -> Record:
    """Send one completion request; when and how it came back."""
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    started = time.perf_counter()
    first, tokens, outcome = 0.0, 0, "ok"
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                return Record(started, 0.0, time.perf_counter(), 0, f"HTTP {response.status}")
            if not stream:
                tokens = json.loads(await response.read())["usage"]["completion_tokens"]
                first = time.perf_counter()
            else:
                first, tokens = await read_events(response.content)
    except Exception as e:  # noqa: BLE001 - every failure is an error to count
        outcome = type(e).__name__
    ended = time.perf_counter()
    return Record(started, first or ended, ended, tokens, outcome if tokens else (outcome if outcome != "ok" else "no tokens"))


async def read_events(lines: Any) -> tuple[float, int]:
    """When a stream's first text came, and the tokens its usage chunk counts (server-sent events, by line)."""
    first, tokens = 0.0, 0
    async for line in lines:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif not first and chunk["choices"] and chunk["choices"][0].get("text"):
            first = time.perf_counter()
    return first, tokens


def tokens_within(record: Record, start: float, end: float) -> float:
    """The tokens of ``record`` made between ``start`` and ``end``: a stream's spread evenly from its first text
    to its end, a whole answer's at its end. (Counting only the requests that end inside the window would count
    in whole waves: C clients with answers of one length end together, 2 048 tokens a wave at C = 64.)"""
    if record.ended <= record.first:
        return record.tokens if start <= record.ended <= end else 0.0
    overlap = min(end, record.ended) - max(start, record.first)
    return record.tokens * max(0.0, overlap) / (record.ended - record.first)


def measure(server: Server, concurrency: int, warmup_s: float, seconds: float, max_tokens: int) -> Measurement:
    """Load ``server`` at ``concurrency`` for ``warmup_s + seconds`` and summarise the last ``seconds``."""
    server.processes.update(process_tree(server.process.pid))
    before = CpuSample.take(server)
    url, prompts, stream = f"{server.url}/v1/completions", itertools.cycle(PROMPTS), server.name.startswith("dsnb")
    records = asyncio.run(bench_serve.closed_loop(
        concurrency, warmup_s + seconds, lambda session: one_request(session, url, next(prompts), max_tokens, stream)))
    cores = CpuSample.take(server).cores_since(before)
    window_start = before.wall + warmup_s
    counted = [r for r in records if window_start <= r.ended <= window_start + seconds]
    made = sum(tokens_within(r, window_start, window_start + seconds) for r in records if r.outcome == "ok")
    good = [r for r in counted if r.outcome == "ok"]
    errors: dict[str, int] = {}
    for r in counted:
        if r.outcome != "ok":
            errors[r.outcome] = errors.get(r.outcome, 0) + 1
    ttft = [(r.first - r.started) * 1000 for r in good]
    itl = [(r.ended - r.first) * 1000 / (r.tokens - 1) for r in good if r.tokens > 1 and server.name.startswith("dsnb")]
    return Measurement(server=server.name, concurrency=concurrency, seconds=seconds, requests=len(counted),
                       errors=sum(errors.values()), tokens_per_s=made / seconds,
                       ttft_p50_ms=percentile(ttft, 50), ttft_p99_ms=percentile(ttft, 99),
                       itl_p50_ms=percentile(itl, 50), itl_p99_ms=percentile(itl, 99), client_cpu_cores=cores["client"],
                       server_cpu_cores=cores["server"], other_cpu_cores=cores["other"], error_kinds=errors)


def table(results: list[Measurement], ceilings: dict[int, float]) -> str:
    """The Markdown table, each row's tokens/s against one at a time and against the static batch."""
    anchor = {m.concurrency: m.tokens_per_s for m in results if m.server == ANCHOR}
    rows = ["| server | C | tokens/s | vs one at a time | vs static batch | first token p50 / p99 ms | "
            "between tokens p50 / p99 ms | errors |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in results:
        versus = f"{m.tokens_per_s / anchor[m.concurrency]:.2f}×" if anchor.get(m.concurrency) else "—"
        ceiling = f"{m.tokens_per_s / ceilings[m.concurrency]:.0%}" if ceilings.get(m.concurrency) else "—"
        between = "—" if m.itl_p50_ms != m.itl_p50_ms else f"{m.itl_p50_ms:.1f} / {m.itl_p99_ms:.1f}"  # NaN: answered whole
        rows.append(f"| {LABELS[m.server]} | {m.concurrency} | {m.tokens_per_s:.0f} | {versus} | {ceiling} | "
                    f"{m.ttft_p50_ms:.1f} / {m.ttft_p99_ms:.1f} | {between} | {m.errors} |")
    rows += ["", "static batch (`generate` on C prompts at once, in this process, no HTTP): "
             + ", ".join(f"C = {c}: {rate:.0f} tokens/s" for c, rate in ceilings.items())]
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="dsnb,dsnb-one,ray,dsnb-ray", help=f"comma-separated, from {', '.join(LABELS)}")
    parser.add_argument("--concurrency", default="1,8,64", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per concurrency")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring, not counted")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every server")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="tokens generated per request")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / f"generate-{date.today()}.json")
    args = parser.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if unknown := [s for s in args.servers if s not in LABELS]:
        parser.error(f"unknown servers {unknown}; choose from {', '.join(LABELS)}")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    return args


def run_all(args: argparse.Namespace, model: str, expected: str, workdir: Path) -> tuple[list[Measurement], list[str]]:
    started: list[Server] = []
    results: list[Measurement] = []
    try:
        for name in args.servers:
            print(f"starting {name} ...", flush=True)
            server = start_server(name, model, args.threads, workdir)
            started.append(server)
            try:
                check_answer(server, expected, args.max_tokens)
                for concurrency in args.concurrency:
                    m = measure(server, concurrency, args.warmup, args.seconds, args.max_tokens)
                    results.append(m)
                    print(f"  C={concurrency}: {m.tokens_per_s:.0f} tokens/s, first token p50 {m.ttft_p50_ms:.1f} ms "
                          f"p99 {m.ttft_p99_ms:.1f} ms, between tokens p50 {m.itl_p50_ms:.1f} ms, {m.errors} errors",
                          flush=True)
            except BaseException:
                print(log_tail(server.log_path), file=sys.stderr)
                raise
            finally:
                stop_server(server)
    finally:
        left = leftovers(started, workdir)
    return results, left


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests" / "serving_code"))
    from tiny_llama import save_tiny_llama

    workdir = Path(tempfile.mkdtemp(prefix="bgen-", dir="/tmp"))  # short: Ray's socket paths live below it
    try:
        model = save_tiny_llama(workdir / "tiny-llama")
        generator = Generator(model, args.threads)
        expected = generator.generate([PROMPTS[0]], args.max_tokens)[0][0]
        ceilings = {c: generator.ceiling(c, args.max_tokens) for c in args.concurrency}
        del generator
        print("static batch: " + ", ".join(f"C={c} {rate:.0f} tokens/s" for c, rate in ceilings.items()), flush=True)
        results, left = run_all(args, model, expected, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    machine = describe(**versions())
    text = (f"{date.today()}, {machine}; --threads {args.threads}, --seconds {args.seconds:g} (after {args.warmup:g} s "
            f"warm-up), max_tokens {args.max_tokens}, greedy; the load generator runs on the same cores\n\n"
            + table(results, ceilings) + "\n\nCPU cores used during each run (CPU seconds / wall seconds, warm-up included):\n"
            + cpu_notes(results))
    if warning := contention_warning(results):
        text += "\n\n" + warning
    print("\n" + text)
    out = args.output.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(date.today()), "machine": machine, "labels": LABELS,
                               "args": {**vars(args), "output": str(out)}, "static_batch_tokens_per_s": ceilings,
                               "report": text, "results": [asdict(m) for m in results]}, indent=1))
    print(f"\nraw results: {out}")
    if left:
        print("processes left running:\n" + "\n".join(left), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
