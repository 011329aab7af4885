"""Ray Serve applications through the dashboard's Serve REST API (``/api/serve/applications/``).

The API is declarative: a ``PUT`` states every application the cluster should run. So a
deploy reads what runs now, keeps the other applications as they were deployed, and adds or
replaces dsnb's; a stop does the same without it. Two clients that do this at once would drop
each other's application (the last ``PUT`` wins, and the API has no version to compare), so
every change is made under a lock of this process and then checked: each client reads the
applications back a few times over :data:`SETTLE_S`, and writes again, from what runs then,
while its change is not there (:meth:`ServeClient.change`). (Applications deployed from Python with
``serve.run`` have no config to keep, and Ray refuses a ``PUT`` while they run; the error says so.)

Example:
    >>> client = ServeClient("http://127.0.0.1:8265", {})        # doctest: +SKIP
    >>> client.applications().keys()                             # doctest: +SKIP
    dict_keys(['tiny-x7k2'])
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from dsnb.errors import ClusterError
from dsnb.status import JobState, ReplicaStatus

PATH = "/api/serve/applications/"
REQUEST_TIMEOUT_S = 30.0
#: How long a change is checked for (a concurrent writer's PUT may land a moment later), and how often it is retried.
SETTLE_S = 3.0
CHANGE_ATTEMPTS = 6
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()
_APP_STATES = {"NOT_STARTED": JobState.STARTING, "DEPLOYING": JobState.STARTING, "RUNNING": JobState.RUNNING,
               "UNHEALTHY": JobState.RUNNING, "DEPLOY_FAILED": JobState.FAILED, "DELETING": JobState.CANCELLED}
_REPLICA_STATES = {"STARTING": JobState.STARTING, "UPDATING": JobState.STARTING, "RECOVERING": JobState.STARTING,
                   "RUNNING": JobState.RUNNING, "STOPPING": JobState.CANCELLED, "PENDING_MIGRATION": JobState.RUNNING}


class ServeClient:
    """Reads and writes a Ray cluster's Serve applications.

    Args:
        dashboard_url: ``http://HOST:8265``.
        headers: sent with every request (the auth token).
    """

    def __init__(self, dashboard_url: str, headers: dict[str, str]) -> None:
        self.url = dashboard_url.rstrip("/") + PATH
        self.headers = headers

    def _request(self, method: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url, data=data, method=method,
                                         headers={"Content-Type": "application/json", **self.headers})
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
                text = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace").strip()[-500:]
            raise ClusterError("Ray Serve", f"{method} {PATH} answered HTTP {e.code}: {detail}",
                               "pass token= for a cluster with token authentication" if e.code in (401, 403)
                               else "see the message; `serve status` on the head shows the applications") from e
        except OSError as e:
            raise ClusterError("Ray Serve", f"the dashboard at {self.url} cannot be reached ({e})",
                               "check that the Ray cluster is up") from e
        return json.loads(text) if text else None

    def details(self) -> dict[str, Any]:
        """The Serve details: ``applications`` (name -> state) and ``http_options``."""
        return self._request("GET") or {}

    def applications(self) -> dict[str, Any]:
        """Running applications by name (empty when Serve has not started)."""
        return self.details().get("applications") or {}

    def put(self, applications: dict[str, dict[str, Any]], http_options: dict[str, Any] | None) -> None:
        """State the applications that should run (keeping the others as deployed)."""
        body: dict[str, Any] = {"applications": list(applications.values())}
        if http_options:
            body["http_options"] = http_options
        self._request("PUT", body)

    def change(self, name: str, config: dict[str, Any] | None, http_options: dict[str, Any] | None) -> None:
        """Deploy application ``name`` with ``config``, or remove it (``config`` None), keeping every other
        application as it runs, and make sure the change holds (see the module docstring).

        Raises:
            ClusterError: Ray refused, or the change was undone by other writers every time.
        """
        def holds() -> bool:
            # A removed application stays listed, DELETING, until its replicas are gone.
            present = _live(self.applications().get(name))
            return present if config is not None else not present

        with _lock_for(self.url):
            for _ in range(CHANGE_ATTEMPTS):
                configs = self.deployed_configs(leave_out=name)
                if config is not None:
                    configs[name] = config
                self.put(configs, http_options)
                if _stays(holds, SETTLE_S):
                    return
        raise ClusterError("Ray Serve", f"application {name!r} was changed by another client each time it was "
                                        f"{'deployed' if config is not None else 'removed'} ({CHANGE_ATTEMPTS} tries)",
                           "try again when the other deploys are done")

    def deployed_configs(self, leave_out: str | None = None) -> dict[str, dict[str, Any]]:
        """The config each running application was deployed with, except ``leave_out``.

        Raises:
            ClusterError: an application deployed without a config (``serve.run``) runs,
                which a declarative update would remove.
        """
        configs = {}
        for name, app in self.applications().items():
            if name == leave_out or not _live(app):
                continue  # writing a DELETING application's config again would bring it back
            config = app.get("deployed_app_config")
            if not config:
                raise ClusterError("Ray Serve", f"application {name!r} was deployed from Python (serve.run), not from a config",
                                   f"remove it first (serve.delete({name!r})), or serve from another Ray cluster")
            configs[name] = config
        return configs


def _live(app: dict[str, Any] | None) -> bool:
    """Whether an application is listed and not being deleted.

    Serve lists an application it was told to remove with status ``DELETING`` until its replicas
    are gone (``ray/serve/_private/application_state.py``, Ray 2.60).
    """
    return app is not None and app.get("status") != "DELETING"


def _lock_for(url: str) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(url, threading.Lock())


def _stays(check: Callable[[], bool], seconds: float, every: float = 0.5) -> bool:
    """Whether ``check()`` holds each time it is asked over ``seconds`` (False at the first time it does not)."""
    deadline = time.monotonic() + seconds
    while True:
        if not check():
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(every)


@dataclass(frozen=True)
class AppReading:
    """One Serve application's details (None when it is not deployed), read for its status.

    The rules below take this, not :class:`dsnb.backends.kubernetes.status_rules.Reading`: an
    application on the dashboard's REST API has no pods, events or Kubernetes workload.
    """

    app: dict[str, Any] | None

    @property
    def status(self) -> str:
        return (self.app or {}).get("status", "")

    @cached_property
    def said(self) -> str:
        """Serve's message on the application."""
        return ((self.app or {}).get("message") or "").strip()

    @cached_property
    def details(self) -> list[str]:
        """Each deployment's last message line: a traceback's last line says what went wrong."""
        details = []
        for deployment in ((self.app or {}).get("deployments") or {}).values():
            lines = [line for line in (deployment.get("message") or "").strip().splitlines() if line.strip()]
            if lines:
                details.append(lines[-1].strip())
        return details

    @cached_property
    def replicas(self) -> tuple[ReplicaStatus, ...]:
        """One ReplicaStatus per replica of every deployment, numbered in order."""
        found = [replica for deployment in ((self.app or {}).get("deployments") or {}).values()
                 for replica in deployment.get("replicas") or []]
        return tuple(ReplicaStatus(rank=rank, state=_REPLICA_STATES.get(replica.get("state", ""), JobState.STARTING),
                                   pid=replica.get("pid"), host=replica.get("node_ip"))
                     for rank, replica in enumerate(found))


