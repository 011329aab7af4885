"""Serving on the local backend: rank 0 of the server's job listens on a free port of 127.0.0.1.

Example:
    >>> from dsnb.backends.local import LocalBackend
    >>> from dsnb.serving import ServeSpec
    >>> job = LocalBackend().job_endpoints.exposure.serving_job(ServeSpec(name="tiny", model="models:build"))
    >>> job.args[-2:], job.args[job.args.index("--port") + 1], "DSNB_SERVE_TOKEN" in job.env
    (['--host', '127.0.0.1'], '0', True)
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from dsnb.backends.local.jobdir import JobDir
from dsnb.errors import ClusterError
from dsnb.serving.job_serving import ServiceExposure

if TYPE_CHECKING:
    from dsnb.serving.spec import ServeSpec
    from dsnb.spec import JobSpec

#: An endpoint's token, 0600 in its job directory, for a reattached Endpoint to send.
SERVE_TOKEN_FILE = "serve-token"
#: What rank 0 writes into its job directory once it listens: ``{"url": "http://127.0.0.1:<port>/"}``.
ENDPOINT_FILE = "endpoint.json"


class LocalExposure(ServiceExposure):
    """Where a local server answers and its token, read from the job's directory.

    Args:
        job_dir: the directory of job ``name`` (raises JobNotFound for an unknown one).
    """

    def __init__(self, job_dir: Callable[[str], JobDir]) -> None:
        self.job_dir = job_dir

    def serving_job(self, spec: ServeSpec) -> JobSpec:
        """The server's job here: this Python, on 127.0.0.1, on a free port, with a token: without one, any
        local user (or a web page the browser visits, by DNS rebinding) could use the server. One is made
        when the spec has none; ``Endpoint.predict`` sends it and ``Endpoint.token`` gives it.

        Raises:
            InvalidSpecError: the spec cannot be served as one job (e.g. several replicas).
        """
        if spec.token is None:
            spec = dataclasses.replace(spec, token=secrets.token_urlsafe(32))
        job = spec.to_job_spec()
        args = list(job.args)
        args[args.index("--port") + 1] = "0"
        return dataclasses.replace(job, command=[sys.executable, "-m", "dsnb.runtime.server"], args=[*args, "--host", "127.0.0.1"])

    def endpoint_token(self, name: str) -> str | None:
        """The endpoint's token, from the file only its owner reads (the records keep none).

        Raises:
            JobNotFound: no such job.
        """
        try:
            return (self.job_dir(name).path / SERVE_TOKEN_FILE).read_text() or None
        except FileNotFoundError:
            return None

    def endpoint_url(self, name: str) -> str:
        """Rank 0's address, as it recorded it once listening.

        Raises:
            JobNotFound: no such job.
            ClusterError: the server has not recorded its address yet.
        """
        path = self.job_dir(name).path / ENDPOINT_FILE
        try:
            return str(json.loads(path.read_text())["url"])
        except (OSError, ValueError, KeyError):
            raise ClusterError(f"endpoint {name!r}", "has no address yet (rank 0 is still loading the model)",
                               "wait with endpoint.wait()") from None
