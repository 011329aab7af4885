"""Kueue: put a job in a team's queue, check the queue before, and say why a queued job waits.

With ``PodOptions(queue="team-a")`` the object Kueue manages for each backend carries Kueue's
queue label (and ``priority_class`` its WorkloadPriorityClass label); Kueue then holds the job
until its ClusterQueue has quota for it, and starts it. Which object that is follows Kueue's own
integrations (kubernetes-sigs/kueue v0.19.2, ``pkg/controller/jobs/``):

=============  ===============  ===========================================================
backend        labelled object  how Kueue holds it (its webhook, not dsnb)
=============  ===============  ===========================================================
statefulset    StatefulSet      a scheduling gate on each pod (``statefulset/`` and ``pod/``)
mpijob         MPIJob           ``spec.runPolicy.suspend`` (``mpijob/``)
trainjob       TrainJob         ``spec.suspend`` (``trainjob/``)
kuberay        RayJob           ``spec.suspend`` (``rayjob/``; it needs ``shutdownAfterJobFinishes``)
=============  ===============  ===========================================================

For each job Kueue makes a Workload (``kueue.x-k8s.io``), owned by the labelled object, whose
``QuotaReserved`` and ``Admitted`` conditions say whether it may run and, while it may not, why
(``pkg/controller/core/workload_controller.go``, ``pkg/scheduler/flavorassigner``). Its place in
the queue comes from Kueue's visibility API, where it is served.

Example:
    >>> from dsnb.backends.kubernetes.pod_options import PodOptions
    >>> queue_labels(PodOptions(queue="team-a", priority_class="high"))
    {'kueue.x-k8s.io/queue-name': 'team-a', 'kueue.x-k8s.io/priority-class': 'high'}
    >>> waiting_reason({"status": {"conditions": [{"type": "QuotaReserved", "status": "False", "reason": "Pending",
    ...     "message": "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in "
    ...                "flavor a100, 8 more needed"}]}})
    "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor a100, 8 more needed"
"""

from __future__ import annotations

import json
from typing import Any

from kubernetes.client.exceptions import ApiException

from dsnb.preflight import CheckResult

#: Kueue's label that puts an object in a LocalQueue (``QueueLabel``, pkg/controller/constants).
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
#: Kueue's label naming a WorkloadPriorityClass (``WorkloadPriorityClassLabel``).
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
GROUP = "kueue.x-k8s.io"
#: The versions Kueue serves, newest first (v1beta2 is stored from v0.15 on; older releases serve v1beta1 only).
VERSIONS = ("v1beta2", "v1beta1")
VISIBILITY_GROUP = "visibility.kueue.x-k8s.io"
#: The kinds whose objects Kueue manages, one per backend (see the module docstring).
MANAGED_KINDS = frozenset({"StatefulSet", "MPIJob", "TrainJob", "RayJob"})
TIMEOUT_S = 5


def queue_labels(options: Any) -> dict[str, str]:
    """The labels that put a job's object in ``options.queue`` at ``options.priority_class`` ({} without a queue)."""
    if not options.queue:
        return {}
    labels = {QUEUE_LABEL: options.queue}
    if options.priority_class:
        labels[PRIORITY_LABEL] = options.priority_class
    return labels


def _get(conn: Any, plural: str, namespace: str, name: str | None = None, **query: Any) -> dict[str, Any]:
    """A Kueue object (or list) at the newest version this cluster serves.

    Raises:
        ApiException: 404 when neither version (or the object) is there, or any other refusal.
    """
    last: ApiException | None = None
    for version in VERSIONS:
        try:
            if name is None:
                answer = conn.custom.list_namespaced_custom_object(GROUP, version, namespace, plural,
                                                                  _preload_content=False, _request_timeout=TIMEOUT_S,
                                                                  **query)
            else:
                answer = conn.custom.get_namespaced_custom_object(GROUP, version, namespace, plural, name,
                                                                 _preload_content=False, _request_timeout=TIMEOUT_S)
            return json.loads(answer.data)
        except ApiException as e:
            if e.status != 404 or name is not None and _kind_served(conn, version, namespace, plural):
                raise
            last = e
    assert last is not None
    raise last


def _kind_served(conn: Any, version: str, namespace: str, plural: str) -> bool:
    """Whether ``plural`` is served at ``version`` (a 404 on an object then means the object is missing)."""
    try:
        conn.custom.list_namespaced_custom_object(GROUP, version, namespace, plural, limit=1,
                                                  _preload_content=False, _request_timeout=TIMEOUT_S)
        return True
    except ApiException as e:
        if e.status == 404:
            return False
        raise