def _not_deployed(a: AppReading) -> tuple[JobState, str] | None:
    return (JobState.CANCELLED, "not deployed") if a.app is None else None


def _deploy_failed(a: AppReading) -> tuple[JobState, str] | None:
    if a.status != "DEPLOY_FAILED":
        return None
    # Serve's application message only says which deployments failed; theirs say why.
    return JobState.FAILED, "; ".join(m for m in [a.said.splitlines()[-1] if a.said else "", *a.details] if m)


def _unhealthy(a: AppReading) -> tuple[JobState, str] | None:
    if a.status != "UNHEALTHY":
        return None
    return JobState.RUNNING, f"unhealthy: {a.said}" if a.said else "unhealthy"


def _as_serve_says(a: AppReading) -> tuple[JobState, str]:
    return _APP_STATES.get(a.status, JobState.STARTING), a.said or (a.details[0] if a.details else "")


#: An application's rules, in the order they are tried; each answers (state, message) or None.
APP_RULES: tuple[Callable[[AppReading], tuple[JobState, str] | None], ...] = (
    _not_deployed, _deploy_failed, _unhealthy, _as_serve_says)


def app_state(app: dict[str, Any] | None) -> tuple[JobState, str, tuple[ReplicaStatus, ...]]:
    """dsnb's state, a message, and one ReplicaStatus per replica for one application's details.

    The state and message are the first answer of :data:`APP_RULES`.

    Example:
        >>> state, message, replicas = app_state({"status": "RUNNING", "message": "",
        ...     "deployments": {"DsnbModel": {"replicas": [{"state": "RUNNING", "pid": 7}]}}})
        >>> state.value, [(r.rank, r.state.value, r.pid) for r in replicas]
        ('RUNNING', [(0, 'RUNNING', 7)])

    Raises:
        Nothing: a status Serve adds later reads as STARTING.
    """
    reading = AppReading(app)
    state, message = next(found for rule in APP_RULES if (found := rule(reading)) is not None)
    return state, message[:2000], reading.replicas
