"""Probe latency under large bodies: does ``GET /readyz`` stay fast while clients send 15 MiB requests?

A Kubernetes readiness probe has a 2 s ``timeoutSeconds`` by default in dsnb's pods; when the
server parses request bodies on its event loop, a few large bodies make the probe miss and
the pod leaves the Service. This starts ``python -m dsnb.runtime.server`` (a 4 -> 16 -> 3 MLP, CPU,
127.0.0.1), then:

1. **anchor**: polls ``/readyz`` every 50 ms for ``--idle`` seconds with nothing else running;
2. **load**: ``--clients`` threads each send ``{"inputs": [[],[],...]}`` bodies of
   ``--body-mib`` MiB (the shape that costs the most Python objects per byte), one after the
   other, for ``--seconds`` seconds, while ``/readyz`` is polled the same way (2 s client timeout:
   a timeout counts as 2 s and is tallied).

It prints p50, p99 and worst ``/readyz`` latency of both phases and the ratio of the p99s, the
status of every large request, and the server's peak resident memory (``VmHWM``). ``--dsnb-root``
runs the server of another checkout (e.g. an older commit) with the same client, for a
before/after pair. Raw results go to ``benchmarks/results/serve-bodies-<date>.json``.

Example::

    python benchmarks/bench_serve_bodies.py                           # 40 clients, 15 MiB, 20 s
    python benchmarks/bench_serve_bodies.py --dsnb-root /tmp/old-dsnb --clients 10 --seconds 10
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

from machine import describe

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
HOST = "127.0.0.1"
PROBE_EVERY_S = 0.05
PROBE_TIMEOUT_S = 2.0
START_TIMEOUT_S = 120
LOADER = '''
import torch


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_server(dsnb_root: Path, workdir: Path, extra: list[str] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """One-rank server of the checkout at ``dsnb_root``; returns it once ``/readyz`` answers 200."""
    (workdir / "bench_loader.py").write_text(LOADER)
    port, master = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(dsnb_root), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": HOST, "MASTER_PORT": str(master), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1"}
    env.pop("DSNB_SERVE_TOKEN", None)
    argv = [sys.executable, "-m", "dsnb.runtime.server", "--model", "bench_loader:mlp", "--working-dir", str(workdir),
            "--host", HOST, "--port", str(port), *(extra or [])]
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(argv, cwd=dsnb_root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited:\n" + (workdir / "server.log").read_text()[-2000:])
        if probe(port)[0] == 200:
            return proc, port
        time.sleep(0.2)
    stop(proc)
    raise SystemExit("the server was not ready in time:\n" + (workdir / "server.log").read_text()[-2000:])


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def probe(port: int) -> tuple[int, float]:
    """Status and seconds of one ``GET /readyz`` (0 and the timeout when it does not answer in time)."""
    start = time.monotonic()
    connection = http.client.HTTPConnection(HOST, port, timeout=PROBE_TIMEOUT_S)
    try:
        connection.request("GET", "/readyz")
        status = connection.getresponse().status
    except OSError:
        status = 0
    finally:
        connection.close()
    return status, min(time.monotonic() - start, PROBE_TIMEOUT_S)


def poll_readyz(port: int, seconds: float) -> list[tuple[int, float]]:
    results = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        results.append(probe(port))
        time.sleep(PROBE_EVERY_S)
    return results


def send_bodies(port: int, body: bytes, until: float, statuses: collections.Counter[str], lock: threading.Lock) -> None:
    """Large requests one after the other until ``until``; tallies each answer's status (or error)."""
    while time.monotonic() < until:
        connection = http.client.HTTPConnection(HOST, port, timeout=120)
        try:
            connection.request("POST", "/", body=body, headers={"Content-Type": "application/json"})
            outcome = str(connection.getresponse().status)
        except OSError as e:
            outcome = type(e).__name__
        finally:
            connection.close()
        with lock:
            statuses[outcome] += 1


def summary(results: list[tuple[int, float]]) -> dict[str, Any]:
    latencies = sorted(seconds for _, seconds in results)
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {"probes": len(results), "p50_ms": round(pick(0.50) * 1000, 1), "p99_ms": round(pick(0.99) * 1000, 1),
            "worst_ms": round(latencies[-1] * 1000, 1), "not_200": sum(1 for status, _ in results if status != 200)}


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--body-mib", type=float, default=15.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--idle", type=float, default=5.0)
    parser.add_argument("--dsnb-root", type=Path, default=ROOT, help="checkout whose server is measured")
    parser.add_argument("--server-args", default="", help="more options for the server, e.g. '--max-body-bytes-in-flight 67108864'")
    args = parser.parse_args()
    size = int(args.body_mib * 1024 * 1024)
    body = b'{"inputs": [' + b"[]," * ((size - 20) // 3) + b"[]]}"
    with tempfile.TemporaryDirectory(prefix="dsnb-bench-bodies-") as tmp:
        proc, port = start_server(args.dsnb_root.resolve(), Path(tmp), args.server_args.split())
        try:
            idle = poll_readyz(port, args.idle)
            statuses: collections.Counter[str] = collections.Counter()
            lock = threading.Lock()
            until = time.monotonic() + args.seconds
            clients = [threading.Thread(target=send_bodies, args=(port, body, until, statuses, lock), daemon=True)
                       for _ in range(args.clients)]
            for client in clients:
                client.start()
            loaded = poll_readyz(port, args.seconds)
            for client in clients:
                client.join(180)
            alive = proc.poll() is None
            rss = peak_rss_mib(proc.pid) if alive else float("nan")
        finally:
            stop(proc)
    result = {"machine": describe(), "dsnb_root": str(args.dsnb_root), "server_args": args.server_args, "clients": args.clients, "body_bytes": len(body),
              "seconds": args.seconds, "idle": summary(idle), "loaded": summary(loaded), "large_requests": dict(statuses),
              "server_alive_after": alive, "server_peak_rss_mib": rss}
    result["p99_ratio"] = round(result["loaded"]["p99_ms"] / max(result["idle"]["p99_ms"], 0.1), 1)
    print(f"/readyz idle   : p50 {result['idle']['p50_ms']} ms, p99 {result['idle']['p99_ms']} ms, worst {result['idle']['worst_ms']} ms")
    print(f"/readyz loaded : p50 {result['loaded']['p50_ms']} ms, p99 {result['loaded']['p99_ms']} ms, worst "
          f"{result['loaded']['worst_ms']} ms, {result['loaded']['not_200']} of {result['loaded']['probes']} not 200 in "
          f"{PROBE_TIMEOUT_S:g} s  (p99 {result['p99_ratio']}x idle)")
    print(f"{args.clients} clients x {len(body) / 2**20:.1f} MiB bodies: {dict(statuses)}; server peak RSS {rss} MiB, "
          f"{'alive' if alive else 'DEAD'} after")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"serve-bodies-{date.today().isoformat()}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
