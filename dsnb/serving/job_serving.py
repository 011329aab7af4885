"""Serving on job backends: a served model is an always-on job whose ranks run ``python -m dsnb.runtime.server``.

:class:`JobEndpoints` holds the serving methods of such a backend. It turns a
:class:`~dsnb.serving.ServeSpec` into a job, so every rank loads the model (tensor parallel
over the ranks) and rank 0 answers HTTP; the job's logs, metrics, status and cancel then
serve the endpoint too. It reaches the backend only through the job contract of
:class:`~dsnb.backends.base.Backend` (``dryrun``, ``apply``, ``status``, ``cancel``,
``jobs``, ``spec_of``). What differs per backend family (which job runs the server, how it
is made reachable, where it answers, its token, how readiness is read) is a
:class:`ServiceExposure`.

A backend lists :class:`EndpointsAsJobs` among its bases and sets ``self.job_endpoints``;
its serving methods then forward there.

Example:
    >>> from dsnb.backends.local import LocalBackend
    >>> from dsnb.serving import ServeSpec
    >>> plan = LocalBackend().serve_plan(ServeSpec(name="tiny", model="models:build", procs_per_node=2))
    >>> [c.argv[1:3] for c in plan.commands]
    [('-m', 'dsnb.runtime.server'), ('-m', 'dsnb.runtime.server')]
"""

from __future__ import annotations

import abc
import dataclasses
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from dsnb.errors import JobNotFound
from dsnb.status import JobState, JobStatus

if TYPE_CHECKING:
    from dsnb.backends.base import Backend, Plan
    from dsnb.serving.spec import ServeSpec
    from dsnb.spec import JobSpec

#: The variable that carries a ServeSpec's token to the ranks.
TOKEN_ENV = "DSNB_SERVE_TOKEN"
READY_PROBE_TIMEOUT_S = 2.0


def is_serving_job(spec: JobSpec) -> bool:
    """Whether a job runs dsnb's model server.

    Example:
        >>> from dsnb.serving import ServeSpec
        >>> is_serving_job(ServeSpec(name="a", model="m:f").to_job_spec())
        True
    """
    return list((spec.command or [])[1:3]) == ["-m", "dsnb.runtime.server"]


class JobCatalog(Protocol):
    """The part of the job contract that finds a served model's job again."""

    @property
    def name(self) -> str:
        """The backend's registry name."""
        ...

    def jobs(self) -> list[JobStatus]:
        """Statuses of the jobs the backend can see, newest first."""
        ...

    def spec_of(self, name: str) -> JobSpec:
        """The spec a job was submitted with. Raises: JobNotFound."""
        ...


def serving_jobs(catalog: JobCatalog) -> Iterator[JobStatus]:
    """The statuses of the jobs of ``catalog`` that run the model server, newest first.

    Raises:
        ClusterError: the jobs cannot be listed.

    Example:
        >>> from dsnb.backends.local import LocalBackend
        >>> list(serving_jobs(LocalBackend(home="/nonexistent")))
        []
    """
    for status in catalog.jobs():
        try:
            if is_serving_job(catalog.spec_of(status.name)):
                yield status
        except JobNotFound:
            continue  # deleted meanwhile


def serving_spec(catalog: JobCatalog, name: str) -> JobSpec:
    """The stored spec of endpoint ``name`` of ``catalog``.

    Raises:
        JobNotFound: no job of that name, or a job that serves nothing (kind endpoint, naming the endpoints there are).

    Example:
        >>> from dsnb.backends.local import LocalBackend
        >>> serving_spec(LocalBackend(home="/nonexistent"), "tiny-x7k2")
        Traceback (most recent call last):
        dsnb.errors.JobNotFound: endpoint 'tiny-x7k2' not found on backend 'local'; list endpoints with cluster.endpoints()
    """
    try:
        spec = catalog.spec_of(name)
    except JobNotFound:
        spec = None
    if spec is None or not is_serving_job(spec):
        raise JobNotFound(name, catalog.name, [s.name for s in serving_jobs(catalog)], kind="endpoint")
    return spec


