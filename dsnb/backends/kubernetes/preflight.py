"""Preflight for the Kubernetes backends: can this user run a job here, and are there GPUs for it?

In order, each check a line of the :class:`~dsnb.preflight.PreflightReport`:

- ``API reachable``: the server answers ``/version`` within a few seconds (nothing else
  runs when it does not);
- ``namespace``: it exists (a user allowed only inside it may not read it: a warning);
- ``permission <resource>``: one SelfSubjectAccessReview per verb the backend needs, so
  the report names exactly the verbs missing;
- with a spec that asks for GPUs, ``GPUs``: enough nodes offer ``nvidia.com/gpu`` for the
  job's pods, and ``GPU Operator``: signs that the NVIDIA GPU Operator or device plugin runs.

Example:
    >>> from dsnb import Cluster, JobSpec, Resources
    >>> spec = JobSpec(name="big", script="train.py", nodes=2, procs_per_node=8, resources=Resources(gpus=8))
    >>> print(Cluster("statefulset", namespace="ml").check(spec))  # doctest: +SKIP
    ✓ API reachable: Kubernetes v1.31.2 at https://10.0.0.1:6443 (context gpu-cluster)
    ✓ namespace: ml exists
    ✓ permission configmaps: create, get, list, watch, patch, delete
    ...
    ✓ GPUs: 4 node(s) offer 8 nvidia.com/gpu or more: room for 4 pod(s), the job needs 2
    ✓ GPU Operator: node gpu-1 is labelled nvidia.com/gpu.present=true
"""

from __future__ import annotations

import copy
import json
import re
from typing import TYPE_CHECKING, Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity

from dsnb.backends.kubernetes import objects
from dsnb.backends.kubernetes.connection import Connection
from dsnb.backends.kubernetes.kueue import check_local_queue
from dsnb.backends.kubernetes.rbac import KUEUE_PERMISSIONS, Permission
from dsnb.errors import ClusterError
from dsnb.fit import MemoryThere
from dsnb.preflight import CheckResult, PreflightReport
from dsnb.spec import JobSpec

if TYPE_CHECKING:
    from dsnb.backends.kubernetes.backend import KubernetesBackend

#: Seconds each request of the preflight may take.
TIMEOUT_S = 5
GPU_RESOURCE = "nvidia.com/gpu"
#: Node labels the GPU Operator's feature discovery sets (None: any value).
OPERATOR_LABELS: dict[str, str | None] = {
    "nvidia.com/gpu.present": "true",
    "nvidia.com/gpu.product": None,
    "feature.node.kubernetes.io/pci-10de.present": "true",
}
#: The label of the device plugin pods the GPU Operator runs.
DEVICE_PLUGIN_SELECTOR = "app=nvidia-device-plugin-daemonset"
OPERATOR_INSTALL = ("helm repo add nvidia https://helm.ngc.nvidia.com/nvidia && "
                    "helm install --wait --generate-name -n gpu-operator --create-namespace nvidia/gpu-operator")
API = "API reachable"


def run_preflight(backend: KubernetesBackend, spec: JobSpec | None = None) -> PreflightReport:
    """Check that ``backend`` can run jobs (and, given a GPU ``spec``, that the cluster has GPUs for it).

    Every request has a short timeout; nothing is created. Problems are results, not exceptions.

    Args:
        backend: a Kubernetes backend; its ``permissions`` are what is checked.
        spec: the job to check GPU capacity for (``resources.gpus`` per pod, ``nodes`` pods).

    Raises:
        Nothing on purpose: an unusable kubeconfig becomes a failed ``API reachable`` line.

    Example:
        >>> from dsnb.backends.kubernetes.statefulset import StatefulSetBackend
        >>> backend = StatefulSetBackend(namespace="ml", kubeconfig="/nonexistent/config")
        >>> print(run_preflight(backend).results[0])
        ✗ API reachable: kubeconfig /nonexistent/config: no such file
            fix: point kubeconfig= (or $KUBECONFIG) at your cluster's config file, or run inside the cluster
    """
    report = PreflightReport(backend.name)
    gpus = spec.resources.gpus if spec is not None else 0
    later = ["namespace", "permissions", *(["GPUs", "GPU Operator"] if gpus else [])]
    try:
        conn = backend.conn
    except ClusterError as e:
        report.results.append(CheckResult(API, False, _problem(e), e.fix))
        report.results += [_not_run(name, "no cluster to ask") for name in later]
        return report
    reachable = check_api(conn)
    report.results.append(reachable)
    if not reachable.ok:
        report.results += [_not_run(name, "the API server did not answer") for name in later]
        return report
    namespace = backend.namespace
    report.results.append(check_namespace(conn, namespace))
    report.results += check_permissions(conn, namespace, backend.permissions, backend.name)
    report.results += backend.operator_checks(conn)
    if spec is not None:
        report.results += backend.spec_checks(spec)
    if spec is not None and gpus:
        report.results += check_gpus(conn, gpus, backend.pods_for(spec))
    if backend.pod_options.queue:
        report.results += check_permissions(conn, namespace, KUEUE_PERMISSIONS, backend.name)
        report.results.append(check_local_queue(conn, namespace, backend.pod_options.queue))
    return report


