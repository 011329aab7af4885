"""A RayJob's and a RayService's status, as tables of rules tried in order (see :mod:`.status_rules`).

What the rules read follows KubeRay v1.7.0 (``ray-operator/controllers/ray/rayjob_controller.go``
and ``rayservice_controller.go``): a RayJob's ``jobDeploymentStatus`` (where KubeRay is: the
cluster, the submission, the end) and, once the Ray job runs, ``jobStatus`` (Ray's own); a
RayService's ``Ready`` condition and its Serve application's status. A pod problem KubeRay
waits on forever (an image that cannot be pulled, a crash loop, a missing Secret) fails the
work with its diagnosis; a pod killed for memory or evicted is Ray's to handle.

Example:
    >>> from dsnb import JobSpec
    >>> from dsnb.backends.kubernetes.status_rules import first_status
    >>> reading = RayJobReading("t-x7k2", "kuberay", JobSpec(name="t-x7k2", command=["true"]), None, (),
    ...     workload={"status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}})
    >>> first_status(reading, RAYJOB_RULES).message
    'the Ray job succeeded'
    >>> first_status(ServiceReading("s-x7k2", "kuberay", None, None, ()), SERVICE_RULES).state.value
    'CANCELLED'
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from dsnb.backends.kubernetes.diagnose import Diagnosis, classify
from dsnb.backends.kubernetes.labels import role
from dsnb.backends.kubernetes.pod_status import parse_time
from dsnb.backends.kubernetes.status_rules import Pod, Reading
from dsnb.status import JobState, JobStatus, ReplicaStatus

__all__ = ["RAYJOB_RULES", "RAY_HANDLES", "SERVICE_RULES", "RayJobReading", "ServiceReading"]

#: Pod problems Ray recovers from or reports itself, so they do not end the work on their own.
RAY_HANDLES = ("OOMKilled", "Evicted")
#: What KubeRay's ``reason`` of a failed RayJob means, in words.
FAILED_REASONS = {
    "DeadlineExceeded": "the job ran longer than its timeout (activeDeadlineSeconds) and was stopped",
    "SubmissionFailed": "the submitter could not submit the Ray job",
    "AppFailed": "the Ray job failed",
    "JobDeploymentStatusTransitionGracePeriodExceeded": "KubeRay lost track of the Ray job",
}
OPERATOR_HINT = "kubectl get pods -A -l app.kubernetes.io/name=kuberay-operator"


def _ray_pods(pods: tuple[Pod, ...]) -> list[Pod]:
    return [p for p in pods if role(p) in ("head", "worker")]


def _fatal(pods: list[Pod], events: Any = None) -> Diagnosis | None:
    """The first pod's (by name) problem that KubeRay would wait on forever."""
    found = sorted((p["metadata"]["name"], d) for p in pods
                   if (d := classify(p, (events or {}).get(p["metadata"]["name"]))) is not None
                   and d.fatal and d.reason not in RAY_HANDLES)
    return found[0][1] if found else None


# -- RayJob -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RayJobReading(Reading):
    """A Reading of a RayJob: ``pods`` without the ones being deleted; ``namespace`` for the hints."""

    namespace: str = "default"

    @cached_property
    def fields(self) -> dict[str, Any]:
        return dict(self.workload.get("status") or {})

    @property
    def deployment(self) -> str:
        return self.fields.get("jobDeploymentStatus") or ""

    @property
    def ray_status(self) -> str:
        return self.fields.get("jobStatus") or ""

    @property
    def said(self) -> str:
        return (self.fields.get("message") or "").strip()

    @property
    def started_at(self) -> float | None:
        info = self.fields.get("rayJobInfo") or {}
        return parse_time(info.get("startTime")) or parse_time(self.fields.get("startTime"))

    def replicas(self, state: JobState) -> tuple[ReplicaStatus, ...]:
        return tuple(ReplicaStatus(rank=r, state=state) for r in range(self.spec.world_size))

    def made(self, state: JobState, message: str, **fields: Any) -> JobStatus:
        return self.status(state, self.replicas(state), message=message, **fields)

    def ended(self, state: JobState, message: str) -> JobStatus:
        info = self.fields.get("rayJobInfo") or {}
        return self.made(state, message, finished_at=parse_time(self.fields.get("endTime")) or parse_time(info.get("endTime")))


