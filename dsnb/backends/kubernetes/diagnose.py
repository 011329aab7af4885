"""Turn pod and event state into one line of cause and one line of fix.

Works on the Kubernetes dict form of a Pod (``status.conditions``, ``containerStatuses``)
and its Events, so it serves every Kubernetes backend and is tested without a cluster.

Example:
    >>> pod = {"metadata": {"name": "tiny-gpt-x7k2-0"},
    ...        "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
    ...            "reason": "Unschedulable",
    ...            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}}
    >>> print(classify(pod).cause)
    pod tiny-gpt-x7k2-0 cannot be scheduled: no node has enough free nvidia.com/gpu
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Diagnosis:
    """Why a pod is stuck or failed, and what to do about it.

    Attributes:
        reason: the Kubernetes reason it came from (e.g. ``"OOMKilled"``).
        cause: one line naming the pod and what is wrong.
        fix: one line saying what to change.
        fatal: True when waiting will not help (the job should fail now).
    """

    reason: str
    cause: str
    fix: str
    fatal: bool = True

    def __str__(self) -> str:
        return f"{self.cause}. Fix: {self.fix}"


_INSUFFICIENT = re.compile(r"Insufficient ([\w./-]*\w)")
_SCHEDULING_FIXES = {
    "nvidia.com/gpu": "lower resources.gpus, wait for GPUs to free up, or add GPU nodes; "
                      "check that the NVIDIA device plugin (GPU Operator) runs on the GPU nodes",
    "cpu": "lower resources.cpu, or add nodes with more CPU",
    "memory": "lower resources.memory, or add nodes with more memory",
}


def _name(pod: dict[str, Any]) -> str:
    return pod.get("metadata", {}).get("name", "?")


def _unschedulable(pod: dict[str, Any], message: str) -> Diagnosis:
    name = _name(pod)
    short = message if len(message) <= 200 else message[:200] + "…"
    found = _INSUFFICIENT.findall(message)
    if found:
        resource = found[0]
        fix = _SCHEDULING_FIXES.get(resource, f"ask for less {resource}, or add nodes that have it")
        # A cluster may grow (autoscaler) or free resources: not fatal by itself.
        return Diagnosis("Unschedulable", f"pod {name} cannot be scheduled: no node has enough free {resource}", fix, fatal=False)
    if "untolerated taint" in message:
        return Diagnosis("Unschedulable", f"pod {name} cannot be scheduled: the nodes carry taints it does not tolerate ({short})",
                         "add matching tolerations in PodOptions(tolerations=[...])", fatal=False)
    if "node affinity" in message or "node selector" in message:
        return Diagnosis("Unschedulable", f"pod {name} cannot be scheduled: no node matches its node selector or affinity",
                         "check PodOptions(node_selector=..., affinity=...) against the node labels (kubectl get nodes --show-labels)",
                         fatal=False)
    return Diagnosis("Unschedulable", f"pod {name} cannot be scheduled: {short}", "see kubectl describe pod " + name, fatal=False)


def _container_state(pod: dict[str, Any], status: dict[str, Any]) -> Diagnosis | None:
    name = _name(pod)
    waiting = (status.get("state") or {}).get("waiting") or {}
    terminated = (status.get("state") or {}).get("terminated") or {}
    last = (status.get("lastState") or {}).get("terminated") or {}
    reason = waiting.get("reason") or ""
    if terminated.get("reason") == "OOMKilled" or (reason == "CrashLoopBackOff" and last.get("reason") == "OOMKilled"):
        return Diagnosis("OOMKilled", f"pod {name} ran out of memory and was killed (OOMKilled)",
                         "raise resources.memory, lower the micro-batch size, or offload with ZeRO (offload_optimizer/offload_param)")
    if reason in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName"):
        image = status.get("image", "the image")
        return Diagnosis(reason, f"pod {name} cannot pull {image}: {waiting.get('message', reason)}",
                         "check the image name and tag, and give registry access with PodOptions(image_pull_secrets=[...])")
    if reason == "CrashLoopBackOff":
        code = last.get("exitCode")
        return Diagnosis(reason, f"pod {name} keeps crashing" + (f" (exit code {code})" if code is not None else ""),
                         "read its logs (job.logs()) for the error in your script or image")
    if reason in ("CreateContainerConfigError", "CreateContainerError"):
        return Diagnosis(reason, f"pod {name} cannot start its container: {waiting.get('message', reason)}",
                         "create the missing Secret or ConfigMap, or fix the reference to it")
    return None


def classify(pod: dict[str, Any], events: list[dict[str, Any]] | None = None) -> Diagnosis | None:
    """The most telling problem of one pod, or None when nothing is wrong (yet).

    Args:
        pod: a Pod in its Kubernetes dict form.
        events: Events whose ``involvedObject`` is this pod, oldest first.

    Raises:
        Nothing: unknown or missing fields mean "no diagnosis".

    Example:
        >>> classify({"metadata": {"name": "p"}, "status": {"phase": "Running"}}) is None
        True
    """
    status = pod.get("status") or {}
    if status.get("reason") == "Evicted":
        return Diagnosis("Evicted", f"pod {_name(pod)} was evicted: {status.get('message', 'node under pressure')}",
                         "ask for the memory and disk the job really uses (resources.memory), so the node keeps room for it")
    for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        found = _container_state(pod, container)
        if found:
            return found
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False" and condition.get("reason") == "Unschedulable":
            return _unschedulable(pod, condition.get("message", ""))
    return _from_pod_events(pod, events or [])


def _from_pod_events(pod: dict[str, Any], events: list[dict[str, Any]]) -> Diagnosis | None:
    """What the newest scheduling or mount Event about ``pod`` says, or None."""
    for event in reversed(events):
        reason = event.get("reason", "")
        if reason == "FailedScheduling":
            return _unschedulable(pod, event.get("message", ""))
        if reason == "FailedMount":
            return Diagnosis(reason, f"pod {_name(pod)} cannot mount a volume: {event.get('message', '')}",
                             "check that the PersistentVolumeClaim in PodOptions(checkpoint_pvc=...) exists and is bound", fatal=False)
    return None


#: Warning reasons on the objects dsnb creates (not pods) that say the controller cannot go on.
_OBJECT_REFUSALS = {
    # MPI Operator v0.8.0, mpi_job_controller.go: the MPIJob fails validation and is not requeued.
    "ValidationError": ("the MPI Operator refused it", "fix what the message names (dsnb checks names before it submits; "
                                                      "an older dsnb may not)"),
    # Kubeflow Trainer v2.3.0, trainjob_controller.go: the JobSet (or another object) could not be created.
    "TrainJobResourcesCreationFailed": ("Kubeflow Trainer cannot create its JobSet", "fix what the message names"),
    # The StatefulSet and Job controllers: a pod the API refused (admission, quota).
    "FailedCreate": ("its pods cannot be created", "see the message"),
}


def event_time(event: dict[str, Any]) -> str:
    """When an Event last happened: ``series.lastObservedTime``, ``lastTimestamp`` or ``eventTime`` (new-style events)."""
    series = event.get("series") or {}
    return series.get("lastObservedTime") or event.get("lastTimestamp") or event.get("eventTime") or ""


def classify_object_events(kind: str, name: str, events: list[dict[str, Any]]) -> Diagnosis | None:
    """The problem a controller reported with a Warning Event about an object dsnb created, or None.

    Args:
        kind, name: the object (a StatefulSet, MPIJob, TrainJob, JobSet or Job).
        events: its Events, oldest first.

    Example:
        >>> event = {"type": "Warning", "reason": "FailedCreate", "message": 'create Pod j-0 in StatefulSet j failed error: '
        ...          'pods "j-0" is forbidden: violates PodSecurity "restricted:latest": runAsNonRoot != true'}
        >>> print(classify_object_events("StatefulSet", "j", [event]))
        StatefulSet j: its pods cannot be created: create Pod j-0 in StatefulSet j failed error: pods "j-0" is forbidden: violates PodSecurity "restricted:latest": runAsNonRoot != true. Fix: the namespace enforces the "restricted" Pod Security profile: keep dsnb's default security context (do not relax it in PodOptions), or ask for a namespace that allows what the message names
    """
    for event in reversed(events):
        if event.get("type") != "Warning":
            continue
        reason, message = event.get("reason", ""), (event.get("message") or "").strip()
        short = message if len(message) <= 400 else message[:400] + "…"
        what, fix = _OBJECT_REFUSALS.get(reason, (f"{reason}", "see kubectl describe " + f"{kind.lower()} {name}"))
        fatal = reason in ("ValidationError",) or "denied the request" in message or "violates PodSecurity" in message
        if "violates PodSecurity" in message:
            fix = ('the namespace enforces the "restricted" Pod Security profile: keep dsnb\'s default security context '
                   "(do not relax it in PodOptions), or ask for a namespace that allows what the message names")
        elif "exceeded quota" in message:
            fix = "the namespace's ResourceQuota is used up: wait for other work to end, ask for less (resources=), or for a larger quota"
        return Diagnosis(reason, f"{kind} {name}: {what}: {short}", fix, fatal=fatal)
    return None
