"""A rank whose output cannot be written (a full disk) fails the job within seconds, naming the place,
instead of blocking on a full pipe while the job shows RUNNING for ever."""

from __future__ import annotations

import errno
import json
import sys
import time
from pathlib import Path

from helpers import job_processes

from dsnb import JobState
from dsnb.backends.local.jobdir import JobDir
from dsnb.runtime.supervisor import Supervisor


class FullDisk:
    """A log file on a disk with no space left: every write fails, as on ``/dev/full``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_rank_log_that_cannot_be_written_fails_the_job_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "jobs" / "chatty-abcd"
    folder.mkdir(parents=True, mode=0o700)
    # A rank that writes far more than a pipe holds (64 KiB), then would wait for ever.
    chatty = "import time\nfor i in range(200000): print('x' * 100, flush=True)\ntime.sleep(600)"
    folder.joinpath("plan.json").write_text(json.dumps({
        "name": "chatty-abcd", "created_at": time.time(), "master_addr": "127.0.0.1", "timeout": None, "max_restarts": 2,
        "ranks": [{"rank": 0, "argv": [sys.executable, "-c", chatty], "cwd": str(tmp_path),
                   "env": {"DSNB_JOB_DIR": str(folder)}}]}))
    supervisor = Supervisor(folder)
    supervisor.logs[0].close()
    supervisor.logs[0] = FullDisk(JobDir(folder).rank_log(0))
    assert supervisor.run() == JobState.FAILED  # the rank alone would sleep 600 s: the full disk ended the job
    status = JobDir(folder).read_status()
    assert status.state == JobState.FAILED and status.failed_rank == 0 and status.restarts == 0  # no restart into a full disk
    assert status.message.startswith(f"no space left on {JobDir(folder).rank_log(0)}: rank 0's output could not be kept")
    assert job_processes(str(folder)) == []
