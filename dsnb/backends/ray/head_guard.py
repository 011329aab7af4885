"""Runs the private Ray head and stops it, with everything it started, when its owner is gone.

``python -m dsnb.backends.ray.head_guard <owner pid> <owner start time> <temp dir> ray start --head --block ...``
is what :mod:`dsnb.backends.ray.head` starts, in a session of its own. The guard starts
``ray start`` in that session and checks twice a second that the owner (the Python process
that asked for the head) still runs, by pid and start time so that a reused pid does not count.
An owner that ends without closing its clusters (a killed notebook kernel, a crash) would
otherwise leave the head's daemons and every job on it running.

Stopping is a sweep, because Ray spreads its processes: its daemons and workers stay in the
head's session but each worker leads a process group of its own, and each job's driver runs
in a session of its own, started in the head's temporary directory. :func:`stop_head` sends
SIGTERM to ``ray start`` (which stops its daemons), then SIGKILL to every process of the
session or working under the temporary directory, until none is left.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil

from dsnb.backends.local.procs import is_alive

POLL_S = 0.5
GRACE_S = 3.0
KILL_TIMEOUT_S = 10.0


def head_processes(session: int, temp_dir: str) -> list[int]:
    """Live (not zombie) processes of ``session``, or whose working directory is under ``temp_dir``.

    Example:
        >>> os.getpid() in head_processes(os.getsid(0), "/nonexistent")   # the guard leaves itself out
        False

    Raises:
        Nothing: a process that ends or cannot be read while the list is made is left out.
    """
    me = os.getpid()
    return [process.pid for process in psutil.process_iter(["status", "cwd"])
            if process.pid != me and process.info["status"] != psutil.STATUS_ZOMBIE
            and (_session_of(process.pid) == session or (process.info["cwd"] or "").startswith(temp_dir))]


def _session_of(pid: int) -> int | None:
    # psutil does not report sessions.
    try:
        return os.getsid(pid)
    except OSError:
        return None


def stop_head(ray_start: subprocess.Popen | int, session: int, temp_dir: str) -> None:
    """Stop ``ray start --block`` gracefully, then kill whatever of the head is left."""
    pid = ray_start if isinstance(ray_start, int) else ray_start.pid
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and is_alive(pid):
        time.sleep(0.1)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while time.monotonic() < deadline:
        left = head_processes(session, temp_dir)
        if not left:
            return
        for victim in left:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def main(argv: list[str]) -> int:
    """Start ``argv[3:]`` and stop it when process ``argv[0]`` (started at ``argv[1]``) is gone."""
    owner, started, temp_dir = int(argv[0]), int(argv[1]), argv[2]
    session = os.getsid(0)
    head = subprocess.Popen(argv[3:])

    def stop(*_: object) -> None:
        stop_head(head, session, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        sys.exit(0)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    while head.poll() is None and is_alive(owner, started or None):
        time.sleep(POLL_S)
    stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
