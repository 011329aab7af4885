"""Start ``python -m dsnb.runtime.server`` ranks as real processes on 127.0.0.1 for tests, and always stop them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SERVING_CODE = str(Path(__file__).parent / "serving_code")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningServer:
    """The rank processes of one server and where rank 0 answers."""

    url: str
    ranks: list[subprocess.Popen[bytes]]
    logs: list[Path]
    token: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def log(self, rank: int = 0) -> str:
        return self.logs[rank].read_text(errors="replace")

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                raw: bytes | None = None, timeout: float = 60) -> tuple[int, dict[str, str], Any]:
        """One HTTP request; returns status, headers and the decoded JSON (or text) answer."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        sent = {"Content-Type": "application/json", **(headers or {})}
        if self.token and "Authorization" not in sent:
            sent["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url.rstrip("/") + path, data=data, headers=sent, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, answer, got = response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as e:
            status, answer, got = e.code, e.read(), dict(e.headers)
        try:
            return status, got, json.loads(answer)
        except ValueError:
            return status, got, answer.decode(errors="replace")

    def stop(self) -> None:
        for proc in self.ranks:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.ranks:
            proc.wait(timeout=30)


def start_server(tmp: Path, model: str, world_size: int = 1, args: list[str] | None = None, token: str | None = None,
                 wait_s: float = 240) -> RunningServer:
    """Start the ranks of one server and wait until rank 0 is ready.

    Raises:
        AssertionError: a rank exited or the server was not ready in ``wait_s`` (with rank 0's log).
    """
    port, master = free_port(), free_port()
    ranks, logs = [], []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(master), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("DSNB_JOB_DIR", None)
        if token:
            env["DSNB_SERVE_TOKEN"] = token
        log = tmp / f"rank{rank}-{port}.log"
        argv = [sys.executable, "-m", "dsnb.runtime.server", "--model", model, "--served-name", "m", "--host", "127.0.0.1",
                "--port", str(port), "--working-dir", SERVING_CODE, *(args or [])]
        with open(log, "wb") as out:
            ranks.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        logs.append(log)
    server = RunningServer(url=f"http://127.0.0.1:{port}/", ranks=ranks, logs=logs, token=token)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in ranks):
            server.stop()
            raise AssertionError("a rank exited while starting:\n" + server.log(0)[-3000:])
        try:
            if server.request("GET", "/readyz", timeout=2)[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.3)
    server.stop()
    raise AssertionError(f"not ready in {wait_s} s:\n" + server.log(0)[-3000:])
