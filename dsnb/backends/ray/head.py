"""A private Ray head on 127.0.0.1, started for this process and shared by its clusters.

``Cluster("ray")`` without an address starts one ``ray start --head --block`` in its own
session, bound to loopback with authentication off (nothing outside this machine can reach
it), with its own ports and temporary directory, so it never touches another Ray on the
machine. Every ``Cluster("ray")`` of the process shares it; the last one closed stops it
(and the jobs still running on it), and so does the end of the process, however it ends (a
guard process watches this one, see :mod:`.head_guard`).

Example:
    >>> head = acquire_head()          # doctest: +SKIP
    >>> head.dashboard_url             # doctest: +SKIP
    'http://127.0.0.1:40123'
    >>> release_head(head)             # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dsnb.backends.local.procs import process_start_time
from dsnb.backends.ray.head_guard import stop_head
from dsnb.errors import ClusterError

START_TIMEOUT_S = 90.0
#: Logical CPUs the private head offers at least: Ray places one worker per CPU it counts,
#: and a laptop run of 4 ranks on 2 cores should start, as it does on the local backend.
MIN_LOGICAL_CPUS = 8


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalHead:
    """One private Ray head: its ports, directory and ``ray start`` process.

    Attributes:
        dashboard_url: where the Job Submission and Serve REST APIs answer.
        gcs_address: ``host:port`` for ``ray.init(address=...)``.
        serve_port: where Ray Serve's HTTP proxy listens once an application is deployed.
        temp_dir: Ray's session files (logs), removed when the head stops.
        token: the head's authentication token (never shown).
    """

    dashboard_url: str
    gcs_address: str
    serve_port: int
    temp_dir: Path
    process: subprocess.Popen = field(repr=False)
    token: str = field(default="", repr=False)
    users: int = 0

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Stop the head and every process it started (daemons, workers, job drivers); wait for them."""
        # The guard leads the head's session (start_new_session): its pid is the session id.
        stop_head(self.process, self.process.pid, str(self.temp_dir))
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


_lock = threading.Lock()
_shared: LocalHead | None = None


def acquire_head(num_cpus: int | None = None) -> LocalHead:
    """The process's private head, started now if there is none yet; count one more user.

    Args:
        num_cpus: logical CPUs the head offers (only used when it starts);
            default ``max(cores, 8)``.

    Raises:
        ClusterError: ``ray`` is not on this Python, or the head did not come up in time
            (its last output lines are in the message).
    """
    global _shared
    with _lock:
        if _shared is None or not _shared.alive:
            _shared = _start(num_cpus or max(os.cpu_count() or 1, MIN_LOGICAL_CPUS))
        _shared.users += 1
        return _shared


def release_head(head: LocalHead) -> None:
    """One user fewer; the last one stops the head."""
    global _shared
    with _lock:
        head.users -= 1
        if head.users > 0:
            return
        if _shared is head:
            _shared = None
    head.stop()


@atexit.register
def _stop_at_exit() -> None:
    global _shared
    with _lock:
        head, _shared = _shared, None
    if head is not None:
        head.stop()


def _start(num_cpus: int) -> LocalHead:
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        raise ClusterError("Ray", f"no 'ray' command next to {sys.executable}", "pip install 'dsnb[ray]' in this environment")
    # Ray puts socket paths under the temp dir, and Unix sockets allow ~107 bytes: keep it short.
    temp_dir = Path(tempfile.mkdtemp(prefix="dsnbray-", dir="/tmp" if os.path.isdir("/tmp") else None))
    gcs_port, dashboard_port, client_port, serve_port, agent_port = (free_port() for _ in range(5))
    env = dict(os.environ)
    # Token authentication even on loopback: another user of this machine must not run code as ours
    # through the Jobs API. The token lives in this process and the head's environment only.
    token = secrets.token_urlsafe(32)
    env.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        # The driver's `python` must be this environment's, which has dsnb, torch and DeepSpeed.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    })
    env.pop("RAY_ADDRESS", None)
    log_path = temp_dir / "head.log"
    argv = [str(ray_cli), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
            f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}"]
    # The guard stops the head when this process is gone, even killed (see head_guard.py).
    guarded = [sys.executable, "-m", "dsnb.backends.ray.head_guard", str(os.getpid()),
               str(process_start_time(os.getpid()) or 0), str(temp_dir), *argv]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(guarded, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
    head = LocalHead(dashboard_url=f"http://127.0.0.1:{dashboard_port}", gcs_address=f"127.0.0.1:{gcs_port}",
                     serve_port=serve_port, temp_dir=temp_dir, process=process, token=token)
    # Ready means the dashboard answers and so does the node's agent: a job submitted before the
    # agent listens is refused ("No available agent") or, worse, waits without end.
    probes = [f"{head.dashboard_url}/api/version", f"http://127.0.0.1:{agent_port}/api/local_raylet_healthz"]
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and head.alive:
        if all(_answers(url, token) for url in probes):
            return head
        time.sleep(0.3)
    tail = _tail(log_path)
    head.stop()
    raise ClusterError("local Ray head", f"did not start within {START_TIMEOUT_S:.0f} s; its last lines:\n{tail}",
                       "check that 'ray start --head' works in this environment, or pass address= of a running Ray cluster")


def _answers(url: str, token: str) -> bool:
    try:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"
