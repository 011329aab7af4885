"""Serving on the Kubernetes job backends: the model server as an always-on job, plus a Service.

``cluster.serve(ServeSpec(...))`` on ``statefulset``, ``mpijob`` and ``trainjob`` runs the job of
:meth:`~dsnb.serving.ServeSpec.to_job_spec` (every rank runs ``python -m dsnb.runtime.server``; rank 0
answers HTTP on ``spec.port``) with the backend's usual manifests, and adds:

- a ``ClusterIP`` Service ``<job>-serve`` (the StatefulSet's headless Service, and the MPI
  Operator's and JobSet's, are called ``<job>``) on ``spec.port`` that selects **only the pod
  hosting rank 0**: each backend names that pod's labels (``serving_selector``, see
  :class:`ServingHost`);
- where it cannot break the job's start-up, a ``containerPort`` and a ``readinessProbe``
  (``GET /readyz``) on the serving container (the backend's ``decorate_serving``).

:class:`KubernetesExposure` does this once for the three backends, as the
:class:`~dsnb.serving.job_serving.ServiceExposure` of their
:class:`~dsnb.serving.job_serving.JobEndpoints`.

Like every object of a job, the Service is owned by the record and deleted when the job ends,
so ``endpoint.stop()`` (a cancel) removes it with the workload.

Readiness comes from Kubernetes, never from calling the in-cluster URL (which a notebook
outside the cluster cannot reach): the rank-0 pod's ``Ready`` condition where its probe is
``/readyz`` (StatefulSet), else the last ``DSNB_SERVE {...}`` line rank 0 printed (MPIJob,
TrainJob), read from the pod logs dsnb follows anyway.

Example:
    >>> from dsnb import Cluster
    >>> from dsnb.serving import ServeSpec
    >>> plan = Cluster("statefulset", namespace="ml").dryrun(ServeSpec(name="tiny", model="m:f", image="img:1"))
    >>> service = plan.manifests[-1]
    >>> service["metadata"]["name"] == plan.name + "-serve", service["spec"]["ports"][0]["port"]
    (True, 8000)
"""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
from typing import TYPE_CHECKING, Any, Protocol

from kubernetes.client.exceptions import ApiException

from dsnb.backends.kubernetes import objects
from dsnb.backends.kubernetes.labels import job_labels
from dsnb.backends.kubernetes.network_policy import allow_serving
from dsnb.backends.kubernetes.pod_status import container_status
from dsnb.errors import InvalidSpecError
from dsnb.serving.job_serving import TOKEN_ENV, JobCatalog, ServiceExposure, serving_spec
from dsnb.status import JobState, JobStatus, node_line_rank

if TYPE_CHECKING:
    from dsnb.backends.base import Plan
    from dsnb.backends.kubernetes.connection import Connection
    from dsnb.backends.kubernetes.pod_options import PodOptions
    from dsnb.backends.logbuffer import JobLogs
    from dsnb.errors import ClusterError
    from dsnb.serving.spec import ServeSpec
    from dsnb.spec import JobSpec

#: The serving Service is ``<job>`` + this.
SERVICE_SUFFIX = "-serve"
#: The name of the serving port on containers and on the Service.
PORT_NAME = "http"
#: What rank 0 prints when it turns ready, ``DSNB_SERVE {"ready": true, "url": "http://0.0.0.0:8000/", ...}``,
#: and when it stops being ready, ``DSNB_SERVE {"ready": false, "reason": "stopped"}``; nothing while it loads.
READY_MARK = "DSNB_SERVE"
DEFAULT_PORT = 8000
#: The longest Kubernetes object name (a DNS-1035 label, as Services need).
MAX_NAME = 63
_READ_LIMIT = 5000


def service_name(job: str) -> str:
    """The serving Service of job ``job``.

    >>> service_name("tiny-x7k2")
    'tiny-x7k2-serve'
    """
    return job + SERVICE_SUFFIX


def serve_port(spec: JobSpec) -> int:
    """The port rank 0 answers on, from the serving job's ``--port`` argument.

    >>> from dsnb.serving import ServeSpec
    >>> serve_port(ServeSpec(name="a", model="m:f", port=9000).to_job_spec())
    9000
    """
    args = list(spec.args or [])
    for i, arg in enumerate(args[:-1]):
        if arg == "--port":
            try:
                return int(args[i + 1])
            except ValueError:
                break
    return DEFAULT_PORT


