"""The entry point of every pod of a StatefulSet job (standard library only).

dsnb ships this file in the job's ConfigMap and the container runs
``python3 entry.py LAUNCHER ARGS...``. On each pod it:

1. takes its node rank from its ordinal (pod ``<set>-<i>`` is node ``i``); when the job ships its
   ``working_dir`` (``DSNB_CODE_BUNDLE``), unpacks it into ``DSNB_CODE_DIR`` and starts there, with
   the ``unpack.py`` mounted beside the bundle (:mod:`dsnb.runtime.code_unpack`);
2. waits until every peer's DNS name ``<set>-<j>.<service>.<namespace>.svc.<domain>``
   resolves, giving up after ``DSNB_PEER_TIMEOUT`` seconds with a message that names
   the missing peers;
3. runs the launcher (torchrun or deepspeed) with ``{node_rank}`` and ``{hostfile}``
   filled in, passing its output through and stopping it on SIGTERM;
4. writes the outcome (exit code, failing rank, last lines) as JSON to the termination
   message, where dsnb reads it from the pod's status, and to a marker in the pod's
   scratch volume;
5. with ``DSNB_RELEASE=1``, also writes the outcome and the end of its output into the job's
   record, and when the job has ended (every node finished, or this one failed) scales the
   StatefulSet to 0, so that a finished job holds no node with no dsnb client running
   (:mod:`dsnb.runtime.pod_api`); then exits with the launcher's code.

A StatefulSet restarts containers that exit. The restarted container finds the marker
and idles instead of training again (retrying step 5 if the API server could not be
reached), until the job's StatefulSet is scaled to 0 or deleted.

Environment: ``DSNB_NODES``, ``DSNB_PROCS_PER_NODE``, ``DSNB_SET``, ``DSNB_SERVICE``,
``DSNB_NAMESPACE``, ``DSNB_CLUSTER_DOMAIN``, ``DSNB_PEER_TIMEOUT``, ``DSNB_TIMEOUT``, ``DSNB_HANG_TIMEOUT``,
``DSNB_STATE_DIR``, ``DSNB_POD_NAME``, ``DSNB_TERMINATION_LOG``, ``DSNB_RELEASE``, ``DSNB_JOB_NAME``,
``DSNB_CODE_BUNDLE``, ``DSNB_CODE_DIR``.

Example (what a pod runs)::

    python3 /var/run/dsnb/job/entry.py torchrun --nnodes=2 --node_rank={node_rank} ... train.py
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

EXIT_PEERS_TIMEOUT = 75
EXIT_NO_CODE = 76
EXIT_TIMEOUT = 124
EXIT_HUNG = 125
LAST_LINES = 20
TERMINATION_LIMIT = 4000  # Kubernetes keeps at most 4096 bytes of it
TAIL_LINES = 2000  # lines of output kept for the job's record (pod_api bounds their bytes)
METRIC_LINES = 5000
METRIC_TAG = "DSNB_METRIC "
RETRY_S = (5, 10, 20, 40, 60)
_LOCAL_PREFIX = re.compile(r"^\[(?:[A-Za-z_]*?)(\d+)\]:")
_MPIRUN_TAG = re.compile(r"^\[\d+,(\d+)\]<std(?:out|err)>:")
_MPIRUN_TAG_ANY = re.compile(r"\[\d+,\d+\]<std(?:out|err)>:")
_ROOT_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
_ROOT_CODE = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
_MPI_RANK = re.compile(r"^\s*Process name:\s*\[\[\d+,\d+\],(\d+)\]")
_MPI_CODE = re.compile(r"^\s*Exit code:\s*(-?\d+)")


_kept_by: Outcome | None = None  # where say() lines are kept for the job's record, once the node is known


def say(text: str) -> None:
    """One line of dsnb's own output in the pod log (and in what the node keeps for the job's record)."""
    print(f"dsnb: {text}", flush=True)
    if _kept_by is not None:
        _kept_by.keep(f"dsnb: {text}", time.time())


def node_rank(pod_name: str, set_name: str) -> int:
    """The ordinal of pod ``<set>-<i>``.

    >>> node_rank("tiny-gpt-x7k2-1", "tiny-gpt-x7k2")
    1
    """
    prefix = set_name + "-"
    if not pod_name.startswith(prefix) or not pod_name[len(prefix):].isdigit():
        raise SystemExit(f"dsnb: pod name {pod_name!r} is not '<{set_name}>-<ordinal>'")
    return int(pod_name[len(prefix):])


def peer_names(nodes: int, set_name: str, service: str, namespace: str, domain: str) -> list[str]:
    """The stable DNS names of every node's pod, node 0 first.

    >>> peer_names(2, "j", "j", "ml", "cluster.local")
    ['j-0.j.ml.svc.cluster.local', 'j-1.j.ml.svc.cluster.local']
    """
    return [f"{set_name}-{i}.{service}.{namespace}.svc.{domain}" for i in range(nodes)]


def resolves(name: str) -> bool:
    """True when ``name`` has an address now."""
    try:
        socket.getaddrinfo(name, None)
        return True
    except OSError:
        return False


def wait_for_peers(names: list[str], timeout: float, poll: float = 1.0) -> list[str]:
    """Wait until every name resolves; return those that still do not after ``timeout``."""
    deadline = time.monotonic() + timeout
    missing = list(names)
    said = 0.0
    while True:
        missing = [n for n in missing if not resolves(n)]
        if not missing or time.monotonic() >= deadline:
            return missing
        if time.monotonic() - said > 10:
            say(f"waiting for {len(missing)} peer(s) to resolve: {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
            said = time.monotonic()
        time.sleep(poll)


class Outcome:
    """What the launcher printed that matters afterwards: last lines per rank, the root cause.

    Reads torchrun (``--tee`` prefixes, its "Root Cause" block) and ``mpirun --tag-output``
    (``[job,rank]<stdout>:`` tags, its "Process name: [[job,1],rank]" / "Exit code:" lines).
    """

    def __init__(self, node: int, procs_per_node: int) -> None:
        self.node = node
        self.procs = procs_per_node
        self.lines: dict[int, collections.deque[str]] = collections.defaultdict(lambda: collections.deque(maxlen=LAST_LINES))
        self.failed_rank: int | None = None
        self.rank_exit_code: int | None = None
        self._in_root_cause = False
        self.tail: collections.deque[list] = collections.deque(maxlen=TAIL_LINES)  # [line number, time, line]
        self.metric_rows: collections.deque[list] = collections.deque(maxlen=METRIC_LINES)
        self._printed = 0

    def keep(self, line: str, when: float) -> None:
        """Remember one line as printed, for the job's record: the end of the output, and every metric line."""
        row = [self._printed, round(when, 3), line]
        self._printed += 1
        (self.metric_rows if METRIC_TAG in line else self.tail).append(row)

    def feed(self, line: str) -> int | None:
        """Remember one line of output; returns the rank that wrote it (None for the launcher's own)."""
        tagged = _MPIRUN_TAG.match(line)
        if tagged:
            rest = _MPIRUN_TAG_ANY.sub("", line[tagged.end():])  # a line written in two parts has two tags
            self.lines[int(tagged.group(1))].append(rest)
            return int(tagged.group(1))
        self._note_mpirun_failure(line)
        found = _LOCAL_PREFIX.match(line)
        if found and int(found.group(1)) < self.procs:
            rank = self.node * self.procs + int(found.group(1))
            self.lines[rank].append(line[found.end():])
            return rank
        self.lines[-1].append(line)
        self._note_root_cause(line)
        return None

    def _note_mpirun_failure(self, line: str) -> None:
        # mpirun names the failed process ("Process name: [[job,1],rank]"), then its "Exit code:".
        mpi_rank, mpi_code = _MPI_RANK.match(line), _MPI_CODE.match(line)
        if mpi_rank and self.failed_rank is None:
            self.failed_rank = int(mpi_rank.group(1))
        if mpi_code and self.rank_exit_code is None and self.failed_rank is not None:
            self.rank_exit_code = int(mpi_code.group(1))

    def _note_root_cause(self, line: str) -> None:
        # torchrun ends a failure with a "Root Cause" block naming the rank and its exit code.
        if "Root Cause" in line:
            self._in_root_cause = True
            return
        if not self._in_root_cause:
            return
        rank = _ROOT_RANK.match(line)
        code = _ROOT_CODE.match(line)
        if rank and self.failed_rank is None:
            self.failed_rank = int(rank.group(1))
        if code and self.rank_exit_code is None:
            self.rank_exit_code = int(code.group(1))

    def report(self, exit_code: int, message: str = "") -> dict:
        """The JSON-ready outcome of this node."""
        rank = self._blamed_rank(exit_code)
        return {"node": self.node, "exit_code": exit_code, "failed_rank": rank,
                "rank_exit_code": self.rank_exit_code if exit_code else 0, "message": message,
                "last_lines": [line[:300] for line in self._last_lines(rank, exit_code)]}

    def _blamed_rank(self, exit_code: int) -> int | None:
        """The rank a failure is put on: the one the launcher named, else (no root cause printed) the
        first rank of this node that wrote anything; None when the node succeeded."""
        if not exit_code:
            return None
        if self.failed_rank is not None:
            return self.failed_rank
        return min((r for r in self.lines if r >= 0), default=self.node * self.procs)

    def _last_lines(self, rank: int | None, exit_code: int) -> list[str]:
        """The last non-blank lines of ``rank``; after a failure with none, the launcher's own."""
        last = [line for line in self.lines.get(rank, ()) if line.strip()] if rank is not None else []
        if exit_code and not last:
            last = [line for line in self.lines.get(-1, ()) if line.strip()]
        return last


