"""The API permissions each Kubernetes backend needs, and the namespaced Role that grants them.

Example:
    >>> print(STATEFULSET_PERMISSIONS[0])
    configmaps: create, get, list, watch, patch, delete
    >>> role, binding = role_manifests(STATEFULSET_PERMISSIONS, "ml", "ServiceAccount", "jupyter")
    >>> role["rules"][0]
    {'apiGroups': [''], 'resources': ['configmaps'], 'verbs': ['create', 'get', 'list', 'watch', 'patch', 'delete']}
    >>> binding["subjects"]
    [{'kind': 'ServiceAccount', 'name': 'jupyter', 'namespace': 'ml'}]
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from dsnb.backends.kubernetes.labels import job_labels

RBAC_API = "rbac.authorization.k8s.io"
SUBJECT_KINDS = ("ServiceAccount", "User", "Group")
#: Said (and written into the YAML) when the Role is bound to the namespace's ``default`` account.
DEFAULT_ACCOUNT_WARNING = ("binding to ServiceAccount 'default' gives these rights to every pod of the namespace that "
                           "names no account (other tools' pods too; dsnb's own job pods never run with its token); "
                           "prefer your notebook server's own account (--service-account NAME) or your login (--user NAME)")


@dataclass(frozen=True)
class Permission:
    """Verbs on one resource of one API group ("" is the core group)."""

    group: str
    resource: str
    verbs: tuple[str, ...]

    def __str__(self) -> str:
        where = f"{self.resource}.{self.group}" if self.group else self.resource
        return f"{where}: {', '.join(self.verbs)}"


#: What dsnb itself does in the namespace for every Kubernetes backend: job records,
#: log archives, Secrets for secret env values, watching pods, reading logs and events.
#: No more: workloads and pods are only listed and watched (never read one by one), and what
#: a job owns is deleted with its record. ``tests/test_k8s_rbac.py`` runs every backend as a
#: user bound to exactly this Role and checks that each verb is used.
COMMON_PERMISSIONS = (
    Permission("", "configmaps", ("create", "get", "list", "watch", "patch", "delete")),
    Permission("", "secrets", ("create", "delete")),
    Permission("", "pods", ("list", "watch")),
    Permission("", "pods/log", ("get",)),
    Permission("", "events", ("list",)),
)
#: ``PodOptions(network_policy=True)``: a NetworkPolicy ``<job>``, which goes with the job's record (every backend).
NETWORK_POLICIES = Permission("networking.k8s.io", "networkpolicies", ("create",))
#: ``PodOptions(queue=...)``: read the LocalQueue, the job's Workload and its place in the queue (Kueue's
#: visibility API); ``dsnb rbac --kueue`` adds them.
KUEUE_PERMISSIONS = (
    Permission("kueue.x-k8s.io", "localqueues", ("get", "list")),
    Permission("kueue.x-k8s.io", "workloads", ("list",)),
    Permission("visibility.kueue.x-k8s.io", "localqueues/pendingworkloads", ("get",)),
)



def with_serving(permissions: Sequence[Permission]) -> tuple[Permission, ...]:
    """``permissions`` plus what serving a model as a job needs: create and delete its Service,
    and get Secrets (a reattached endpoint reads its token from ``<job>-env``). Lines for the
    core group come first, as in :data:`COMMON_PERMISSIONS`.

    Example:
        >>> [str(p) for p in with_serving(COMMON_PERMISSIONS) if p.resource in ("secrets", "services")]
        ['secrets: create, get, delete', 'services: create, delete']
    """
    order = ("create", "get", "list", "watch", "patch", "delete")
    wanted = {("", "secrets"): ("create", "get", "delete"), ("", "services"): ("create", "delete")}
    result = []
    for permission in permissions:
        verbs = wanted.pop((permission.group, permission.resource), None)
        if verbs is not None:
            merged = {*permission.verbs, *verbs}
            permission = Permission(permission.group, permission.resource, tuple(v for v in order if v in merged))
        result.append(permission)
    core = next((i for i, p in enumerate(result) if p.group), len(result))
    result[core:core] = [Permission(group, resource, verbs) for (group, resource), verbs in wanted.items()]
    return tuple(result)


#: The StatefulSet backend: its set and headless Service, serving (a Service, the token's Secret), and
#: each job's own ServiceAccount, Role and RoleBinding (:func:`job_role_manifests`). The API server lets
#: a user grant only what the user holds, so ``statefulsets/scale: patch`` is here for the job's Role to
#: pass on; they go with the job's record.
STATEFULSET_PERMISSIONS = with_serving((
    *COMMON_PERMISSIONS,
    Permission("", "services", ("create", "delete")),
    Permission("", "serviceaccounts", ("create",)),
    Permission("apps", "statefulsets", ("create", "delete")),
    Permission("apps", "statefulsets/scale", ("patch",)),
    Permission(RBAC_API, "roles", ("create",)),
    Permission(RBAC_API, "rolebindings", ("create",)),
)) + (NETWORK_POLICIES,)


def job_role_manifests(job: str, namespace: str, service_account: str | None = None) -> list[dict[str, Any]]:
    """What the pods of StatefulSet job ``job`` may do themselves, and nothing more: write their outcome into
    the job's record and scale the job's StatefulSet to 0 when it ended (see
    :mod:`dsnb.runtime.pod_api`), each by ``resourceNames``.

    Returns a ServiceAccount ``<job>`` (unless the pods run as ``service_account``, which then gets the
    Role instead), a Role ``<job>`` and a RoleBinding ``<job>``.

    Example:
        >>> account, role, binding = job_role_manifests("tiny-gpt-x7k2", "ml")
        >>> [(r["resources"], r["resourceNames"], r["verbs"]) for r in role["rules"]]
        [(['configmaps'], ['tiny-gpt-x7k2'], ['get', 'patch']), (['statefulsets/scale'], ['tiny-gpt-x7k2'], ['patch'])]
        >>> binding["subjects"]
        [{'kind': 'ServiceAccount', 'name': 'tiny-gpt-x7k2', 'namespace': 'ml'}]
    """
    rules = [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [job], "verbs": ["get", "patch"]},
        {"apiGroups": ["apps"], "resources": ["statefulsets/scale"], "resourceNames": [job], "verbs": ["patch"]},
    ]
    meta = {"name": job, "namespace": namespace, "labels": job_labels(job)}
    manifests: list[dict[str, Any]] = []
    if service_account is None:
        manifests.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": copy.deepcopy(meta)})
    manifests.append({"apiVersion": f"{RBAC_API}/v1", "kind": "Role", "metadata": copy.deepcopy(meta), "rules": rules})
    manifests.append({"apiVersion": f"{RBAC_API}/v1", "kind": "RoleBinding", "metadata": copy.deepcopy(meta),
                      "subjects": [{"kind": "ServiceAccount", "name": service_account or job, "namespace": namespace}],
                      "roleRef": {"apiGroup": RBAC_API, "kind": "Role", "name": job}})
    return manifests


def role_manifests(
    permissions: Sequence[Permission],
    namespace: str,
    subject_kind: str,
    subject_name: str,
    name: str = "dsnb",
) -> list[dict[str, Any]]:
    """A Role granting ``permissions`` in ``namespace``, and a RoleBinding giving it to one subject.

    Args:
        permissions: what the backend needs, e.g. ``STATEFULSET_PERMISSIONS``.
        namespace: where the jobs go.
        subject_kind: ``"ServiceAccount"`` (a notebook pod's identity), ``"User"`` or ``"Group"``.
        subject_name: the service account (in ``namespace``), user or group name.
        name: the name of both the Role and the RoleBinding.

    Raises:
        ValueError: an unknown subject kind, or an empty subject name.

    Example:
        >>> role, binding = role_manifests(STATEFULSET_PERMISSIONS, "ml", "User", "alice@example.com")
        >>> binding["subjects"], binding["roleRef"]["name"]
        ([{'kind': 'User', 'apiGroup': 'rbac.authorization.k8s.io', 'name': 'alice@example.com'}], 'dsnb')
    """
    if subject_kind not in SUBJECT_KINDS:
        raise ValueError(f"RoleBinding {name!r}: unknown subject kind {subject_kind!r}; use one of {', '.join(SUBJECT_KINDS)}")
    if not subject_name:
        raise ValueError(f"RoleBinding {name!r}: the {subject_kind} name is empty; name who gets the Role")
    rules = [{"apiGroups": [p.group], "resources": [p.resource], "verbs": list(p.verbs)} for p in permissions]
    if subject_kind == "ServiceAccount":
        subject = {"kind": subject_kind, "name": subject_name, "namespace": namespace}
    else:
        subject = {"kind": subject_kind, "apiGroup": RBAC_API, "name": subject_name}
    role = {
        "apiVersion": f"{RBAC_API}/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace},
        "rules": rules,
    }
    binding = {
        "apiVersion": f"{RBAC_API}/v1",
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": namespace},
        "subjects": [subject],
        "roleRef": {"apiGroup": RBAC_API, "kind": "Role", "name": name},
    }
    return [role, binding]


def render_rbac(
    permissions: Sequence[Permission],
    namespace: str,
    subject_kind: str,
    subject_name: str,
    name: str = "dsnb",
    backend: str = "",
) -> str:
    """The Role and RoleBinding of :func:`role_manifests` as YAML for ``kubectl apply -f -``.

    Raises:
        ValueError: an unknown subject kind, or an empty subject name.

    Example:
        >>> print(render_rbac(STATEFULSET_PERMISSIONS, "ml", "User", "alice@example.com", backend="statefulset").splitlines()[0])
        # Role for dsnb's statefulset backend in namespace ml, bound to User alice@example.com.
    """
    manifests = role_manifests(permissions, namespace, subject_kind, subject_name, name)
    who = f"{namespace}/{subject_name}" if subject_kind == "ServiceAccount" else subject_name
    what = f"dsnb's {backend} backend" if backend else "dsnb"
    header = (f"# Role for {what} in namespace {namespace}, bound to {subject_kind} {who}.\n"
              "# Apply it with: kubectl apply -f <this file>\n")
    if subject_kind == "ServiceAccount" and subject_name == "default":
        header += f"# Warning: {DEFAULT_ACCOUNT_WARNING}.\n"
    return header + yaml.safe_dump_all(manifests, sort_keys=False)

MPIJOB_PERMISSIONS = with_serving((
    *COMMON_PERMISSIONS,
    Permission("kubeflow.org", "mpijobs", ("create", "list", "watch", "delete")),
)) + (NETWORK_POLICIES,)

#: ClusterTrainingRuntimes are cluster-wide: reading them needs a ClusterRole (Kubeflow
#: Trainer v2.3.0's kubeflow-platform install binds one to every authenticated user), so only
#: the namespaced kinds are here.
TRAINJOB_PERMISSIONS = with_serving((
    *COMMON_PERMISSIONS,
    Permission("trainer.kubeflow.org", "trainjobs", ("create", "list", "watch", "delete")),
    # create, delete: each job runs from a TrainingRuntime of its own (its image on every pod, its restarts).
    Permission("trainer.kubeflow.org", "trainingruntimes", ("create", "get", "list", "delete")),
)) + (NETWORK_POLICIES,)

#: KubeRay (``Cluster("kuberay")``): RayJobs for batch jobs, RayServices for serving.
#: The Ray clusters, submitter Jobs and their pods are KubeRay's to create; dsnb only reads the pods.
KUBERAY_PERMISSIONS = (
    *COMMON_PERMISSIONS,
    Permission("ray.io", "rayjobs", ("create", "list", "watch", "delete")),
    # A RayService is read by name and listed, never watched; it goes with its record (ownerReferences).
    Permission("ray.io", "rayservices", ("create", "get", "list")),
    NETWORK_POLICIES,
)
