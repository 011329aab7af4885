"""Test helpers that look at the machine itself rather than at dsnb's own records."""

from __future__ import annotations

import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKLOAD = Path(__file__).resolve().parent / "conformance" / "workload.py"


def job_processes(marker: str) -> list[int]:
    """Pids of live processes whose environment mentions ``marker`` (a job name or DSNB_HOME).

    Every rank and everything it starts inherits ``DSNB_JOB_DIR``, so this finds grandchildren too;
    the supervisor is found by its command line.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes() + b"\0" + (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        parts = environ.split(b"\0")
        if any(v.startswith(b"DSNB_JOB_DIR=") and marker.encode() in v for v in parts) or (
            b"dsnb.runtime.supervisor" in parts[-1] and marker.encode() in parts[-1]
        ):
            found.append(int(entry.name))
    return found


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05, message=None):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds.

    ``message``: a callable whose answer the failure shows (what was seen last).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s" + (f": {message()}" if message else ""))


def settled(probe, timeout: float = 10.0):
    """``probe()`` once it returns an empty list, or its last answer after ``timeout`` seconds.

    A supervisor writes the final status a moment before it exits; leftovers are judged after that.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def followed(panel, timeout: float = 30.0, ended: str = "the job ended"):
    """Wait for a panel's follower thread and ticker to stop by themselves; returns the panel."""
    panel.monitor.thread.join(timeout)
    assert not panel.monitor.thread.is_alive(), f"the follower did not stop when {ended}"
    if panel.ticker is not None:
        panel.ticker.join(5)
        assert not panel.ticker.is_alive()
    return panel
