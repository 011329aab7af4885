"""What each rank uses: the sampler on real processes, NVML's answers attributed to the rank's processes, and the
per-rank CPU and memory samples of a local job."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dsnb import Cluster, JobSpec, JobState
from dsnb.runtime.usage import USAGE_METRICS, UsageSampler, gpu_usage, group_pids

BURN = textwrap.dedent("""
    import subprocess, sys, time
    held = bytearray(80 * 2**20)  # resident: every page written
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # same group
    print("ready", flush=True)
    end = time.time() + 60
    while time.time() < end:
        sum(range(10000))
""")


@pytest.fixture
def burner():
    proc = subprocess.Popen([sys.executable, "-c", BURN], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout.readline() == b"ready\n"
    yield proc
    os.killpg(proc.pid, 9)
    proc.wait()


def test_the_sampler_reads_the_whole_process_group(burner) -> None:
    sampler = UsageSampler(burner.pid, nvml=False)
    assert len(group_pids({burner.pid})[burner.pid]) == 2  # the rank and the child it started
    first = sampler.sample()
    assert first["cpu_percent"] == 0.0 and set(first) == {"cpu_percent", "rss_mib"}  # no time before it yet
    time.sleep(1.0)
    second = sampler.sample()
    assert 50 <= second["cpu_percent"] <= 110  # one core busy (2 cores here; a loaded machine gives less)
    assert second["rss_mib"] >= 80
    os.killpg(burner.pid, 9)
    burner.wait()
    assert sampler.sample() == {}  # gone: nothing to say


@dataclass
class _Process:
    pid: int
    usedGpuMemory: int | None  # noqa: N815 (NVML's field name)


class _Rates:
    def __init__(self, gpu: int) -> None:
        self.gpu = gpu


class RecordedNvml:
    """NVML's calls as the nvidia-ml-py bindings name them, answering with what a two-GPU node reported."""

    devices = [([_Process(101, 30 * 2**30), _Process(999, 2**30)], 90), ([_Process(102, 10 * 2**30)], 40)]

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[_Process]:  # noqa: N802
        return self.devices[handle][0]

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> _Rates:  # noqa: N802
        return _Rates(self.devices[handle][1])


def test_gpu_usage_counts_the_ranks_own_processes_and_the_gpus_they_are_on() -> None:
    nvml = RecordedNvml()
    assert gpu_usage(nvml, {101}) == {"gpu_util_percent": 90.0, "gpu_mem_mib": 30 * 1024.0}
    assert gpu_usage(nvml, {101, 102}) == {"gpu_util_percent": 65.0, "gpu_mem_mib": 40 * 1024.0}
    assert gpu_usage(nvml, {555}) == {}  # on no GPU: no GPU values

    class Failing(RecordedNvml):
        def nvmlDeviceGetCount(self) -> int:  # noqa: N802
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")

    assert gpu_usage(Failing(), {101}) == {}


def test_a_local_job_gets_cpu_and_memory_samples_per_rank(tmp_path: Path) -> None:
    (tmp_path / "busy.py").write_text(textwrap.dedent("""
        import os, time
        rank = int(os.environ["RANK"])
        held = bytearray((rank + 1) * 60 * 2**20)  # rank 1 holds 60 MiB more than rank 0
        end = time.time() + 6
        while time.time() < end:
            sum(range(20000))
    """))
    job = Cluster().submit(JobSpec(name="busy", script="busy.py", working_dir=str(tmp_path), procs_per_node=2))
    assert job.wait(timeout=120).state == JobState.SUCCEEDED
    samples = [s for s in job.metrics() if s.name in USAGE_METRICS]
    by_rank = {rank: [s for s in samples if s.rank == rank] for rank in (0, 1)}
    for own in by_rank.values():
        assert len({s.time for s in own if s.name == "cpu_percent"}) >= 2, samples  # one each 2 s
        assert max(s.value for s in own if s.name == "cpu_percent") >= 30
    rss = {rank: max(s.value for s in own if s.name == "rss_mib") for rank, own in by_rank.items()}
    assert rss[1] - rss[0] >= 50
    assert not any(s.name.startswith("gpu_") for s in samples)  # no GPU here
