"""``JobSpec.hang_timeout`` on the StatefulSet backend: the pod entry stops a node whose rank went quiet while the
node's other rank went on, and the job fails naming that rank; pods run for real under the simulated cluster."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from k8s.fixtures import IMAGE, emulator, make_cluster, sim  # noqa: F401 - fixtures
from k8s.sandbox import sandbox_problem

from dsnb import JobSpec, JobState
from dsnb.errors import JobFailed

pytestmark = pytest.mark.skipif(sandbox_problem() is not None, reason=sandbox_problem() or "")

STALL = textwrap.dedent("""
    import os, time
    rank = int(os.environ["RANK"])
    for step in range(400):
        print(f"rank {rank} step {step}", flush=True)
        if rank == 1 and step == 30:
            while True:
                time.sleep(0.5)
        time.sleep(0.2)
""")


def test_a_rank_quiet_while_its_peer_goes_on_fails_the_job_naming_it(emulator, sim, tmp_path: Path) -> None:  # noqa: F811
    (tmp_path / "stall.py").write_text(STALL)
    spec = JobSpec(name="stall", script="stall.py", working_dir=str(tmp_path), procs_per_node=2, image=IMAGE,
                   hang_timeout=6)
    with make_cluster(emulator) as cluster:
        job = cluster.submit(spec)
        with pytest.raises(JobFailed) as failed:
            job.wait(timeout=240)
    status = failed.value.status
    assert status.state == JobState.FAILED and status.failed_rank == 1, status.diagnosis()
    assert "rank 1 hung: it wrote nothing for" in status.message
    assert "while the others progressed (JobSpec.hang_timeout=6 s)" in status.message
    assert "rank 1 step 30" in status.last_lines