def readiness_probe(port: int) -> dict[str, Any]:
    """``GET /readyz`` every 5 s: 200 once every rank loaded the model and is connected.

    Not ready never restarts anything (that is what a liveness probe would do, and none is
    set: loading a large model may take many minutes); it only keeps the pod out of the
    Service until the model answers.
    """
    return {"httpGet": {"path": "/readyz", "port": port}, "initialDelaySeconds": 5, "periodSeconds": 5,
            "timeoutSeconds": 2, "successThreshold": 1, "failureThreshold": 3}


def container_port(port: int) -> dict[str, Any]:
    """The serving port as a container declares it."""
    return {"name": PORT_NAME, "containerPort": port, "protocol": "TCP"}


def serve_service(job: str, namespace: str, port: int, selector: dict[str, str]) -> dict[str, Any]:
    """The ``ClusterIP`` Service in front of rank 0: ``<job>-serve:<port>`` → the selected pod's ``<port>``."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": service_name(job), "namespace": namespace, "labels": job_labels(job)},
        "spec": {"type": "ClusterIP", "selector": dict(selector),
                 "ports": [{"name": PORT_NAME, "port": port, "targetPort": port, "protocol": "TCP"}]},
    }


def parse_serve_line(text: str) -> dict[str, Any] | None:
    """The readiness report in one line of rank 0's output, or None when it is no such line.

    >>> parse_serve_line('DSNB_SERVE {"ready": false, "reason": "loading the model"}')
    {'ready': False, 'reason': 'loading the model'}
    >>> parse_serve_line("step 3 loss 2.1") is None
    True
    """
    text = text.strip()
    if not text.startswith(READY_MARK + " "):
        return None
    try:
        found = json.loads(text[len(READY_MARK) + 1:])
    except ValueError:
        return None
    return found if isinstance(found, dict) and "ready" in found else None


def pod_ready(pod: dict[str, Any]) -> bool:
    """Whether the pod's ``Ready`` condition is True (its readiness probes pass)."""
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def matches(selector: dict[str, str], pod: dict[str, Any]) -> bool:
    """Whether a Service with ``selector`` selects ``pod``."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())



def container_running(pod: dict[str, Any], container: str) -> bool:
    """Whether ``container`` of ``pod`` runs now."""
    return bool((container_status(pod, container).get("state") or {}).get("running"))


def not_ready_reason(report: dict[str, Any] | None) -> str | None:
    """Why a ``DSNB_SERVE`` report says rank 0 is not ready; None without a report or when it is ready.

    >>> not_ready_reason({"ready": False, "reason": "stopped"}), not_ready_reason({"ready": True})
    ('stopped', None)
    """
    if report is None or report.get("ready"):
        return None
    return str(report.get("reason") or "not ready")


def readiness_from_probe(pod: str, probe_passes: bool, report: dict[str, Any] | None, port: int) -> tuple[bool, str]:
    """Readiness where rank 0's pod probes ``GET /readyz``: its Ready condition decides; rank 0's last
    ``DSNB_SERVE`` report (``report``) only explains a wait.

    >>> readiness_from_probe("tiny-0", False, {"ready": True}, 8000)
    (False, 'rank 0 reports ready; waiting for pod tiny-0 to pass its readiness probe (GET /readyz on port 8000)')
    """
    if probe_passes:
        return True, f"ready: rank 0 (pod {pod}) passes its readiness probe, GET /readyz on port {port}"
    reason = not_ready_reason(report)
    if reason:
        return False, f"rank 0 (pod {pod}) is not ready: {reason}"
    if report:
        return False, f"rank 0 reports ready; waiting for pod {pod} to pass its readiness probe (GET /readyz on port {port})"
    return False, f"starting the server on rank 0 (pod {pod}): waiting for GET /readyz on port {port} to answer 200"


def readiness_from_lines(pod: str, report: dict[str, Any] | None, port: int, status: JobStatus) -> tuple[bool, str]:
    """Readiness where no probe can be added: rank 0's last ``DSNB_SERVE`` report (``report``) decides.

    >>> from dsnb.status import JobState, JobStatus
    >>> readiness_from_lines("tiny-worker-0", {"ready": True}, 8000, JobStatus(name="tiny", backend="mpijob", state=JobState.RUNNING))
    (True, 'ready: rank 0 (pod tiny-worker-0) answers on port 8000')
    """
    if report and report.get("ready"):
        return True, f"ready: rank 0 (pod {pod}) answers on port {port}"
    reason = not_ready_reason(report)
    if reason:
        return False, f"rank 0 (pod {pod}) is not ready: {reason}"
    if status.state != JobState.RUNNING:
        return False, status.message
    return False, f"loading the model: rank 0 (pod {pod}) has not reported ready yet"


class ServingHost(JobCatalog, Protocol):
    """What :class:`KubernetesExposure` uses of its backend: the job contract's ``jobs`` and
    ``spec_of``, the shared machinery of :class:`~dsnb.backends.kubernetes.backend.KubernetesBackend`,
    and what each job backend says about the pod that hosts rank 0."""

    @property
    def namespace(self) -> str:
        """The namespace jobs go to."""
        ...

    @property
    def conn(self) -> Connection:
        """The API connection."""
        ...

    @property
    def pod_options(self) -> PodOptions:
        """Options for every pod (``serve_ingress_from`` is read here)."""
        ...

    @property
    def container_name(self) -> str:
        """The container whose log holds the job's output."""
        ...

    @property
    def probe_is_readyz(self) -> bool:
        """Whether the rank-0 pod's readiness probe is ``GET /readyz`` (then its Ready condition is the truth)."""
        ...

    @property
    def readiness_note(self) -> str:
        """One sentence for the plan's notes and the docs: how readiness is read on this backend."""
        ...

    def api_error(self, e: ApiException, doing: str) -> ClusterError:
        """A clear error for a refused request."""
        ...

    def job_pods(self, name: str) -> list[dict[str, Any]]:
        """The job's pods."""
        ...

    def job_logs(self, name: str) -> JobLogs:
        """The job's line buffer."""
        ...

    def serving_selector(self, name: str) -> dict[str, str]:
        """The labels of exactly the pod that hosts rank 0 of job ``name``."""
        ...

    def decorate_serving(self, plan: Plan, port: int) -> None:
        """Add the serving port (and a readiness probe where safe) to the plan's pod templates."""
        ...