def job_succeeded(r: RayJobReading) -> JobStatus | None:
    return r.ended(JobState.SUCCEEDED, "the Ray job succeeded") if (r.deployment, r.ray_status) == ("Complete", "SUCCEEDED") else None


def job_stopped(r: RayJobReading) -> JobStatus | None:
    if r.deployment in ("Complete", "Failed") and r.ray_status == "STOPPED":
        return r.ended(JobState.CANCELLED, "the Ray job was stopped outside dsnb (ray job stop)")
    return None


def job_refused(r: RayJobReading) -> JobStatus | None:
    if r.deployment != "ValidationFailed":  # KubeRay gives up on it for good
        return None
    return r.ended(JobState.FAILED, f"KubeRay refused the RayJob: {r.said}" if r.said else "KubeRay refused the RayJob (ValidationFailed)")


def job_failed(r: RayJobReading) -> JobStatus | None:
    if r.deployment not in ("Complete", "Failed"):
        return None
    reason = r.fields.get("reason") or ""
    what = FAILED_REASONS.get(reason) or ("the Ray job failed" if r.ray_status == "FAILED" else "the RayJob failed")
    if reason == "SubmissionFailed":
        what += f" (its log: kubectl logs -n {r.namespace} job/{r.name})"
    return r.ended(JobState.FAILED, f"{what}: {r.said}" if r.said else what)


def job_pod_cannot_run(r: RayJobReading) -> JobStatus | None:
    # A pod that died (OOMKilled, evicted) is Ray's to handle (a worker lost, FailureConfig retries)
    # and the RayJob reports the outcome; only what KubeRay would wait on forever fails the job here.
    fatal = _fatal(list(r.pods), r.events)
    return None if fatal is None else r.made(JobState.FAILED, str(fatal))


def job_suspended(r: RayJobReading) -> JobStatus | None:
    if r.deployment not in ("Suspending", "Suspended"):
        return None
    return r.made(JobState.PENDING, "the RayJob is suspended (e.g. waiting in a Kueue queue)")


def job_retrying(r: RayJobReading) -> JobStatus | None:
    if r.deployment != "Retrying":
        return None
    attempts = int(r.fields.get("failed") or 0)
    return r.made(JobState.STARTING, f"attempt {attempts} failed; KubeRay retries on a new Ray cluster"
                                     f"{f' ({r.said})' if r.said else ''}")


def job_running(r: RayJobReading) -> JobStatus | None:
    if (r.deployment, r.ray_status) != ("Running", "RUNNING"):
        return None
    return r.made(JobState.RUNNING, f"Ray Train: {r.spec.world_size} worker(s) on {r.spec.nodes} Ray worker pod(s)")


def job_driver_starting(r: RayJobReading) -> JobStatus | None:
    if r.deployment not in ("Running", "Waiting"):
        return None
    waiting = r.waiting
    return r.made(JobState.STARTING, waiting[0] if waiting else "the Ray cluster is up; the driver is starting "
                                                                "(runtime environment, placement of the workers)")


def job_cluster_starting(r: RayJobReading) -> JobStatus | None:
    ray_pods = _ray_pods(r.pods)
    if not any((p.get("spec") or {}).get("nodeName") for p in ray_pods):
        return None
    running = [p for p in ray_pods if (p.get("status") or {}).get("phase") == "Running"]
    waiting = r.waiting
    return r.made(JobState.STARTING, waiting[0] if waiting else
                  f"the Ray cluster starts: {len(running)} of {r.spec.nodes + 1} pod(s) running")


def job_pending(r: RayJobReading) -> JobStatus:
    waiting = r.waiting
    if waiting:
        return r.made(JobState.PENDING, waiting[0])
    if not r.workload or not r.deployment:
        return r.made(JobState.PENDING, f"waiting for the KubeRay operator to take the RayJob ({OPERATOR_HINT})")
    return r.made(JobState.PENDING, f"KubeRay creates the Ray cluster ({len(_ray_pods(r.pods))} of {r.spec.nodes + 1} pod(s) so far)")