def _problem(e: ClusterError) -> str:
    """The message of ``e`` without its ``Fix:`` part (which goes into the result's fix)."""
    text, suffix = str(e), f". Fix: {e.fix}"
    return text[: -len(suffix)] if text.endswith(suffix) else text


def _not_run(name: str, why: str) -> CheckResult:
    return CheckResult(name, False, f"not run: {why}", skipped=True)


def _reason(e: Exception) -> str:
    """A short reason for a failed connection, without urllib3's object reprs."""
    while isinstance(getattr(e, "reason", None), Exception):
        e = e.reason  # type: ignore[assignment]
    # NewConnectionError (refused, unresolvable) is a subclass of ConnectTimeoutError.
    timeout = urllib3.exceptions.ConnectTimeoutError | urllib3.exceptions.ReadTimeoutError
    if isinstance(e, timeout) and not isinstance(e, urllib3.exceptions.NewConnectionError):
        return f"no answer within {TIMEOUT_S} s"
    return re.sub(r"^(<[^>]*>|\w+\([^)]*\)): ", "", str(e))  # drop urllib3's "<HTTPConnection ...>: "


def _json(response: Any) -> dict[str, Any]:
    """The body of a raw (``_preload_content=False``) response; the client raised already for non-2xx."""
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()


def _message(e: ApiException) -> str:
    try:
        return json.loads(e.body).get("message") or f"{e.status} {e.reason}"
    except (TypeError, ValueError):
        return f"{e.status} {e.reason}"


def check_api(conn: Connection) -> CheckResult:
    """Whether the API server answers ``/version`` within :data:`TIMEOUT_S` seconds.

    Raises:
        Nothing: an unreachable server or refused credentials are a failed result.
    """
    where = f"{conn.host} (context {conn.context})"
    conf = copy.deepcopy(conn.api.configuration)
    conf.retries = False  # one attempt: urllib3 otherwise retries a dead address 3 times
    try:
        with client.ApiClient(conf) as api:
            version = _json(client.VersionApi(api).get_code(_preload_content=False, _request_timeout=TIMEOUT_S))
    except ApiException as e:
        if e.status == 401:
            return CheckResult(API, False, f"{where} refused the credentials", "log in again (refresh your kubeconfig)")
        return CheckResult(API, False, f"{where} answered {_message(e)}",
                           "check the kubeconfig's context points at a Kubernetes API server (kubectl cluster-info)")
    except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
        return CheckResult(API, False, f"cannot reach {where}: {_reason(e)}",
                           "check the cluster is up and the kubeconfig's context (kubectl cluster-info)")
    return CheckResult(API, True, f"Kubernetes {version.get('gitVersion', '?')} at {where}")