class KubernetesExposure(ServiceExposure):
    """Serving for a Kubernetes job backend: the Service ``<job>-serve`` in front of rank 0, its
    in-cluster URL (or ``serve_url``), the token from the job's Secret and readiness from Kubernetes.

    Args:
        host: the backend (see :class:`ServingHost`).
        serve_url: where requests go instead of the in-cluster URL, e.g.
            ``"http://127.0.0.1:8000"`` through ``kubectl port-forward svc/<job>-serve 8000:8000``;
            ``{name}``, ``{service}``, ``{namespace}`` and ``{port}`` are filled in, e.g.
            ``"https://{name}.models.example.com"`` behind an Ingress of your own.

    Example:
        >>> from dsnb import Cluster
        >>> exposure = Cluster("statefulset", namespace="ml", serve_url="https://{name}.example.com").backend.job_endpoints.exposure
        >>> exposure.serve_url, exposure.host.readiness_note.split(":")[0]
        ('https://{name}.example.com', 'readiness')
    """

    def __init__(self, host: ServingHost, serve_url: str | None = None) -> None:
        self.host = host
        self.serve_url = serve_url.rstrip("/") if serve_url else None
        self._tokens: dict[str, str] = {}
        self._serve_lines: dict[str, tuple[int, dict[str, Any] | None]] = {}
        self._lock = threading.Lock()

    def rank0_pod(self, name: str, pods: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The pod of ``pods`` that hosts rank 0 (the one the Service selects), if it exists."""
        selector = self.host.serving_selector(name)
        chosen = [p for p in pods if matches(selector, p) and not (p.get("metadata") or {}).get("deletionTimestamp")]
        return chosen[0] if chosen else None

    # -- planning --------------------------------------------------------------------------
    def serving_job(self, spec: ServeSpec) -> JobSpec:
        """The always-on job of ``spec``: no time limit, no restarts (a server never exits on its own).

        Raises:
            InvalidSpecError: several replicas or autoscaling (that is Ray Serve's).
        """
        return dataclasses.replace(spec.to_job_spec(), timeout=None)

    def expose(self, plan: Plan, spec: ServeSpec) -> None:
        """The ports and probes, the NetworkPolicy's serving rule, the serving Service and the notes.

        Raises:
            InvalidSpecError: a name too long for the Service.
        """
        name, namespace, port = plan.name, self.host.namespace, spec.port
        if len(service_name(name)) > MAX_NAME:
            longest = MAX_NAME - len(SERVICE_SUFFIX) - 5
            raise InvalidSpecError("name", f"{name!r} leaves no room for its Service {service_name(name)!r} "
                                   f"({MAX_NAME} characters at most)", f"use at most {longest} characters",
                                   spec="ServeSpec")
        self.host.decorate_serving(plan, port)
        allow_serving(plan.manifests, port, self.host.pod_options.serve_ingress_from)
        plan.manifests.append(serve_service(name, namespace, port, self.host.serving_selector(name)))
        plan.notes += [
            f"serving: Service {service_name(name)} (ClusterIP, port {port}) selects the pod of rank 0 only; "
            f"{self.host.readiness_note}",
            f"in-cluster URL: {self._in_cluster_url(name, port)}; from outside the cluster: kubectl port-forward "
            f"-n {namespace} svc/{service_name(name)} {port}:{port} and serve_url='http://127.0.0.1:{port}'",
        ]
        if spec.token:
            plan.notes.append(f"requests need 'Authorization: Bearer <token>'; the token is in Secret {name}-env "
                              f"(key {TOKEN_ENV}), never in this plan")

    def applied(self, plan: Plan) -> None:
        """Keep the token of the endpoint just created, so that this kernel need not read its Secret."""
        token = plan.extra.get("secret_values", {}).get(f"{plan.name}-env", {}).get(TOKEN_ENV)
        if token:
            with self._lock:
                self._tokens[plan.name] = token

    # -- finding it again ------------------------------------------------------------------
    def _in_cluster_url(self, name: str, port: int) -> str:
        return f"http://{service_name(name)}.{self.host.namespace}.svc:{port}/"

    def endpoint_url(self, name: str) -> str:
        """``http://<job>-serve.<namespace>.svc:<port>/`` (the Service, in the cluster), or ``serve_url``.

        Raises:
            JobNotFound: no endpoint of that name.
        """
        port = serve_port(serving_spec(self.host, name))
        if self.serve_url:
            url = self.serve_url.format(name=name, service=service_name(name), namespace=self.host.namespace, port=port)
            return url.rstrip("/") + "/"
        return self._in_cluster_url(name, port)

    def endpoint_token(self, name: str) -> str | None:
        """The endpoint's token, read from its Secret ``<job>-env`` once (never printed); None without one.

        Raises:
            JobNotFound: no endpoint of that name.
            ClusterError: the Secret may not be read (the Role of ``dsnb rbac`` allows it).
        """
        if TOKEN_ENV not in serving_spec(self.host, name).env:
            return None
        with self._lock:
            known = self._tokens.get(name)
        if known is None:
            known = self._read_token(name)
            if known is not None:
                with self._lock:
                    self._tokens[name] = known
        return known

    def _read_token(self, name: str) -> str | None:
        secret_name = f"{name}-env"
        try:
            secret = objects.read(self.host.conn, "v1", "Secret", secret_name)
        except ApiException as e:
            raise self.host.api_error(e, f"read the token of endpoint {name!r} (Secret {secret_name})") from e
        if secret is None:
            return None  # stopped: the Secret went with the endpoint
        encoded = (secret.get("data") or {}).get(TOKEN_ENV)
        value = base64.b64decode(encoded).decode() if encoded else (secret.get("stringData") or {}).get(TOKEN_ENV)
        return value or None

    # -- readiness -------------------------------------------------------------------------
    def _last_serve_line(self, name: str) -> dict[str, Any] | None:
        """The last ``DSNB_SERVE`` report of rank 0, from the job's followed logs (read once each)."""
        logs = self.host.job_logs(name)
        with self._lock:
            cursor, last = self._serve_lines.get(name, (0, None))
            while True:
                lines, position = logs.read(cursor, None, _READ_LIMIT)
                for line in lines:
                    if line.rank in (0, node_line_rank(0)):
                        found = parse_serve_line(line.text)
                        if found is not None:
                            last = found
                if position == cursor:
                    break
                cursor = position
            self._serve_lines[name] = (cursor, last)
        return last

    def server_ready(self, name: str, status: JobStatus) -> tuple[bool, str]:
        """Whether rank 0 serves, from Kubernetes: its pod's Ready condition where the pod probes
        ``GET /readyz`` (:func:`readiness_from_probe`), else its DSNB_SERVE lines (:func:`readiness_from_lines`).

        Raises:
            JobNotFound: no endpoint of that name.
            ClusterError: the pods or their logs may not be read.
        """
        spec = serving_spec(self.host, name)
        pod = self.rank0_pod(name, self.host.job_pods(name))
        if pod is None or not container_running(pod, self.host.container_name):
            return False, status.message or "waiting for rank 0's pod to start"
        pod_name, port = pod["metadata"]["name"], serve_port(spec)
        report = self._last_serve_line(name)
        if self.host.probe_is_readyz:
            return readiness_from_probe(pod_name, pod_ready(pod), report, port)
        return readiness_from_lines(pod_name, report, port, status)

    def forget(self, name: str) -> None:
        """Drop the token and the readiness lines kept of endpoint ``name`` (its workload, Service and Secret were deleted)."""
        with self._lock:
            self._tokens.pop(name, None)
            self._serve_lines.pop(name, None)
