"""RBAC authorization as the Kubernetes API server decides it, over the Roles and bindings in a store.

The emulator asks this for every request made with a user's token (``KubeEmulator.add_user``),
so a test can run dsnb as a subject bound to exactly the Role ``dsnb rbac`` prints and see
the 403 a real cluster would answer for a verb that Role lacks.

It plays the RBAC authorizer of Kubernetes v1.32 (the version the emulator reports): rule matching as in
``pkg/apis/rbac/v1/evaluation_helpers.go`` (``VerbMatches``, ``APIGroupMatches``,
``ResourceMatches`` with ``*`` and ``*/subresource``, ``ResourceNameMatches``: an empty list
matches every name, a non-empty one only requests that name an object, so never create, list
or watch of a collection), and which bindings apply as in
``pkg/registry/rbac/validation/rule.go`` (``VisitRulesFor``: every ClusterRoleBinding, then
the RoleBindings of the request's namespace, whose ``roleRef`` may name a Role of that
namespace or a ClusterRole; ``appliesTo``: a User subject by name, a Group by the user's
groups, a ServiceAccount as ``system:serviceaccount:<namespace>:<name>``, its namespace
defaulting to the binding's). Nothing is allowed unless a rule allows it; RBAC has no deny.
Discovery (``/api``, ``/apis``) is open to every authenticated user, as the default
``system:discovery`` binding makes it.

Example:
    >>> role = {"rules": [{"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get"]}]}
    >>> rule_allows(role["rules"][0], "get", "", "pods", "log", "p-0")
    True
    >>> rule_allows(role["rules"][0], "list", "", "pods", None, None)
    False
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]
RBAC_GROUP = "rbac.authorization.k8s.io"


@dataclass(frozen=True)
class Requester:
    """Who makes a request: a user name and the groups the authenticator gave it."""

    user: str
    groups: tuple[str, ...] = ()

    @classmethod
    def service_account(cls, namespace: str, name: str) -> Requester:
        """A ServiceAccount's identity, as its token authenticates it."""
        return cls(f"system:serviceaccount:{namespace}:{name}",
                   ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"))


def rule_allows(rule: Obj, verb: str, group: str, resource: str, subresource: str | None, name: str | None) -> bool:
    """Whether one PolicyRule allows a request (``evaluation_helpers.go``)."""
    verbs, groups = rule.get("verbs") or [], rule.get("apiGroups") or []
    if "*" not in verbs and verb not in verbs:
        return False
    if "*" not in groups and group not in groups:
        return False
    combined = f"{resource}/{subresource}" if subresource else resource
    resources = rule.get("resources") or []
    if not any(r in ("*", combined) or (subresource and r == f"*/{subresource}") for r in resources):
        return False
    names = rule.get("resourceNames") or []
    return not names or (name is not None and name in names)


def _applies_to(subject: Obj, who: Requester, binding_namespace: str) -> bool:
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "User":
        return name == who.user
    if kind == "Group":
        return name in who.groups
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_namespace
        return who.user == f"system:serviceaccount:{namespace}:{name}"
    return False


def rules_for(who: Requester, namespace: str | None, lookup: Callable[[str, str | None], Iterable[Obj]]) -> list[Obj]:
    """Every rule granted to ``who`` for requests in ``namespace`` (None: at the cluster scope).

    Args:
        lookup: ``(kind, namespace) -> objects`` of the store, for Role, ClusterRole, RoleBinding
            and ClusterRoleBinding (namespace None for the cluster-scoped kinds).
    """
    def role_rules(ref: Obj, binding_namespace: str | None) -> list[Obj]:
        if ref.get("apiGroup") != RBAC_GROUP:
            return []
        kind = ref.get("kind")
        scope = binding_namespace if kind == "Role" else None
        if kind not in ("Role", "ClusterRole") or (kind == "Role" and binding_namespace is None):
            return []
        for role in lookup(kind, scope):
            if role["metadata"]["name"] == ref.get("name"):
                return list(role.get("rules") or [])
        return []  # a binding to a missing role grants nothing

    rules: list[Obj] = []
    for binding in lookup("ClusterRoleBinding", None):
        if any(_applies_to(s, who, "") for s in binding.get("subjects") or []):
            rules += role_rules(binding.get("roleRef") or {}, None)
    if namespace:
        for binding in lookup("RoleBinding", namespace):
            if any(_applies_to(s, who, namespace) for s in binding.get("subjects") or []):
                rules += role_rules(binding.get("roleRef") or {}, namespace)
    return rules


def allowed(who: Requester, verb: str, group: str, resource: str, subresource: str | None, namespace: str | None,
            name: str | None, lookup: Callable[[str, str | None], Iterable[Obj]]) -> bool:
    """Whether RBAC lets ``who`` make this request."""
    return any(rule_allows(rule, verb, group, resource, subresource, name) for rule in rules_for(who, namespace, lookup))


def forbidden_message(who: Requester, verb: str, group: str, resource: str, subresource: str | None,
                      namespace: str | None, name: str | None) -> str:
    """The 403 message the API server writes for a refused request."""
    combined = f"{resource}/{subresource}" if subresource else resource
    what = f'{combined} "{name}"' if name else combined
    where = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
    return f'{what} is forbidden: User "{who.user}" cannot {verb} resource "{combined}" in API group "{group}"{where}'
