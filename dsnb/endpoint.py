"""The :class:`Endpoint` handle: a served model's URL, predictions, status and stop.

Like :class:`~dsnb.job.Job`, an Endpoint holds only a backend and a name, so
``cluster.endpoint(name)`` in a new kernel gives an equal handle.

Example:
    >>> from dsnb import Cluster
    >>> from dsnb.serving import ServeSpec
    >>> endpoint = Cluster("ray").serve(ServeSpec(name="tiny", model="models:build"))   # doctest: +SKIP
    >>> endpoint.predict({"inputs": [[0.0, 1.0, 2.0, 3.0]]})                           # doctest: +SKIP
    {'outputs': [[0.12, -0.4]]}
    >>> endpoint.stop().state.value                                                    # doctest: +SKIP
    'CANCELLED'
"""

from __future__ import annotations

import html
import json
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from dsnb.errors import ClusterError, JobFailed, WaitTimeout
from dsnb.status import JobState, JobStatus

if TYPE_CHECKING:
    from dsnb.backends.base import Backend


class Endpoint:
    """A handle on one served model of one backend.

    Args:
        backend: the backend that serves it.
        name: the endpoint's unique name.
    """

    def __init__(self, backend: Backend, name: str) -> None:
        self.backend = backend
        self.name = name

    @property
    def url(self) -> str:
        """Where to send requests (``POST`` JSON ``{"inputs": ...}``)."""
        return self.backend.endpoint_url(self.name)

    def status(self) -> JobStatus:
        """RUNNING once every replica answers; STARTING while they load; FAILED, CANCELLED.

        Raises:
            JobNotFound: no endpoint of that name.
        """
        return self.backend.endpoint_status(self.name)

    def wait(self, timeout: float | None = 600, poll: float = 0.5) -> JobStatus:
        """Block until the endpoint answers (RUNNING).

        Raises:
            JobFailed: the deployment failed (the message says why, e.g. the loader's error).
            WaitTimeout: it was not ready within ``timeout`` seconds; it keeps starting.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            if status.state == JobState.RUNNING:
                return status
            if status.state == JobState.FAILED:
                raise JobFailed(status)
            if status.state.is_terminal():
                raise ClusterError(f"endpoint {self.name!r}", f"is {status.state.value}", "deploy it again with cluster.serve(spec)")
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(self.name, timeout or 0.0, status.state.value)
            time.sleep(poll)

    def predict(self, payload: Any, timeout: float = 60.0) -> Any:
        """Send one request and return the decoded JSON answer.

        Args:
            payload: a JSON-ready body, e.g. ``{"inputs": [[1.0, 2.0]]}``.
            timeout: seconds to wait for the answer.

        Raises:
            ClusterError: the endpoint answered an HTTP error (status and reason in the
                message) or could not be reached.

        Example:
            >>> endpoint.predict({"inputs": ["a sentence to embed"]})   # doctest: +SKIP
        """
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", **self.backend.endpoint_headers(self.name)}
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise ClusterError(f"endpoint {self.name!r}", f"answered HTTP {e.code}: {detail}",
                               "check the request body" if 400 <= e.code < 500 else "see endpoint.status() and the replicas' logs") from e
        except OSError as e:
            raise ClusterError(f"endpoint {self.name!r}", f"cannot be reached at {self.url} ({e})",
                               "wait until endpoint.status() is RUNNING (endpoint.wait())") from e

    def stop(self) -> JobStatus:
        """Remove the served application and its replicas; safe to call again.

        Raises:
            JobNotFound: no endpoint of that name.
        """
        return self.backend.stop_endpoint(self.name)

    def __repr__(self) -> str:
        return f"Endpoint(name={self.name!r}, backend={self.backend.name!r})"

    def _repr_html_(self) -> str:
        status = self.status()
        return (f"<b>dsnb endpoint</b> <code>{html.escape(self.name)}</code> on <i>{html.escape(self.backend.name)}</i>: "
                f"<b>{status.state.value}</b> at <code>{html.escape(self.url)}</code><br>{html.escape(status.message)}")
