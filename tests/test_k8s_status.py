"""A StatefulSet job's status from its pods (table-driven), and the pods' entry script on its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("kubernetes")

from dsnb import JobSpec, JobState  # noqa: E402
from dsnb.backends.kubernetes.statefulset import StatefulSetBackend  # noqa: E402
from dsnb.runtime import pod_entry as entry  # noqa: E402

SPEC = JobSpec(name="j-abcd", script="train.py", nodes=2, procs_per_node=2, image="img:1")


def pod(node: int, state: dict | None = None, last: dict | None = None, scheduled: bool = True, **status) -> dict:
    container = {"name": "dsnb", "restartCount": 1 if last else 0, "image": "img:1", "imageID": ""}
    if state is not None:
        container["state"] = state
    if last is not None:
        container["lastState"] = {"terminated": last}
    return {"metadata": {"name": f"j-abcd-{node}", "labels": {"dsnb.io/job": "j-abcd"}},
            "spec": {"nodeName": "n1"} if scheduled else {},
            "status": {"phase": "Running", **({"containerStatuses": [container]} if state is not None else {}), **status}}


RUNNING = {"running": {"startedAt": "2026-11-28T10:00:00Z"}}


def finished(code: int, finished_at: str = "2026-11-28T10:05:00Z", reason: str | None = None, **outcome) -> dict:
    message = json.dumps({"node": 0, "exit_code": code, "failed_rank": None, "rank_exit_code": 0, "message": "",
                          "last_lines": [], **outcome}) if outcome or code == 0 else ""
    return {"exitCode": code, "reason": reason or ("Completed" if code == 0 else "Error"), "message": message,
            "startedAt": "2026-11-28T10:00:00Z", "finishedAt": finished_at}


@dataclass
class Case:
    pods: list[dict]
    state: JobState
    message: str
    failed_rank: int | None = None
    exit_code: int | None = None
    last_lines: tuple[str, ...] = ()
    replica_states: list[JobState] = field(default_factory=list)
    record: dict | None = None  # the job's record, with what its pods wrote into it


UNSCHEDULABLE = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                  "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]
def deleting(node: int, state: dict) -> dict:
    """A pod being deleted (the job's release, a cancel, an eviction), its container ended by the SIGTERM."""
    gone = pod(node, state)
    gone["metadata"] |= {"deletionTimestamp": "2026-11-28T10:05:30Z", "deletionGracePeriodSeconds": 30}
    return gone


def record(**outcomes: dict) -> dict:
    """A record holding the outcomes the pods wrote (``node1={...}``)."""
    return {"data": {f"outcome-{key.removeprefix('node')}.json": json.dumps({"node": int(key.removeprefix("node")), **value})
                     for key, value in outcomes.items()}}


STOPPED = {"terminated": {"exitCode": 143, "reason": "Error", "finishedAt": "2026-11-28T10:05:01Z",
                          "message": json.dumps({"node": 0, "exit_code": 143, "message": "stopped by Kubernetes (SIGTERM)"})}}
CASES = {
    "no pods yet": Case([], JobState.PENDING, "waiting for the StatefulSet to create 2 pod(s)"),
    "released after a failure: the stopped node is no cause": Case(
        [deleting(0, STOPPED)], JobState.FAILED, "rank 3 (pod j-abcd-1) exited with code 7", failed_rank=3, exit_code=7,
        last_lines=("boom",), record=record(node1={"exit_code": 1, "failed_rank": 3, "rank_exit_code": 7, "last_lines": ["boom"],
                                                    "finished_at": 1796000000.0, "started_at": 1795999000.0})),
    "released after success: pods gone, outcomes in the record": Case(
        [], JobState.SUCCEEDED, "all 2 node(s) finished", replica_states=[JobState.SUCCEEDED] * 4,
        record=record(node0={"exit_code": 0, "finished_at": 1796000000.0}, node1={"exit_code": 0, "finished_at": 1796000001.0})),
    "a pod being deleted mid-run is no failure": Case(
        [deleting(0, STOPPED), pod(1, RUNNING)], JobState.STARTING, "1 of 2 pod(s) running"),
    "one running, one unschedulable": Case(
        [pod(0, RUNNING), pod(1, None, scheduled=False, conditions=UNSCHEDULABLE, phase="Pending")],
        JobState.STARTING, "no node has enough free nvidia.com/gpu",
        replica_states=[JobState.RUNNING] * 2 + [JobState.PENDING] * 2),
    "both running": Case([pod(0, RUNNING), pod(1, RUNNING)], JobState.RUNNING, "4 rank(s) on 2 pod(s)"),
    "both finished": Case([pod(0, RUNNING, finished(0)), pod(1, RUNNING, finished(0, "2026-11-28T10:06:00Z"))],
                          JobState.SUCCEEDED, "all 2 node(s) finished", replica_states=[JobState.SUCCEEDED] * 4),
    "one finished, one running": Case([pod(0, RUNNING, finished(0)), pod(1, RUNNING)], JobState.RUNNING, "4 rank(s) on 2 pod(s)",
                                      replica_states=[JobState.SUCCEEDED] * 2 + [JobState.RUNNING] * 2),
    "a rank failed": Case(
        [pod(0, RUNNING), pod(1, {"terminated": finished(1, failed_rank=3, rank_exit_code=7, last_lines=["boom"])})],
        JobState.FAILED, "rank 3 (pod j-abcd-1) exited with code 7", failed_rank=3, exit_code=7, last_lines=("boom",)),
    "out of memory without an outcome": Case(
        [pod(0, RUNNING, {"exitCode": 137, "reason": "OOMKilled", "finishedAt": "2026-11-28T10:01:00Z"}), pod(1, RUNNING)],
        JobState.FAILED, "rank 0 (pod j-abcd-0) was killed: out of memory (OOMKilled)", failed_rank=0, exit_code=137),
    "the earliest failure wins": Case(
        [pod(0, RUNNING, finished(1, "2026-11-28T10:09:00Z", failed_rank=1, rank_exit_code=1)),
         pod(1, RUNNING, finished(1, "2026-11-28T10:02:00Z", failed_rank=2, rank_exit_code=4))],
        JobState.FAILED, "rank 2 (pod j-abcd-1) exited with code 4", failed_rank=2, exit_code=4),
    "peers never resolved": Case(
        [pod(0, RUNNING, finished(75, failed_rank=0, message="these peers still do not resolve: j-abcd-1.j-abcd")), pod(1, None)],
        JobState.FAILED, "still do not resolve", failed_rank=0, exit_code=75),
    "image cannot be pulled": Case(
        [pod(0, RUNNING), pod(1, {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}})],
        JobState.FAILED, "cannot pull img:1", failed_rank=2),
    "logs instead of an outcome": Case(
        [pod(0, RUNNING, {"exitCode": 1, "reason": "Error", "message": "Traceback\nValueError: bad", "finishedAt": "2026-11-28T10:01:00Z"}),
         pod(1, RUNNING)],
        JobState.FAILED, "exited with code 1", failed_rank=0, exit_code=1, last_lines=("Traceback", "ValueError: bad")),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_status_from_pods(case: Case) -> None:
    status = StatefulSetBackend(namespace="ml").compute_status(SPEC.name, SPEC, 1.0, case.pods, None, case.record)
    assert status.state == case.state, status
    assert case.message and case.message in status.message, status.message
    if case.state == JobState.FAILED:
        assert (status.failed_rank, status.exit_code) == (case.failed_rank, case.exit_code)
        assert status.last_lines == case.last_lines
    if case.replica_states:
        assert [r.state for r in status.replicas] == case.replica_states
    assert len(status.replicas) == 4


# -- the entry script ------------------------------------------------------------------------

def test_outcome_reads_torchruns_root_cause() -> None:
    outcome = entry.Outcome(node=1, procs_per_node=2)
    for line in ["[default0]:hello", "[default1]:about to fail: marker", "Root Cause (first observed failure):", "[0]:",
                 "  rank      : 3 (local_rank: 1)", "  exitcode  : 3 (pid: 12)"]:
        outcome.feed(line)
    report = outcome.report(1)
    assert (report["failed_rank"], report["rank_exit_code"], report["last_lines"]) == (3, 3, ["about to fail: marker"])
    assert outcome.report(0)["failed_rank"] is None


def test_outcome_reads_mpiruns_tags_and_failed_process() -> None:
    outcome = entry.Outcome(node=0, procs_per_node=2)
    for line in ["[1,0]<stdout>:step 1", "[1,1]<stderr>:boom[1,1]<stderr>: at step 2", "  Exit code:    9",
                 "  Process name: [[4242,1],1]", "  Exit code:    7", "  Exit code:    8"]:
        outcome.feed(line)
    report = outcome.report(1, "mpirun failed")
    assert (report["failed_rank"], report["rank_exit_code"], report["last_lines"]) == (1, 7, ["boom at step 2"])
    assert report["message"] == "mpirun failed"


def test_outcome_without_a_root_cause_blames_the_first_rank_that_wrote() -> None:
    outcome = entry.Outcome(node=1, procs_per_node=2)
    for line in ["[default1]:only rank 3 spoke", "[default1]:   ", "torchrun: something went wrong"]:
        outcome.feed(line)
    assert (outcome.report(1)["failed_rank"], outcome.report(1)["last_lines"]) == (3, ["only rank 3 spoke"])
    silent = entry.Outcome(node=1, procs_per_node=2)
    silent.feed("torchrun: could not start")
    assert (silent.report(2)["failed_rank"], silent.report(2)["last_lines"]) == (2, ["torchrun: could not start"])
    assert silent.report(0)["last_lines"] == [] and silent.report(0)["rank_exit_code"] == 0


class FakeClock:
    """``time.monotonic`` and ``time.sleep`` for code under test: sleeping moves the clock, nothing waits."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_waiting_for_peers_gives_up_at_the_timeout_with_the_missing_names(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, asked = FakeClock(), []

    def resolves(name: str) -> bool:  # a resolver that never learns of j-1 (a pod that was never made)
        asked.append((clock.now, name))
        return name == "j-0.j.ml.svc.cluster.local"

    monkeypatch.setattr(entry, "time", clock)
    monkeypatch.setattr(entry, "resolves", resolves)
    missing = entry.wait_for_peers(["j-0.j.ml.svc.cluster.local", "j-1.j.ml.svc.cluster.invalid"], timeout=0.5, poll=0.1)
    assert missing == ["j-1.j.ml.svc.cluster.invalid"]
    assert clock.now == pytest.approx(1000.5)  # gave up at the timeout, not before and not after
    assert [name for _, name in asked].count("j-0.j.ml.svc.cluster.local") == 1  # a resolved peer is not asked again
    assert [name for _, name in asked].count("j-1.j.ml.svc.cluster.invalid") == 6  # every 0.1 s from 0 to 0.5


def run_entry(tmp_path: Path, *argv: str, **env: str) -> subprocess.Popen:
    variables = {**os.environ, "DSNB_SET": "j", "DSNB_POD_NAME": "j-1", "DSNB_STATE_DIR": str(tmp_path),
                 "DSNB_TERMINATION_LOG": str(tmp_path / "termination-log"), **env}
    return subprocess.Popen([sys.executable, entry.__file__, *argv], env=variables, stdout=subprocess.PIPE, text=True)


def test_a_pod_whose_peers_never_resolve_fails_with_their_names(tmp_path: Path) -> None:
    proc = run_entry(tmp_path, sys.executable, "-c", "print('never runs')", DSNB_NODES="2", DSNB_PEER_TIMEOUT="1",
                     DSNB_CLUSTER_DOMAIN="cluster.invalid")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == entry.EXIT_PEERS_TIMEOUT and "never runs" not in out
    outcome = json.loads((tmp_path / "termination-log").read_text())
    assert "j-0.j.default.svc.cluster.invalid" in outcome["message"] and outcome["node"] == 1


def test_the_entry_fills_in_the_node_rank_then_idles_after_a_restart(tmp_path: Path) -> None:
    proc = run_entry(tmp_path, sys.executable, "-c", "import sys; print('node', sys.argv[1])", "{node_rank}")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "node 1" in out
    assert json.loads((tmp_path / "outcome.json").read_text())["exit_code"] == 0
    again = run_entry(tmp_path, sys.executable, "-c", "print('trained twice')")  # the restarted container
    assert "already finished" in again.stdout.readline()
    again.send_signal(signal.SIGTERM)
    out, _ = again.communicate(timeout=10)
    assert again.returncode == 0 and "trained twice" not in out