def check_namespace(conn: Connection, namespace: str) -> CheckResult:
    """Whether ``namespace`` exists (a warning when the user may not read namespaces).

    Raises:
        Nothing: every outcome is a result.
    """
    try:
        found = _json(conn.core.read_namespace(namespace, _preload_content=False, _request_timeout=TIMEOUT_S))
    except ApiException as e:
        if e.status == 404:
            return CheckResult("namespace", False, f"namespace {namespace!r} does not exist",
                               f"kubectl create namespace {namespace} (or pass another namespace=)")
        if e.status == 403:
            return CheckResult("namespace", False,
                               f"cannot read namespace {namespace!r} (normal for namespaced users); "
                               "the permission checks below tell whether you can work in it", warning=True)
        return CheckResult("namespace", False, f"reading namespace {namespace!r} failed: {_message(e)}",
                           "check the cluster's health (kubectl get namespace " + namespace + ")")
    except (urllib3.exceptions.HTTPError, OSError) as e:
        return CheckResult("namespace", False, f"reading namespace {namespace!r} failed: {_reason(e)}",
                           "check the cluster is up (kubectl cluster-info), then run the check again")
    phase = (found.get("status") or {}).get("phase")
    if phase == "Terminating":
        return CheckResult("namespace", False, f"namespace {namespace!r} is being deleted",
                           "wait until it is gone and create it again, or pass another namespace=")
    return CheckResult("namespace", True, f"{namespace} exists")


def _allowed(conn: Connection, namespace: str, group: str, resource: str, verb: str) -> bool:
    """One SelfSubjectAccessReview: may the current user ``verb`` ``resource`` in ``namespace``?

    Raises:
        ApiException: the review itself was refused.
    """
    name, _, sub = resource.partition("/")
    review = client.V1SelfSubjectAccessReview(
        api_version="authorization.k8s.io/v1", kind="SelfSubjectAccessReview",
        spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=client.V1ResourceAttributes(
            namespace=namespace, verb=verb, group=group, resource=name, subresource=sub or None)),
    )
    api = client.AuthorizationV1Api(conn.api)
    answer = _json(api.create_self_subject_access_review(review, _preload_content=False, _request_timeout=TIMEOUT_S))
    return bool((answer.get("status") or {}).get("allowed"))


def check_permissions(conn: Connection, namespace: str, permissions: tuple[Permission, ...], backend: str) -> list[CheckResult]:
    """One result per permission line: the verbs the current user lacks in ``namespace``.

    Raises:
        Nothing: a refused or failed review is a result.
    """
    fix = f"ask your cluster admin for the Role printed by `dsnb rbac --backend {backend} --namespace {namespace} --user <you>`"
    results = []
    for permission in permissions:
        label = f"{permission.resource}.{permission.group}" if permission.group else permission.resource
        name = f"permission {label}"
        try:
            missing = [v for v in permission.verbs if not _allowed(conn, namespace, permission.group, permission.resource, v)]
        except ApiException as e:
            return results + [CheckResult("permissions", False, f"cannot ask the API server what you may do: {_message(e)}",
                                          f"{fix}; or try the verbs with `kubectl auth can-i --list -n {namespace}`",
                                          warning=True)]
        except (urllib3.exceptions.HTTPError, OSError) as e:
            return results + [CheckResult(name, False, f"the access review failed: {_reason(e)}",
                                          "check the cluster is up (kubectl cluster-info), then run the check again")]
        if missing:
            granted = [v for v in permission.verbs if v not in missing]
            have = f" (allowed: {', '.join(granted)})" if granted else ""
            results.append(CheckResult(name, False, f"cannot {', '.join(missing)} in namespace {namespace}{have}", fix))
        else:
            results.append(CheckResult(name, True, ", ".join(permission.verbs)))
    return results


def _list(call: Any, **options: Any) -> list[dict[str, Any]] | None:
    """The items of a list call, or None when the user may not list them (403).

    Raises:
        ApiException: any refusal other than 403.
    """
    try:
        return _json(call(_preload_content=False, _request_timeout=TIMEOUT_S, **options)).get("items") or []
    except ApiException as e:
        if e.status == 403:
            return None
        raise


def _gpus_of(node: dict[str, Any]) -> int:
    amount = _status(node, "allocatable").get(GPU_RESOURCE, "0")
    try:
        return int(amount)
    except ValueError:
        return 0


def check_gpus(conn: Connection, gpus: int, pods: int) -> list[CheckResult]:
    """Whether the nodes offer ``gpus`` GPUs to each of ``pods`` pods, and signs of the GPU Operator.

    Counts allocatable GPUs of schedulable nodes, not free ones: GPUs other pods hold are not subtracted.

    Raises:
        Nothing: every outcome is a result.
    """
    try:
        nodes = _list(conn.core.list_node)
        plugins = _list(conn.core.list_pod_for_all_namespaces, label_selector=DEVICE_PLUGIN_SELECTOR)
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
        why = _message(e) if isinstance(e, ApiException) else _reason(e)
        retry = "check the cluster is up (kubectl cluster-info), then run the check again"
        return [CheckResult("GPUs", False, f"listing nodes failed: {why}", retry),
                _not_run("GPU Operator", "the nodes could not be listed")]
    return [_capacity(nodes, gpus, pods), _operator(nodes, plugins)]


