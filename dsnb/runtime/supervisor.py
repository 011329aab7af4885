"""The supervisor of one local job: a small detached process that owns the ranks.

``python -m dsnb.runtime.supervisor JOB_DIR`` starts every rank of the plan in its
own process group, copies each rank's output line by line into ``rank-<i>.log`` (with a
timestamp) while parsing metric lines into ``metrics.jsonl``, and writes ``status.json``
as the job moves. It runs in its own session, so the job outlives the notebook kernel
that launched it and any Python process can attach to it through the job directory.

When one rank exits non-zero the others are stopped at once (not after a collective
timeout) and the job fails naming that rank, its exit code and its last lines, or the
whole job restarts while ``max_restarts`` allows. SIGTERM (sent by ``cancel``) stops
every rank's process group and records CANCELLED.

It also follows when each rank last wrote and which step it last reported
(:class:`~dsnb.stragglers.RankActivity`): ranks that look stuck or slow are written into the
status as they appear. With ``hang_timeout``, a rank that writes nothing for that long while the
others go on (or a job where no rank writes) is sent SIGABRT, on which Python's faulthandler
(``PYTHONFAULTHANDLER``, set for every rank) prints every thread's stack, and the job fails
naming that rank with its stack as the last lines.

It imports neither torch nor DeepSpeed, so it adds little to a job's start-up.
"""

from __future__ import annotations

import errno
import functools
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any

from dsnb.backends.local.jobdir import JobDir, format_log_line, read_last_lines
from dsnb.backends.local.procs import boot_id, describe_exit, die_with_parent, process_start_time, stop_groups
from dsnb.backends.local.store import LoopbackStore
from dsnb.metrics import MetricParser, is_metric_line, sample_to_dict
from dsnb.monitor import paces
from dsnb.runtime.usage import DEFAULT_INTERVAL_S as USAGE_INTERVAL_S
from dsnb.runtime.usage import UsageSampler, group_pids, load_nvml
from dsnb.secrets import REDACTED
from dsnb.status import JobState, JobStatus, MetricSample, ReplicaStatus
from dsnb.stragglers import DEFAULT_FLOOR_S, RankActivity

POLL_S = 0.05
LAST_LINES = 20
MAX_LINE_BYTES = 64 * 1024
KILL_GRACE_S = float(os.environ.get("DSNB_KILL_GRACE", "5"))
INTERRUPT_GRACE_S = 2.0
#: Seconds between two looks for stuck and slow ranks.
STRAGGLER_CHECK_S = 1.0
#: Seconds a hung rank gets to print its stack after SIGABRT.
STACK_WAIT_S = 5.0
#: The most lines of a hung rank's stack kept in the status.
STACK_LINES = 60
#: The first line faulthandler prints on a fatal signal.
FAULT_MARK = "Fatal Python error"


def _diagnostic(text: str) -> bool:
    # Metric lines are data, not diagnosis: a script reporting every step would otherwise fill them.
    return bool(text.strip()) and not is_metric_line(text)


def tail_lines(path: Path, count: int = LAST_LINES) -> tuple[str, ...]:
    """The last ``count`` lines of a rank log, without timestamps, blank lines or metric lines."""
    return tuple(text for _, text in read_last_lines(path, count, keep=_diagnostic)[0])


class _OutputPump(threading.Thread):
    """Copies one rank's pipe into its log file and feeds the metric parser."""

    def __init__(self, rank: int, pipe: IO[bytes], log: IO[str], sink: _MetricSink, activity: RankActivity) -> None:
        super().__init__(name=f"dsnb-rank-{rank}", daemon=True)
        self.rank, self.pipe, self.log, self.sink, self.activity = rank, pipe, log, sink, activity
        self.saw_output = threading.Event()
        self.write_error: OSError | None = None  # the log could not be written (a full disk): the job must fail
        self.dropped = 0

    def run(self) -> None:
        for raw in iter(lambda: self.pipe.readline(MAX_LINE_BYTES), b""):
            now = time.time()
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.saw_output.set()
            if self.write_error is not None:
                self.dropped += 1  # keep draining: a rank blocked on a full pipe would hang the job
                continue
            try:
                self.log.write(format_log_line(now, text))
                self.log.flush()
            except OSError as e:
                self.write_error, self.dropped = e, self.dropped + 1
                continue
            try:
                self.activity.saw_line(self.rank, now)
                for step in self.sink.feed(self.rank, text, now):
                    self.activity.saw_step(self.rank, step, now)
            except Exception:  # never stop copying output: a blocked pipe would hang the rank
                traceback.print_exc()
        self.pipe.close()