def probe_ready(url: str) -> tuple[bool, str]:
    """Whether the server at ``url`` is ready (``GET <url>readyz`` answers 200), and what to tell the user.

    Raises:
        Nothing on purpose: an unreachable server is "not ready" with the reason.

    Example:
        >>> probe_ready("http://127.0.0.1:9/")[0]
        False
    """
    try:
        with urllib.request.urlopen(url + "readyz", timeout=READY_PROBE_TIMEOUT_S) as response:
            return response.status == 200, f"ready at {url}"
    except urllib.error.HTTPError as e:
        try:
            reason = json.loads(e.read()).get("reason", "not ready")
        except (ValueError, AttributeError):
            reason = f"HTTP {e.code}"
        return False, f"not ready: {reason}"
    except OSError as e:
        return False, f"loading the model (no answer at {url} yet: {getattr(e, 'reason', e)})"


class ServiceExposure(abc.ABC):
    """What one backend family says about serving a model as a job: the job, how it is made
    reachable, where rank 0 answers, its token and how readiness is read.

    Only :meth:`endpoint_url` has no default. :meth:`endpoint_url` and :meth:`endpoint_token`
    say themselves whether ``name`` must be an endpoint (:func:`serving_spec` checks it).

    Example:
        >>> class Fixed(ServiceExposure):
        ...     def endpoint_url(self, name):
        ...         return "http://127.0.0.1:9/"
        >>> from dsnb.serving import ServeSpec
        >>> Fixed().serving_job(ServeSpec(name="a", model="m:f")).command
        ['python', '-m', 'dsnb.runtime.server']
    """

    def serving_job(self, spec: ServeSpec) -> JobSpec:
        """The job that runs ``spec``'s server here (default :meth:`ServeSpec.to_job_spec`).

        Raises:
            InvalidSpecError: the spec cannot be served as one job (e.g. several replicas).
        """
        return spec.to_job_spec()

    def expose(self, plan: Plan, spec: ServeSpec) -> None:  # noqa: B027 - optional hook
        """Add to the job's ``plan`` what makes rank 0 reachable (a Service, ports, probes, notes); nothing by default.

        Raises:
            InvalidSpecError: the spec cannot be served here (the field and fix named).
        """

    def applied(self, plan: Plan) -> None:  # noqa: B027 - optional hook
        """Remember what is needed of ``plan``, whose job was just created (e.g. its token); nothing by default."""

    @abc.abstractmethod
    def endpoint_url(self, name: str) -> str:
        """Where rank 0 of endpoint ``name`` answers, ending in ``/``.

        Raises:
            JobNotFound: no endpoint of that name.
            ClusterError: no address yet, or the cluster refused to say.
        """

    def endpoint_token(self, name: str) -> str | None:
        """The endpoint's bearer token, or None (default: None, no token is kept).

        Raises:
            JobNotFound: no endpoint of that name.
            ClusterError: where the token is kept may not be read.
        """
        return None

    def server_ready(self, name: str, status: JobStatus) -> tuple[bool, str]:
        """Whether rank 0 of the running job ``status`` is ready, and what to tell the user.

        By default rank 0 is asked (``GET /readyz`` at :meth:`endpoint_url`); families whose
        notebook may not reach the server read it from the cluster instead.

        Raises:
            JobNotFound: the job went away meanwhile.
        """
        try:
            url = self.endpoint_url(name)
        except (OSError, LookupError, ValueError) as e:
            return False, f"waiting for the server's address ({e})"
        return probe_ready(url)

    def forget(self, name: str) -> None:  # noqa: B027 - optional hook
        """Drop what was kept about endpoint ``name``, which was just stopped; nothing by default."""