def _capacity(nodes: list[dict[str, Any]] | None, gpus: int, pods: int) -> CheckResult:
    if nodes is None:
        return CheckResult("GPUs", False, "cannot list nodes, so the GPU capacity is unknown",
                           f"ask your cluster admin whether {pods} node(s) offer {gpus} {GPU_RESOURCE} each", warning=True)
    schedulable = [n for n in nodes if not (n.get("spec") or {}).get("unschedulable")]
    offers = sorted((_gpus_of(n) for n in schedulable), reverse=True)
    fitting = [o for o in offers if o >= gpus]
    room = sum(o // gpus for o in fitting)
    if room >= pods:
        return CheckResult("GPUs", True, f"{len(fitting)} node(s) offer {gpus} {GPU_RESOURCE} or more: "
                                         f"room for {room} pod(s), the job needs {pods}")
    largest = offers[0] if offers else 0
    if not largest:
        return CheckResult("GPUs", False, f"no node offers {GPU_RESOURCE} ({len(schedulable)} schedulable node(s))",
                           f"install the NVIDIA GPU Operator or device plugin: {OPERATOR_INSTALL}")
    if not fitting:
        return CheckResult("GPUs", False, f"the job asks {gpus} {GPU_RESOURCE} per pod; the largest node offers {largest}",
                           f"ask for gpus={largest} or fewer per node (more nodes instead), or add larger GPU nodes")
    return CheckResult("GPUs", False, f"room for {room} pod(s) with {gpus} {GPU_RESOURCE} each; the job needs {pods}",
                       f"ask for nodes={room} or fewer, or add GPU nodes (an autoscaled pool may add them on demand)")


def _operator(nodes: list[dict[str, Any]] | None, plugins: list[dict[str, Any]] | None) -> CheckResult:
    for node in nodes or []:
        labels = _labels(node)
        for key, value in OPERATOR_LABELS.items():
            if key in labels and (value is None or labels[key] == value):
                return CheckResult("GPU Operator", True, f"node {node['metadata']['name']} is labelled {key}={labels[key]}")
    if plugins:
        where = sorted({(p.get("metadata") or {}).get("namespace", "?") for p in plugins})
        return CheckResult("GPU Operator", True, f"{len(plugins)} device plugin pod(s) in namespace {', '.join(where)}")
    if nodes is None and plugins is None:
        return CheckResult("GPU Operator", False, "cannot list nodes or pods across namespaces, so no sign of it can be seen",
                           "ask your cluster admin whether the NVIDIA GPU Operator runs", warning=True)
    return CheckResult("GPU Operator", False, "no sign of the NVIDIA GPU Operator (no GPU node labels, no device plugin pods)",
                       f"install it: {OPERATOR_INSTALL}", warning=True)


def check_crd(conn: Connection, namespace: str, group: str, version: str, plural: str, kind: str, install: str) -> CheckResult:
    """Whether the API serves ``kind`` (its CustomResourceDefinition is installed).

    Asks API discovery (``/apis/<group>/<version>``), which every signed-in user may read,
    so a user not allowed to list the kind still learns whether it exists.

    Raises:
        Nothing: every outcome is a result.
    """
    name = f"{kind} CRD"
    try:
        resources = _json(conn.custom.get_api_resources(group, version, _preload_content=False, _request_timeout=TIMEOUT_S))
    except ApiException as e:
        if e.status == 404:
            return CheckResult(name, False, f"the API does not serve {plural}.{group}/{version}", f"install it: {install}")
        return CheckResult(name, False, f"asking for {group}/{version} failed: {_message(e)}", "run the check again")
    except (urllib3.exceptions.HTTPError, OSError) as e:
        return CheckResult(name, False, f"asking for {group}/{version} failed: {_reason(e)}", "run the check again")
    if not any(r.get("name") == plural for r in resources.get("resources") or []):
        return CheckResult(name, False, f"the API does not serve {plural}.{group}/{version}", f"install it: {install}")
    return CheckResult(name, True, f"{plural}.{group}/{version} is served")


def check_fields(conn: Connection, namespace: str, manifest: dict[str, Any], upgrade: str) -> CheckResult:
    """Whether the served CRD of ``manifest`` knows every field dsnb sets: a server-side dry run
    (``dryRun=All``, nothing stored) with ``fieldValidation=Strict``.

    Raises:
        Nothing: every outcome is a result; a dry run the user may not make is a warning.
    """
    kind, (group, version) = manifest["kind"], manifest["apiVersion"].split("/")
    name = f"{kind} fields"
    try:
        conn.custom.create_namespaced_custom_object(group, version, namespace, objects.plural(kind), manifest, dry_run="All",
                                                    field_validation="Strict", _request_timeout=TIMEOUT_S)
    except ApiException as e:
        fields = objects.unknown_fields(e)
        if fields is not None:
            return CheckResult(name, False, f"the served {kind} CRD does not know {', '.join(fields)}: "
                                            "its operator is older than what dsnb renders for", upgrade)
        if e.status in (401, 403, 404):
            return CheckResult(name, True, f"not checked: a dry-run create was refused ({_message(e)})", warning=True)
        return CheckResult(name, False, f"a dry-run create failed: {_message(e)}", "see the message; check the spec and PodOptions")
    except (urllib3.exceptions.HTTPError, OSError) as e:
        return CheckResult(name, False, f"a dry-run create failed: {_reason(e)}", "run the check again")
    return CheckResult(name, True, f"the served {kind} CRD takes every field dsnb sets (server-side dry run)")


def check_controller(conn: Connection, what: str, selectors: tuple[str, ...], install: str) -> CheckResult:
    """Whether a running pod of the operator ``what`` can be seen (any namespace, any of ``selectors``).

    Raises:
        Nothing: every outcome is a result; not being allowed to look is a warning.
    """
    found: list[dict[str, Any]] = []
    allowed = False
    for selector in selectors:
        try:
            pods = _list(conn.core.list_pod_for_all_namespaces, label_selector=selector)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            why = _message(e) if isinstance(e, ApiException) else _reason(e)
            return CheckResult(what, False, f"listing its pods failed: {why}", "run the check again", warning=True)
        if pods is not None:
            allowed = True
            found += pods
    return _controller_result(what, found, allowed, install)


def _controller_result(what: str, found: list[dict[str, Any]], allowed: bool, install: str) -> CheckResult:
    """What the operator's pods say: running, not allowed to look, waiting, or absent."""
    running = [p for p in found if (p.get("status") or {}).get("phase") == "Running"]
    if running:
        return CheckResult(what, True, f"{len(running)} pod(s) running in namespace {running[0]['metadata'].get('namespace', '?')}")
    if not allowed:
        return CheckResult(what, False, "cannot list pods across namespaces, so it cannot be seen",
                           f"ask your cluster admin whether {what} runs", warning=True)
    waiting = [p for p in found if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")] or found
    if waiting:
        pod = waiting[0]["metadata"]
        phase = (waiting[0].get("status") or {}).get("phase", "?")
        return CheckResult(what, False, f"its pod {pod['name']} is {phase}, not Running",
                           f"kubectl describe pod -n {pod.get('namespace', '?')} {pod['name']}")
    return CheckResult(what, False, f"no running pod of {what} found", f"install it: {install}")


def check_runtime(conn: Connection, namespace: str, kind: str, runtime: str, install: str) -> CheckResult:
    """Whether the training runtime a TrainJob names exists.

    Raises:
        Nothing: every outcome is a result.
    """
    group, version = "trainer.kubeflow.org", "v1alpha1"
    try:
        if kind == "ClusterTrainingRuntime":
            conn.custom.get_cluster_custom_object(group, version, "clustertrainingruntimes", runtime, _request_timeout=TIMEOUT_S)
        else:
            conn.custom.get_namespaced_custom_object(group, version, namespace, "trainingruntimes", runtime, _request_timeout=TIMEOUT_S)
    except ApiException as e:
        if e.status == 404:
            where = "in the cluster" if kind == "ClusterTrainingRuntime" else f"in namespace {namespace}"
            return CheckResult("runtime", False, f"no {kind} {runtime!r} {where}",
                               f"install the stock runtimes ({install}), or pass runtime= one of cluster.runtimes()")
        if e.status == 403:
            return CheckResult("runtime", False, f"not allowed to read {kind} {runtime!r}, so it cannot be checked",
                               "ask for read access to training runtimes (the Trainer's view role)", warning=True)
        return CheckResult("runtime", False, f"reading {kind} {runtime!r} failed: {_message(e)}", "run the check again")
    except (urllib3.exceptions.HTTPError, OSError) as e:
        return CheckResult("runtime", False, f"reading {kind} {runtime!r} failed: {_reason(e)}", "run the check again")
    return CheckResult("runtime", True, f"{kind} {runtime!r} exists")


#: How to install the KubeRay operator (with its CRDs) from its Helm chart.
KUBERAY_INSTALL = ("helm repo add kuberay https://ray-project.github.io/kuberay-helm/ && "
                   "helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0")
#: The label the KubeRay Helm chart gives the operator's pods.
KUBERAY_SELECTORS = ("app.kubernetes.io/name=kuberay-operator",)


def check_kuberay(conn: Connection, namespace: str, plural: str = "rayjobs", kind: str = "RayJob") -> list[CheckResult]:
    """Whether the API serves KubeRay's ``kind`` (``ray.io/v1``) and a KubeRay operator pod runs.

    Raises:
        Nothing: every outcome is a result.
    """
    return [check_crd(conn, namespace, "ray.io", "v1", plural, kind, KUBERAY_INSTALL),
            check_controller(conn, "KubeRay operator", KUBERAY_SELECTORS, KUBERAY_INSTALL)]


#: The label GPU Feature Discovery (part of the GPU Operator) sets to each GPU's memory, in MiB.
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"


def memory_there(conn: Connection, spec: JobSpec | None) -> MemoryThere:
    """The memory a pod of ``spec`` gets: per GPU from the ``nvidia.com/gpu.memory`` label of the nodes that offer
    the GPUs it asks for (the smallest), per node from its memory limit, else the nodes' allocatable memory.

    Raises:
        Nothing: what cannot be read is None, with the reason in ``source``.
    """
    try:
        nodes = _list(conn.core.list_node)
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
        return MemoryThere(source=f"listing nodes failed: {_message(e) if isinstance(e, ApiException) else _reason(e)}")
    limit = spec.resources.memory if spec is not None else None
    cpu = int(parse_quantity(limit)) if limit else None
    if nodes is None:
        return MemoryThere(cpu=cpu, source="the nodes cannot be listed (forbidden)")
    gpus = spec.resources.gpus if spec is not None else 0
    candidates = [n for n in nodes if not (n.get("spec") or {}).get("unschedulable") and (not gpus or _gpus_of(n) >= gpus)]
    cpu = cpu if cpu is not None else _smallest_allocatable_memory(candidates)
    gpu, source = _smallest_gpu_memory(candidates, gpus)
    return MemoryThere(gpu=gpu, cpu=cpu, source=source)


def _smallest_gpu_memory(nodes: list[dict[str, Any]], gpus: int) -> tuple[int | None, str]:
    """(bytes of the smallest GPU of these nodes by their label, where that came from)."""
    if not gpus:
        return None, "the job asks for no GPUs"
    labelled = [int(v) for n in nodes if str(v := _labels(n).get(GPU_MEMORY_LABEL, "")).isdigit()]
    if not labelled:
        return None, f"no GPU node has the {GPU_MEMORY_LABEL} label (GPU Feature Discovery)"
    return min(labelled) * 2**20, f"{GPU_MEMORY_LABEL} of {len(labelled)} node(s) with {gpus} GPU(s) or more"


def _smallest_allocatable_memory(nodes: list[dict[str, Any]]) -> int | None:
    allocatable = [parse_quantity(m) for n in nodes if (m := _status(n, "allocatable").get("memory"))]
    return int(min(allocatable)) if allocatable else None


def _status(node: dict[str, Any], key: str) -> dict[str, Any]:
    return (node.get("status") or {}).get(key) or {}


def _labels(node: dict[str, Any]) -> dict[str, str]:
    return (node.get("metadata") or {}).get("labels") or {}
