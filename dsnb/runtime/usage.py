"""What each rank uses: CPU, resident memory and, on NVIDIA GPUs, utilisation and memory.

:class:`UsageSampler` reads a rank's whole process group from ``/proc`` (a rank may be a launcher
with Python under it) and, when ``nvidia-ml-py`` is installed and a GPU is there, asks NVML which
GPUs the group's processes hold memory on and how busy those GPUs are. Each :meth:`UsageSampler.sample`
gives the values since the last one:

=====================  ====================================================================
``cpu_percent``        CPU time over wall time since the last sample (100 = one core busy)
``rss_mib``            resident memory of the group's processes
``gpu_util_percent``   utilisation of the GPUs the group uses (their mean), NVML only
``gpu_mem_mib``        GPU memory the group's processes hold, NVML only
=====================  ====================================================================

It needs only the standard library (NVML is optional), so any of dsnb's rank-side code can run it.

Example:
    >>> import os
    >>> sampler = UsageSampler(os.getpgid(0))
    >>> first = sampler.sample()
    >>> sorted(first)[:2], first["rss_mib"] > 0
    (['cpu_percent', 'rss_mib'], True)
"""

from __future__ import annotations

import os
import time
from typing import Any

#: The metric names a sample may hold.
USAGE_METRICS = frozenset({"cpu_percent", "rss_mib", "gpu_util_percent", "gpu_mem_mib"})
#: Seconds between two samples of one rank: a bounded rate, whatever the job.
DEFAULT_INTERVAL_S = 2.0
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MIB = 2**20


def group_pids(pgids: set[int]) -> dict[int, list[int]]:
    """The processes of each of these process groups, in one pass over ``/proc`` (a group that is gone: none).

    Example:
        >>> os.getpid() in group_pids({os.getpgid(0)})[os.getpgid(0)]
        True
    """
    found: dict[int, list[int]] = {pgid: [] for pgid in pgids}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat_fields(int(entry))
            if stat is not None and int(stat[2]) in found:
                found[int(stat[2])].append(int(entry))
    return found


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` after the command name (which may hold spaces): field 3 (state) first."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _cpu_ticks_and_rss(pid: int) -> tuple[int, int] | None:
    stat = _stat_fields(pid)
    if stat is None or len(stat) < 22 or stat[0] in ("Z", "X"):  # a zombie holds nothing and uses nothing
        return None
    # utime and stime are fields 14 and 15, rss (pages) field 24: indexes 11, 12 and 21 here.
    return int(stat[11]) + int(stat[12]), int(stat[21]) * _PAGE


class UsageSampler:
    """Samples one rank's process group (see the module docstring).

    Args:
        pgid: the rank's process group (dsnb starts each rank as its own group).
        nvml: an initialised ``pynvml`` module, or None to try importing one (``False``: no GPU metrics).
        clock: seconds, monotonic; injectable for tests.

    Raises:
        Nothing: a process that ended, or an NVML that fails, leaves its values out.
    """

    def __init__(self, pgid: int, nvml: Any = None, clock: Any = time.monotonic) -> None:
        self.pgid = pgid
        self.clock = clock
        self.nvml = load_nvml() if nvml is None else nvml or None
        self._ticks: dict[int, int] = {}
        self._last: float | None = None

    def sample(self, pids: list[int] | None = None) -> dict[str, float]:
        """The rank's usage now (CPU since the last call; 0 on the first), or {} once its processes are gone.

        Args:
            pids: the group's processes when the caller listed them already (:func:`group_pids`).
        """
        now = self.clock()
        pids = group_pids({self.pgid})[self.pgid] if pids is None else pids
        ticks, rss, seen = 0, 0, {}
        for pid in pids:
            read = _cpu_ticks_and_rss(pid)
            if read is None:
                continue
            seen[pid] = read[0]
            ticks += read[0] - self._ticks.get(pid, read[0])
            rss += read[1]
        if not seen:
            return {}
        elapsed = None if self._last is None else now - self._last
        self._ticks, self._last = seen, now
        values = {"cpu_percent": round(100.0 * ticks / _TICKS / elapsed, 1) if elapsed else 0.0,
                  "rss_mib": round(rss / MIB, 1)}
        if self.nvml is not None:
            values.update(gpu_usage(self.nvml, set(seen)))
        return values


def load_nvml() -> Any:
    """``pynvml`` (from ``nvidia-ml-py``), initialised, or None without it or without an NVIDIA driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, _DriverNotLoaded...: no GPU here
        return None
    return pynvml


def gpu_usage(nvml: Any, pids: set[int]) -> dict[str, float]:
    """GPU memory these processes hold and the mean utilisation of the GPUs they hold it on ({} on none).

    Raises:
        Nothing: an NVML error leaves the GPU values out.
    """
    try:
        used, devices = 0, []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            held = [p for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid in pids]
            if held:
                used += sum(p.usedGpuMemory or 0 for p in held)
                devices.append(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:  # NVMLError: a GPU fell off the bus, a permission...
        return {}
    if not devices:
        return {}
    return {"gpu_util_percent": float(sum(devices)) / len(devices), "gpu_mem_mib": round(used / MIB, 1)}
