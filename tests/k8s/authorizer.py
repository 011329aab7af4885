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


# -- escalation prevention ----------------------------------------------------------------------------
#
# Creating or updating a Role or RoleBinding is refused unless the requester already holds every
# permission it grants, as Kubernetes v1.32 decides it: pkg/registry/rbac/role/policybased/storage.go
# and rolebinding/policybased/storage.go call ConfirmNoEscalation (pkg/registry/rbac/validation/rule.go),
# which covers each granted rule, broken down into one verb, group, resource and name at a time, by a
# rule the requester holds (pkg/apis/rbac/validation's Covers). EscalationAllowed
# (pkg/registry/rbac/escalation_check.go) waives it for the system:masters group and for whoever may
# ``escalate`` roles; a RoleBinding is also allowed to whoever may ``bind`` the role it names
# (BindingAuthorized).

MASTERS = "system:masters"


def simple_rules(rule: Obj) -> list[tuple[str, str, str, str | None]]:
    """(verb, group, resource, name) for every combination a rule grants (BreakdownRule)."""
    names = rule.get("resourceNames") or [None]
    return [(verb, group, resource, name) for group in rule.get("apiGroups") or [] for resource in rule.get("resources") or []
            for verb in rule.get("verbs") or [] for name in names]


def _covers(owner: Obj, verb: str, group: str, resource: str, name: str | None) -> bool:
    """Whether a held rule covers one granted (verb, group, resource, name): wildcards cover everything
    of their kind, a held rule with names covers only grants of those names (rbac validation ruleCovers)."""
    verbs, groups = owner.get("verbs") or [], owner.get("apiGroups") or []
    if "*" not in verbs and verb not in verbs:
        return False
    if "*" not in groups and group not in groups:
        return False
    resources = owner.get("resources") or []
    sub = resource.partition("/")[2]
    if not any(r in ("*", resource) or (sub and r == f"*/{sub}") for r in resources):
        return False
    held_names = owner.get("resourceNames") or []
    return not held_names or (name is not None and name in held_names)


def missing_for_grant(who: Requester, rules: Iterable[Obj], namespace: str,
                      lookup: Callable[[str, str | None], Iterable[Obj]]) -> list[str]:
    """The parts of ``rules`` that ``who`` does not hold in ``namespace``, as the API server lists them
    (empty: the grant is no escalation)."""
    held = rules_for(who, namespace, lookup)
    missing = []
    for rule in rules:
        for verb, group, resource, name in simple_rules(rule):
            if not any(_covers(owner, verb, group, resource, name) for owner in held):
                names = f', ResourceNames:["{name}"]' if name else ""
                missing.append(f'{{APIGroups:["{group}"], Resources:["{resource}"]{names}, Verbs:["{verb}"]}}')
    return missing


def escalation_problem(who: Requester, kind: str, obj: Obj, namespace: str,
                       lookup: Callable[[str, str | None], Iterable[Obj]]) -> str | None:
    """Why creating or updating the Role or RoleBinding ``obj`` would be an escalation for ``who``, or None.

    Example:
        >>> alice = Requester("alice", ("system:authenticated",))
        >>> holds = {"Role": [{"metadata": {"name": "r"}, "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]}],
        ...          "RoleBinding": [{"subjects": [{"kind": "User", "name": "alice"}],
        ...                           "roleRef": {"apiGroup": RBAC_GROUP, "kind": "Role", "name": "r"}}]}
        >>> lookup = lambda kind, ns: holds.get(kind, [])
        >>> escalation_problem(alice, "Role", {"rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"],
        ...                                               "resourceNames": ["job"]}]}, "ml", lookup) is None
        True
        >>> print(escalation_problem(alice, "Role", {"rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]},
        ...                          "ml", lookup))
        user "alice" (groups=["system:authenticated"]) is attempting to grant RBAC permissions not currently held:
        {APIGroups:[""], Resources:["secrets"], Verbs:["get"]}
    """
    if MASTERS in who.groups:
        return None
    plural = "roles" if kind == "Role" else "rolebindings"
    if allowed(who, "escalate", RBAC_GROUP, plural, None, namespace, None, lookup):
        return None
    rules = obj.get("rules") or []
    if plural == "rolebindings":
        ref = obj.get("roleRef") or {}
        if allowed(who, "bind", RBAC_GROUP, "roles" if ref.get("kind") == "Role" else "clusterroles", None, namespace,
                   ref.get("name"), lookup):
            return None
        scope = namespace if ref.get("kind") == "Role" else None
        role = next((r for r in lookup(ref.get("kind", ""), scope) if r["metadata"]["name"] == ref.get("name")), None)
        if role is None:  # GetRoleReferenceRules fails: the binding is refused
            return f'{ref.get("kind", "role").lower()}s.{RBAC_GROUP} "{ref.get("name")}" not found'
        rules = role.get("rules") or []
    missing = missing_for_grant(who, rules, namespace, lookup)
    if not missing:
        return None
    groups = ",".join(f'"{g}"' for g in who.groups)
    return f'user "{who.user}" (groups=[{groups}]) is attempting to grant RBAC permissions not currently held:\n' + "\n".join(missing)
