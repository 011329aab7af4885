"""The failure classifier: pod and event states in, one cause and one fix out (table-driven)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from dsnb.backends.kubernetes.diagnose import classify


def pod(status: dict[str, Any], name: str = "tiny-gpt-x7k2-1") -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": status}


def unschedulable(message: str) -> dict[str, Any]:
    return pod({"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]})


def container(state: dict[str, Any], last: dict[str, Any] | None = None, image: str = "ghcr.io/org/train:1") -> dict[str, Any]:
    return pod({"phase": "Pending", "containerStatuses": [
        {"name": "dsnb", "image": image, "state": state, "lastState": {"terminated": last} if last else {}}]})


@dataclass(frozen=True)
class Case:
    id: str
    pod: dict[str, Any]
    reason: str
    cause_has: str
    fix_has: str
    fatal: bool
    events: tuple[dict[str, Any], ...] = ()


CASES = [
    Case("no gpu", unschedulable("0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes"),
         "Unschedulable", "no node has enough free nvidia.com/gpu", "GPU Operator", False),
    Case("no memory", unschedulable("0/2 nodes are available: 2 Insufficient memory."),
         "Unschedulable", "enough free memory", "resources.memory", False),
    Case("taint", unschedulable("0/1 nodes are available: 1 node(s) had untolerated taint {gpu: true}."),
         "Unschedulable", "taints", "tolerations", False),
    Case("selector", unschedulable("0/4 nodes are available: 4 node(s) didn't match Pod's node affinity/selector."),
         "Unschedulable", "node selector or affinity", "node_selector", False),
    Case("image pull", container({"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}),
         "ImagePullBackOff", "cannot pull ghcr.io/org/train:1", "image_pull_secrets", True),
    Case("err image pull", container({"waiting": {"reason": "ErrImagePull", "message": "manifest unknown"}}),
         "ErrImagePull", "manifest unknown", "tag", True),
    Case("crash loop", container({"waiting": {"reason": "CrashLoopBackOff"}}, last={"exitCode": 2, "reason": "Error"}),
         "CrashLoopBackOff", "keeps crashing (exit code 2)", "job.logs()", True),
    Case("oom now", container({"terminated": {"reason": "OOMKilled", "exitCode": 137}}),
         "OOMKilled", "ran out of memory", "resources.memory", True),
    Case("oom then crash loop", container({"waiting": {"reason": "CrashLoopBackOff"}}, last={"exitCode": 137, "reason": "OOMKilled"}),
         "OOMKilled", "OOMKilled", "offload", True),
    Case("evicted", pod({"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}),
         "Evicted", "was evicted: The node was low on resource: memory.", "resources.memory", True),
    Case("missing secret", container({"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "hf" not found'}}),
         "CreateContainerConfigError", 'secret "hf" not found', "Secret", True),
    Case("scheduling event", pod({"phase": "Pending"}), "Unschedulable", "nvidia.com/gpu", "GPU", False,
         events=({"reason": "Scheduled", "message": "old"},
                 {"reason": "FailedScheduling", "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."})),
    Case("mount event", pod({"phase": "Pending"}), "FailedMount", "cannot mount a volume", "checkpoint_pvc", False,
         events=({"reason": "FailedMount", "message": 'persistentvolumeclaim "ckpt" not found'},)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_classifier(case: Case) -> None:
    found = classify(case.pod, list(case.events))
    assert found is not None
    assert found.reason == case.reason and found.fatal == case.fatal
    assert case.cause_has in found.cause and found.cause.startswith("pod tiny-gpt-x7k2-1 ")
    assert case.fix_has in found.fix
    assert str(found) == f"{found.cause}. Fix: {found.fix}"


@pytest.mark.parametrize("state", [
    {"phase": "Running", "containerStatuses": [{"name": "dsnb", "state": {"running": {}}}]},
    {"phase": "Pending", "containerStatuses": [{"name": "dsnb", "state": {"waiting": {"reason": "ContainerCreating"}}}]},
    {"phase": "Succeeded"},
    {},
])
def test_healthy_or_starting_pods_have_no_diagnosis(state: dict[str, Any]) -> None:
    assert classify(pod(state)) is None
