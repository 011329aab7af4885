"""A local job's rendezvous and collectives listen on loopback only, as the docs promise.

torch's rank-0 TCPStore listens on every interface; the supervisor now hosts the store on a
socket it bound to 127.0.0.1 and keeps gloo on ``lo``. Checked by listing the listening sockets
of every process of a running 2-rank gloo job (its supervisor included).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from helpers import job_processes, wait_until

from dsnb import Cluster, JobSpec

psutil = pytest.importorskip("psutil")
pytest.importorskip("torch")

RANK = textwrap.dedent("""
    import time, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    total = torch.ones(1)
    dist.all_reduce(total)
    print(f"ready {int(total.item())}", flush=True)
    time.sleep(300)
""")


def listening(pids: list[int]) -> list[tuple[int, str]]:
    found = []
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found += [(pid, c.laddr.ip) for c in connections if c.status == psutil.CONN_LISTEN]
    return found


def test_a_two_rank_job_listens_on_loopback_only(tmp_path: Path, dsnb_home: Path) -> None:
    (tmp_path / "rank.py").write_text(RANK)
    with Cluster() as cluster:
        job = cluster.submit(JobSpec(name="loopback", script="rank.py", working_dir=str(tmp_path), procs_per_node=2))
        try:
            wait_until(lambda: sorted(line.text for line in job.logs()) == ["ready 2", "ready 2"], timeout=120,
                       message=lambda: [line.text for line in job.logs()][-5:])
            pids = job_processes(str(dsnb_home))  # the ranks and the supervisor
            sockets = listening(pids)
            assert sockets, "no listening socket found: the check would be vacuous"
            assert {ip for _, ip in sockets} == {"127.0.0.1"}, sockets
        finally:
            job.cancel()