#: A RayJob's rules, in the order they are tried: an end KubeRay reports, a pod that cannot
#: run, then how far KubeRay has come.
RAYJOB_RULES = (job_succeeded, job_stopped, job_refused, job_failed, job_pod_cannot_run, job_suspended,
                job_retrying, job_running, job_driver_starting, job_cluster_starting, job_pending)


# -- RayService ---------------------------------------------------------------------------------

def app_message(app: dict[str, Any]) -> str:
    """Serve's message on an application, else the first unhealthy deployment's; a failure's in full (its traceback).

    Example:
        >>> app_message({"serveDeploymentStatuses": {"M": {"status": "UNHEALTHY", "message": "boom"}}})
        'boom'
    """
    message = (app.get("message") or "").strip()
    if not message:
        for deployment in (app.get("serveDeploymentStatuses") or {}).values():
            if (deployment or {}).get("status") != "HEALTHY" and (deployment or {}).get("message"):
                message = deployment["message"].strip()
                break
    if not message:
        return ""
    return message[-2000:] if app.get("status") == "DEPLOY_FAILED" else message.splitlines()[-1][:500]


@dataclass(frozen=True)
class ServiceReading:
    """An endpoint's inputs to its status: its RayService (None once deleted) and Ray pods."""

    name: str
    backend: str
    created_at: float | None
    service: dict[str, Any] | None
    pods: tuple[Pod, ...]

    @cached_property
    def fields(self) -> dict[str, Any]:
        return dict((self.service or {}).get("status") or {})

    @cached_property
    def ready(self) -> dict[str, Any]:
        conditions = {c.get("type"): c for c in self.fields.get("conditions") or [] if isinstance(c, dict)}
        return conditions.get("Ready") or {}

    @property
    def serving(self) -> bool:
        """KubeRay's Ready condition (``serviceStatus: Running`` before conditions existed)."""
        return self.ready.get("status") == "True" if self.ready else self.fields.get("serviceStatus") == "Running"

    @cached_property
    def app(self) -> dict[str, Any]:
        """The Serve application: active, or pending until KubeRay first promotes the cluster."""
        active = (self.fields.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
        pending = (self.fields.get("pendingServiceStatus") or {}).get("applicationStatuses") or {}
        return active.get(self.name) or pending.get(self.name) or {}

    @property
    def app_status(self) -> str:
        return self.app.get("status") or ""

    @cached_property
    def said(self) -> str:
        return app_message(self.app)

    @cached_property
    def workers(self) -> list[Pod]:
        return sorted((p for p in self.pods if role(p) == "worker"), key=lambda p: p["metadata"]["name"])

    @cached_property
    def ray_pods(self) -> list[Pod]:
        return _ray_pods(self.pods)

    @property
    def expected(self) -> int:
        groups = (((self.service or {}).get("spec") or {}).get("rayClusterConfig") or {}).get("workerGroupSpecs") or []
        return 1 + sum(int(g.get("replicas") or 0) for g in groups)

    def refused_for_good(self, reason: str) -> str | None:
        """The Ready condition's message when it is False for ``reason``, else None."""
        if self.ready.get("status") == "False" and self.ready.get("reason") == reason:
            return (self.ready.get("message") or "").strip()
        return None

    def made(self, state: JobState, message: str, **fields: Any) -> JobStatus:
        """A status, with one replica per Ray worker pod (STARTING until the pod runs)."""
        replicas = []
        for rank, pod in enumerate(self.workers):
            running = (pod.get("status") or {}).get("phase") == "Running"
            shown = JobState.STARTING if state == JobState.RUNNING and not running else state
            replicas.append(ReplicaStatus(rank=rank, state=shown, host=(pod.get("spec") or {}).get("nodeName"),
                                          message=f"Ray worker pod {pod['metadata']['name']}"))
        return JobStatus(name=self.name, backend=self.backend, created_at=self.created_at, state=state,
                         replicas=tuple(replicas), message=message, **fields)


def service_gone(r: ServiceReading) -> JobStatus | None:
    if r.service is not None:
        return None
    return JobStatus(name=r.name, backend=r.backend, created_at=r.created_at, state=JobState.CANCELLED,
                     message="the RayService is gone (deleted outside dsnb); endpoint.stop() removes its record")


def service_refused(r: ServiceReading) -> JobStatus | None:
    told = r.refused_for_good("ValidationFailed")  # for good
    if told is None:
        return None
    return r.made(JobState.FAILED, f"KubeRay refused the RayService: {told}" if told else "KubeRay refused the RayService (ValidationFailed)")


def service_timed_out(r: ServiceReading) -> JobStatus | None:
    told = r.refused_for_good("InitializingTimeout")
    if told is None:
        return None
    return r.made(JobState.FAILED, "KubeRay gave up: the RayService was not ready within its initializing timeout"
                                   + (f" ({told})" if told else "") + (f"; {r.said}" if r.said else ""))


def app_failed(r: ServiceReading) -> JobStatus | None:
    if r.app_status != "DEPLOY_FAILED":
        return None
    return r.made(JobState.FAILED, f"the Serve application failed to deploy: {r.said}" if r.said
                  else "the Serve application failed to deploy (kubectl describe rayservice shows Serve's message)")


def service_pod_cannot_run(r: ServiceReading) -> JobStatus | None:
    fatal = _fatal(r.ray_pods)
    return None if fatal is None else r.made(JobState.FAILED, str(fatal))


def serving(r: ServiceReading) -> JobStatus | None:
    if not r.serving:
        return None
    started = parse_time(r.ready.get("lastTransitionTime"))
    if r.app_status == "UNHEALTHY":
        return r.made(JobState.RUNNING, f"unhealthy: {r.said}" if r.said else "unhealthy", started_at=started)
    return r.made(JobState.RUNNING, f"Ray Serve answers with {len(r.workers)} Ray worker pod(s) "
                                    f"({r.fields.get('numServeEndpoints', 0)} serve endpoint(s))", started_at=started)


_APP_STARTING = {
    "NOT_STARTED": lambda said: "the replicas load the model (Serve application DEPLOYING)" + (f": {said}" if said else ""),
    "DEPLOYING": lambda said: "the replicas load the model (Serve application DEPLOYING)" + (f": {said}" if said else ""),
    "UNHEALTHY": lambda said: f"unhealthy: {said}" if said else "unhealthy",
    "RUNNING": lambda said: "the application runs; KubeRay points its serve Service at the Ray pods",
}


def app_starting(r: ServiceReading) -> JobStatus | None:
    say = _APP_STARTING.get(r.app_status)
    return None if say is None else r.made(JobState.STARTING, say(r.said))


def _waiting(r: ServiceReading) -> list[str]:
    return [str(d) for d in (classify(p) for p in r.ray_pods) if d is not None]


def service_cluster_starting(r: ServiceReading) -> JobStatus | None:
    if not any((p.get("spec") or {}).get("nodeName") for p in r.ray_pods):
        return None
    waiting = _waiting(r)
    running = [p for p in r.ray_pods if (p.get("status") or {}).get("phase") == "Running"]
    return r.made(JobState.STARTING, waiting[0] if waiting else
                  f"the Ray cluster starts: {len(running)} of {r.expected} pod(s) running"
                  + ("; then Serve deploys the application" if len(running) == r.expected else ""))


def service_pending(r: ServiceReading) -> JobStatus:
    waiting = _waiting(r)
    if waiting:
        return r.made(JobState.PENDING, waiting[0])
    if not r.fields:
        return r.made(JobState.PENDING, f"waiting for the KubeRay operator to take the RayService ({OPERATOR_HINT})")
    return r.made(JobState.PENDING, f"KubeRay creates the Ray cluster ({len(r.ray_pods)} of {r.expected} pod(s) so far)")


#: A RayService's rules, in the order they are tried: gone, refused or failed for good, a pod
#: that cannot run, serving, then how far the start has come.
SERVICE_RULES = (service_gone, service_refused, service_timed_out, app_failed, service_pod_cannot_run, serving,
                 app_starting, service_cluster_starting, service_pending)
