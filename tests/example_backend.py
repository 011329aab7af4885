"""A minimal backend, as docs/backends.md "Writing a backend" describes: ranks as child processes.

It implements only what differs between backends (render, apply, status, read logs and
metrics, stop, list); unique names, ``submit``, ``cancel`` of an ended job, tails, following,
waiting and views come from :class:`~dsnb.backends.base.Backend` and :class:`~dsnb.job.Job`.
Jobs live in this process's memory, so they end with it. ``tests/test_example_backend.py``
runs the conformance suite on it, after ``register_backend("children", ChildProcessBackend)``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from dsnb import InvalidSpecError, JobNotFound, JobSpec, JobState
from dsnb.backends.base import Backend, LogChunk, MetricChunk, Plan, RankCommand
from dsnb.backends.logbuffer import JobLogs
from dsnb.status import JobStatus, ReplicaStatus

READ_LIMIT = 5000


@dataclass
class _Run:
    plan: Plan
    processes: list[subprocess.Popen]
    logs: JobLogs = field(default_factory=JobLogs)
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    cancelled: bool = False
    failed_rank: int | None = None


class ChildProcessBackend(Backend):
    """Each rank a child process of this one, on 127.0.0.1; no GPUs."""

    name = "children"

    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}

    def render(self, spec: JobSpec) -> Plan:
        if spec.resources.gpus:
            raise InvalidSpecError("resources.gpus", "child processes get no GPUs", "set resources.gpus=0")
        argv = tuple(spec.rank_argv(python=sys.executable))  # a script, a command or a function
        base = {**spec.env, "DSNB_JOB_NAME": spec.name, "WORLD_SIZE": str(spec.world_size),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "$MASTER_PORT"}  # a free port, chosen at launch
        commands = [RankCommand(rank=r, argv=argv, cwd=spec.working_dir or os.getcwd(),
                                env={**base, "RANK": str(r), "LOCAL_RANK": str(r % spec.procs_per_node)})
                    for r in range(spec.world_size)]
        return Plan(backend=self.name, spec=spec, commands=commands)

    def apply(self, plan: Plan) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = str(probe.getsockname()[1])
        processes = [subprocess.Popen(c.argv, cwd=c.cwd, env={**os.environ, **c.env, "MASTER_PORT": port}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True)
                     for c in plan.commands]
        run = self._runs[plan.name] = _Run(plan, processes)
        readers = [threading.Thread(target=self._read, args=(run, rank), daemon=True) for rank in range(len(processes))]
        for reader in readers:
            reader.start()
        threading.Thread(target=self._watch, args=(run, readers), daemon=True).start()

    @staticmethod
    def _read(run: _Run, rank: int) -> None:
        for text in run.processes[rank].stdout:
            run.logs.add(rank, text.rstrip("\n"), time.time())

    def _watch(self, run: _Run, readers: list[threading.Thread]) -> None:
        while any(p.poll() is None for p in run.processes):
            failed = [r for r, p in enumerate(run.processes) if p.returncode not in (None, 0)]
            if failed and run.failed_rank is None and not run.cancelled:
                run.failed_rank = failed[0]
                self._stop(run)  # the first failure ends the job: its peers are stopped
            time.sleep(0.1)
        for reader in readers:
            reader.join()
        run.finished_at = time.time()

    @staticmethod
    def _stop(run: _Run) -> None:
        for process in run.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)

    def _run(self, name: str) -> _Run:
        if name not in self._runs:
            raise JobNotFound(name, self.name, sorted(self._runs))
        return self._runs[name]

    def status(self, name: str) -> JobStatus:
        run = self._run(name)
        codes = [p.poll() for p in run.processes]
        if run.finished_at is None:
            state = JobState.RUNNING
        elif run.cancelled:
            state = JobState.CANCELLED
        else:
            failed = run.failed_rank if run.failed_rank is not None else next(
                (r for r, code in enumerate(codes) if code), None)
            state = JobState.SUCCEEDED if failed is None else JobState.FAILED
            run.failed_rank = failed
        replicas = tuple(ReplicaStatus(rank=r, exit_code=code, pid=p.pid, state=JobState.RUNNING if code is None else
                                       JobState.SUCCEEDED if code == 0 else state) for r, (p, code) in enumerate(zip(run.processes, codes)))
        failed_rank = run.failed_rank if state == JobState.FAILED else None
        last = tuple(line.text for line in run.logs.tail(20, failed_rank)[0]) if failed_rank is not None else ()
        return JobStatus(name=name, backend=self.name, state=state, replicas=replicas, started_at=run.started_at,
                         created_at=run.started_at, finished_at=run.finished_at, failed_rank=failed_rank,
                         exit_code=codes[failed_rank] if failed_rank is not None else None, last_lines=last,
                         message=f"rank {failed_rank} exited with {codes[failed_rank]}" if failed_rank is not None else "")

    def read_logs(self, name: str, cursor: Any = None, rank: int | None = None) -> LogChunk:
        lines, after = self._run(name).logs.read(cursor or 0, rank, READ_LIMIT)
        return LogChunk(lines=lines, cursor=after)

    def read_metrics(self, name: str, cursor: Any = None) -> MetricChunk:
        samples, after = self._run(name).logs.samples(cursor or 0)
        return MetricChunk(samples=samples, cursor=after)

    def stop_running(self, name: str, status: JobStatus) -> JobStatus:
        run = self._run(name)
        run.cancelled = True
        self._stop(run)
        while run.finished_at is None:
            time.sleep(0.05)
        return self.status(name)

    def jobs(self) -> list[JobStatus]:
        return [self.status(name) for name in sorted(self._runs, key=lambda n: -self._runs[n].started_at)]

    def spec_of(self, name: str) -> JobSpec:
        return self._run(name).plan.spec

    def close(self) -> None:
        for run in self._runs.values():
            self._stop(run)