class _UsageThread(threading.Thread):
    """Samples every rank's CPU, memory and GPU use (:mod:`dsnb.runtime.usage`) into the metrics, at a bounded rate."""

    def __init__(self, ranks: list[tuple[int, int]], sink: _MetricSink, activity: RankActivity,
                 interval: float = USAGE_INTERVAL_S) -> None:
        super().__init__(name="dsnb-usage", daemon=True)
        self.samplers = {rank: UsageSampler(pgid, nvml=_nvml_once()) for rank, pgid in ranks}
        self.sink, self.activity, self.interval = sink, activity, interval
        self.done = threading.Event()

    def run(self) -> None:
        self._sample(write=False)  # the first CPU figure needs a time before it
        while not self.done.wait(self.interval):
            self._sample(write=True)

    def _sample(self, write: bool) -> None:
        try:
            listed = group_pids({s.pgid for s in self.samplers.values()})
            now = time.time()
            for rank, sampler in self.samplers.items():
                values = sampler.sample(listed[sampler.pgid])
                if write:
                    step = self.activity.step_of(rank)
                    self.sink.write([MetricSample(step, name, value, rank, now) for name, value in values.items()])
        except Exception:  # usage is an aid: never stop the job for it
            traceback.print_exc()


@functools.cache
def _nvml_once() -> Any:
    """NVML, initialised once per supervisor; False without it."""
    return load_nvml() or False