def check_local_queue(conn: Any, namespace: str, queue: str) -> CheckResult:
    """The ``Kueue queue`` line of a preflight: the LocalQueue exists and is active.

    Raises:
        Nothing: every outcome is a result.
    """
    name = "Kueue queue"
    try:
        if not _kind_served(conn, VERSIONS[0], namespace, "localqueues") and \
                not _kind_served(conn, VERSIONS[1], namespace, "localqueues"):
            return CheckResult(name, False, "Kueue is not installed: this cluster serves no LocalQueue",
                               "install Kueue (https://kueue.sigs.k8s.io/docs/installation/), or leave "
                               "PodOptions(queue=...) unset")
        local = _get(conn, "localqueues", namespace, queue)
    except ApiException as e:
        if e.status == 404:
            return CheckResult(name, False, f"LocalQueue {queue!r} does not exist in namespace {namespace!r}",
                               f"kubectl get localqueues -n {namespace} lists the queues there; ask your cluster "
                               "admin for one, or name another with PodOptions(queue=...)")
        if e.status == 403:
            return CheckResult(name, False, f"cannot read LocalQueue {queue!r} (forbidden)",
                               "ask for get on localqueues.kueue.x-k8s.io in this namespace", warning=True)
        return CheckResult(name, False, f"reading LocalQueue {queue!r} failed: HTTP {e.status} {e.reason}",
                           "check the cluster is up, then run the check again")
    active = next((c for c in (local.get("status") or {}).get("conditions") or [] if c.get("type") == "Active"), None)
    cluster_queue = (local.get("spec") or {}).get("clusterQueue", "?")
    if active is not None and active.get("status") == "False":
        return CheckResult(name, False, f"LocalQueue {queue!r} is not active ({active.get('reason')}: "
                                        f"{active.get('message', '')})",
                           f"ask your cluster admin about ClusterQueue {cluster_queue!r}")
    pending = (local.get("status") or {}).get("pendingWorkloads", 0)
    return CheckResult(name, True, f"LocalQueue {queue!r} (ClusterQueue {cluster_queue!r}) is active, "
                                   f"{pending} workload(s) waiting in it")


def workload_of(conn: Any, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    """The Workload Kueue made for object ``kind``/``name`` (its owner), or None while there is none.

    Raises:
        ApiException: the Workloads cannot be listed (404 too: Kueue is not installed).
    """
    items = _get(conn, "workloads", namespace).get("items") or []
    for workload in items:
        owners = (workload.get("metadata") or {}).get("ownerReferences") or []
        if any(o.get("kind") == kind and o.get("name") == name for o in owners):
            return workload
    return None


def _condition(workload: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in (workload.get("status") or {}).get("conditions") or [] if c.get("type") == kind), None)


def admitted(workload: dict[str, Any]) -> bool:
    """Whether Kueue admitted the workload (it may run)."""
    condition = _condition(workload, "Admitted")
    return condition is not None and condition.get("status") == "True"


def waiting_reason(workload: dict[str, Any]) -> str:
    """Why Kueue holds the workload, in Kueue's words (its ``QuotaReserved`` condition), or a plain "waiting"."""
    for kind in ("QuotaReserved", "Evicted", "Admitted"):
        condition = _condition(workload, kind)
        if condition is not None and condition.get("message") and (kind == "Evicted") == (condition.get("status") == "True"):
            return str(condition["message"])
    return "waiting for Kueue to admit it"


def queue_position(conn: Any, namespace: str, queue: str, workload_name: str) -> int | None:
    """The workload's place in its LocalQueue (1: next), from Kueue's visibility API; None where it is not served.

    Raises:
        Nothing: an API that is not there or refuses gives None.
    """
    for version in VERSIONS:
        path = f"/apis/{VISIBILITY_GROUP}/{version}/namespaces/{namespace}/localqueues/{queue}/pendingworkloads"
        try:
            request = conn.api.param_serialize("GET", path, header_params={"Accept": "application/json"},
                                               auth_settings=["BearerToken"])
            response = conn.api.call_api(*request, _request_timeout=TIMEOUT_S)
            response.read()
        except Exception:  # the API server could not be reached: the position is an aid, not a must
            return None
        if response.status != 200:
            continue  # not served at this version (404), or not allowed: try the next, else no position
        for item in json.loads(response.data).get("items") or []:
            if (item.get("metadata") or {}).get("name") == workload_name:
                return int(item.get("positionInLocalQueue", 0)) + 1
        return None
    return None


def pending_message(conn: Any, namespace: str, queue: str, kind: str, name: str) -> str | None:
    """What a status says of a job Kueue holds, or None once Kueue admitted it.

    Raises:
        Nothing: a Workload that cannot be read says so in the message.
    """
    try:
        workload = workload_of(conn, namespace, kind, name)
    except ApiException as e:
        return f"queued in LocalQueue {queue!r} (Kueue); its Workload cannot be read: HTTP {e.status} {e.reason}"
    if workload is None:
        return f"queued in LocalQueue {queue!r}: waiting for Kueue to make its Workload"
    if admitted(workload):
        return None
    position = queue_position(conn, namespace, queue, workload["metadata"]["name"])
    where = f", position {position} in the queue" if position is not None else ""
    return f"queued in LocalQueue {queue!r} (Kueue{where}): {waiting_reason(workload)}"
