"""Process helpers: identity that survives pid reuse, and stopping whole process trees.

Every rank runs in its own session (``start_new_session=True``), so its process group id
equals its pid and ``killpg`` reaches the rank and everything it started (DataLoader
workers, compiler jobs), even after the rank itself has exited.

Processes are read through psutil. Two things psutil does not give are read directly: a
process's group (``os.getpgid``) and Linux's boot id (:func:`boot_id`).

Example:
    >>> import os
    >>> is_alive(os.getpid(), process_start_time(os.getpid()))
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil

#: The unit of a recorded start time: the kernel's clock ticks, as ``/proc/<pid>/stat`` counts them,
#: so that a start time recorded by an earlier dsnb still compares equal.
TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot, or None if it is gone, a zombie, or unreadable.

    Used together with the pid to tell a process from a later one that reused its pid.

    Example:
        >>> process_start_time(os.getpid()) > 0, process_start_time(2**22 + 1)
        (True, None)

    Raises:
        Nothing: a process that cannot be read has no start time.
    """
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # it has exited; only its exit status is left to collect
            return None
        # Boot time first: psutil 5 adds the boot time it read last to the process's creation time.
        booted = psutil.boot_time()
        return round((process.create_time() - booted) * TICKS_PER_S)
    except (psutil.Error, ValueError):
        return None


def boot_id() -> str | None:
    """This boot of the machine (Linux's ``/proc/sys/kernel/random/boot_id``), or None where there is none.

    Pids and start times mean something only within one boot: after a restart, a recorded pid
    belongs to whatever process got that number since. psutil has no boot id, and its
    ``boot_time()`` cannot stand in for one: it is derived from the wall clock, which moves.

    Example:
        >>> boot_id() == boot_id()
        True

    Raises:
        Nothing: None where the file cannot be read.
    """
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def owned_groups(pgids: list[int], starts: list[int | None] | None) -> list[int]:
    """The process groups of ``pgids`` that are still the ones dsnb started, so that it may signal them.

    A group's leader (the rank) must run with the start time recorded for it. A group whose leader
    has exited but whose members still run (a rank's DataLoader workers) is still the same group:
    Linux does not give a pid to a new process while a process group of that number exists. A group
    recorded without a start time (an older record) is never signalled.

    Example:
        >>> import subprocess, sys
        >>> rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
        >>> owned_groups([rank.pid], [process_start_time(rank.pid)]) == [rank.pid], owned_groups([rank.pid], [1])
        (True, [])
        >>> rank.kill(); rank.wait()
        -9
    """
    owned = []
    for pgid, start in zip(pgids, starts or [None] * len(pgids)):
        if start is None:
            continue
        now = process_start_time(pgid)
        if now == start or (now is None and group_alive(pgid)):
            owned.append(pgid)
    return owned


def die_with_parent() -> None:
    """In a child between fork and exec: have the kernel send it SIGTERM when the process that
    started it dies, however it dies (Linux's ``PR_SET_PDEATHSIG``; elsewhere nothing)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _load_prctl() -> Any:
    # Looked up before any fork: a child may not import or allocate between fork and exec.
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_PR_SET_PDEATHSIG = 1
_PRCTL = _load_prctl() if sys.platform.startswith("linux") else None


def is_alive(pid: int | None, start_time: int | None = None) -> bool:
    """True if ``pid`` runs (a zombie does not) and, when given, started at ``start_time``.

    Example:
        >>> is_alive(os.getpid()), is_alive(os.getpid(), 1), is_alive(None)
        (True, False, False)

    Raises:
        Nothing: a process that cannot be read counts as gone.
    """
    if not pid:
        return False
    now = process_start_time(pid)
    return now is not None and (start_time is None or now == start_time)


def group_alive(pgid: int) -> bool:
    """True while any process of process group ``pgid`` exists, zombies aside.

    Example:
        >>> group_alive(os.getpgrp())
        True

    Raises:
        Nothing: a group that cannot be signalled for lack of permission counts as alive.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(…, 0) also succeeds for a group made only of zombies awaiting their parent.
    return any(_group_of(process.pid) == pgid for process in psutil.process_iter(["status"])
               if process.info["status"] != psutil.STATUS_ZOMBIE)


def _group_of(pid: int) -> int | None:
    # psutil does not report process groups.
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to process group ``pgid``; a group that is gone is fine."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(pgids: list[int], seconds: float) -> list[int]:
    """The groups of ``pgids`` still alive after waiting up to ``seconds`` for them to end."""
    # Not psutil.wait_procs: that waits for given processes, and a group's members may change while it ends.
    deadline = time.monotonic() + seconds
    remaining = list(pgids)
    while remaining:
        remaining = [g for g in remaining if group_alive(g)]
        if not remaining or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return remaining


def stop_groups(pgids: list[int], grace: float = 5.0, interrupt: float = 0.0) -> None:
    """Stop whole process groups: SIGINT (optional), then SIGTERM, then SIGKILL.

    Args:
        pgids: process group ids (a rank's pid, as each rank leads its own group).
        grace: seconds between SIGTERM and SIGKILL.
        interrupt: if above 0, send SIGINT first and wait this long. Python then raises
            KeyboardInterrupt and runs its ``finally`` blocks, which release file locks such
            as the one torch holds while it compiles an extension; a process killed outright
            leaves that lock behind and every later job waits on it forever.

    Example:
        >>> stop_groups([], grace=0.1)
    """
    remaining = list(pgids)
    if interrupt > 0:
        for pgid in remaining:
            signal_group(pgid, signal.SIGINT)
        remaining = _wait_gone(remaining, interrupt)
    for pgid in remaining:
        signal_group(pgid, signal.SIGTERM)
    for pgid in _wait_gone(remaining, grace):
        signal_group(pgid, signal.SIGKILL)


def describe_exit(code: int) -> str:
    """Human words for a Popen return code.

    Example:
        >>> describe_exit(3), describe_exit(-9)
        ('exited with code 3', 'was killed by SIGKILL (out of memory, or killed by hand)')
    """
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    words = f"was killed by {name}"
    if -code == signal.SIGKILL:
        words += " (out of memory, or killed by hand)"
    elif -code == signal.SIGSEGV:
        words += " (a crash in native code)"
    return words