def write_outcome(state_dir: str, outcome: dict) -> None:
    """Leave the outcome where a restart (marker) and dsnb (termination message) find it."""
    text = json.dumps(outcome)
    while len(text.encode()) > TERMINATION_LIMIT and outcome["last_lines"]:
        outcome["last_lines"].pop(0)
        text = json.dumps(outcome)
    marker = os.path.join(state_dir, "outcome.json")
    with open(marker + ".tmp", "w") as f:
        f.write(text)
    os.replace(marker + ".tmp", marker)
    try:
        with open(os.environ.get("DSNB_TERMINATION_LOG", "/dev/termination-log"), "w") as f:
            f.write(text)
    except OSError:
        pass  # not in a Kubernetes container: the marker is enough


def save_report(state_dir: str, outcome: Outcome, result: dict) -> None:
    """Keep what goes into the job's record beside the marker, for a restarted container to send."""
    path = os.path.join(state_dir, "report.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"outcome": result, "log_rows": list(outcome.tail), "metric_rows": list(outcome.metric_rows)}, f)
    os.replace(path + ".tmp", path)


def report_and_release(state_dir: str, env: os._Environ | dict) -> bool:
    """Send the saved report to the job's record; scale the job's StatefulSet to 0 if that ended the job.
    True once done (or nothing to do), False when the API server could not be asked (say why, retry later)."""
    import pod_api  # shipped beside this file in the job's record

    path = os.path.join(state_dir, "report.json")
    done = os.path.join(state_dir, "released")
    if not os.path.exists(path) or os.path.exists(done):
        return True
    with open(path) as f:
        saved = json.load(f)
    namespace, job = env.get("DSNB_NAMESPACE", "default"), env["DSNB_JOB_NAME"]
    try:
        api = pod_api.InClusterApi.from_environment(env)
        ended = pod_api.report(api, namespace, job, saved["outcome"]["node"], int(env.get("DSNB_NODES", "1")),
                               saved["outcome"], saved["log_rows"], saved["metric_rows"])
        if ended:
            pod_api.release(api, namespace, env.get("DSNB_SET", job))
            say("the job has ended: its pods are released (StatefulSet scaled to 0)")
    except pod_api.ApiUnavailable as e:
        say(f"could not tell the API server the outcome (will retry): {e}")
        return False
    with open(done, "w") as f:
        f.write("1")
    return True


def idle_after_finish(state_dir: str, env: os._Environ | dict) -> None:
    """A restarted container of a finished node: say so, send the outcome if that failed before, and
    wait to be stopped (the job's release, or dsnb ending it)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # before saying anything: a stop may come at once
    with open(os.path.join(state_dir, "outcome.json")) as f:
        outcome = json.load(f)
    say(f"node {outcome['node']} already finished (exit code {outcome['exit_code']}); idle until the job is released")
    for delay in itertools.chain(RETRY_S, itertools.repeat(RETRY_S[-1])):
        if env.get("DSNB_RELEASE") != "1" or report_and_release(state_dir, env):
            break
        time.sleep(delay)
    while True:
        time.sleep(3600)


def unpack_code(env: os._Environ | dict) -> str | None:
    """Unpack the job's shipped ``working_dir`` and go there; None when it ships none.

    Raises:
        ValueError, OSError: the bundle cannot be unpacked.
    """
    bundle = env.get("DSNB_CODE_BUNDLE")
    if not bundle:
        return None
    unpacker = runpy.run_path(os.path.join(os.path.dirname(bundle), "unpack.py"))
    where = unpacker["unpack_from_environment"](env)
    os.chdir(where)
    return where


def run_launcher(argv: list[str], outcome: Outcome, timeout: float | None,
                 hang_timeout: float | None = None) -> tuple[int, str]:
    """Run the launcher, pass its output through, stop it on SIGTERM, after ``timeout``, or once a rank hung
    for ``hang_timeout`` (see :class:`HangWatch`)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    stopping = {"why": ""}

    def stop(why: str, sig: int = signal.SIGTERM) -> None:
        stopping["why"] = stopping["why"] or why
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, lambda *_: stop("stopped by Kubernetes (SIGTERM)"))
    signal.signal(signal.SIGINT, lambda *_: stop("interrupted", signal.SIGINT))
    timer = None
    if timeout:
        timer = threading.Timer(timeout, stop, args=(f"timed out after {timeout:g} s (JobSpec.timeout)",))
        timer.daemon = True
        timer.start()
    watch = HangWatch(hang_timeout, outcome, stop) if hang_timeout else None
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        rank = outcome.feed(line)
        now = time.time()
        outcome.keep(line, now)
        if watch is not None:
            watch.saw(rank, line, now)
    code = proc.wait()
    if timer is not None:
        timer.cancel()
    if watch is not None:
        watch.done.set()
    if stopping["why"].startswith("timed out"):
        code = EXIT_TIMEOUT
    if watch is not None and watch.hung:
        code = EXIT_HUNG
    return (code if code >= 0 else 128 - code), stopping["why"]


