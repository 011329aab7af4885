"""Serving from the client's side: what to serve, how a job backend serves it, and the endpoint.

:class:`ServeSpec` says what to serve (:mod:`~dsnb.serving.spec`); a job backend serves it as
an always-on job whose ranks run the model server (:mod:`~dsnb.serving.job_serving`); the
:class:`~dsnb.serving.endpoint.Endpoint` is what ``Cluster.serve`` returns. The server itself
runs inside the ranks and lives in :mod:`dsnb.runtime.server`.

Example:
    >>> from dsnb.serving import ServeSpec
    >>> ServeSpec(name="tiny", model="models:build").world_size
    1
"""

from dsnb.serving.spec import ServeSpec

__all__ = ["ServeSpec"]
