"""What the pods of a StatefulSet job tell the API server themselves (standard library only).

A StatefulSet restarts every container that ends, so a finished job's pods would hold their
nodes (and GPUs) until a dsnb client came to end the job. Instead, each pod's entry, once its
launcher ended, writes its outcome and the end of its output into the job's record (the
ConfigMap ``<job>``, keys ``outcome-<node>.json``, ``log-<node>.jsonl``, ``metrics-<node>.jsonl``),
then reads the record back: when every node finished, or this one failed, it scales the job's
StatefulSet to 0, which stops every pod and frees what they held. Whoever writes last sees
every earlier write (the API server orders them), so exactly the right write ends the job;
a repeated scale to 0 is harmless.

The pods do this as a ServiceAccount whose Role names only this job's record
(``configmaps``: get, patch) and this job's StatefulSet (``statefulsets/scale``: patch), by
``resourceNames``; see :func:`dsnb.backends.kubernetes.rbac.job_role_manifests`.

This file runs inside the job's image, next to ``entry.py``, so it uses only the standard
library and the in-cluster conventions every Kubernetes client follows: the API server at
``https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT``, its CA and a token, re-read for
every request since the kubelet rotates it, in ``/var/run/secrets/kubernetes.io/serviceaccount``.

Example (inside a pod)::

    api = InClusterApi.from_environment()
    ended = report(api, "ml", "tiny-gpt-x7k2", node=1, nodes=2, outcome={...}, log_rows=[...], metric_rows=[...])
    if ended:
        release(api, "ml", "tiny-gpt-x7k2")
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MERGE_PATCH = "application/merge-patch+json"
#: What the end-of-job keys of all nodes together may take of the record (a ConfigMap holds at most 1 MiB).
RECORD_BUDGET = 600_000
NODE_BUDGET_MAX = 96_000


class ApiUnavailable(Exception):
    """The API server could not be asked: no in-cluster configuration, refused, or unreachable."""


@dataclass(frozen=True)
class InClusterApi:
    """The API server as a pod sees it.

    Attributes:
        server: ``https://host:port``.
        folder: where the token, ``ca.crt`` and ``namespace`` lie.
        timeout: seconds per request.
    """

    server: str
    folder: str = SERVICE_ACCOUNT_DIR
    timeout: float = 10.0

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> InClusterApi:
        """The in-cluster API server, from ``KUBERNETES_SERVICE_HOST``/``PORT``.

        Raises:
            ApiUnavailable: not in a pod, or no token mounted (``automountServiceAccountToken: false``).

        Example:
            >>> InClusterApi.from_environment({}).server
            Traceback (most recent call last):
            dsnb.runtime.pod_api.ApiUnavailable: not in a Kubernetes pod (KUBERNETES_SERVICE_HOST is not set)
        """
        env = os.environ if environ is None else environ
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise ApiUnavailable("not in a Kubernetes pod (KUBERNETES_SERVICE_HOST is not set)")
        if ":" in host:  # IPv6
            host = f"[{host}]"
        api = cls(f"https://{host}:{port}")
        if not os.path.exists(os.path.join(api.folder, "token")):
            raise ApiUnavailable(f"no service account token in {api.folder} (the pod runs without one)")
        return api

    def request(self, method: str, path: str, body: dict | None = None, content_type: str = "application/json") -> dict:
        """One API request; the decoded reply.

        Raises:
            ApiUnavailable: the server did not answer, or refused (the status and its message).
        """
        with open(os.path.join(self.folder, "token")) as f:
            token = f.read().strip()
        context = ssl.create_default_context(cafile=os.path.join(self.folder, "ca.crt"))
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.server + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=context) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("message", e.reason)
            except ValueError:
                message = e.reason
            raise ApiUnavailable(f"{method} {path}: {e.code} {message}") from e
        except (OSError, ValueError) as e:
            raise ApiUnavailable(f"{method} {path}: {e}") from e


def node_budget(nodes: int) -> int:
    """Bytes of the record one node's log and metric rows may take.

    >>> node_budget(2), node_budget(64)
    (96000, 9375)
    """
    return min(NODE_BUDGET_MAX, RECORD_BUDGET // max(nodes, 1))


def bounded_rows(rows: list, limit: int) -> tuple[str, int]:
    """The last ``rows`` (JSON, one a line) that fit in ``limit`` bytes, and how many were left out.

    >>> bounded_rows([[0, 1.0, "a"], [1, 2.0, "b"]], 14)
    ('[1,2.0,"b"]', 1)
    """
    kept: list[str] = []
    size = 0
    for row in reversed(rows):
        text = json.dumps(row, separators=(",", ":"))
        if size + len(text) + 1 > limit:
            break
        kept.append(text)
        size += len(text) + 1
    return "\n".join(reversed(kept)), len(rows) - len(kept)


def job_ended(data: dict[str, str], nodes: int) -> bool:
    """Whether a record's outcomes end the job: one node failed, or all finished.

    >>> job_ended({"outcome-0.json": '{"exit_code": 0}'}, 2), job_ended({"outcome-1.json": '{"exit_code": 3}'}, 2)
    (False, True)
    """
    outcomes = [json.loads(data[key]) for key in data if key.startswith("outcome-") and key.endswith(".json")]
    return any(o.get("exit_code") for o in outcomes) or len(outcomes) >= nodes


def report(api: InClusterApi, namespace: str, record: str, node: int, nodes: int, outcome: dict,
           log_rows: list, metric_rows: list) -> bool:
    """Write this node's outcome and output's end into the record; True when the job has ended.

    Raises:
        ApiUnavailable: the write or the read was not possible.
    """
    budget = node_budget(nodes)
    logs, dropped = bounded_rows(log_rows, budget * 2 // 3)
    metrics, _ = bounded_rows(metric_rows, budget - len(logs))
    outcome = {**outcome, "lines_not_kept": dropped}
    path = f"/api/v1/namespaces/{namespace}/configmaps/{record}"
    api.request("PATCH", path, {"data": {f"outcome-{node}.json": json.dumps(outcome), f"log-{node}.jsonl": logs,
                                         f"metrics-{node}.jsonl": metrics}}, MERGE_PATCH)
    return job_ended(api.request("GET", path).get("data") or {}, nodes)


def release(api: InClusterApi, namespace: str, stateful_set: str) -> None:
    """Scale the job's StatefulSet to 0: Kubernetes stops every pod of it.

    Raises:
        ApiUnavailable: the scale was refused or the server did not answer.
    """
    api.request("PATCH", f"/apis/apps/v1/namespaces/{namespace}/statefulsets/{stateful_set}/scale",
                {"spec": {"replicas": 0}}, MERGE_PATCH)
