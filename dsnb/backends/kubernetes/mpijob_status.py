"""An MPIJob's status, as a table of rules tried in order (see :mod:`.status_rules`).

What each rule reads follows the MPI Operator v0.8.0 (``pkg/controller/mpi_job_controller.go``):
the MPIJob's conditions (``Succeeded``/``Failed`` copied from the launcher Job, ``Running``
once the launcher runs and every worker is ready, ``Suspended``, ``Restarting``), and the
worker pods, which the operator names ``<job>-worker-<i>`` and stops once the job ended.

Example:
    >>> from dsnb import JobSpec
    >>> from dsnb.backends.kubernetes.status_rules import first_status
    >>> reading = MPIReading("t-x7k2", "mpijob", JobSpec(name="t-x7k2", command=["true"], nodes=2), None, (),
    ...                      workload={"status": {"conditions": [{"type": "Succeeded", "status": "True"}]}})
    >>> first_status(reading, RULES).state.value
    'SUCCEEDED'
"""

from __future__ import annotations

from functools import cached_property

from dsnb.backends.kubernetes.labels import role
from dsnb.backends.kubernetes.pod_status import container_status, terminating
from dsnb.backends.kubernetes.pod_template import CONTAINER
from dsnb.backends.kubernetes.status_rules import Pod, Reading
from dsnb.status import JobState, JobStatus, ReplicaStatus

SSHD_PORT = 2222

__all__ = ["RULES", "MPIReading"]


class MPIReading(Reading):
    """A Reading with the MPIJob's workers (by node) and launchers."""

    @cached_property
    def workers(self) -> dict[int, Pod]:
        """The worker pods by node (the number at the end of the operator's name)."""
        return {int(p["metadata"]["name"].rsplit("-", 1)[1]): p for p in self.pods if role(p) == "worker"}

    @cached_property
    def launchers(self) -> list[Pod]:
        """The launcher pods (one; more while the launcher Job retries)."""
        return [p for p in self.pods if role(p) == "launcher"]

    def replicas(self, state_of: object) -> tuple[ReplicaStatus, ...]:
        """One replica per rank: ``state_of`` is a JobState, or a function of the node."""
        procs = self.spec.procs_per_node
        # Worker pods are named by the operator <job>-worker-<i>, also after cleanPodPolicy removed them.
        return tuple(ReplicaStatus(rank=r, state=state_of(r // procs) if callable(state_of) else state_of,
                                   host=f"{self.name}-worker-{r // procs}") for r in range(self.spec.world_size))

    def worker_state(self, node: int) -> JobState:
        """PENDING until scheduled, STARTING until its container runs, then RUNNING once the job runs."""
        pod = self.workers.get(node)
        if pod is None:
            return JobState.PENDING
        if (container_status(pod, CONTAINER).get("state") or {}).get("running"):
            return JobState.RUNNING if "Running" in self.conditions else JobState.STARTING
        return JobState.STARTING if (pod.get("spec") or {}).get("nodeName") else JobState.PENDING

    def failed(self, message: str, **fields: object) -> JobStatus:
        """FAILED, every rank with it."""
        return self.status(JobState.FAILED, self.replicas(JobState.FAILED), message=message, **fields)


def succeeded(r: MPIReading) -> JobStatus | None:
    if "Succeeded" not in r.conditions:
        return None
    return r.status(JobState.SUCCEEDED, r.replicas(JobState.SUCCEEDED), message="the launcher finished",
                    finished_at=r.condition_time("Succeeded"))


def failed(r: MPIReading) -> JobStatus | None:
    condition = r.conditions.get("Failed")
    if condition is None:
        return None
    # The operator copies the launcher Job's reason (DeadlineExceeded, BackoffLimitExceeded/...) and message.
    said, why = condition.get("message") or "", condition.get("reason") or ""
    informative = said and why and why != "Failed" and why not in said
    return r.failed(f"{said} ({why})" if informative else said or why or "the MPIJob failed",
                    finished_at=r.condition_time("Failed"))


def _worker_stopped_because(pod: Pod, terminated: dict) -> str:
    name, code = pod["metadata"]["name"], terminated.get("exitCode")
    said = (terminated.get("message") or "").strip()
    if terminated.get("reason") == "StartError" and "operation not permitted" in said:
        return (f"worker {name} could not start sshd: {said}. Fix: the kernel refuses to run a program whose "
                "file capabilities its container may not have (sshd in images built FROM mpioperator/openmpi "
                "carries NET_BIND_SERVICE, which dsnb keeps); check the capabilities PodOptions or an admission "
                "policy drop")
    return (f"worker {name} stopped (exit code {code}) before the job ended: "
            f"{said + '; ' if said else ''}its sshd must keep running; check the image has sshd set up "
            f"for mpiuser on port {SSHD_PORT} (read its log: kubectl logs {name})")


def worker_stopped(r: MPIReading) -> JobStatus | None:
    """A worker whose sshd ended while the job runs: mpirun cannot reach it, so the job has failed."""
    for node, pod in sorted(r.workers.items()):
        if terminating(pod):
            continue  # being deleted: the MPI Operator stops workers once the job ended, before its status says so
        terminated = (container_status(pod, CONTAINER).get("state") or {}).get("terminated")
        if terminated or (pod.get("status") or {}).get("phase") == "Failed":
            return r.failed(_worker_stopped_because(pod, terminated or {}), failed_rank=node * r.spec.procs_per_node,
                            exit_code=(terminated or {}).get("exitCode"))
    return None


def pod_cannot_run(r: MPIReading) -> JobStatus | None:
    found = r.fatal
    if found is None:
        return None
    pod, diagnosis = found
    node = None if role(pod) == "launcher" else int(pod["metadata"]["name"].rsplit("-", 1)[1])
    return r.failed(str(diagnosis), failed_rank=None if node is None else node * r.spec.procs_per_node)


def suspended(r: MPIReading) -> JobStatus | None:
    if "Suspended" not in r.conditions:
        return None
    return r.status(JobState.PENDING, r.replicas(JobState.PENDING), message="the MPIJob is suspended")


def running(r: MPIReading) -> JobStatus | None:
    if "Running" not in r.conditions:
        return None
    message = ("restarting the launcher" if "Restarting" in r.conditions
               else f"{r.spec.world_size} rank(s) on {r.spec.nodes} worker(s)")
    return r.status(JobState.RUNNING, r.replicas(r.worker_state), message=message)


def starting(r: MPIReading) -> JobStatus | None:
    states = [r.worker_state(n) for n in range(r.spec.nodes)]
    if not r.launchers and not {JobState.STARTING, JobState.RUNNING} & set(states):
        return None
    ready = sum(state != JobState.PENDING for state in states)
    waiting = r.waiting
    return r.status(JobState.STARTING, r.replicas(r.worker_state),
                    message=waiting[0] if waiting else f"{ready} of {r.spec.nodes} worker(s) scheduled; "
                                                       "the launcher starts when all are ready")


def pending(r: MPIReading) -> JobStatus:
    waiting = r.waiting
    if waiting:
        message = waiting[0]
    elif not r.workload or not r.pods:
        message = "waiting for the MPI Operator to create the pods"
    else:
        message = f"{len(r.workers)} worker(s) waiting to be scheduled"
    return r.status(JobState.PENDING, r.replicas(r.worker_state), message=message)


#: The rules, in the order they are tried: an end the operator reports, a failure it has not
#: reported yet, then how far the start has come.
RULES = (succeeded, failed, worker_stopped, pod_cannot_run, suspended, running, starting, pending)