class HangWatch:
    """``JobSpec.hang_timeout`` on one node: when a rank writes nothing for that long while the node's other ranks
    go on, or no rank of the node writes at all, the launcher is stopped and the rank named
    (:mod:`dsnb.stragglers`, shipped beside this file, has the rule)."""

    def __init__(self, hang_timeout: float, outcome: Outcome, stop: Any) -> None:
        try:
            from stragglers import RankActivity  # shipped beside this file in the job's record
        except ImportError:
            from dsnb.stragglers import RankActivity
        self.hang_timeout, self.outcome, self.stop = hang_timeout, outcome, stop
        self.activity = RankActivity(floor_s=hang_timeout)
        self.started = time.time()
        self.hung = False
        self.done = threading.Event()
        threading.Thread(target=self._watch, name="dsnb-hang-watch", daemon=True).start()

    def saw(self, rank: int | None, line: str, when: float) -> None:
        """One line of rank ``rank`` (None: the launcher's, which shows no rank's progress)."""
        if rank is None:
            return
        self.activity.saw_line(rank, when)
        at = line.find(METRIC_TAG)
        if at >= 0:
            try:
                step = json.loads(line[at + len(METRIC_TAG):]).get("step")
            except (ValueError, AttributeError):
                return
            if isinstance(step, int):
                self.activity.saw_step(rank, step, when)

    def _watch(self) -> None:
        while not self.done.wait(1.0):
            found = self.activity.hung(time.time(), self.hang_timeout, self.started)
            if found is None:
                continue
            rank, quiet = found
            if rank is not None:
                why = f"rank {rank} hung: it wrote nothing for {quiet:.0f} s while the others progressed"
                self.outcome.failed_rank = rank
            else:
                why = f"node {self.outcome.node} hung: no rank wrote anything for {quiet:.0f} s"
            self.hung = True
            self.stop(f"{why} (JobSpec.hang_timeout={self.hang_timeout:g} s)")
            return


