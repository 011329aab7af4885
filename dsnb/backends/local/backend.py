"""The local backend: every rank as a process on this machine.

Example:
    >>> from dsnb import JobSpec
    >>> plan = LocalBackend().dryrun(JobSpec(name="hello", command=["python", "-c", "print(1)"],
    ...                                      procs_per_node=2))
    >>> [c.env["RANK"] for c in plan.commands], plan.commands[0].env["DS_ACCELERATOR"]
    (['0', '1'], 'cpu')
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dsnb.backends.base import Backend, LogChunk, MetricChunk, Plan, RankCommand
from dsnb.backends.local.jobdir import (
    JobDir,
    ensure_private_dir,
    jobs_root,
    parse_log_lines,
    read_last_lines,
    write_json_atomic,
    write_private,
)
from dsnb.backends.local.procs import boot_id, is_alive, owned_groups, stop_groups
from dsnb.backends.local.serving import SERVE_TOKEN_FILE, LocalExposure
from dsnb.backends.options import BUILTIN_OPTIONS
from dsnb.backends.profiles import BUILTIN_PROFILES
from dsnb.errors import InvalidSpecError, JobNotFound
from dsnb.preflight import CheckResult, PreflightReport
from dsnb.secrets import is_secret, redact_env, refuse_references
from dsnb.serving.job_serving import TOKEN_ENV, EndpointsAsJobs, JobEndpoints, is_serving_job
from dsnb.spec import JobSpec
from dsnb.status import JobState, JobStatus, LogLine, MetricSample

JOB_NAME = re.compile(r"\A[a-z]([-a-z0-9]*[a-z0-9])?\Z")
DEFAULT_DRAIN_S = 30.0  # python -m dsnb.runtime.server's --drain-s
MASTER_ADDR = "127.0.0.1"
READ_CHUNK_BYTES = 256 * 1024
CANCEL_WAIT_S = 20.0


def visible_gpus() -> int:
    """GPUs this machine offers: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _threads_per_rank(spec: JobSpec) -> int:
    """The spec's threads per rank; without a CPU count, this machine's cores shared by all ranks."""
    return spec.threads_per_rank or max(1, usable_cpus() // spec.world_size)


def _check_fits_here(spec: JobSpec) -> None:
    """Refuse more GPUs or ranks than this machine has.

    Raises:
        InvalidSpecError: naming ``resources.gpus`` or ``procs_per_node``.
    """
    gpus = spec.resources.gpus
    if gpus:
        have = visible_gpus()
        if gpus * spec.nodes > have:
            raise InvalidSpecError(
                "resources.gpus",
                f"{gpus} per node x {spec.nodes} nodes asked, this machine has {have}",
                "set gpus=0 to run on CPU, or ask for fewer",
            )
    most = max(64, 8 * usable_cpus())
    if spec.world_size > most:
        raise InvalidSpecError("procs_per_node", f"{spec.world_size} ranks is more than this machine can run "
                                                 f"({usable_cpus()} usable cores; at most {most} ranks here)",
                               f"ask for at most {most} ranks (nodes x procs_per_node), or use a cluster backend")


def _program(spec: JobSpec) -> tuple[Path, list[str]]:
    """The ranks' working directory and command line.

    Raises:
        InvalidSpecError: naming ``working_dir``, ``script`` or ``command`` when it is not there.
    """
    cwd = Path(spec.working_dir or os.getcwd()).expanduser().resolve()
    if not cwd.is_dir():
        raise InvalidSpecError("working_dir", f"{str(cwd)!r} is not a directory", "pass an existing directory")
    if spec.script is not None:
        script = (cwd / spec.script).resolve()
        if not script.is_file():
            raise InvalidSpecError("script", f"{str(script)!r} not found", f"check the path (relative to working_dir {str(cwd)!r})")
        return cwd, [sys.executable, "-u", str(script), *spec.args]
    if spec.function is not None:
        return cwd, spec.function.argv(python=sys.executable)  # type: ignore[union-attr]
    program = spec.command[0]  # type: ignore[index]
    if not (shutil.which(program) or (cwd / program).is_file()):
        raise InvalidSpecError("command", f"{program!r} is not on PATH", "give a full path or install it")
    return cwd, [*spec.command, *spec.args]  # type: ignore[misc]


class LocalBackend(EndpointsAsJobs, Backend):
    """Runs ``nodes × procs_per_node`` ranks as processes here, under a detached supervisor.

    ``serve`` runs a model server the same way (:class:`~dsnb.serving.job_serving.JobEndpoints`
    with :class:`~dsnb.backends.local.serving.LocalExposure`): rank 0 listens on a free port of
    127.0.0.1 and records its URL in the job's directory.

    Each job lives in ``$DSNB_HOME/jobs/<name>/`` (see :mod:`dsnb.backends.local.jobdir`),
    so a restarted kernel or another terminal can list, attach to, follow and cancel it.
    Ranks get the torch.distributed environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``LOCAL_WORLD_SIZE``, ``LOCAL_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``); without GPUs they
    run gloo with ``DS_ACCELERATOR=cpu``, with GPUs nccl.

    Args:
        home: directory for job records; defaults to ``$DSNB_HOME/jobs`` (``~/.dsnb/jobs``).
    """

    name = "local"
    watches_hangs = True
    reports_stragglers = True  # the supervisor sees every line of every rank
    options = BUILTIN_OPTIONS["local"]
    profiles = BUILTIN_PROFILES["local"]

    def __init__(self, home: str | Path | None = None) -> None:
        self.root = Path(home) if home is not None else jobs_root()
        self._supervisors: dict[str, subprocess.Popen[bytes]] = {}
        self._rank_counts: dict[str, int] = {}
        self.job_endpoints = JobEndpoints(self, LocalExposure(self.job_dir))

    # -- planning --------------------------------------------------------------------------
    def unique_spec(self, spec: JobSpec) -> JobSpec:
        """``spec`` under a unique name that no job directory here has."""
        unique = spec.with_unique_name()
        while (self.root / unique.name).exists():
            unique = spec.with_unique_name()
        return unique

    def render(self, spec: JobSpec) -> Plan:
        refuse_references(spec.env, self.name)
        gpus = spec.resources.gpus
        _check_fits_here(spec)
        cwd, argv = _program(spec)
        job_dir = JobDir(self.root / spec.name)
        commands = []
        for rank in range(spec.world_size):
            node, local = divmod(rank, spec.procs_per_node)
            env = {
                "RANK": str(rank),
                "LOCAL_RANK": str(local),
                "WORLD_SIZE": str(spec.world_size),
                "LOCAL_WORLD_SIZE": str(spec.procs_per_node),
                "LOCAL_SIZE": str(spec.procs_per_node),
                "NODE_RANK": str(node),
                "GROUP_RANK": str(node),
                "MASTER_ADDR": MASTER_ADDR,
                "MASTER_PORT": "$MASTER_PORT",
                "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(_threads_per_rank(spec))),
                "DSNB_JOB_NAME": spec.name,
                "DSNB_JOB_DIR": str(job_dir.path),
                "DSNB_DIST_BACKEND": spec.dist_backend,
            }
            if gpus:
                first = node * gpus
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(first, first + gpus))
            else:
                env["DS_ACCELERATOR"] = "cpu"
            if spec.deepspeed is not None:
                env["DSNB_DEEPSPEED_CONFIG"] = str(job_dir.ds_config)
            env.update(spec.env)  # a Secret stays one, so that every view of the plan hides it
            commands.append(RankCommand(rank=rank, argv=tuple(argv), cwd=str(cwd), env=env))
        backend_word = f"{spec.dist_backend} on {spec.accelerator.upper()}"
        notes = [
            f"dsnb local plan for {spec.name}: {spec.nodes} node(s) x {spec.procs_per_node} rank(s), {backend_word}",
            "MASTER_PORT is a free port chosen at launch; ranks also inherit the caller's environment",
        ]
        return Plan(backend=self.name, spec=spec, commands=commands, notes=notes)

    def memory_there(self, spec: JobSpec | None = None) -> Any:
        """This machine's memory (``dsnb.fit.MemoryThere``): its smallest GPU's for a GPU ``spec``; for a CPU one,
        each rank's share of this machine's memory, which DeepSpeed's CPU accelerator uses as the device's.

        Example:
            >>> there = LocalBackend().memory_there(JobSpec(name="a", command=["true"], procs_per_node=2))
            >>> there.cpu > there.gpu > 0
            True
        """
        import psutil

        from dsnb.fit import MemoryThere, local_gpu_memory

        total = psutil.virtual_memory().total
        if spec is not None and spec.resources.gpus:
            return MemoryThere(gpu=local_gpu_memory(), cpu=total, source="this machine")
        ranks = spec.procs_per_node if spec is not None else 1
        return MemoryThere(gpu=total // ranks, cpu=total,
                           source=f"this machine's memory, shared by {ranks} CPU rank(s) as their device memory")

    def check(self, spec: JobSpec | None = None) -> PreflightReport:
        """torch and deepspeed importable, CPU cores for the ranks, and the GPUs ``spec`` asks for.

        Example:
            >>> from dsnb import Resources
            >>> report = LocalBackend().check(JobSpec(name="a", command=["true"], resources=Resources(gpus=1)))
            >>> [r.name for r in report.results]
            ['torch', 'deepspeed', 'CPU cores', 'GPUs']
        """
        import importlib.metadata
        import importlib.util

        results = []
        for package in ("torch", "deepspeed"):
            if importlib.util.find_spec(package) is None:
                results.append(CheckResult(package, False, f"not installed for {sys.executable}", "pip install 'dsnb[local]'"))
            else:
                results.append(CheckResult(package, True, f"{package} {importlib.metadata.version(package)}"))
        cores, ranks = usable_cpus(), spec.world_size if spec is not None else 1
        results.append(CheckResult("CPU cores", cores >= ranks, f"{cores} usable for {ranks} rank(s)",
                                   f"ranks will share cores and run slower; run at most {cores}", warning=cores < ranks))
        if spec is not None and spec.resources.gpus:
            need, have = spec.resources.gpus * spec.nodes, visible_gpus()
            results.append(CheckResult("GPUs", have >= need, f"{need} asked ({spec.resources.gpus} per node x {spec.nodes} "
                                       f"node(s)), this machine shows {have}", "set gpus=0 to run on CPU, or ask for fewer"))
        return PreflightReport(self.name, results)

    def apply(self, plan: Plan) -> None:
        for folder in ((self.root.parent, self.root) if self.root == jobs_root() else (self.root,)):
            ensure_private_dir(folder)  # DSNB_HOME and its jobs/: 0700 and yours
        job_dir = JobDir(self.root / plan.name)
        job_dir.path.mkdir(mode=0o700)
        spec = plan.spec
        created = time.time()
        # No secret value goes into a file of the record: the supervisor gets them on its stdin.
        stored = spec.to_dict()
        stored["env"] = redact_env(spec.env)
        write_json_atomic(job_dir.spec, stored)
        secret_values = {k: str(v) for c in plan.commands for k, v in c.env.items() if is_secret(k, v)}
        if TOKEN_ENV in secret_values:  # what a reattached Endpoint sends: a file only its owner reads
            write_private(job_dir.path / SERVE_TOKEN_FILE, secret_values[TOKEN_ENV])
        if spec.deepspeed_config is not None:
            write_json_atomic(job_dir.ds_config, spec.deepspeed_config)
        job_dir.write_status(JobStatus(name=plan.name, backend=self.name, state=JobState.PENDING, created_at=created, message="starting the supervisor"))
        # plan.json marks the job as existing, so it is written last.
        write_json_atomic(
            job_dir.plan,
            {
                "name": plan.name,
                "created_at": created,
                "master_addr": MASTER_ADDR,
                "timeout": spec.timeout,
                "hang_timeout": spec.hang_timeout,
                "max_restarts": spec.max_restarts,
                "stop": stop_policy(spec),
                "ranks": [
                    {"rank": c.rank, "argv": list(c.argv), "cwd": c.cwd,
                     "env": {k: v for k, v in redact_env(c.env).items() if k != "MASTER_PORT"}}
                    for c in plan.commands
                ],
            },
        )
        with open(job_dir.supervisor_log, "ab") as log:
            supervisor = subprocess.Popen(
                [sys.executable, "-m", "dsnb.runtime.supervisor", str(job_dir.path)],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the job outlives the kernel that launched it
            )
        self._supervisors[plan.name] = supervisor
        assert supervisor.stdin is not None
        with supervisor.stdin:  # the secret values, once, through a pipe: in no file and on no command line
            supervisor.stdin.write(json.dumps(secret_values).encode())

    # -- reading ---------------------------------------------------------------------------
    def job_dir(self, name: str) -> JobDir:
        """The directory of job ``name``.

        Raises:
            InvalidSpecError: ``name`` is no job name (a path would leave ``DSNB_HOME``).
            JobNotFound: no such job.
        """
        if not isinstance(name, str) or not JOB_NAME.match(name):  # a path would leave DSNB_HOME ("/x", "../x")
            raise InvalidSpecError("name", f"{name!r} is not a job name", "use a name from cluster.jobs() (letters, digits and '-')")
        job_dir = JobDir(self.root / name)
        if not job_dir.plan.is_file():
            raise JobNotFound(name, self.name, self._names())
        return job_dir

    def _names(self) -> list[str]:
        """Names of the recorded jobs (no status reads)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "plan.json").is_file())

    def _rank_count(self, name: str, job_dir: JobDir) -> int:
        if name not in self._rank_counts:  # the plan never changes; read it once per job
            self._rank_counts[name] = len(json.loads(job_dir.plan.read_text())["ranks"])
        return self._rank_counts[name]

    def status(self, name: str) -> JobStatus:
        job_dir = self.job_dir(name)
        self._reap(name)
        status, extra = job_dir.read_status_and_extra()
        if status is None:  # apply writes the status first; only a damaged record lacks it
            raise JobNotFound(name, self.name, self._names())
        if status.state.is_terminal():
            return status
        if self._supervisor_may_run(name, status, extra):
            return status
        pid = extra.get("supervisor_pid")
        other_boot = extra.get("boot_id") not in (None, boot_id())
        # The supervisor may have written its final state and exited since we read the file.
        latest = job_dir.read_status()
        if latest is not None and latest.state.is_terminal():
            return latest
        # The supervisor is gone without writing a final state: killed, or the machine restarted.
        if other_boot:  # its pids now name whatever else got them: signal nothing
            state, message = JobState.FAILED, "the machine restarted while the job ran: its processes are gone"
        else:
            stop_groups(owned_groups(extra.get("rank_pgids", []), extra.get("rank_starts")), grace=1.0)
            _remove_shm_segments(extra)
            if job_dir.cancel_request.exists():
                state, message = JobState.CANCELLED, "cancelled; all ranks stopped"
            else:
                state = JobState.FAILED
                message = f"the dsnb supervisor (pid {pid}) stopped unexpectedly; see {job_dir.supervisor_log}"
        lost = dataclasses.replace(status, state=state, finished_at=time.time(), message=message)
        job_dir.write_status(lost)
        return lost

    def _supervisor_may_run(self, name: str, status: JobStatus, extra: dict) -> bool:
        """Whether the job's supervisor runs, or may not have written its first status yet."""
        pid, start = extra.get("supervisor_pid"), extra.get("supervisor_start")
        if pid is not None:
            return extra.get("boot_id") in (None, boot_id()) and is_alive(pid, start)
        ours = self._supervisors.get(name)
        if ours is not None:
            return ours.poll() is None  # just launched; it has not written its first status yet
        return time.time() - (status.created_at or 0) < 30  # launched a moment ago by another process

    def _reap(self, name: str) -> None:
        proc = self._supervisors.get(name)
        if proc is not None and proc.poll() is not None:
            del self._supervisors[name]

    def read_logs(self, name: str, cursor: Any = None, rank: int | None = None) -> LogChunk:
        job_dir = self.job_dir(name)
        offsets: dict[int, int] = dict(cursor or {})
        ranks = range(self._rank_count(name, job_dir)) if rank is None else [rank]
        lines: list[LogLine] = []
        for r in ranks:
            start = offsets.get(r, 0)
            try:
                with open(job_dir.rank_log(r), "rb") as f:
                    f.seek(start)
                    data = f.read(READ_CHUNK_BYTES)
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1  # only whole lines; the rest is read next time
            lines.extend(LogLine(rank=r, text=text, time=when) for when, text in parse_log_lines(data[:end]))
            offsets[r] = start + end
        lines.sort(key=lambda line: line.time)
        return LogChunk(lines=lines, cursor=offsets)

    def read_log_tail(self, name: str, count: int, rank: int | None = None) -> LogChunk:
        """The last ``count`` lines, read backwards from the end of each rank's file."""
        job_dir = self.job_dir(name)
        ranks = range(self._rank_count(name, job_dir)) if rank is None else [rank]
        lines: list[LogLine] = []
        offsets: dict[int, int] = {}
        for r in ranks:
            last, offsets[r] = read_last_lines(job_dir.rank_log(r), count)
            lines.extend(LogLine(rank=r, text=text, time=when) for when, text in last)
        lines.sort(key=lambda line: line.time)
        return LogChunk(lines=lines[-count:] if count > 0 else [], cursor=offsets)

    def read_metrics(self, name: str, cursor: Any = None) -> MetricChunk:
        job_dir = self.job_dir(name)
        start = int(cursor or 0)
        try:
            with open(job_dir.metrics, "rb") as f:
                f.seek(start)
                data = f.read(READ_CHUNK_BYTES)
        except FileNotFoundError:
            return MetricChunk(samples=[], cursor=start)
        end = data.rfind(b"\n") + 1
        samples = [MetricSample(**json.loads(raw)) for raw in data[:end].decode().splitlines() if raw]
        return MetricChunk(samples=samples, cursor=start + end)

    # -- control -----------------------------------------------------------------------------
    def stop_running(self, name: str, status: JobStatus) -> JobStatus:
        job_dir = self.job_dir(name)
        job_dir.cancel_request.touch()
        extra = job_dir.read_status_extra()
        pid = extra.get("supervisor_pid")
        if pid and is_alive(pid, extra.get("supervisor_start")):
            os.kill(pid, signal.SIGTERM)
        # Without a pid the supervisor is still starting; it sees the cancel file before spawning.
        deadline = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < deadline:
            status = self.status(name)
            if status.state.is_terminal():
                self._wait_supervisor(name)
                return status
            time.sleep(0.1)
        # The supervisor did not answer: stop everything ourselves (what is still ours) and record the outcome.
        extra = job_dir.read_status_extra()
        supervisor = extra.get("supervisor_pid")
        ours = [supervisor] if supervisor and is_alive(supervisor, extra.get("supervisor_start")) else []
        stop_groups(ours + owned_groups(extra.get("rank_pgids", []), extra.get("rank_starts")), grace=1.0)
        _remove_shm_segments(extra)
        cancelled = dataclasses.replace(status, state=JobState.CANCELLED, finished_at=time.time(),
                                        message="cancelled; the supervisor did not respond and was killed")
        job_dir.write_status(cancelled)
        return cancelled

    def _wait_supervisor(self, name: str) -> None:
        proc = self._supervisors.pop(name, None)
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def jobs(self) -> list[JobStatus]:
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            if (path / "plan.json").is_file():
                try:
                    found.append(self.status(path.name))
                except (OSError, ValueError, JobNotFound):
                    continue  # a directory being written or removed right now
        return sorted(found, key=lambda s: s.created_at or 0, reverse=True)

    def spec_of(self, name: str) -> JobSpec:
        return JobSpec.from_dict(json.loads(self.job_dir(name).spec.read_text()))

    def close(self) -> None:
        for name in list(self._supervisors):
            self._reap(name)


def stop_policy(spec: JobSpec) -> dict[str, float]:
    """How the supervisor stops the job's ranks: a model server gets SIGTERM alone and its drain time
    (``--drain-s``, 30 s by default, plus a margin) before SIGKILL; other jobs SIGINT first (so that
    ``finally`` blocks run), then SIGTERM and SIGKILL after the usual grace.

    Example:
        >>> from dsnb import ServeSpec
        >>> stop_policy(ServeSpec(name="m", model="m:f").to_job_spec())
        {'interrupt_s': 0.0, 'grace_s': 40.0}
    """
    if not is_serving_job(spec):
        return {}
    args = list(spec.args)
    drain = float(args[args.index("--drain-s") + 1]) if "--drain-s" in args else DEFAULT_DRAIN_S
    return {"interrupt_s": 0.0, "grace_s": drain + 10.0}


def _remove_shm_segments(extra: dict[str, Any]) -> None:
    """The shared-memory segments DeepSpeed's CPU all-reduce left for the job, when its supervisor could not
    remove them (it was killed): named after this user, the master address and the job's port."""
    port, address = extra.get("master_port"), extra.get("master_addr", "127.0.0.1")
    if port:
        for leftover in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_*"):
            Path(leftover).unlink(missing_ok=True)
