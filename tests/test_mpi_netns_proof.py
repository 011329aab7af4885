"""Proof of an MPI Operator-style launch across pods that are network namespaces, without ssh.

Three "pods" (``tj-launcher``, ``tj-worker-0``, ``tj-worker-1``) are network namespaces on one
bridge (:class:`k8s.netns.PodNetwork`), each with the DNS names a headless Service gives
(``tj-worker-0.tj.ml.svc``). The launcher runs ``mpirun`` with the hostfile the MPI Operator
(v2beta1, ``slotsPerWorker: 2``) writes and the environment it sets; Open MPI starts its
``orted`` daemons on the workers through ``OMPI_MCA_plm_rsh_agent`` pointed at
``k8s/rsh_agent.py``, which enters the worker's namespace where ssh would log in. Each rank
runs a small shim that turns Open MPI's environment into torch.distributed's, then the script.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO
from k8s.netns import PodNetwork
from k8s.sandbox import mpi_problem, netns_problem

pytestmark = pytest.mark.skipif(bool(netns_problem() or mpi_problem()),
                                reason=netns_problem() or mpi_problem() or "")

AGENT = Path(__file__).resolve().parent / "k8s" / "rsh_agent.py"
EXAMPLE = REPO / "examples" / "tiny_gpt"
JOB, NAMESPACE, SLOTS = "tj", "ml", 2
WORKERS = [f"{JOB}-worker-{i}" for i in range(2)]
LAUNCHER = f"{JOB}-launcher"
MASTER_PORT = 29500

# What each rank runs first: Open MPI's environment -> torch.distributed's, then the script.
RANK_SHIM = '''\
import os, sys
env = os.environ
env["RANK"] = env["OMPI_COMM_WORLD_RANK"]
env["LOCAL_RANK"] = env["OMPI_COMM_WORLD_LOCAL_RANK"]
env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_SIZE"]
env["LOCAL_WORLD_SIZE"] = env["LOCAL_SIZE"] = env["OMPI_COMM_WORLD_LOCAL_SIZE"]
env["NODE_RANK"] = str(int(env["RANK"]) // int(env["LOCAL_SIZE"]))
env.setdefault("MASTER_PORT", "29500")
if "MASTER_ADDR" not in env:
    sys.exit("MASTER_ADDR is not set: export it with mpirun -x MASTER_ADDR=<first host of the hostfile>")
os.execvp(sys.executable, [sys.executable, *sys.argv[1:]])
'''

# Prints what a rank sees: its rank, hostname and its namespace's eth0 address.
RANK_INFO = '''\
import fcntl, os, socket, struct
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
address = socket.inet_ntoa(fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", b"eth0"))[20:24])  # SIOCGIFADDR
print(f"rank={os.environ['RANK']} local={os.environ['LOCAL_RANK']} node={os.environ['NODE_RANK']} "
      f"host={socket.gethostname()} ip={address} master={os.environ['MASTER_ADDR']}", flush=True)
'''

# A rank that fails: rank 2 exits 3 after a second, the others would sleep for minutes.
RANK_FAILS = '''\
import os, sys, time
print("up", flush=True)
if os.environ["RANK"] == "2":
    time.sleep(1)
    sys.exit(3)
time.sleep(300)
'''

# The launcher's command line, as an MPIJob launcher container would run it (by sh -c).
MPIRUN = (
    "mpirun --tag-output -np {np} --map-by slot --bind-to none"
    " --mca pml ob1 --mca btl tcp,self --mca btl_tcp_if_include eth0 --mca oob_tcp_if_include eth0"
    " -x MASTER_ADDR=$(head -n 1 \"$OMPI_MCA_orte_default_hostfile\" | cut -d ' ' -f 1)"
    f" -x MASTER_PORT={MASTER_PORT} -x GLOO_SOCKET_IFNAME=eth0 -x OMP_NUM_THREADS=1"
    " {exports} {python} {shim} {script}"
)


def dns_name(pod: str) -> str:
    """A pod's name under the job's headless Service, as the MPI Operator's hostfile has it."""
    return f"{pod}.{JOB}.{NAMESPACE}.svc"


def processes_mentioning(marker: str) -> list[int]:
    """Live pids whose environment or command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            seen = (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and marker.encode() in seen:
            found.append(int(entry.name))
    return found


def namespaces_left(prefix: str) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    left = [line.split()[0] for line in listed if line.startswith(prefix)]
    return left + [p.name for p in Path("/etc/netns").glob(f"{prefix}*")]


@dataclass
class MpiJob:
    """A launcher and two workers; :meth:`mpirun` runs the launcher's command and returns it."""

    net: PodNetwork
    folder: Path
    env: dict[str, str]

    def mpirun(self, script: str, exports: dict[str, str] | None = None, *, np: int = 4,
               timeout: float = 60, extra: str = "") -> subprocess.CompletedProcess[str]:
        process = self.start(script, exports, np=np, extra=extra)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            raise AssertionError(f"mpirun did not finish within {timeout} s:\n{out}\n{err}") from None
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def start(self, script: str, exports: dict[str, str] | None = None, *, np: int = 4,
              extra: str = "") -> subprocess.Popen[str]:
        line = MPIRUN.format(np=np, python=sys.executable, shim=self.folder / "rank_shim.py", script=script,
                             exports=" ".join(f"-x {k}={v}" for k, v in (exports or {}).items()) + " " + extra)
        return subprocess.Popen(self.net.command(LAUNCHER, ["sh", "-c", f"exec {line}"]), env=self.env,
                                cwd=self.folder, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)

    def prefix(self) -> str:
        """What every namespace name of this job starts with (and what every process of it mentions)."""
        return self.net.namespace(LAUNCHER).rsplit("-", 1)[0] + "-"