class JobEndpoints:
    """The serving methods of a backend whose endpoints are jobs.

    Args:
        backend: the backend; only its job contract is used.
        exposure: what its family says about serving (see :class:`ServiceExposure`).

    Example:
        >>> from dsnb.backends.local import LocalBackend
        >>> backend = LocalBackend()
        >>> isinstance(backend.job_endpoints, JobEndpoints), backend.job_endpoints.backend is backend
        (True, True)
    """

    def __init__(self, backend: Backend, exposure: ServiceExposure) -> None:
        self.backend = backend
        self.exposure = exposure

    # -- planning and applying -------------------------------------------------------------
    def serve_plan(self, spec: ServeSpec) -> Plan:
        """The server's job plan under a unique name, with what exposes it; nothing is started.

        Raises:
            InvalidSpecError: the spec cannot be served here.
        """
        plan = self.backend.dryrun(self.exposure.serving_job(spec))
        self.exposure.expose(plan, spec)
        return plan

    def apply_serve(self, plan: Plan) -> None:
        """Start the server's ranks (the job's ``apply``).

        Raises:
            DsnbError: the backend refused; nothing of the job is left behind.
        """
        self.backend.apply(plan)
        self.exposure.applied(plan)

    # -- finding it again ------------------------------------------------------------------
    def endpoint_url(self, name: str) -> str:
        """Where rank 0 answers, ending in ``/``.

        Raises:
            JobNotFound: no endpoint of that name.
            ClusterError: no address yet, or the cluster refused to say.
        """
        return self.exposure.endpoint_url(name)

    def endpoint_headers(self, name: str) -> dict[str, str]:
        """``Authorization: Bearer`` when the endpoint was served with a token.

        Raises:
            JobNotFound: no endpoint of that name.
            ClusterError: where the token is kept may not be read.
        """
        token = self.exposure.endpoint_token(name)
        return {"Authorization": f"Bearer {token}"} if token else {}

    # -- status ----------------------------------------------------------------------------
    def _job_status(self, name: str) -> JobStatus:
        serving_spec(self.backend, name)
        try:
            return self.backend.status(name)
        except JobNotFound:  # deleted meanwhile
            raise JobNotFound(name, self.backend.name, kind="endpoint") from None

    def _with_readiness(self, status: JobStatus) -> JobStatus:
        if status.state not in (JobState.RUNNING, JobState.STARTING):
            return status
        ready, message = self.exposure.server_ready(status.name, status)
        return dataclasses.replace(status, state=JobState.RUNNING if ready else JobState.STARTING, message=message)

    def endpoint_status(self, name: str) -> JobStatus:
        """RUNNING once rank 0 is ready; STARTING while the ranks load; the job's end state after.

        Raises:
            JobNotFound: no endpoint of that name.
        """
        return self._with_readiness(self._job_status(name))

    def endpoints(self) -> list[JobStatus]:
        """Statuses of the backend's endpoints, newest first (RUNNING only once a server answers)."""
        found = []
        for status in serving_jobs(self.backend):
            try:
                found.append(self._with_readiness(status))
            except JobNotFound:
                continue  # deleted meanwhile
        return found

    # -- stopping --------------------------------------------------------------------------
    def stop_endpoint(self, name: str) -> JobStatus:
        """Drain and stop the server's ranks (the job is cancelled); safe to call again.

        Raises:
            JobNotFound: no endpoint of that name.
        """
        self._job_status(name)
        final = self.backend.cancel(name)
        self.exposure.forget(name)
        return final


class EndpointsAsJobs:
    """The serving methods of :class:`~dsnb.backends.base.Backend`, forwarded to :attr:`job_endpoints`.

    A backend whose endpoints are jobs lists this class before ``Backend`` among its bases
    and sets ``self.job_endpoints = JobEndpoints(self, exposure)`` in its constructor.

    Example:
        >>> from dsnb.backends.local import LocalBackend
        >>> isinstance(LocalBackend(), EndpointsAsJobs)
        True
    """

    #: The object that serves this backend's endpoints as jobs.
    job_endpoints: JobEndpoints

    def serve_plan(self, spec: ServeSpec) -> Plan:
        """See :meth:`JobEndpoints.serve_plan`. Raises: InvalidSpecError."""
        return self.job_endpoints.serve_plan(spec)

    def apply_serve(self, plan: Plan) -> None:
        """See :meth:`JobEndpoints.apply_serve`. Raises: DsnbError."""
        self.job_endpoints.apply_serve(plan)

    def endpoint_url(self, name: str) -> str:
        """See :meth:`JobEndpoints.endpoint_url`. Raises: JobNotFound, ClusterError."""
        return self.job_endpoints.endpoint_url(name)

    def endpoint_headers(self, name: str) -> dict[str, str]:
        """See :meth:`JobEndpoints.endpoint_headers`. Raises: JobNotFound."""
        return self.job_endpoints.endpoint_headers(name)

    def endpoint_status(self, name: str) -> JobStatus:
        """See :meth:`JobEndpoints.endpoint_status`. Raises: JobNotFound."""
        return self.job_endpoints.endpoint_status(name)

    def stop_endpoint(self, name: str) -> JobStatus:
        """See :meth:`JobEndpoints.stop_endpoint`. Raises: JobNotFound."""
        return self.job_endpoints.stop_endpoint(name)

    def endpoints(self) -> list[JobStatus]:
        """See :meth:`JobEndpoints.endpoints`."""
        return self.job_endpoints.endpoints()
