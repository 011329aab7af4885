"""Connect to a Kubernetes cluster: kubeconfig file and context, in-cluster config, namespace.

The namespace is, in order: the one passed in, the kubeconfig context's namespace, the
pod's own namespace when running inside a cluster, then ``default``.

Example:
    >>> conn = connect(kubeconfig="~/.kube/config", context="gpu-cluster", namespace="ml")  # doctest: +SKIP
    >>> conn.namespace                                                                      # doctest: +SKIP
    'ml'
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kubernetes import client, config

from dsnb.errors import ClusterError

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass
class Connection:
    """An API client bound to one cluster and one namespace.

    Attributes:
        api: the official client's ``ApiClient``.
        namespace: where jobs are created and looked up.
        context: the kubeconfig context in use (``"in-cluster"`` inside a pod).
    """

    api: client.ApiClient
    namespace: str
    context: str

    @property
    def core(self) -> client.CoreV1Api:
        """Pods, Services, ConfigMaps, Secrets, Events, Nodes."""
        return client.CoreV1Api(self.api)

    @property
    def apps(self) -> client.AppsV1Api:
        """StatefulSets."""
        return client.AppsV1Api(self.api)

    @property
    def networking(self) -> client.NetworkingV1Api:
        """NetworkPolicies."""
        return client.NetworkingV1Api(self.api)

    @property
    def rbac(self) -> client.RbacAuthorizationV1Api:
        """Roles and RoleBindings."""
        return client.RbacAuthorizationV1Api(self.api)

    @property
    def custom(self) -> client.CustomObjectsApi:
        """Custom resources (MPIJob, TrainJob, RayJob)."""
        return client.CustomObjectsApi(self.api)

    @property
    def host(self) -> str:
        """The API server's URL."""
        return self.api.configuration.host

    def close(self) -> None:
        """Close the client's connection pool."""
        self.api.close()


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (SERVICE_ACCOUNT_DIR / "token").is_file()


def connect(
    kubeconfig: str | os.PathLike[str] | None = None,
    context: str | None = None,
    namespace: str | None = None,
    in_cluster: bool | None = None,
    configuration: client.Configuration | None = None,
) -> Connection:
    """An API client for the cluster the user means.

    Args:
        kubeconfig: a kubeconfig file; default ``$KUBECONFIG`` (every file it lists, merged as
            kubectl merges them) or ``~/.kube/config``.
        context: a context of that file; default its current context.
        namespace: where jobs go; see the module docstring for the default.
        in_cluster: use the pod's service account (default: when running in a pod and no
            kubeconfig was given).
        configuration: a ready ``kubernetes.client.Configuration`` (tests, custom auth).

    Raises:
        ClusterError: no kubeconfig, an unknown context, or an unreadable file;
            the message names the file and context and says how to fix it.

    Example:
        >>> connect(kubeconfig="/nonexistent/config")
        Traceback (most recent call last):
        ...
        dsnb.errors.ClusterError: kubeconfig /nonexistent/config: no such file. Fix: point kubeconfig= (or $KUBECONFIG) at your cluster's config file, or run inside the cluster
    """
    if configuration is not None:
        return Connection(client.ApiClient(configuration), namespace or "default", context or "custom")
    if in_cluster is None:
        in_cluster = kubeconfig is None and not os.environ.get("KUBECONFIG") and _in_cluster()
    if in_cluster:
        return _in_cluster_connection(namespace)
    return _kubeconfig_connection(kubeconfig, context, namespace)


def _in_cluster_connection(namespace: str | None) -> Connection:
    try:
        conf = client.Configuration()
        config.load_incluster_config(client_configuration=conf)
    except config.ConfigException as e:
        raise ClusterError("in-cluster configuration", str(e),
                           "run inside a pod with a service account, or pass kubeconfig=") from e
    own = SERVICE_ACCOUNT_DIR / "namespace"
    default_ns = own.read_text().strip() if own.is_file() else "default"
    return Connection(client.ApiClient(conf), namespace or default_ns, "in-cluster")


def _kubeconfig_files(kubeconfig: str | os.PathLike[str] | None) -> str:
    """The kubeconfig files to read, joined as ``$KUBECONFIG`` joins them.

    ``$KUBECONFIG`` may list several files: the official client merges them, as kubectl does.

    Raises:
        ClusterError: none of them exists.
    """
    given = str(kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config")
    files = os.pathsep.join(str(Path(p).expanduser()) for p in given.split(os.pathsep) if p)
    paths = files.split(os.pathsep)
    if not any(Path(p).is_file() for p in paths):
        raise ClusterError(f"kubeconfig {files}", "no such file" if len(paths) == 1 else "none of these files exists",
                           "point kubeconfig= (or $KUBECONFIG) at your cluster's config file, or run inside the cluster")
    return files


def _kubeconfig_connection(kubeconfig: str | os.PathLike[str] | None, context: str | None, namespace: str | None) -> Connection:
    files = _kubeconfig_files(kubeconfig)
    where = f"kubeconfig {files}"
    try:
        contexts, current = config.list_kube_config_contexts(files)
        chosen = current if context is None else next((c for c in contexts if c["name"] == context), None)
        if chosen is None:
            names = ", ".join(c["name"] for c in contexts) or "none"
            raise ClusterError(where, f"has no context {context!r} (it has: {names})",
                               "pass one of those as context=, or add the context with kubectl config")
        conf = client.Configuration()
        config.load_kube_config(config_file=files, context=chosen["name"], client_configuration=conf)
    except config.ConfigException as e:
        raise ClusterError(where, str(e), "check the file with `kubectl config view`") from e
    default_ns = (chosen.get("context") or {}).get("namespace") or "default"
    return Connection(client.ApiClient(conf), namespace or default_ns, chosen["name"])