def main(argv: list[str]) -> int:
    env = os.environ
    started = round(time.time(), 3)
    state_dir = env.get("DSNB_STATE_DIR", "/var/run/dsnb/state")
    os.makedirs(state_dir, exist_ok=True)
    if os.path.exists(os.path.join(state_dir, "outcome.json")):
        idle_after_finish(state_dir, env)
    nodes = int(env.get("DSNB_NODES", "1"))
    procs = int(env.get("DSNB_PROCS_PER_NODE", "1"))
    set_name = env["DSNB_SET"]
    node = node_rank(env.get("DSNB_POD_NAME") or socket.gethostname(), set_name)
    outcome = Outcome(node, procs)
    global _kept_by
    _kept_by = outcome
    peers = peer_names(nodes, set_name, env.get("DSNB_SERVICE", set_name), env.get("DSNB_NAMESPACE", "default"),
                       env.get("DSNB_CLUSTER_DOMAIN", "cluster.local"))
    try:
        where = unpack_code(env)
    except (OSError, ValueError) as e:
        message = f"node {node}: could not unpack the job's working_dir from {env.get('DSNB_CODE_BUNDLE')}: {e}"
        say(message)
        finish(state_dir, env, outcome, {**outcome.report(EXIT_NO_CODE, message), "last_lines": [message], "started_at": started},
               stopped=False)
        return EXIT_NO_CODE
    if where:
        say(f"node {node}: the job's working_dir is unpacked in {where}")
    hostfile = os.path.join(state_dir, "hostfile")
    with open(hostfile, "w") as f:
        f.writelines(f"{peer} slots={procs}\n" for peer in peers)
    if nodes > 1:
        timeout = float(env.get("DSNB_PEER_TIMEOUT", "600"))
        say(f"node {node} of {nodes}: waiting for the other pods' DNS names")
        missing = wait_for_peers(peers, timeout)
        if missing:
            message = (f"node {node}: after {timeout:g} s these peers still do not resolve: {', '.join(missing)}. "
                       "Their pods are not running yet (see job.status() for Pending pods, e.g. waiting for GPUs) "
                       "or the headless Service is missing; raise DSNB_PEER_TIMEOUT if the cluster is slow to schedule")
            say(message)
            result = {**outcome.report(EXIT_PEERS_TIMEOUT, message), "last_lines": [message]}
            finish(state_dir, env, outcome, {**result, "started_at": started}, stopped=False)
            return EXIT_PEERS_TIMEOUT
        say(f"node {node} of {nodes}: all peers resolve; starting {procs} rank(s)")
    # Only the launcher's own arguments hold {node_rank} and {hostfile}; the user's (after them) are left as given.
    templated = int(env.get("DSNB_LAUNCHER_ARGC", len(argv)))
    command = [a.replace("{node_rank}", str(node)).replace("{hostfile}", hostfile) if i < templated else a
               for i, a in enumerate(argv)]
    job_timeout = float(env["DSNB_TIMEOUT"]) if env.get("DSNB_TIMEOUT") else None
    hang_timeout = float(env["DSNB_HANG_TIMEOUT"]) if env.get("DSNB_HANG_TIMEOUT") else None
    # For the ranks: torchrun sets GROUP_RANK itself, the deepspeed launcher only CROSS_RANK, and
    # Lightning's default environment takes the node from NODE_RANK or GROUP_RANK.
    env["NODE_RANK"] = env["GROUP_RANK"] = str(node)
    code, why = run_launcher(command, outcome, job_timeout, hang_timeout)
    result = outcome.report(code, why)
    if code and outcome.rank_exit_code:
        code_text = f"rank {result['failed_rank']} exited with code {outcome.rank_exit_code}"
    else:
        code_text = f"exit code {code}"
    say(f"node {node} finished: {code_text}" + (f" ({why})" if why else ""))
    finish(state_dir, env, outcome, {**result, "started_at": started}, stopped=why.startswith("stopped by Kubernetes"))
    return code


def finish(state_dir: str, env: os._Environ | dict, outcome: Outcome, result: dict, stopped: bool) -> None:
    """Leave the outcome for dsnb and the restarted container; unless Kubernetes stopped this pod (a cancel,
    the job's release, an eviction: the job's end is decided elsewhere), tell the job's record."""
    result["finished_at"] = round(time.time(), 3)
    write_outcome(state_dir, {**result, "last_lines": list(result["last_lines"])})
    if env.get("DSNB_RELEASE") == "1" and not stopped:
        save_report(state_dir, outcome, result)
        report_and_release(state_dir, env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
