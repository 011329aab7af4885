"""Serving on job backends: a served model is an always-on job whose ranks run ``python -m dsnb.runtime.server``.

The local and Kubernetes backends mix :class:`ServesAsJob` in. It turns a
:class:`~dsnb.serving.ServeSpec` into the job of :meth:`ServeSpec.to_job_spec`, so every
rank loads the model (tensor parallel over the ranks) and rank 0 answers HTTP; the job's
logs, metrics, status and cancel then serve the endpoint too. A backend supplies where
rank 0 answers (:meth:`ServesAsJob.endpoint_url`) and may say how readiness is read.

Example:
    >>> from dsnb.backends.local import LocalBackend
    >>> from dsnb.serving import ServeSpec
    >>> plan = LocalBackend().serve_plan(ServeSpec(name="tiny", model="models:build", procs_per_node=2))
    >>> [c.argv[1:3] for c in plan.commands]
    [('-m', 'dsnb.runtime.server'), ('-m', 'dsnb.runtime.server')]
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

from dsnb.errors import JobNotFound
from dsnb.status import JobState, JobStatus

if TYPE_CHECKING:
    from dsnb.backends.base import Plan
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


class ServesAsJob:
    """Serving methods of a job backend (mixed into a :class:`~dsnb.backends.base.Backend`).

    Hooks a backend may override: :meth:`serving_job` (adjust the job, e.g. the port),
    :meth:`server_ready` (how readiness is read) and :meth:`endpoint_url` (required).
    """

    def serving_job(self, spec: ServeSpec) -> JobSpec:
        """The job that runs ``spec``'s server here (default :meth:`ServeSpec.to_job_spec`).

        Raises:
            InvalidSpecError: the spec cannot be served as one job (e.g. several replicas).
        """
        return spec.to_job_spec()

    def serve_plan(self, spec: ServeSpec) -> Plan:
        """The job plan of ``spec``'s server, under a unique name; nothing is started.

        Raises:
            InvalidSpecError: the spec cannot be served here.
        """
        return self.dryrun(self.serving_job(spec))  # type: ignore[attr-defined]

    def apply_serve(self, plan: Plan) -> None:
        """Start the server's ranks. Raises: ClusterError when the backend refuses."""
        self.apply(plan)  # type: ignore[attr-defined]

    def endpoint_url(self, name: str) -> str:
        """Where rank 0 answers, ending in ``/``. Raises: JobNotFound, ClusterError."""
        raise NotImplementedError

    def server_ready(self, name: str, status: JobStatus) -> tuple[bool, str]:
        """Whether rank 0 of the running job ``status`` is ready, and what to tell the user.

        By default rank 0 is asked (``GET /readyz`` at :meth:`endpoint_url`); backends whose
        notebook may not reach the server read it from the cluster instead.
        """
        try:
            url = self.endpoint_url(name)
        except (OSError, LookupError, ValueError) as e:
            return False, f"waiting for the server's address ({e})"
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

    def _serving_spec(self, name: str) -> JobSpec:
        """The stored spec of endpoint ``name``.

        Raises:
            JobNotFound: no job of that name, or a job that serves nothing (kind endpoint).
        """
        try:
            spec = self.spec_of(name)  # type: ignore[attr-defined]
        except JobNotFound:
            spec = None
        if spec is None or not is_serving_job(spec):
            raise JobNotFound(name, self.name, [s.name for s in self.endpoints()], kind="endpoint")  # type: ignore[attr-defined]
        return spec

    def _serving_status(self, name: str) -> JobStatus:
        self._serving_spec(name)
        try:
            return self.status(name)  # type: ignore[attr-defined]
        except JobNotFound:  # deleted meanwhile
            raise JobNotFound(name, self.name, kind="endpoint") from None  # type: ignore[attr-defined]

    def endpoint_status(self, name: str) -> JobStatus:
        """RUNNING once rank 0 is ready; STARTING while the ranks load; the job's end state after.

        Raises:
            JobNotFound: no endpoint of that name.
        """
        return self._with_readiness(self._serving_status(name))

    def _with_readiness(self, status: JobStatus) -> JobStatus:
        import dataclasses

        name = status.name
        if status.state in (JobState.RUNNING, JobState.STARTING):
            ready, message = self.server_ready(name, status)
            state = JobState.RUNNING if ready else JobState.STARTING
            return dataclasses.replace(status, state=state, message=message)
        return status

    def stop_endpoint(self, name: str) -> JobStatus:
        """Drain and stop the server's ranks (the job is cancelled); safe to call again.

        Raises:
            JobNotFound: no endpoint of that name.
        """
        self._serving_status(name)
        return self.cancel(name)  # type: ignore[attr-defined]

    def endpoints(self) -> list[JobStatus]:
        """Statuses of this backend's endpoints, newest first (RUNNING only once a server answers)."""
        found = []
        for status in self.jobs():  # type: ignore[attr-defined]
            try:
                if is_serving_job(self.spec_of(status.name)):  # type: ignore[attr-defined]
                    found.append(self._with_readiness(status))
            except JobNotFound:
                continue
        return found

    def endpoint_headers(self, name: str) -> dict[str, str]:
        """``Authorization: Bearer`` when the endpoint was served with a token."""
        token = self.serving_token(name)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def serving_token(self, name: str) -> str | None:
        """The endpoint's token, or None (default: from the job's stored environment)."""
        return self.spec_of(name).env.get(TOKEN_ENV)  # type: ignore[attr-defined]
