"""Status as data: what a Kubernetes backend reads once, and its rules tried in order.

A backend's status is the first answer of an ordered table of rules, each one condition of
the job (the operator says it succeeded; a worker stopped; a pod cannot start; ...) and the
status it means. What every rule reads (the workload's true conditions, the pods' diagnoses,
the fields every status carries) is read once here, in :class:`Reading`.

Example:
    >>> from dsnb import JobSpec
    >>> reading = Reading("tiny-x7k2", "mpijob", JobSpec(name="tiny-x7k2", command=["true"]), None, (),
    ...                   workload={"status": {"conditions": [{"type": "Running", "status": "True"}]}})
    >>> sorted(reading.conditions)
    ['Running']
    >>> first_status(reading, [lambda r: None, lambda r: r.status(JobState.RUNNING, message="up")]).message
    'up'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from dsnb.backends.kubernetes.diagnose import Diagnosis, classify
from dsnb.backends.kubernetes.pod_status import parse_time
from dsnb.spec import JobSpec
from dsnb.status import JobState, JobStatus, ReplicaStatus

Pod = dict[str, Any]


@dataclass(frozen=True)
class Reading:
    """One job's inputs to its status: pure data, no API calls.

    Attributes:
        name: the job.
        backend: the backend's name, for the status.
        spec: the job's spec.
        created_at: when its record was made.
        pods: the job's pods.
        events: Warning events of its pods that have not started, by pod name.
        workload: the backend's custom object (MPIJob, TrainJob, RayJob), if it has one.
    """

    name: str
    backend: str
    spec: JobSpec
    created_at: float | None
    pods: tuple[Pod, ...]
    events: Mapping[str, list[dict[str, Any]]] = field(default_factory=dict)
    workload: Mapping[str, Any] = field(default_factory=dict)

    @cached_property
    def conditions(self) -> dict[str, dict[str, Any]]:
        """The workload's conditions whose status is ``"True"``, by type."""
        status = self.workload.get("status") or {}
        return {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}

    def condition_time(self, *types: str) -> float | None:
        """When the first of these conditions that holds became true."""
        for kind in types:
            if kind in self.conditions:
                return parse_time(self.conditions[kind].get("lastTransitionTime"))
        return None

    @cached_property
    def diagnoses(self) -> tuple[tuple[Pod, Diagnosis], ...]:
        """Each pod with a problem and the problem, in the order of :meth:`diagnosed`."""
        found = []
        for pod in self.diagnosed():
            diagnosis = classify(pod, self.events.get(pod["metadata"]["name"]))
            if diagnosis is not None:
                found.append((pod, diagnosis))
        return tuple(found)

    def diagnosed(self) -> tuple[Pod, ...]:
        """The pods whose problems count (all of them, unless a backend knows some have ended)."""
        return self.pods

    @property
    def fatal(self) -> tuple[Pod, Diagnosis] | None:
        """The pod (first by name) whose problem waiting will not fix, and that problem."""
        fatal = sorted(((pod, d) for pod, d in self.diagnoses if d.fatal), key=lambda found: found[0]["metadata"]["name"])
        return fatal[0] if fatal else None

    @property
    def waiting(self) -> list[str]:
        """Every pod problem, as one line each."""
        return [str(d) for _, d in self.diagnoses]

    @property
    def started_at(self) -> float | None:
        """When the workload says it started."""
        return parse_time((self.workload.get("status") or {}).get("startTime"))

    def status(self, state: JobState, replicas: tuple[ReplicaStatus, ...] = (), **fields: Any) -> JobStatus:
        """A status of this job, with the fields every status carries.

        Raises:
            TypeError: a field JobStatus does not have.
        """
        fields.setdefault("started_at", self.started_at)
        return JobStatus(name=self.name, backend=self.backend, state=state, replicas=replicas,
                         created_at=self.created_at, **fields)


Rule = Callable[[Any], "JobStatus | None"]


def first_status(reading: Any, rules: Sequence[Rule]) -> JobStatus:
    """The answer of the first rule that has one (``reading``: a :class:`Reading`, or another record with a ``name``).

    Raises:
        LookupError: no rule answered (a backend's last rule answers always).
    """
    for rule in rules:
        found = rule(reading)
        if found is not None:
            return found
    raise LookupError(f"no status rule answered for {reading.name!r}")
