"""Serving on the Kubernetes job backends: the model server as an always-on job, plus a Service.

``cluster.serve(ServeSpec(...))`` on ``statefulset``, ``mpijob`` and ``trainjob`` runs the job of
:meth:`~dsnb.serving.ServeSpec.to_job_spec` (every rank runs ``python -m dsnb.runtime.server``; rank 0
answers HTTP on ``spec.port``) with the backend's usual manifests, and adds:

- a ``ClusterIP`` Service ``<job>-serve`` (the StatefulSet's headless Service, and the MPI
  Operator's and JobSet's, are called ``<job>``) on ``spec.port`` that selects **only the pod
  hosting rank 0**: each backend names that pod's labels (:meth:`JobServing.serving_selector`);
- where it cannot break the job's start-up, a ``containerPort`` and a ``readinessProbe``
  (``GET /readyz``) on the serving container (:meth:`JobServing.decorate_serving`).

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
from typing import TYPE_CHECKING, Any

from kubernetes.client.exceptions import ApiException

from dsnb.backends.kubernetes import objects
from dsnb.backends.kubernetes.labels import job_labels
from dsnb.backends.kubernetes.network_policy import allow_serving
from dsnb.backends.kubernetes.pod_status import container_status
from dsnb.errors import InvalidSpecError
from dsnb.serving.job_serving import TOKEN_ENV, ServesAsJob
from dsnb.status import JobState, JobStatus, node_line_rank

if TYPE_CHECKING:
    from dsnb.backends.base import Plan
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


class JobServing(ServesAsJob):
    """``serve`` for a Kubernetes job backend (mixed in before :class:`KubernetesBackend`).

    Args:
        serve_url: where requests go instead of the in-cluster URL, e.g.
            ``"http://127.0.0.1:8000"`` through ``kubectl port-forward svc/<job>-serve 8000:8000``;
            ``{name}``, ``{service}``, ``{namespace}`` and ``{port}`` are filled in, e.g.
            ``"https://{name}.models.example.com"`` behind an Ingress of your own.
        **options: the backend's own options.

    A backend says which pod hosts rank 0 (:meth:`serving_selector`, :meth:`rank0_pod`),
    adds ports and probes where they are safe (:meth:`decorate_serving`), and whether that
    pod's readiness probe is ``/readyz`` (:attr:`probe_is_readyz`).
    """

    #: Whether the rank-0 pod's readiness probe is ``GET /readyz`` (then its Ready condition is the truth).
    probe_is_readyz = False
    #: One sentence for the plan's notes and the docs: how readiness is read on this backend.
    readiness_note = "readiness: the last DSNB_SERVE line rank 0 printed"

    def __init__(self, *args: Any, serve_url: str | None = None, **options: Any) -> None:
        super().__init__(*args, **options)
        self.serve_url = serve_url.rstrip("/") if serve_url else None
        self._tokens: dict[str, str] = {}
        self._serve_lines: dict[str, tuple[int, dict[str, Any] | None]] = {}

    # -- what each backend says ------------------------------------------------------------
    def serving_selector(self, name: str) -> dict[str, str]:
        """The labels of exactly the pod that hosts rank 0 of job ``name``."""
        raise NotImplementedError

    def decorate_serving(self, plan: Plan, port: int) -> None:
        """Add the serving port (and a readiness probe where safe) to the plan's pod templates."""

    def rank0_pod(self, name: str, pods: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The pod of ``pods`` that hosts rank 0 (the one the Service selects), if it exists."""
        selector = self.serving_selector(name)
        chosen = [p for p in pods if matches(selector, p) and not (p.get("metadata") or {}).get("deletionTimestamp")]
        return chosen[0] if chosen else None

    # -- planning and applying -------------------------------------------------------------
    def serving_job(self, spec: ServeSpec) -> JobSpec:
        """The always-on job of ``spec``: no time limit, no restarts (a server never exits on its own).

        Raises:
            InvalidSpecError: several replicas or autoscaling (that is Ray Serve's).
        """
        return dataclasses.replace(spec.to_job_spec(), timeout=None)

    def serve_plan(self, spec: ServeSpec) -> Plan:
        """The job's manifests under a unique name, the ports and probes, and the serving Service.

        Raises:
            InvalidSpecError: the spec cannot be served here (replicas, no image, a name too long
                for the Service).
        """
        plan = self.dryrun(self.serving_job(spec))  # type: ignore[attr-defined]
        name, namespace = plan.name, self.namespace  # type: ignore[attr-defined]
        if len(service_name(name)) > MAX_NAME:
            longest = MAX_NAME - len(SERVICE_SUFFIX) - 5
            raise InvalidSpecError("name", f"{plan.name!r} leaves no room for its Service {service_name(name)!r} "
                                   f"({MAX_NAME} characters at most)", f"use at most {longest} characters",
                                   spec="ServeSpec")
        port = spec.port
        self.decorate_serving(plan, port)
        allow_serving(plan.manifests, port, self.pod_options.serve_ingress_from)  # type: ignore[attr-defined]
        plan.manifests.append(serve_service(name, namespace, port, self.serving_selector(name)))
        plan.notes += [
            f"serving: Service {service_name(name)} (ClusterIP, port {port}) selects the pod of rank 0 only; "
            f"{self.readiness_note}",
            f"in-cluster URL: {self._in_cluster_url(name, port)}; from outside the cluster: kubectl port-forward "
            f"-n {namespace} svc/{service_name(name)} {port}:{port} and serve_url='http://127.0.0.1:{port}'",
        ]
        if spec.token:
            plan.notes.append(f"requests need 'Authorization: Bearer <token>'; the token is in Secret {name}-env "
                              f"(key {TOKEN_ENV}), never in this plan")
        return plan

    def apply_serve(self, plan: Plan) -> None:
        """Create the record, then everything else owned by it; undo all on a refusal.

        Raises:
            ClusterError: the API refused (e.g. the operator's CRD is missing: how to install it).
        """
        self.apply(plan)  # type: ignore[attr-defined]
        token = plan.extra.get("secret_values", {}).get(f"{plan.name}-env", {}).get(TOKEN_ENV)
        if token:
            self._tokens[plan.name] = token

    # -- finding it again ------------------------------------------------------------------
    def _in_cluster_url(self, name: str, port: int) -> str:
        return f"http://{service_name(name)}.{self.namespace}.svc:{port}/"  # type: ignore[attr-defined]

    def endpoint_url(self, name: str) -> str:
        """``http://<job>-serve.<namespace>.svc:<port>/`` (the Service, in the cluster), or ``serve_url``.

        Raises:
            JobNotFound: no endpoint of that name.
        """
        port = serve_port(self._serving_spec(name))
        if self.serve_url:
            url = self.serve_url.format(name=name, service=service_name(name), namespace=self.namespace, port=port)  # type: ignore[attr-defined]
            return url.rstrip("/") + "/"
        return self._in_cluster_url(name, port)

    def serving_token(self, name: str) -> str | None:
        """The endpoint's token, read from its Secret ``<job>-env`` (never printed); None without one.

        Raises:
            JobNotFound: no endpoint of that name.
            ClusterError: the Secret may not be read (the Role of ``dsnb rbac`` allows it).
        """
        spec = self._serving_spec(name)
        if TOKEN_ENV not in spec.env:
            return None
        if name not in self._tokens:
            secret_name = f"{name}-env"
            try:
                secret = objects.read(self.conn, "v1", "Secret", secret_name)  # type: ignore[attr-defined]
            except ApiException as e:
                raise self._api_error(e, f"read the token of endpoint {name!r} (Secret {secret_name})") from e  # type: ignore[attr-defined]
            if secret is None:
                return None  # stopped: the Secret went with the endpoint
            encoded = (secret.get("data") or {}).get(TOKEN_ENV)
            value = base64.b64decode(encoded).decode() if encoded else (secret.get("stringData") or {}).get(TOKEN_ENV)
            if not value:
                return None
            self._tokens[name] = value
        return self._tokens[name]

    # -- readiness -------------------------------------------------------------------------
    def _last_serve_line(self, name: str) -> dict[str, Any] | None:
        """The last ``DSNB_SERVE`` report of rank 0, from the job's followed logs (read once each)."""
        logs = self._job_logs(name)  # type: ignore[attr-defined]
        with self._lock:  # type: ignore[attr-defined]
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
        """Whether rank 0 serves, from Kubernetes (its pod's Ready condition, or its DSNB_SERVE lines).

        Raises:
            JobNotFound: no endpoint of that name.
        """
        spec = self._serving_spec(name)
        port = serve_port(spec)
        pod = self.rank0_pod(name, self._job_pods(name))  # type: ignore[attr-defined]
        running = pod is not None and bool((container_status(pod, self.container_name).get("state") or {}).get("running"))  # type: ignore[attr-defined]
        if pod is None or not running:
            return False, status.message or "waiting for rank 0's pod to start"
        pod_name = pod["metadata"]["name"]
        report = self._last_serve_line(name)
        reason = str(report.get("reason") or "not ready") if report and not report.get("ready") else None
        if self.probe_is_readyz:
            if pod_ready(pod):
                return True, f"ready: rank 0 (pod {pod_name}) passes its readiness probe, GET /readyz on port {port}"
            if reason:
                return False, f"rank 0 (pod {pod_name}) is not ready: {reason}"
            if report:
                return False, f"rank 0 reports ready; waiting for pod {pod_name} to pass its readiness probe (GET /readyz on port {port})"
            return False, f"starting the server on rank 0 (pod {pod_name}): waiting for GET /readyz on port {port} to answer 200"
        if report and report.get("ready"):
            return True, f"ready: rank 0 (pod {pod_name}) answers on port {port}"
        if reason:
            return False, f"rank 0 (pod {pod_name}) is not ready: {reason}"
        if status.state != JobState.RUNNING:
            return False, status.message
        return False, f"loading the model: rank 0 (pod {pod_name}) has not reported ready yet"

    def stop_endpoint(self, name: str) -> JobStatus:
        """Cancel the job: its workload, the serving Service and the Secret are deleted; safe to call again.

        Raises:
            JobNotFound: no endpoint of that name.
        """
        final = super().stop_endpoint(name)
        self._tokens.pop(name, None)
        self._serve_lines.pop(name, None)
        return final