@pytest.fixture
def mpi_job(tmp_path: Path) -> Iterator[MpiJob]:
    """The pods, their hosts files, the MPI Operator's hostfile and launcher environment."""
    pods = [LAUNCHER, *WORKERS]
    (tmp_path / "rank_shim.py").write_text(RANK_SHIM)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{dns_name(w)} slots={SLOTS}\n" for w in WORKERS))
    with PodNetwork(pods) as net:
        net.hosts({pod: [dns_name(pod), f"{dns_name(pod)}.cluster.local"] for pod in pods})
        env = {
            "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
            # mpirun's session directory; a SIGKILLed mpirun leaves it behind (pytest removes tmp_path).
            "TMPDIR": str(tmp_path),
            # What the MPI Operator (v2beta1) sets in an Open MPI launcher.
            "OMPI_MCA_orte_default_hostfile": str(hostfile),
            "OMPI_MCA_orte_keep_fqdn_hostnames": "true",
            "OMPI_MCA_plm_rsh_args": "-o ConnectionAttempts=10",
            # The image runs as root.
            "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            # Instead of ssh: enter the worker's namespace.
            "OMPI_MCA_plm_rsh_agent": f"{sys.executable} {AGENT}",
            "DSNB_RSH_NETNS": json.dumps({pod: net.namespace(pod) for pod in pods}),
        }
        job = MpiJob(net, tmp_path, env)
        prefix = job.prefix()
        try:
            yield job
        finally:
            # A test that leaves processes behind is a leak: fail loudly after cleaning up.
            deadline = time.monotonic() + 15
            while (left := processes_mentioning(prefix)) and time.monotonic() < deadline:
                time.sleep(0.1)
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            assert not left, f"processes of the MPI job survived: {left}"
    assert not namespaces_left(prefix), f"namespaces left behind: {namespaces_left(prefix)}"


@pytest.mark.parametrize("tree_spawn", [True, False], ids=["tree-spawn", "no-tree-spawn"])
def test_mpirun_places_two_ranks_on_each_worker(mpi_job: MpiJob, tree_spawn: bool) -> None:
    (mpi_job.folder / "rank_info.py").write_text(RANK_INFO)
    extra = "" if tree_spawn else "--mca plm_rsh_no_tree_spawn 1"
    done = mpi_job.mpirun("rank_info.py", extra=extra)
    assert done.returncode == 0, done.stderr
    lines = sorted(done.stdout.splitlines())
    assert len(lines) == 4, done.stdout
    worker_ips = [mpi_job.net.address(w) for w in WORKERS]
    for rank, line in enumerate(lines):
        match = re.fullmatch(r"\[\d+,(\d)\]<stdout>:rank=(\d) local=(\d) node=(\d) host=(\S+) ip=(\S+) master=(\S+)", line)
        assert match, line
        tag, seen, local, node, host, address, master = match.groups()
        worker = rank // SLOTS
        assert (int(tag), int(seen), int(local), int(node)) == (rank, rank, rank % SLOTS, worker), line
        assert (host, address, master) == (WORKERS[worker], worker_ips[worker], dns_name(WORKERS[0])), line
    assert mpi_job.net.address(LAUNCHER) not in done.stdout


def test_a_failing_rank_fails_the_job_and_is_named(mpi_job: MpiJob) -> None:
    (mpi_job.folder / "rank_fails.py").write_text(RANK_FAILS)
    started = time.monotonic()
    done = mpi_job.mpirun("rank_fails.py", timeout=60)
    assert done.returncode == 3, done.stderr
    assert re.search(r"Process name: \[\[\d+,1\],2\]\n\s+Exit code:\s+3", done.stderr), done.stderr
    assert time.monotonic() - started < 30, "the other ranks were not stopped promptly"


def test_killing_mpirun_stops_every_daemon_and_rank(mpi_job: MpiJob) -> None:
    (mpi_job.folder / "rank_fails.py").write_text(RANK_FAILS.replace('"2"', '"none"'))
    launcher = mpi_job.start("rank_fails.py")
    try:
        assert launcher.stdout is not None
        for _ in range(4):
            assert launcher.stdout.readline().endswith("up\n")
        # mpirun dies at once, without telling the daemons. Only mpirun: its remote-shell agents
        # stay, so what stops the daemons is orted's own watch on its connection to mpirun,
        # not the agents' teardown (which would also stop them, as sshd does for a lost client).
        assert Path(f"/proc/{launcher.pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"mpirun")
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
        launcher.stdout.close()
        launcher.stderr.close()
    # The daemons notice that mpirun is gone and stop their ranks, and the agents end with them
    # (the fixture checks nothing is left).
    deadline = time.monotonic() + 30
    while processes_mentioning(mpi_job.prefix()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_mentioning(mpi_job.prefix())