class _MetricSink:
    """Thread-safe writer of parsed metric samples."""

    def __init__(self, path: Path) -> None:
        self._parser = MetricParser()
        self._lock = threading.Lock()
        self._file = open(path, "a", buffering=1, encoding="utf-8")

    def feed(self, rank: int, text: str, when: float) -> set[int]:
        """Parse one line; returns the training steps its samples report."""
        with self._lock:
            samples = self._parser.feed(rank, text, when)
            for sample in samples:
                self._file.write(json.dumps(sample_to_dict(sample)) + "\n")
        return {sample.step for sample in samples if sample.step_unit == "step" and paces(sample.name)}

    def write(self, samples: list[MetricSample]) -> None:
        """Write samples made here (not parsed from a line)."""
        with self._lock:
            for sample in samples:
                self._file.write(json.dumps(sample_to_dict(sample)) + "\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_secrets(stream: Any) -> dict[str, str]:
    """The secret env values the launcher wrote to our stdin (none when it is a terminal or closed)."""
    try:
        if stream is None or stream.isatty():
            return {}
        text = stream.read()
    except (OSError, ValueError):
        return {}
    values = json.loads(text) if text.strip() else {}
    return {str(k): str(v) for k, v in values.items()} if isinstance(values, dict) else {}


class Supervisor:
    """Runs the ranks of one job directory to completion."""

    def __init__(self, job_dir: Path, secret_values: dict[str, str] | None = None) -> None:
        self.dir = JobDir(job_dir)
        self.plan: dict[str, Any] = json.loads(self.dir.plan.read_text())
        # The plan shows secret values as ***; the real ones come from whoever launched us (main: on stdin).
        secret_values = secret_values or {}
        for rank in self.plan["ranks"]:
            rank["env"] = {k: secret_values.get(k, v) if v == REDACTED else v for k, v in rank["env"].items()}
        self.name: str = self.plan["name"]
        self.cancel_requested = threading.Event()
        self.created_at: float = self.plan["created_at"]
        self.started_at: float | None = None
        self.restarts = 0
        self.procs: list[subprocess.Popen[bytes]] = []
        self.rank_starts: list[int | None] = []  # each rank's start time, recorded with its pid
        self.port: int | None = None
        self.exit_times: dict[int, float] = {}
        self.pumps: list[_OutputPump] = []
        self.usage: _UsageThread | None = None
        self.replicas: list[ReplicaStatus] = []
        self.hang_timeout: float | None = self.plan.get("hang_timeout")
        # Flags show at half the hang timeout, so that a user sees a rank go quiet before the job fails.
        self.activity = RankActivity(self._straggler_floor())
        self.stragglers: tuple[str, ...] = ()
        self.attempt_started = 0.0
        self.sink = _MetricSink(self.dir.metrics)
        self.logs = [open(self.dir.rank_log(r["rank"]), "a", encoding="utf-8", errors="replace") for r in self.plan["ranks"]]

    # -- status -------------------------------------------------------------------------
    def _write(self, state: JobState, message: str = "", **failure: Any) -> None:
        finished = time.time() if state.is_terminal() else None
        status = JobStatus(
            name=self.name,
            backend="local",
            state=state,
            replicas=tuple(self.replicas),
            message=message,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=finished,
            restarts=self.restarts,
            stragglers=() if state.is_terminal() else self.stragglers,
            **failure,
        )
        self.dir.write_status(
            status,
            supervisor_pid=os.getpid(),
            supervisor_start=process_start_time(os.getpid()),
            boot_id=boot_id(),
            rank_pgids=[p.pid for p in self.procs],
            rank_starts=list(self.rank_starts),  # each rank's identity, checked before any signal
            master_addr=self.plan["master_addr"], master_port=self.port,
        )

    def _set_replicas(self, state: JobState) -> None:
        self.replicas = [
            ReplicaStatus(rank=r["rank"], state=state, pid=p.pid, host="localhost")
            for r, p in zip(self.plan["ranks"], self.procs)
        ]

    def _mark_all(self, line: str) -> None:
        now = time.time()
        for log in self.logs:
            log.write(format_log_line(now, line))
            log.flush()

    # -- one attempt ----------------------------------------------------------------------
    def _spawn(self, port: int, store_env: dict[str, str]) -> None:
        base_env = dict(os.environ)
        if self.hang_timeout:
            base_env.setdefault("PYTHONFAULTHANDLER", "1")  # SIGABRT then prints every thread's Python stack
        self.procs, self.pumps, self.exit_times = [], [], {}
        self.rank_starts, self.port = [], port
        self.activity, self.stragglers, self.attempt_started = RankActivity(self._straggler_floor()), (), time.time()
        for rank_plan, log in zip(self.plan["ranks"], self.logs):
            # The spec's env wins (a user who sets GLOO_SOCKET_IFNAME means it); the store's port does not.
            env = {**base_env, **store_env, **rank_plan["env"], "MASTER_PORT": str(port)}
            proc = subprocess.Popen(
                rank_plan["argv"],
                cwd=rank_plan["cwd"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,  # a supervisor killed with SIGKILL takes its ranks with it
            )
            self.procs.append(proc)  # recorded at once, so a failure below still stops it
            self.rank_starts.append(process_start_time(proc.pid))
            pump = _OutputPump(rank_plan["rank"], proc.stdout, log, self.sink, self.activity)  # type: ignore[arg-type]
            pump.start()
            self.pumps.append(pump)
        for index, proc in enumerate(self.procs):
            threading.Thread(target=self._note_exit, args=(index, proc), daemon=True).start()
        self.usage = _UsageThread([(r["rank"], p.pid) for r, p in zip(self.plan["ranks"], self.procs)], self.sink,
                                  self.activity)
        self.usage.start()

    def _note_exit(self, index: int, proc: subprocess.Popen[bytes]) -> None:
        # Exact exit order tells the rank that died first from peers that fell with it.
        proc.wait()
        self.exit_times[index] = time.monotonic()

    def _stop_all(self) -> None:
        # A model server drains on SIGTERM (rank 0 answers what it holds, then tells the other ranks to stop),
        # which SIGINT would cut short: its plan says how long that may take.
        how = self.plan.get("stop") or {}
        grace, interrupt = float(how.get("grace_s", KILL_GRACE_S)), float(how.get("interrupt_s", INTERRUPT_GRACE_S))
        if self.usage is not None:
            self.usage.done.set()
            self.usage.join(timeout=5)
        stop_groups([p.pid for p in self.procs], grace=grace, interrupt=interrupt)
        for proc in self.procs:
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        for pump in self.pumps:
            pump.join(timeout=2)

    def _cleanup_shm(self, port: int) -> None:
        # DeepSpeed's CPU shared-memory all-reduce leaves one segment per rank behind.
        pattern = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{self.plan['master_addr']}_{port}_*"
        for leftover in glob.glob(pattern):
            Path(leftover).unlink(missing_ok=True)

    def _attempt(self) -> tuple[str, dict[str, Any]]:
        """Run all ranks once. Returns ("ok"|"failed"|"cancelled"|"timeout"|"log_failed", failure info)."""
        if self._cancel_wanted():
            return "cancelled", {}
        store = LoopbackStore(self.plan["master_addr"])  # the rendezvous, bound to loopback only
        port = store.port
        try:
            self._spawn(port, store.rank_env())
            if self.started_at is None:
                self.started_at = time.time()
            self._set_replicas(JobState.STARTING)
            self._write(JobState.STARTING, "ranks started, waiting for output")
            return self._watch()
        finally:
            still_running = {i for i in range(len(self.procs)) if i not in self.exit_times}
            self._stop_all()
            store.close()
            self._cleanup_shm(port)
            self._record_exits(still_running)

    def _cancel_wanted(self) -> bool:
        return self.cancel_requested.is_set() or self.dir.cancel_request.exists()

    def _straggler_floor(self) -> float:
        return min(DEFAULT_FLOOR_S, self.hang_timeout / 2) if self.hang_timeout else DEFAULT_FLOOR_S

    def _watch(self) -> tuple[str, dict[str, Any]]:
        """Poll the started ranks until the attempt ends; record RUNNING once a rank has written output, and
        the ranks that look stuck or slow as they change."""
        running_written, next_look = False, 0.0
        while True:
            ended = self._ended()
            if ended is not None:
                return ended
            if not running_written and any(p.saw_output.is_set() for p in self.pumps):
                self._set_replicas(JobState.RUNNING)
                self._write(JobState.RUNNING)
                running_written = True
            if running_written and time.monotonic() >= next_look:
                next_look = time.monotonic() + STRAGGLER_CHECK_S
                flagged = tuple(str(s) for s in self.activity.stragglers(time.time()))
                if flagged != self.stragglers:
                    self.stragglers = flagged
                    self._write(JobState.RUNNING)
                hung = self._hung()
                if hung is not None:
                    return hung
            time.sleep(POLL_S)

    def _hung(self) -> tuple[str, dict[str, Any]] | None:
        """The outcome "hung" once a rank wrote nothing for ``hang_timeout`` while the others went on (or no rank
        wrote): the rank (every rank, when none stands out) is sent SIGABRT to print its stack first."""
        if not self.hang_timeout:
            return None
        found = self.activity.hung(time.time(), self.hang_timeout, self.attempt_started)
        if found is None:
            return None
        rank, quiet = found
        if rank is not None:
            why = f"rank {rank} hung: it wrote nothing for {quiet:.0f} s while the others progressed"
        else:
            why = f"the job hung: no rank wrote anything for {quiet:.0f} s"
        index_of = {r["rank"]: i for i, r in enumerate(self.plan["ranks"])}
        running = [i for i, proc in enumerate(self.procs) if proc.poll() is None] or list(range(len(self.procs)))
        indexes = [index_of[rank]] if rank is not None else running  # ranks that exited 0 are done, not hung
        self._dump_stacks(indexes)
        shown = rank if rank is not None else self.plan["ranks"][indexes[0]]["rank"]
        whose = "its Python stack is below" if rank is not None else \
            f"the stack of every rank still running is at the end of its log, rank {shown}'s below"
        message = f"{why} (JobSpec.hang_timeout={self.hang_timeout:g} s); {whose} (faulthandler, after SIGABRT); " \
                  "all ranks stopped"
        return "hung", {"failed_rank": shown, "message": message, "last_lines": self._stack_of(shown)}

    def _dump_stacks(self, indexes: list[int]) -> None:
        """SIGABRT to the process group of each of these ranks (dsnb's own children), then wait for their stacks."""
        for index in indexes:
            proc = self.procs[index]
            if proc.poll() is None:  # our child, not yet reaped: its pid (and group) is still its own
                try:
                    os.killpg(proc.pid, signal.SIGABRT)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STACK_WAIT_S
        for index in indexes:
            try:
                self.procs[index].wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self.pumps[index].join(timeout=max(0.1, deadline - time.monotonic()))

    def _stack_of(self, rank: int) -> tuple[str, ...]:
        """The stack faulthandler printed last in ``rank``'s log, else its last lines."""
        lines = [text for _, text in read_last_lines(self.dir.rank_log(rank), 4 * STACK_LINES)[0]]
        marks = [i for i, text in enumerate(lines) if text.startswith(FAULT_MARK)]
        if not marks:
            return tail_lines(self.dir.rank_log(rank))
        return tuple(text for text in lines[marks[-1]:] if text.strip())[:STACK_LINES]

    def _ended(self) -> tuple[str, dict[str, Any]] | None:
        """How the attempt ended (a cancel, the timeout, the ranks' exits, a log that cannot be written), or None."""
        if self._cancel_wanted():
            return "cancelled", {}
        timeout = self.plan.get("timeout")
        if timeout and time.time() - (self.started_at or 0.0) > timeout:
            return "timeout", {}
        exits = self._exits()
        return exits if exits is not None else self._log_failure()

    def _exits(self) -> tuple[str, dict[str, Any]] | None:
        """The outcome "failed" (naming the rank that failed first), "ok" once every rank exited 0, or None while ranks run."""
        codes = [p.returncode if i in self.exit_times else None for i, p in enumerate(self.procs)]
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            index = min(failed, key=lambda i: self.exit_times[i])
            self.pumps[index].join(timeout=2)
            return "failed", {"failed_rank": self.plan["ranks"][index]["rank"], "exit_code": self.procs[index].returncode}
        if all(c == 0 for c in codes):
            for pump in self.pumps:
                pump.join(timeout=5)
            return "ok", {}
        return None

    def _log_failure(self) -> tuple[str, dict[str, Any]] | None:
        """The outcome "log_failed" (naming a rank whose output could not be written, as on a full disk), or None."""
        broken = next((p for p in self.pumps if p.write_error is not None), None)
        if broken is None:
            return None
        error = broken.write_error
        where = getattr(error, "filename", None) or str(self.dir.rank_log(broken.rank))
        why = "no space left on" if getattr(error, "errno", None) == errno.ENOSPC else f"cannot write ({error}) to"
        return "log_failed", {"failed_rank": broken.rank,
                              "message": f"{why} {where}: rank {broken.rank}'s output could not be kept, so the job was stopped"}

    def _record_exits(self, stopped: set[int]) -> None:
        """Per-rank outcome; ranks dsnb had to stop are CANCELLED, not blamed."""
        replicas = []
        for index, (r, p) in enumerate(zip(self.plan["ranks"], self.procs)):
            code = p.returncode
            if index in stopped:
                state, message = JobState.CANCELLED, "stopped by dsnb"
            else:
                state = JobState.SUCCEEDED if code == 0 else JobState.FAILED
                message = "" if code == 0 else describe_exit(code)
            replicas.append(ReplicaStatus(rank=r["rank"], state=state, exit_code=code, pid=p.pid, host="localhost", message=message))
        self.replicas = replicas

    # -- the whole job ----------------------------------------------------------------------
    def run(self) -> JobState:
        signal.signal(signal.SIGTERM, lambda *_: self.cancel_requested.set())
        signal.signal(signal.SIGINT, lambda *_: self.cancel_requested.set())
        max_restarts = int(self.plan.get("max_restarts", 0))
        try:
            while True:
                outcome, failure = self._attempt()
                if outcome == "ok":
                    self._write(JobState.SUCCEEDED, f"all {len(self.procs)} ranks exited with code 0")
                    return JobState.SUCCEEDED
                if outcome == "cancelled":
                    self._mark_all("[dsnb] job cancelled; all ranks stopped")
                    self._write(JobState.CANCELLED, "cancelled by request; all ranks stopped")
                    return JobState.CANCELLED
                if outcome == "timeout":
                    message = f"timed out after {self.plan['timeout']:g} s (JobSpec.timeout); all ranks stopped"
                    self._mark_all(f"[dsnb] {message}")
                    self._write(JobState.FAILED, message)
                    return JobState.FAILED
                if outcome == "log_failed":  # not worth a restart: the disk stays full
                    self._write(JobState.FAILED, failure["message"], failed_rank=failure["failed_rank"])
                    return JobState.FAILED
                if outcome == "hung":
                    if self.restarts < max_restarts:
                        self.restarts += 1
                        self._mark_all(f"[dsnb] {failure['message']}; restarting all ranks "
                                       f"(restart {self.restarts} of {max_restarts})")
                        continue
                    self._mark_all(f"[dsnb] {failure['message']}")
                    self._write(JobState.FAILED, failure["message"], failed_rank=failure["failed_rank"],
                                last_lines=failure["last_lines"])
                    return JobState.FAILED
                rank, code = failure["failed_rank"], failure["exit_code"]
                message = f"rank {rank} {describe_exit(code)}"
                if self.restarts < max_restarts:
                    self.restarts += 1
                    self._mark_all(f"[dsnb] {message}; restarting all ranks (restart {self.restarts} of {max_restarts})")
                    continue
                last = tail_lines(self.dir.rank_log(rank))
                self._write(JobState.FAILED, message, failed_rank=rank, exit_code=code, last_lines=last)
                return JobState.FAILED
        except Exception as e:  # the status must never stay "running" behind a dead supervisor
            self._write(JobState.FAILED, f"dsnb supervisor error: {type(e).__name__}: {e}")
            raise
        finally:
            self.sink.close()
            for log in self.logs:
                log.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m dsnb.runtime.supervisor JOB_DIR``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m dsnb.runtime.supervisor JOB_DIR", file=sys.stderr)
        return 2
    state = Supervisor(Path(args[0]), read_secrets(sys.stdin)).run()
    return 0 if state == JobState.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
