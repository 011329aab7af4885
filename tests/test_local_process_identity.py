"""The local backend never signals a process it did not start, and leaves nothing behind when its supervisor dies.

A job's record names its supervisor and its ranks by pid; after a supervisor was killed, a
container restart or a reboot, those numbers may belong to anyone (a Jupyter kernel, a tmux
session). Each rank's start time and the machine's boot id are recorded with its pid, and
every path that signals (status, cancel, jobs) checks both first.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
from helpers import job_processes, wait_until

from dsnb import Cluster, JobSpec, JobState
from dsnb.backends.local.jobdir import JobDir
from dsnb.backends.local.procs import boot_id, group_alive, is_alive, owned_groups, process_start_time
from dsnb.status import JobStatus, ReplicaStatus


def victim() -> subprocess.Popen[bytes]:
    """An unrelated process in a session of its own, as a Jupyter kernel would be."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)


def planted_record(home: Path, name: str, **extra) -> None:
    """A record as one left RUNNING by a supervisor that is gone."""
    job_dir = JobDir(home / "jobs" / name)
    job_dir.path.mkdir(parents=True)
    job_dir.plan.write_text('{"ranks": [{"rank": 0}]}')
    status = JobStatus(name=name, backend="local", state=JobState.RUNNING, replicas=(ReplicaStatus(rank=0, state=JobState.RUNNING),),
                       created_at=time.time() - 3600)
    job_dir.write_status(status, supervisor_pid=999_999, supervisor_start=1, **extra)


def test_a_pid_that_now_names_another_process_is_not_signalled(dsnb_home: Path) -> None:
    other = victim()
    try:
        # The rank's pid is reused by an unrelated process, which started later than the rank did.
        planted_record(dsnb_home, "reused-abcd", boot_id=boot_id(), rank_pgids=[other.pid], rank_starts=[1])
        statuses = Cluster().jobs()
        assert [s.state for s in statuses] == [JobState.FAILED] and "supervisor" in statuses[0].message
        time.sleep(0.5)
        assert other.poll() is None  # still running: nothing was sent to it
        # A record of an older dsnb (no start times) is not trusted either.
        planted_record(dsnb_home, "older-abcd", rank_pgids=[other.pid])
        Cluster().jobs()
        time.sleep(0.5)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_record_from_another_boot_fails_without_a_signal(dsnb_home: Path) -> None:
    other = victim()
    try:
        # Even with the right start time: the numbers of another boot mean nothing in this one.
        planted_record(dsnb_home, "reboot-abcd", boot_id="00000000-0000-0000-0000-000000000000",
                       rank_pgids=[other.pid], rank_starts=[process_start_time(other.pid)])
        status = Cluster().attach("reboot-abcd").status()
        assert status.state == JobState.FAILED and "the machine restarted" in status.message
        time.sleep(0.5)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_owned_groups_keeps_only_groups_that_are_still_dsnbs() -> None:
    other = victim()
    try:
        start = process_start_time(other.pid)
        assert owned_groups([other.pid], [start]) == [other.pid]
        assert owned_groups([other.pid], [start - 1]) == []  # the pid was reused
        assert owned_groups([other.pid], None) == []  # nothing to check it against
    finally:
        other.kill()
        other.wait()
    assert owned_groups([other.pid], [start]) == []  # gone


def test_a_zombie_is_neither_alive_nor_owned() -> None:
    """A process that exited but was not collected by its parent still has a pid and a group; it is gone all the same."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"], start_new_session=True)
    try:
        start = process_start_time(child.pid)
        assert start is not None and is_alive(child.pid, start) and group_alive(child.pid)
        # Not reaped: Popen collects the exit status only when asked (poll, wait).
        wait_until(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, timeout=30)
        assert process_start_time(child.pid) is None
        assert not is_alive(child.pid) and not is_alive(child.pid, start)
        assert not group_alive(child.pid)  # killpg(pgid, 0) still succeeds for a group of zombies
        assert owned_groups([child.pid], [start]) == []
    finally:
        child.wait()


def test_a_supervisor_killed_outright_takes_its_ranks_and_shared_memory_with_it(tmp_path: Path, dsnb_home: Path) -> None:
    script = tmp_path / "hold.py"
    script.write_text(textwrap.dedent("""
        import os, time
        print("up", flush=True)
        time.sleep(300)
    """))
    job = Cluster().submit(JobSpec(name="orphan", script="hold.py", working_dir=str(tmp_path), procs_per_node=2))
    wait_until(lambda: sum(line.text == "up" for line in job.logs()) == 2, timeout=60)
    job_dir = JobDir(dsnb_home / "jobs" / job.name)
    extra = job_dir.read_status_extra()
    assert extra["boot_id"] == boot_id() and len(extra["rank_starts"]) == 2 and all(extra["rank_starts"])
    # What DeepSpeed's CPU all-reduce would have left, for this job's port.
    segment = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{extra['master_addr']}_{extra['master_port']}_0")
    segment.write_bytes(b"x")
    os.kill(extra["supervisor_pid"], signal.SIGKILL)
    # No client looks: the kernel stops the ranks (parent-death signal), not a later status().
    wait_until(lambda: job_processes(job.name) == [], timeout=30, message=lambda: job_processes(job.name))
    status = job.status()
    assert status.state == JobState.FAILED and "supervisor" in status.message
    assert not segment.exists() and not glob.glob(str(segment))
