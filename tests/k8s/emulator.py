"""An in-process Kubernetes API server for tests: real HTTP, an in-memory store, watches and logs.

The official ``kubernetes`` client talks to it as it would to a cluster, while test code plays
the controllers and the kubelet through direct store calls (``create``, ``patch_status``,
``append_log``, ...), which need no HTTP. Standard library only; every structure is bounded.

Example:
    >>> from kubernetes import client
    >>> with KubeEmulator(namespaces=("ml",)) as emu:
    ...     with client.ApiClient(emu.configuration()) as api:
    ...         _ = client.CoreV1Api(api).create_namespaced_config_map("ml", {"metadata": {"name": "cfg"}, "data": {"a": "1"}})
    ...     emu.get("v1", "ConfigMap", "ml", "cfg")["data"]
    {'a': '1'}

Close to the real API server where the official client can tell:
    * errors are ``Status`` bodies; a watch from a forgotten resourceVersion gets a 410 ERROR event;
    * a resource with a ``/status`` subresource ignores ``.status`` in writes to the main resource
      (and drops it on create), while ``/status`` writes change nothing else;
    * a write that changes nothing keeps the resourceVersion and sends no event;
    * deleting a batch/v1 Job through the API orphans its pods unless a propagationPolicy says otherwise;
    * a request made with the token of a user added by ``add_user`` is authorized by RBAC over the
      Roles, ClusterRoles and bindings in the store, as the real RBAC authorizer decides
      (``k8s/authorizer.py``): 403 for anything no bound rule grants, and access reviews answer the same;
    * a request for something in ``denied`` is answered 403 (set ``enforce_denied = False`` to only
      make SelfSubjectAccessReview say no); ``denied_cluster_wide`` does so only at the cluster scope,
      as for a user whose Roles are bound in some namespaces;
    * a kind taken away with ``remove_resource`` is not served, as when its CRD is not installed: 404,
      or 403 for a request ``denied`` would refuse (authorization comes before routing);
    * reading the log of a Pending pod's container that has printed nothing is a 400 ("waiting to start"),
      and a pod with several containers needs ``container=``;
    * a Secret's ``stringData`` is merged into ``data`` (base64) on create, and not stored;
    * a ConfigMap or Secret holding more than 1 MiB (``data`` plus ``binaryData``, decoded) is refused
      (422, as ``ValidateConfigMap``/``ValidateSecret`` do), as is a key that is not a valid
      ConfigMap key, a key in both ``data`` and ``binaryData``, undecodable base64 (400), and a
      change to the data of an ``immutable`` ConfigMap;
    * deleting a pod that runs on a node marks it (``deletionTimestamp``) for its grace period; it goes
      when its kubelet deletes it with grace 0 (``k8s/sim.py``); an object with ``finalizers`` stays,
      marked, until they are removed;
    * every namespace has a ``default`` ServiceAccount; a pod naming a missing account is refused
      (403), and one that does not opt out gets the projected token volume; a token from
      ``service_account_token`` is authorized by RBAC as that account, and refused (401) once it is gone;
      ``in_cluster`` serves the same API over TLS for pods, with a CA of its own;
    * StatefulSets and Deployments have a ``/scale`` subresource (autoscaling/v1 ``Scale``);
    * a user may create a Role or RoleBinding only for what the user holds (RBAC's escalation check,
      ``authorizer.escalation_problem``), unless allowed to ``escalate`` or ``bind``;
    * a custom resource whose CRD schema was given (``add_schema``) loses the fields that schema does
      not know when created or replaced through the API, or is refused (400, "strict decoding error")
      with ``fieldValidation=Strict``.

Not emulated: admission (beyond the ServiceAccount plugin and the ``admission`` checks a test gives), server-side apply,
``limit``/``continue`` paging, strategic merge by list keys (strategic merge patches are JSON merge
patches, so lists are replaced), and most defaulting.
"""

from __future__ import annotations

import base64
import calendar
import copy
import itertools
import json
import random
import re
import select
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from k8s import authorizer, structural
from k8s.authorizer import Requester

if TYPE_CHECKING:
    from kubernetes.client import Configuration

Obj = dict[str, Any]

KUBE_VERSION = {
    "major": "1", "minor": "32", "gitVersion": "v1.32.0", "gitCommit": "70d3cc986aa8221cd1dfb1121852688902d3bf53",
    "gitTreeState": "clean", "buildDate": "2024-12-11T17:59:15Z", "goVersion": "go1.23.3", "compiler": "gc",
    "platform": "linux/amd64",
}
USER = "system:serviceaccount:default:tester"
MERGE_PATCH_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")
JSON_PATCH_TYPE = "application/json-patch+json"
POLICIES = ("Background", "Foreground", "Orphan")
# Seconds a serving thread waits before looking again for a hung-up client or a passed deadline.
POLL_S = 0.5
#: Where the ServiceAccount admission plugin mounts a pod's token, CA and namespace.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


# -- the kinds served ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    """One kind the emulator serves, with its URL name and scope.

    Example:
        >>> r = Resource("apps/v1", "StatefulSet", "statefulsets", status=True)
        >>> (r.group, r.version)
        ('apps', 'v1')
    """

    api_version: str
    kind: str
    plural: str
    namespaced: bool = True
    status: bool = False  # has a /status subresource
    returns_deleted: bool = True  # DELETE answers with the object, else with a Status
    default_propagation: str = "Background"

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    @property
    def path(self) -> tuple[str, str, str]:
        """What identifies it in URLs and in the store: (group, version, plural)."""
        return self.group, self.version, self.plural


#: The kinds every emulator starts with; extend with ``KubeEmulator.add_resource``.
RESOURCES: list[Resource] = [
    Resource("v1", "Namespace", "namespaces", namespaced=False, status=True),
    Resource("v1", "Node", "nodes", namespaced=False, status=True, returns_deleted=False),
    Resource("v1", "Pod", "pods", status=True),
    Resource("v1", "Service", "services", status=True),
    Resource("v1", "ConfigMap", "configmaps", returns_deleted=False),
    Resource("v1", "Secret", "secrets", returns_deleted=False),
    Resource("v1", "Event", "events", returns_deleted=False),
    Resource("v1", "ServiceAccount", "serviceaccounts"),
    Resource("v1", "PersistentVolumeClaim", "persistentvolumeclaims", status=True),
    Resource("apps/v1", "StatefulSet", "statefulsets", status=True, returns_deleted=False),
    Resource("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies", returns_deleted=False),
    Resource("apps/v1", "Deployment", "deployments", status=True, returns_deleted=False),
    # The API (unlike kubectl) orphans a Job's pods unless told otherwise.
    Resource("batch/v1", "Job", "jobs", status=True, returns_deleted=False, default_propagation="Orphan"),
    Resource("rbac.authorization.k8s.io/v1", "Role", "roles", returns_deleted=False),
    Resource("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings", returns_deleted=False),
    Resource("rbac.authorization.k8s.io/v1", "ClusterRole", "clusterroles", namespaced=False, returns_deleted=False),
    Resource("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "clusterrolebindings", namespaced=False, returns_deleted=False),
    Resource("apiextensions.k8s.io/v1", "CustomResourceDefinition", "customresourcedefinitions", namespaced=False, status=True),
    Resource("kubeflow.org/v2beta1", "MPIJob", "mpijobs", status=True),
    Resource("trainer.kubeflow.org/v1alpha1", "TrainJob", "trainjobs", status=True),
    Resource("trainer.kubeflow.org/v1alpha1", "TrainingRuntime", "trainingruntimes"),
    Resource("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime", "clustertrainingruntimes", namespaced=False),
    Resource("jobset.x-k8s.io/v1alpha2", "JobSet", "jobsets", status=True),
    Resource("ray.io/v1", "RayJob", "rayjobs", status=True),
    Resource("ray.io/v1", "RayCluster", "rayclusters", status=True),
    Resource("ray.io/v1", "RayService", "rayservices", status=True),
]
NAMESPACE, POD = RESOURCES[0], RESOURCES[2]
#: Kinds with a ``/scale`` subresource.
SCALABLE = {("apps", "v1", "statefulsets"), ("apps", "v1", "deployments")}


def _plural(kind: str) -> str:
    """A kind's URL name, the way CRDs usually spell it: ``Policy`` -> ``policies``."""
    lower = kind.lower()
    if lower.endswith("y") and lower[-2:-1] not in ("a", "e", "i", "o", "u"):
        return lower[:-1] + "ies"
    return lower + ("es" if lower.endswith("s") else "s")


def _kind_from_plural(plural: str) -> str:
    """Best guess at the kind behind a URL name: ``widgets`` -> ``Widget``."""
    if plural.endswith("ies"):
        singular = plural[:-3] + "y"
    elif plural.endswith("ses"):
        singular = plural[:-2]
    else:
        singular = plural.removesuffix("s")
    return singular[:1].upper() + singular[1:]


# -- errors -------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A failure, carrying the ``Status`` body the API server would send.

    Example:
        >>> ApiError(404, "NotFound", 'pods "x" not found').status()["reason"]
        'NotFound'
    """

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> Obj:
        body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                     "message": self.message, "reason": self.reason, "code": self.code}
        if self.details is not None:
            body["details"] = self.details
        return body


def _details(res: Resource, name: str) -> Obj:
    return {"name": name, "group": res.group, "kind": res.plural}


def _not_found(res: Resource, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{res.plural} "{name}" not found', _details(res, name))


def _no_route() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def _conflict(res: Resource, name: str) -> ApiError:
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {res.plural} "{name}": the object has been '
                    "modified; please apply your changes to the latest version and try again", _details(res, name))


def _invalid(res: Resource, name: str, path: str, why: str, reason: str = "FieldValueInvalid") -> ApiError:
    details = {"name": name, "group": res.group, "kind": res.kind,
               "causes": [{"reason": reason, "message": why, "field": path}]}
    return ApiError(422, "Invalid", f'{res.kind} "{name}" is invalid: {path}: {why}', details)


def _expired(since: int, oldest: int) -> ApiError:
    return ApiError(410, "Expired", f"too old resource version: {since} ({oldest})")


# -- time -----------------------------------------------------------------------------------------------


def _rfc3339(seconds: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _rfc3339_nano(ns: int) -> str:
    """A kubelet-style timestamp with all nine digits.

    Example:
        >>> _rfc3339_nano(1_800_000_000_000_000_123)
        '2027-01-15T08:00:00.000000123Z'
    """
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"


_TIME = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(\.\d+)?([Zz]|[+-]\d\d:\d\d)$")


def _parse_seconds(text: str) -> int:
    """Whole seconds since the epoch of an RFC 3339 time; the fraction is dropped, as the server does.

    Example:
        >>> _parse_seconds("1970-01-01T00:01:05.9+00:01")
        5
    """
    m = _TIME.match(text)
    if m is None:
        raise _bad_request(f'invalid time "{text}": expected RFC 3339')
    seconds = calendar.timegm(tuple(int(g) for g in m.groups()[:6]))
    zone = m.group(8)
    if zone not in ("Z", "z"):
        offset = int(zone[1:3]) * 3600 + int(zone[4:6]) * 60
        seconds -= offset if zone[0] == "+" else -offset
    return seconds


# -- selectors ----------------------------------------------------------------------------------------

LabelTest = Callable[[dict[str, str]], bool]
_SET_TERM = re.compile(r"^([^\s!=(),]+)\s+(in|notin)\s*\(([^()]*)\)$")
_EQ_TERM = re.compile(r"^([^\s!=(),]+)\s*(==|=|!=)\s*([^\s!=(),]*)$")
_KEY_TERM = re.compile(r"^(!?)\s*([^\s!=(),]+)$")


def _terms(text: str) -> list[str]:
    """Split on the commas that are not inside ``( )``."""
    terms, depth, current = [], 0, []
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            terms.append("".join(current))
            current = []
        else:
            current.append(ch)
    terms.append("".join(current))
    return [t.strip() for t in terms if t.strip()]


def _label_test(term: str) -> LabelTest:
    if m := _SET_TERM.match(term):
        key, values = m.group(1), {v.strip() for v in m.group(3).split(",") if v.strip()}
        if m.group(2) == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if m := _EQ_TERM.match(term):
        key, op, value = m.groups()
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if m := _KEY_TERM.match(term):
        negate, key = m.group(1) == "!", m.group(2)
        return lambda labels: (key in labels) != negate
    raise _bad_request(f'unable to parse requirement: found "{term}", expected a label selector term')


def parse_label_selector(text: str) -> list[LabelTest]:
    """Tests that all have to hold for a label selector to match.

    Example:
        >>> tests = parse_label_selector("app=web,tier in (a, b),!legacy")
        >>> all(t({"app": "web", "tier": "b"}) for t in tests), all(t({"app": "web"}) for t in tests)
        (True, False)
    """
    return [_label_test(term) for term in _terms(text)]


def _field_value(obj: Obj, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def parse_field_selector(text: str) -> list[Callable[[Obj], bool]]:
    """Tests for a field selector; any dotted path works (the real server allows only some per kind).

    Example:
        >>> [t({"metadata": {"name": "a"}}) for t in parse_field_selector("metadata.name=a,status.phase!=Running")]
        [True, True]
    """
    tests = []
    for term in _terms(text):
        m = re.match(r"^([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*)$", term)
        if m is None:
            raise _bad_request(f'invalid field selector "{term}"')
        path, op, value = m.groups()
        tests.append((lambda o, p=path, v=value: _field_value(o, p) != v) if op == "!=" else
                     (lambda o, p=path, v=value: _field_value(o, p) == v))
    return tests


# -- patches ------------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, null deletes, anything else replaces.

    Example:
        >>> merge_patch({"a": 1, "b": {"c": 2}}, {"a": None, "b": {"d": 3}})
        {'b': {'c': 2, 'd': 3}}
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise _patch_error(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _patch_error(why: str) -> ApiError:
    return ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: {why}")


def _index(container: list[Any], token: str, adding: bool) -> int:
    if adding and token == "-":
        return len(container)
    if not token.isdigit() or int(token) > len(container) - (0 if adding else 1):
        raise _patch_error(f"array index {token!r} out of range")
    return int(token)


def _parent(doc: Any, tokens: list[str]) -> Any:
    for token in tokens[:-1]:
        if isinstance(doc, dict) and token in doc:
            doc = doc[token]
        elif isinstance(doc, list):
            doc = doc[_index(doc, token, False)]
        else:
            raise _patch_error(f"path segment {token!r} does not exist")
    return doc


def _get_at(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        return doc
    parent, last = _parent(doc, tokens), tokens[-1]
    if isinstance(parent, dict) and last in parent:
        return parent[last]
    if isinstance(parent, list):
        return parent[_index(parent, last, False)]
    raise _patch_error(f"path segment {last!r} does not exist")


def _add_at(doc: Any, tokens: list[str], value: Any, replace: bool) -> Any:
    if not tokens:
        return value
    parent, last = _parent(doc, tokens), tokens[-1]
    if isinstance(parent, dict):
        if replace and last not in parent:
            raise _patch_error(f"cannot replace missing key {last!r}")
        parent[last] = value
    elif isinstance(parent, list):
        i = _index(parent, last, not replace)
        if replace:
            parent[i] = value
        else:
            parent.insert(i, value)
    else:
        raise _patch_error(f"cannot add {last!r} to a scalar")
    return doc


def _remove_at(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise _patch_error("cannot remove the whole document")
    parent, last = _parent(doc, tokens), tokens[-1]
    if isinstance(parent, dict) and last in parent:
        del parent[last]
    elif isinstance(parent, list):
        del parent[_index(parent, last, False)]
    else:
        raise _patch_error(f"cannot remove missing {last!r}")
    return doc


def json_patch(doc: Any, operations: Iterable[Obj]) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test), applied to a copy of ``doc``.

    Example:
        >>> json_patch({"a": [1]}, [{"op": "add", "path": "/a/-", "value": 2}, {"op": "remove", "path": "/a/0"}])
        {'a': [2]}
    """
    doc = copy.deepcopy(doc)
    for op in operations:
        if not isinstance(op, dict):
            raise _patch_error("every operation must be an object")
        name, tokens = op.get("op"), _pointer(op.get("path"))
        if name in ("add", "replace"):
            if "value" not in op:
                raise _patch_error(f"{name} needs a value")
            doc = _add_at(doc, tokens, copy.deepcopy(op["value"]), replace=name == "replace")
        elif name == "remove":
            doc = _remove_at(doc, tokens)
        elif name in ("move", "copy"):
            source = _pointer(op.get("from"))
            value = copy.deepcopy(_get_at(doc, source))
            if name == "move":
                doc = _remove_at(doc, source)
            doc = _add_at(doc, tokens, value, replace=False)
        elif name == "test":
            if _get_at(doc, tokens) != op.get("value"):
                raise _patch_error(f"test operation failed at {op.get('path')!r}")
        else:
            raise _patch_error(f"unknown operation {name!r}")
    return doc


# -- validation ---------------------------------------------------------------------------------------

_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_PART = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _name_problem(kind: str, name: str) -> str | None:
    if kind in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"):
        bad = name in (".", "..") or "/" in name or "%" in name
        return "may not be '.' or '..' or contain '/' or '%'" if bad else None
    if kind == "Namespace":
        ok = len(name) <= 63 and _DNS_LABEL.match(name)
        return None if ok else "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"
    if kind == "Service":
        ok = len(name) <= 63 and _DNS1035_LABEL.match(name)
        return None if ok else "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character"
    ok = len(name) <= 253 and _SUBDOMAIN.match(name)
    return None if ok else "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"


def _label_problem(key: Any, value: Any) -> str | None:
    if not isinstance(key, str) or not isinstance(value, str):
        return "label keys and values must be strings"
    prefix, _, name = key.rpartition("/")
    if (prefix and (len(prefix) > 253 or not _SUBDOMAIN.match(prefix))) or not name or len(name) > 63 or not _LABEL_PART.match(name):
        return f'Invalid value: "{key}": name part must consist of alphanumeric characters, \'-\', \'_\' or \'.\', and must start and end with an alphanumeric character'
    if len(value) > 63 or not _LABEL_PART.match(value):
        return f'Invalid value: "{value}": a valid label must be an empty string or consist of alphanumeric characters, \'-\', \'_\' or \'.\', and must start and end with an alphanumeric character'
    return None


#: k8s.io/kubernetes v1.34.1 pkg/apis/core/types.go (MaxSecretSize): the most a Secret's data, or a ConfigMap's
#: data and binaryData, may hold.
MAX_SECRET_SIZE = 1 * 1024 * 1024
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def _config_key_problem(key: Any) -> str | None:
    """k8s.io/apimachinery v0.34.1 pkg/util/validation/validation.go IsConfigMapKey."""
    if not isinstance(key, str) or not key or len(key) > 253:
        return "must be no more than 253 characters"
    if not _CONFIG_KEY.match(key):
        return "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"
    if key in (".", "..") or key.startswith(".."):
        return "must not be '.' or '..'" if key in (".", "..") else "must not start with '..'"
    return None


def _decoded(res: Resource, name: str, value: Any) -> bytes:
    """A ``[]byte`` field as the API server decodes it from JSON (base64), or its 400."""
    try:
        return base64.b64decode(value if isinstance(value, str) else "", validate=True)
    except (ValueError, TypeError) as e:
        raise _bad_request(f'{res.kind} in version "v1" cannot be handled as a {res.kind}: illegal base64 data ({e})') from e


def _validate_data(res: Resource, obj: Obj) -> None:
    """What kube-apiserver checks of a ConfigMap's or Secret's content (k8s.io/kubernetes v1.34.1
    pkg/apis/core/validation/validation.go ValidateConfigMap, ValidateSecret): valid keys, no key in both
    ``data`` and ``binaryData``, and at most ``MaxSecretSize`` bytes in all (``binaryData`` and a Secret's
    ``data`` counted decoded; ``stringData`` merged into ``data`` first, as the API's conversion does)."""
    name = obj["metadata"]["name"]
    if res.kind == "ConfigMap":
        data, binary = obj.get("data") or {}, obj.get("binaryData") or {}
        sizes = {}
        for bag, values in (("data", data), ("binaryData", binary)):
            for key, value in values.items():
                if problem := _config_key_problem(key):
                    raise _invalid(res, name, f"{bag}[{key}]", f'Invalid value: "{key}": {problem}')
                if bag == "data" and key in binary:
                    raise _invalid(res, name, f"data[{key}]", f'Invalid value: "{key}": duplicate of key present in binaryData')
                sizes[bag, key] = len(value.encode()) if bag == "data" else len(_decoded(res, name, value))
        path = ""  # field.NewPath(""): the whole object
    else:
        merged = {key: len(_decoded(res, name, value)) for key, value in (obj.get("data") or {}).items()}
        merged.update({key: len(str(value).encode()) for key, value in (obj.get("stringData") or {}).items()})
        for key in merged:
            if problem := _config_key_problem(key):
                raise _invalid(res, name, f"data[{key}]", f'Invalid value: "{key}": {problem}')
        sizes, path = merged, "data"
    if sum(sizes.values()) > MAX_SECRET_SIZE:
        raise _invalid(res, name, path, f"Too long: may not be more than {MAX_SECRET_SIZE} bytes", reason="FieldValueTooLong")


def _validate(res: Resource, obj: Obj) -> None:
    meta = obj["metadata"]
    name = meta["name"]
    if not isinstance(name, str) or (problem := _name_problem(res.kind, name)):
        raise _invalid(res, str(name), "metadata.name", f'Invalid value: "{name}": {problem or "must be a string"}')
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        raise _invalid(res, name, "metadata.labels", "must be an object")
    for key, value in labels.items():
        if problem := _label_problem(key, value):
            raise _invalid(res, name, "metadata.labels", problem)
    if res.api_version == "v1" and res.kind in ("ConfigMap", "Secret"):
        _validate_data(res, obj)


def _spec_part(obj: Obj) -> Obj:
    """What a change of bumps ``metadata.generation``."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


# -- watches and logs -----------------------------------------------------------------------------------

Matcher = Callable[[Resource, Obj], bool]


class _Watch:
    """One open watch: events are queued under the store lock and drained by the serving thread."""

    def __init__(self, lock: threading.RLock, wanted: Matcher, limit: int) -> None:
        self.cond = threading.Condition(lock)
        self.wanted = wanted
        self.limit = limit
        self.queue: deque[tuple[str, Obj]] = deque()
        self.closed = False
        self.error: Obj | None = None
        self.done = threading.Event()  # set once the response is finished

    def offer(self, kind: str, res: Resource, obj: Obj) -> None:
        """Queue an event if it matches (the caller holds the lock)."""
        if self.closed or not self.wanted(res, obj):
            return
        self.queue.append((kind, obj))
        if len(self.queue) > self.limit:
            # A reader this far behind cannot catch up: make it list again, like an expired version.
            self.queue.clear()
            self.close(ApiError(410, "Expired", "too many events queued for a slow watch; list again").status())
        else:
            self.cond.notify_all()

    def close(self, error: Obj | None = None) -> None:
        """End the stream after the queued events, optionally with an ERROR event (caller holds the lock)."""
        if not self.closed:
            self.closed, self.error = True, error
        self.cond.notify_all()


class _Log:
    """One container's output: (timestamp in ns, text) lines, the oldest dropped past ``limit``."""

    def __init__(self, limit: int) -> None:
        self.lines: deque[tuple[int, str]] = deque(maxlen=limit)
        self.first = 0  # sequence number of lines[0]
        self.ended = False
        self.size = 0  # bytes in the current file
        self.rotations = 0

    def add(self, ns: int, text: str, rotate_bytes: int | None = None) -> None:
        if rotate_bytes is not None and self.size + len(text) + 1 > rotate_bytes:
            # The kubelet's rotation: only the new file is served (pkg/kubelet/logs/container_log_manager.go, v1.32).
            self.first += len(self.lines)
            self.lines.clear()
            self.size = 0
            self.rotations += 1
        if len(self.lines) == self.lines.maxlen:
            self.first += 1
        self.lines.append((ns, text))
        self.size += len(text) + 1

    @property
    def end(self) -> int:
        """Sequence number the next line will get."""
        return self.first + len(self.lines)

    def since(self, seq: int) -> list[tuple[int, str]]:
        return list(itertools.islice(self.lines, max(seq - self.first, 0), None))


def _split_lines(text: str) -> list[str]:
    """``"a\\nb\\n"`` is two lines; ``""`` is one empty line."""
    return text.removesuffix("\n").split("\n")


def _log_bytes(lines: list[tuple[int, str]], timestamps: bool) -> bytes:
    if timestamps:
        return "".join(f"{_rfc3339_nano(ns)} {text}\n" for ns, text in lines).encode()
    return "".join(f"{text}\n" for _, text in lines).encode()


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1")


def _int_param(query: dict[str, str], name: str) -> int | None:
    if name not in query:
        return None
    try:
        return int(query[name])
    except ValueError:
        raise _bad_request(f'invalid value for {name}: "{query[name]}"') from None


@dataclass
class _Reply:
    code: int
    body: Any  # sent as JSON, or as is when bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


Streamer = Callable[["_Handler"], None]


# -- the emulator -----------------------------------------------------------------------------------------


class KubeEmulator:
    """An API server on 127.0.0.1 with an in-memory store, watches, pod logs and access reviews.

    Args:
        namespaces: namespaces that exist from the start.
        token: when set, every request must carry ``Authorization: Bearer <token>`` (else 401).
        history: how many events are kept for watches that resume from a resourceVersion.

    Attributes:
        url: ``http://127.0.0.1:PORT`` once started.
        denied: ``(verb, group, resource)`` triples that access reviews answer "no" for; the resource
            may name a subresource (``"pods/log"``) and any part may be ``"*"``.
        denied_cluster_wide: like ``denied``, but only for requests outside a namespace (across all
            namespaces, or of cluster-scoped kinds) and access reviews without a namespace.
        enforce_denied: also answer matching requests with 403 Forbidden (default True).
        denied_to_service_accounts: like ``denied``, but only for requests made with a ServiceAccount's
            token (a job's pods), as a webhook that refuses what pods send would: the client goes on.
        requests: ``(method, path with query)`` of every HTTP request, the last 10,000.
        granted: ``(user, verb, group, resource)`` of every request RBAC allowed a user added by ``add_user``.
        admission: checks run on every create, through the API or by a simulated controller (admission
            plugins and webhooks, e.g. Pod Security): one that returns a message refuses the object
            with 403 Forbidden.

    Example:
        >>> with KubeEmulator() as emu:
        ...     _ = emu.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}})
        ...     emu.get("v1", "Pod", "default", "p")["status"]
        {'phase': 'Pending'}
    """

    watch_queue_limit = 100_000
    #: Bytes after which a container's log is rotated (the kubelet's containerLogMaxSize, 10 MiB by
    #: default): from then on only the new file is served, and a follow that was open stalls, sending
    #: nothing more (kubernetes#115701, #126564). None: never rotated.
    log_rotate_bytes: int | None = None
    #: Seconds each batch of watch events waits before it is sent. A real API server answers a
    #: write before its watchers hear of it (the watch cache is fed asynchronously, from etcd's
    #: watch: staging/src/k8s.io/apiserver/pkg/storage/cacher, Kubernetes v1.32), so a
    #: client must not expect its own write in its watch cache the moment the write returns.
    watch_delay = 0.0
    log_line_limit = 100_000
    requests_limit = 10_000
    bookmark_interval = 5.0

    def __init__(self, namespaces: Iterable[str] = ("default",), token: str | None = None, history: int = 10_000) -> None:
        self.token = token
        self.url = ""
        self.denied: set[tuple[str, str, str]] = set()
        self.denied_cluster_wide: set[tuple[str, str, str]] = set()
        self.enforce_denied = True
        self.denied_to_service_accounts: set[tuple[str, str, str]] = set()
        self.requests: list[tuple[str, str]] = []
        self.granted: set[tuple[str, str, str, str]] = set()
        self.admission: list[Callable[[Obj], str | None]] = []
        # Aggregated APIs (served by an extension API server behind this one, e.g. Kueue's visibility API):
        # a GET of one of these paths answers what its function gives.
        self.aggregated: dict[str, Callable[[], Obj]] = {}
        self.schemas: dict[tuple[str, str], Obj] = {}  # (apiVersion, kind) -> the CRD's openAPIV3Schema
        self._users: dict[str, Requester] = {}  # bearer token -> who, authorized by RBAC
        self._sa_tokens: dict[str, tuple[str, str, str]] = {}  # token -> (namespace, service account, its uid)
        self._in_cluster: InCluster | None = None
        self._lock = threading.RLock()
        self._log_cond = threading.Condition(self._lock)
        self._kinds: dict[tuple[str, str], Resource] = {}
        self._paths: dict[tuple[str, str, str], Resource] = {}
        self._removed: dict[tuple[str, str, str], Resource] = {}  # kinds not served, by path
        for res in RESOURCES:
            self.add_resource(res)
        self._objects: dict[tuple[str, str, str], dict[tuple[str, str], Obj]] = {}  # path -> (namespace, name) -> object
        self._uids: set[str] = set()
        self._rv = 0
        self._history: deque[tuple[int, str, Resource, Obj]] = deque(maxlen=max(history, 0))
        self._floor = 0  # every event after this resourceVersion is still in _history
        self._watches: set[_Watch] = set()
        self._logs: dict[tuple[str, str, str], _Log] = {}
        self._previous: dict[tuple[str, str, str], _Log] = {}
        self._follows: set[threading.Event] = set()
        self._cuts = 0  # bumped by drop_log_streams
        self._clock_ns = 0
        self._next_ip = 1
        self._stopping = False
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conn_lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._handler_threads: set[threading.Thread] = set()
        for name in namespaces:
            self.add_namespace(name)

    # -- life cycle --------------------------------------------------------------------------------------
    def start(self) -> KubeEmulator:
        """Listen on a free port of 127.0.0.1 and serve in daemon threads."""
        if self._server is None:
            self._server = _Server(("127.0.0.1", 0), _Handler)
            self._server.emulator = self
            self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                            name="kube-emulator", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """End every watch and log stream (normally), stop listening and close every connection."""
        server = self._server
        if server is None:
            return
        with self._lock:
            self._stopping = True
            open_streams = [w.done for w in self._watches] + list(self._follows)
            for w in list(self._watches):
                w.close()
            self._log_cond.notify_all()
        for done in open_streams:
            done.wait(2)
        server.shutdown()
        server.server_close()
        with self._conn_lock:
            in_cluster, self._in_cluster = self._in_cluster, None
        if in_cluster is not None:
            in_cluster.server.shutdown()
            in_cluster.server.server_close()
            in_cluster.thread.join(2)
            shutil.rmtree(in_cluster.folder, ignore_errors=True)
        with self._conn_lock:
            self._server = None
            conns, threads = list(self._conns), list(self._handler_threads)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes handlers waiting for a next keep-alive request
            except OSError:
                pass
        for t in threads + [self._thread]:
            if t is not None:
                t.join(2)

    def __enter__(self) -> KubeEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def threads(self) -> list[threading.Thread]:
        """The server's threads that are still alive (none after ``stop``)."""
        with self._conn_lock:
            threads = list(self._handler_threads)
        return [t for t in [self._thread, *threads] if t is not None and t.is_alive()]

    def configuration(self, token: str | None = None) -> Configuration:
        """A client configuration for this server, with ``token`` (a user's, from ``add_user``) or the admin's.

        Example:
            >>> KubeEmulator(token="t").configuration().api_key
            {'authorization': 'Bearer t'}
        """
        from kubernetes import client

        conf = client.Configuration()
        conf.host = self.url
        if token or self.token:
            conf.api_key = {"authorization": f"Bearer {token or self.token}"}
        return conf

    def add_user(self, user: str, groups: Iterable[str] = ()) -> str:
        """A bearer token for ``user``; its requests are allowed only as far as RBAC objects in the store grant.

        A ServiceAccount is the user ``system:serviceaccount:<namespace>:<name>``.

        Example:
            >>> emu = KubeEmulator()
            >>> token = emu.add_user("alice", groups=("ml-team",))
            >>> emu.requester(f"Bearer {token}")
            Requester(user='alice', groups=('ml-team', 'system:authenticated'))
        """
        if user.startswith("system:serviceaccount:"):
            _, _, namespace, name = user.split(":", 3)
            who = Requester.service_account(namespace, name)
        else:
            who = Requester(user, (*groups, "system:authenticated"))
        token = f"user-{uuid.uuid4().hex}"
        with self._lock:
            self._users[token] = who
        return token

    def requester(self, authorization: str | None) -> Requester | None:
        """Who an ``Authorization`` header speaks for: a user of ``add_user``, or None for the admin.

        Raises:
            ApiError: 401 when the server has a token and the header carries neither it nor a user's.
        """
        token = (authorization or "").removeprefix("Bearer ")
        with self._lock:
            who = self._users.get(token)
            bound = self._sa_tokens.get(token)
            if bound is not None:
                # A service account token is valid only while its account exists (the same uid): Kubernetes
                # v1.32 pkg/serviceaccount/claims.go (validator.Validate) looks the account up on every request.
                namespace, name, uid = bound
                account = self._find(self._kinds["v1", "ServiceAccount"], namespace, name)
                if account is None or account["metadata"]["uid"] != uid:
                    raise ApiError(401, "Unauthorized", "Unauthorized")
                return Requester.service_account(namespace, name)
        if who is not None:
            return who
        if self.token and authorization != f"Bearer {self.token}":
            raise ApiError(401, "Unauthorized", "Unauthorized")
        return None

    def service_account_token(self, namespace: str, name: str) -> str:
        """A token of ServiceAccount ``namespace/name``, as the kubelet asks for one (TokenRequest) to mount in a pod.

        Requests with it are authorized by RBAC as ``system:serviceaccount:<namespace>:<name>``, and
        answered 401 once that account is deleted.

        Raises:
            ApiError: 404 when the account does not exist.
        """
        res = self._kinds["v1", "ServiceAccount"]
        with self._lock:
            account = self._find(res, namespace, name)
            if account is None:
                raise _not_found(res, name)
            token = f"sa-{uuid.uuid4().hex}"
            self._sa_tokens[token] = (namespace, name, account["metadata"]["uid"])
        return token

    def in_cluster(self) -> InCluster:
        """The endpoint pods use (``KUBERNETES_SERVICE_HOST``/``PORT``): the same API over TLS on another
        port of 127.0.0.1, with a certificate from a CA of its own (``ca_file``, what pods get as ``ca.crt``).
        Started on first use, stopped with the emulator."""
        from k8s.tls import make_server_certificate

        with self._conn_lock:
            if self._in_cluster is None:
                if self._server is None:
                    raise RuntimeError("start the emulator first")
                folder = Path(tempfile.mkdtemp(prefix="emulator-tls-"))
                certificates = make_server_certificate(folder)
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(certificates.cert_file, certificates.key_file)
                server = _TLSServer(("127.0.0.1", 0), _Handler, context)
                server.emulator = self
                thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                          name="kube-emulator-tls", daemon=True)
                thread.start()
                self._in_cluster = InCluster("127.0.0.1", server.server_address[1], certificates.ca_file, folder, server, thread)
            return self._in_cluster

    def write_kubeconfig(self, path: str | Path, namespace: str = "default", context: str = "emulator") -> str:
        """Write a kubeconfig (JSON, which is YAML) whose current context points here; returns the path.

        Example:
            >>> import tempfile, os
            >>> p = KubeEmulator().write_kubeconfig(os.path.join(tempfile.mkdtemp(), "config"))
            >>> json.load(open(p))["current-context"]
            'emulator'
        """
        user = {"token": self.token} if self.token else {}
        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {}, "current-context": context,
            "clusters": [{"name": context, "cluster": {"server": self.url}}],
            "users": [{"name": context, "user": user}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context, "namespace": namespace}}],
        }
        Path(path).write_text(json.dumps(config, indent=2))
        return str(path)

    def add_resource(self, res: Resource) -> None:
        """Serve another kind (or replace how one is served)."""
        with self._lock:
            self._removed.pop(res.path, None)
            self._kinds[res.api_version, res.kind] = res
            self._paths[res.group, res.version, res.plural] = res

    def remove_resource(self, api_version: str, kind: str) -> None:
        """Stop serving a kind, as if its CRD were not installed: its URLs answer 404 and its objects are dropped.

        Other kinds of its API group stay served; ``add_resource`` serves it again.

        Example:
            >>> emu = KubeEmulator()
            >>> emu.remove_resource("kubeflow.org/v2beta1", "MPIJob")
            >>> emu.list("kubeflow.org/v2beta1", "MPIJob")
            Traceback (most recent call last):
            k8s.emulator.ApiError: 404 NotFound: no matches for kind "MPIJob" in version "kubeflow.org/v2beta1"
        """
        with self._lock:
            res = self._kinds.pop((api_version, kind), None) or Resource(api_version, kind, _plural(kind))
            self._paths.pop(res.path, None)
            self._objects.pop(res.path, None)
            self._removed[res.path] = res

    # -- direct store access -----------------------------------------------------------------------------
    def create(self, obj: Obj) -> Obj:
        """Store a new object (status included) and emit ADDED; namespaced kinds default to "default".

        Raises:
            ApiError: 409 if it exists, 404 if its namespace does not, 422 if its name is missing or invalid.
        """
        meta = obj.get("metadata") or {}
        res = self._resource(obj.get("apiVersion", ""), obj.get("kind", ""), bool(meta.get("namespace")))
        with self._lock:
            return copy.deepcopy(self._create(res, obj, meta.get("namespace")))

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> Obj | None:
        """A copy of the stored object, or None."""
        res = self._resource(api_version, kind, namespace is not None)
        with self._lock:
            found = self._find(res, namespace, name)
            return copy.deepcopy(found) if found is not None else None

    def list(self, api_version: str, kind: str, namespace: str | None = None, label_selector: str = "") -> list[Obj]:
        """Copies of the stored objects of a kind (in one namespace, or all), ordered by namespace and name."""
        res = self._resource(api_version, kind, True)
        with self._lock:
            return copy.deepcopy(self._select(res, self._matcher(res, namespace, label_selector)))

    def inventory(self, namespace: str | None = None) -> list[str]:
        """``"Kind namespace/name"`` of every stored object (in one namespace, or all), sorted; Events left out.

        Example:
            >>> with KubeEmulator(namespaces=("ml",)) as emu:
            ...     _ = emu.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "ml"}})
            ...     emu.inventory("ml")
            ['ConfigMap ml/c', 'ServiceAccount ml/default']
        """
        with self._lock:
            return sorted(f"{self._paths[path].kind if path in self._paths else path[2]} {ns}/{name}"
                          for path, objects in self._objects.items() if path[2] != "events"
                          for ns, name in objects if namespace is None or ns == namespace)

    def update(self, obj: Obj) -> Obj:
        """Replace a stored object, status included; a set ``metadata.resourceVersion`` must be current (else 409)."""
        meta = obj.get("metadata") or {}
        res = self._resource(obj.get("apiVersion", ""), obj.get("kind", ""), bool(meta.get("namespace")))
        with self._lock:
            ns = (meta.get("namespace") or "default") if res.namespaced else None
            return copy.deepcopy(self._replace(res, ns, meta.get("name", ""), obj))

    def patch_status(self, api_version: str, kind: str, namespace: str | None, name: str, status: Obj) -> Obj:
        """Merge ``status`` into the object's ``.status`` (null deletes a key) and emit MODIFIED.

        Example:
            >>> emu = KubeEmulator()
            >>> _ = emu.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}})
            >>> emu.patch_status("v1", "Pod", "default", "p", {"phase": "Running"})["status"]
            {'phase': 'Running'}
        """
        res = self._resource(api_version, kind, namespace is not None)
        with self._lock:
            current = self._find(res, namespace, name)
            if current is None:
                raise _not_found(res, name)
            doc = dict(current, status=merge_patch(current.get("status") or {}, status))
            return copy.deepcopy(self._replace(res, namespace, name, doc, subresource="status"))

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str, propagation: str = "Background",
               grace_period: int | None = None) -> None:
        """Delete an object as an API request would (graceful for a running pod, held by finalizers) and
        collect its dependents (see ``ownerReferences``) per ``propagation``.

        ``grace_period``: seconds a pod on a node has to stop (default its ``terminationGracePeriodSeconds``);
        0 removes it now, as the kubelet's last delete does.

        Raises:
            ApiError: 404 if there is no such object.
        """
        res = self._resource(api_version, kind, namespace is not None)
        with self._lock:
            self._delete(res, namespace, name, propagation=propagation, grace=grace_period)

    def add_namespace(self, name: str) -> None:
        """Create a namespace unless it exists."""
        with self._lock:
            if self._find(NAMESPACE, None, name) is None:
                self._create(NAMESPACE, {"metadata": {"name": name}}, None)

    def add_node(self, name: str, labels: dict[str, str] | None = None, allocatable: dict[str, str] | None = None) -> None:
        """Create (or replace) a Ready node with these labels and allocatable resources.

        Example:
            >>> emu = KubeEmulator()
            >>> emu.add_node("gpu-1", {"pool": "a100"}, {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "8"})
            >>> emu.get("v1", "Node", None, "gpu-1")["status"]["allocatable"]["nvidia.com/gpu"]
            '8'
        """
        amounts = dict(allocatable or {"cpu": "8", "memory": "32Gi", "pods": "110"})
        node = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", **(labels or {})}},
            "spec": {},
            "status": {"allocatable": amounts, "capacity": dict(amounts),
                       "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]},
        }
        with self._lock:
            current = self._find(self._kinds["v1", "Node"], None, name)
            if current is None:
                self._create(self._kinds["v1", "Node"], node, None)
            else:
                self._replace(self._kinds["v1", "Node"], None, name, node)

    # -- watch control ----------------------------------------------------------------------------------
    def compact(self) -> None:
        """Forget the event history: a watch from any older resourceVersion now gets 410 Expired."""
        with self._lock:
            self._history.clear()
            self._floor = self._rv

    def drop_watches(self) -> None:
        """End every open watch stream now, cleanly: the client sees the end of the stream.

        ``kubernetes.watch.Watch().stream`` then stops iterating when ``timeout_seconds`` was given,
        and otherwise quietly watches again from the last resourceVersion it saw.
        """
        with self._lock:
            watches = list(self._watches)
            for w in watches:
                w.close()
        for w in watches:
            w.done.wait(5)

    # -- logs ----------------------------------------------------------------------------------------------
    def append_log(self, namespace: str, pod: str, text: str, container: str | None = None) -> None:
        """Add ``\\n``-separated lines to a container's log, each with a later timestamp than any before.

        The pod need not exist yet; the container defaults to the pod's first container, or ``"main"``.
        """
        with self._lock:
            log = self._current_log(namespace, pod, container)
            for line in _split_lines(text):
                log.add(self._tick(), line, self.log_rotate_bytes)
            self._log_cond.notify_all()

    def log_lines(self, namespace: str, pod: str) -> list[str]:
        """Every line a pod's containers printed that is still kept (the previous run's first), for test checks."""
        with self._lock:
            logs = [log for store in (self._previous, self._logs) for (ns, name, _), log in store.items()
                    if (ns, name) == (namespace, pod)]
            return [text for log in logs for _, text in log.lines]

    def end_log(self, namespace: str, pod: str, container: str | None = None) -> None:
        """The container terminated: following streams send what is left and end normally."""
        with self._lock:
            self._current_log(namespace, pod, container).ended = True
            self._log_cond.notify_all()

    def restart_container(self, namespace: str, pod: str, container: str | None = None) -> None:
        """The container restarted: its log becomes the ``previous=true`` one and a new, empty one begins."""
        with self._lock:
            key = (namespace, pod, self._container_name(namespace, pod, container))
            old = self._logs.pop(key, None) or _Log(self.log_line_limit)
            old.ended = True
            self._previous[key] = old
            self._logs[key] = _Log(self.log_line_limit)
            self._log_cond.notify_all()

    def drop_log_streams(self) -> None:
        """Cut every open ``follow=true`` log stream mid-way (the TCP connection closes, no final chunk).

        A client reading the body sees ``urllib3.exceptions.ProtocolError`` ("Response ended prematurely")
        rather than a normal end.
        """
        with self._lock:
            self._cuts += 1
            follows = list(self._follows)
            self._log_cond.notify_all()
        for done in follows:
            done.wait(5)

    # -- store internals (callers hold self._lock) ------------------------------------------------------
    def _resource(self, api_version: str, kind: str, namespaced: bool) -> Resource:
        with self._lock:
            res = self._kinds.get((api_version, kind))
            group, _, version = api_version.rpartition("/")
            removed = any((r.api_version, r.kind) == (api_version, kind) for r in self._removed.values())
            if res is None and kind and group and not removed and any(g == group for g, _, _ in self._paths):
                res = Resource(api_version, kind, _plural(kind), namespaced=namespaced, status=True)
                self.add_resource(res)
            if res is None:
                raise ApiError(404, "NotFound", f'no matches for kind "{kind}" in version "{api_version}"')
            return res

    def _find(self, res: Resource, namespace: str | None, name: str) -> Obj | None:
        return self._objects.get(res.path, {}).get(((namespace or "") if res.namespaced else "", name))

    def _matcher(self, res: Resource, namespace: str | None, labels: str = "", fields: str = "") -> Matcher:
        label_tests, field_tests = parse_label_selector(labels), parse_field_selector(fields)
        namespace = namespace if res.namespaced else None

        def wanted(r: Resource, obj: Obj) -> bool:
            meta = obj["metadata"]
            if r.path != res.path or (namespace is not None and meta.get("namespace") != namespace):
                return False
            own = meta.get("labels") or {}
            return all(t(own) for t in label_tests) and all(t(obj) for t in field_tests)

        return wanted

    def _select(self, res: Resource, wanted: Matcher) -> list[Obj]:
        return [o for _, o in sorted(self._objects.get(res.path, {}).items()) if wanted(res, o)]

    def _tick(self) -> int:
        """Now in ns, strictly later than the previous tick."""
        self._clock_ns = max(time.time_ns(), self._clock_ns + 1)
        return self._clock_ns

    def _stamp(self, obj: Obj) -> Obj:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        return obj

    def _emit(self, kind: str, res: Resource, obj: Obj) -> None:
        if len(self._history) == self._history.maxlen:
            self._floor = self._history[0][0] if self._history else self._rv
        self._history.append((self._rv, kind, res, obj))
        for w in list(self._watches):
            w.offer(kind, res, obj)

    def _namespace_of(self, res: Resource, meta: Obj, from_path: str | None) -> str | None:
        if not res.namespaced:
            meta.pop("namespace", None)
            return None
        given = meta.get("namespace")
        if given and from_path and given != from_path:
            raise _bad_request("the namespace of the provided object does not match the namespace sent on the request")
        meta["namespace"] = from_path or given or "default"
        return meta["namespace"]

    def _generate_name(self, res: Resource, namespace: str | None, prefix: str) -> str:
        alphabet = "bcdfghjklmnpqrstvwxz2456789"  # the API server's: no vowels, no look-alikes
        for _ in range(100):
            name = prefix + "".join(random.choices(alphabet, k=5))
            if self._find(res, namespace, name) is None:
                return name
        raise ApiError(409, "AlreadyExists", f"could not generate a free name from {prefix!r}")

    def _create(self, res: Resource, body: Any, namespace: str | None, *, dry_run: bool = False, from_api: bool = False) -> Obj:
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise _bad_request("the object must be a JSON object with an object as metadata")
        if body.get("kind") not in (None, res.kind):
            raise _bad_request(f"the object is a {body.get('kind')}, not a {res.kind}")
        obj = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        meta = obj.setdefault("metadata", {})
        ns = self._namespace_of(res, meta, namespace)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise _invalid(res, "", "metadata.name", "Required value: name or generateName is required")
            meta["name"] = self._generate_name(res, ns, meta["generateName"])
        _validate(res, obj)
        if ns is not None and self._find(NAMESPACE, None, ns) is None:
            raise _not_found(NAMESPACE, ns)
        if res.path == POD.path and ns is not None:
            self._admit_service_account(res, obj, ns)
        for admit in list(self.admission):
            refused = admit(obj)
            if refused:  # as admission answers (Pod Security: staging/src/k8s.io/pod-security-admission, v1.32): 403, nothing stored
                raise ApiError(403, "Forbidden", f'{res.plural} "{meta["name"]}" is forbidden: {refused}', _details(res, meta["name"]))
        if self._find(res, ns, meta["name"]) is not None:
            raise ApiError(409, "AlreadyExists", f'{res.plural} "{meta["name"]}" already exists', _details(res, meta["name"]))
        for key in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(key, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_rfc3339(), generation=1)
        if from_api and res.status:
            obj.pop("status", None)
        self._default(res, obj)
        if dry_run:
            return obj
        self._stamp(obj)
        self._objects.setdefault(res.path, {})[ns or "", meta["name"]] = obj
        self._uids.add(meta["uid"])
        self._emit("ADDED", res, obj)
        if res.path == NAMESPACE.path:
            # Kubernetes' serviceaccounts controller gives every namespace its "default" account
            # (v1.32 pkg/controller/serviceaccount/serviceaccounts_controller.go).
            self._create(self._kinds["v1", "ServiceAccount"], {"metadata": {"name": "default"}}, meta["name"])
        return obj

    def _admit_service_account(self, res: Resource, pod: Obj, namespace: str) -> None:
        """The ServiceAccount admission plugin of Kubernetes v1.32 (plugin/pkg/admission/serviceaccount/admission.go):
        a pod runs as ``default`` unless it names an account; one that does not exist refuses the pod (403);
        unless the pod or its account sets ``automountServiceAccountToken: false``, a projected volume
        ``kube-api-access-<random>`` (a token, the cluster's CA, the namespace) is mounted read-only at
        /var/run/secrets/kubernetes.io/serviceaccount in every container that mounts nothing there."""
        spec = pod.setdefault("spec", {})
        account_name = spec.setdefault("serviceAccountName", "default")
        account = self._find(self._kinds["v1", "ServiceAccount"], namespace, account_name)
        if account is None:
            raise ApiError(403, "Forbidden", f'{res.plural} "{pod["metadata"]["name"]}" is forbidden: error looking up service account '
                           f'{namespace}/{account_name}: serviceaccount "{account_name}" not found', _details(res, pod["metadata"]["name"]))
        automount = spec.get("automountServiceAccountToken")
        if automount is None:
            automount = account.get("automountServiceAccountToken")
        if automount is False:
            return
        volume_name = "kube-api-access-" + "".join(random.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
        mount = {"name": volume_name, "readOnly": True, "mountPath": SERVICE_ACCOUNT_DIR}
        needed = False
        for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
            if not any(m.get("mountPath") == SERVICE_ACCOUNT_DIR for m in container.get("volumeMounts") or []):
                container.setdefault("volumeMounts", []).append(dict(mount))
                needed = True
        if needed:
            spec.setdefault("volumes", []).append({"name": volume_name, "projected": {"defaultMode": 0o644, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
            ]}})

    def _default(self, res: Resource, obj: Obj) -> None:
        """The few defaults clients commonly read back."""
        if res.api_version != "v1":
            return
        if res.kind == "Pod":
            obj.setdefault("status", {}).setdefault("phase", "Pending")
        elif res.kind == "Namespace":
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            obj.setdefault("status", {"phase": "Active"})
        elif res.kind == "Secret" and obj.get("stringData"):
            # As the API server does: stringData is write-only, merged into data (base64).
            data = dict(obj.get("data") or {})
            data.update({k: base64.b64encode(str(v).encode()).decode() for k, v in obj.pop("stringData").items()})
            obj["data"] = data
        elif res.kind == "Service":
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            if not spec.get("clusterIP"):
                spec["clusterIP"] = f"10.96.{self._next_ip // 250}.{self._next_ip % 250 + 1}"
                self._next_ip += 1
            spec.setdefault("clusterIPs", [spec["clusterIP"]])

    def _replace(self, res: Resource, namespace: str | None, name: str, body: Any, *, subresource: str | None = None,
                 dry_run: bool = False, from_api: bool = False) -> Obj:
        current = self._find(res, namespace, name)
        if current is None:
            raise _not_found(res, name)
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise _bad_request("the object must be a JSON object with an object as metadata")
        given = body.get("metadata") or {}
        if given.get("name") not in (None, name):
            raise _bad_request(f"the name of the object ({given['name']}) does not match the name on the URL ({name})")
        if given.get("resourceVersion") and given["resourceVersion"] != current["metadata"]["resourceVersion"]:
            raise _conflict(res, name)
        if subresource == "status":
            new = copy.deepcopy(current)
            new.pop("status", None)
            if "status" in body:
                new["status"] = copy.deepcopy(body["status"])
        else:
            new = copy.deepcopy(body)
            if from_api and res.status:
                new.pop("status", None)
                if "status" in current:
                    new["status"] = copy.deepcopy(current["status"])
        return self._write(res, current, new, dry_run)

    def _write(self, res: Resource, current: Obj, new: Obj, dry_run: bool = False) -> Obj:
        """Store ``new`` over ``current``, keeping the fields the server owns."""
        old_meta = current["metadata"]
        meta = new.setdefault("metadata", {})
        new["apiVersion"], new["kind"] = current["apiVersion"], current["kind"]
        for key in ("name", "namespace", "uid", "creationTimestamp", "resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            if key in old_meta:
                meta[key] = old_meta[key]
            else:
                meta.pop(key, None)
        meta["generation"] = old_meta.get("generation", 1) + (_spec_part(new) != _spec_part(current))
        _validate(res, new)
        if res.api_version == "v1" and res.kind == "ConfigMap" and current.get("immutable"):
            # v1.34.1 ValidateConfigMapUpdate: an immutable ConfigMap's data, binaryData and immutability stay as they are.
            for key in ("immutable", "data", "binaryData"):
                if new.get(key) != current.get(key):
                    raise _invalid(res, meta["name"], key, "Forbidden: field is immutable when `immutable` is set", reason="FieldValueForbidden")
        if new == current or dry_run:
            return current if new == current else new
        self._stamp(new)
        self._objects[res.path][meta.get("namespace", ""), meta["name"]] = new
        self._emit("MODIFIED", res, new)
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and not meta.get("deletionGracePeriodSeconds"):
            # The last finalizer of a terminating object is gone: it goes now (store.go, Update's deleteWithoutFinalizers).
            return self._remove(res, new, "Background")
        return new

    def _patch(self, res: Resource, namespace: str | None, name: str, patch: Any, content_type: str, *,
               subresource: str | None = None, dry_run: bool = False) -> Obj:
        current = self._find(res, namespace, name)
        if current is None:
            raise _not_found(res, name)
        media = content_type.split(";")[0].strip().lower()
        if media == JSON_PATCH_TYPE:
            if not isinstance(patch, list):
                raise _bad_request("a JSON patch must be a list of operations")
            doc = json_patch(current, patch)
        elif media in MERGE_PATCH_TYPES:
            if not isinstance(patch, dict):
                raise _bad_request("a merge patch must be a JSON object")
            doc = merge_patch(copy.deepcopy(current), patch)
        else:
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format ({media}) - "
                           f"accepted media types include: {JSON_PATCH_TYPE}, {', '.join(MERGE_PATCH_TYPES)}")
        return self._replace(res, namespace, name, doc, subresource=subresource, dry_run=dry_run, from_api=True)

    def _delete(self, res: Resource, namespace: str | None, name: str, *, propagation: str | None = None,
                preconditions: Obj | None = None, dry_run: bool = False, grace: int | None = None) -> Obj:
        current = self._find(res, namespace, name)
        if current is None:
            raise _not_found(res, name)
        for key in ("uid", "resourceVersion"):
            wanted = (preconditions or {}).get(key)
            if wanted and wanted != current["metadata"].get(key):
                raise _conflict(res, name)
        policy = propagation or res.default_propagation
        if policy not in POLICIES:
            raise _bad_request(f"propagationPolicy must be one of {', '.join(POLICIES)}, not {policy!r}")
        return current if dry_run else self._remove(res, current, policy, grace)

    def _grace_period(self, res: Resource, obj: Obj, grace: int | None) -> int:
        """Seconds a deleted object stays, terminating, before it may go: for a pod on a node, the request's
        grace period, else its ``terminationGracePeriodSeconds`` (default 30); 0 for a pod never scheduled or
        already finished, and for other kinds (Kubernetes v1.32 pkg/registry/core/pod/strategy.go, CheckGracefulDelete)."""
        if res.path != POD.path:
            return 0
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        if not spec.get("nodeName") or status.get("phase") in ("Succeeded", "Failed"):
            return 0
        period = grace if grace is not None else spec.get("terminationGracePeriodSeconds", 30)
        return max(int(period), 0)

    def _begin_deletion(self, res: Resource, obj: Obj, policy: str, period: int) -> Obj:
        """Mark ``obj`` terminating (``deletionTimestamp``) instead of removing it: a pod until its kubelet has
        stopped it and deletes it with grace 0, any object until its ``finalizers`` are gone (apiserver v1.32
        pkg/registry/generic/registry/store.go, updateForGracefulDeletionAndFinalizers). A second delete only
        shortens a pending grace period (pkg/registry/rest/delete.go, BeforeDelete)."""
        meta = obj["metadata"]
        if meta.get("deletionTimestamp") and period >= meta.get("deletionGracePeriodSeconds", 0):
            return obj
        first = not meta.get("deletionTimestamp")
        new = copy.deepcopy(obj)
        new["metadata"]["deletionTimestamp"] = _rfc3339(time.time() + period)
        new["metadata"]["deletionGracePeriodSeconds"] = period
        if first and policy != "Background":
            self._collect(meta["uid"], policy)
        self._stamp(new)
        self._objects[res.path][meta.get("namespace", ""), meta["name"]] = new
        self._emit("MODIFIED", res, new)
        return new

    def _remove(self, res: Resource, obj: Obj, policy: str, grace: int | None = None, force: bool = False) -> Obj:
        meta = obj["metadata"]
        uid, ns, name = meta["uid"], meta.get("namespace", ""), meta["name"]
        if not force:
            period = self._grace_period(res, obj, grace)
            if period > 0 or meta.get("finalizers"):
                return self._begin_deletion(res, obj, policy, period)
        if policy != "Background":  # Foreground deletes, Orphan releases, dependents before the owner goes
            self._collect(uid, policy)
        if res.path == NAMESPACE.path:
            for path, objects in list(self._objects.items()):
                for key in [k for k in objects if self._paths[path].namespaced and k[0] == name]:
                    if (found := objects.get(key)) is not None:
                        self._remove(self._paths[path], found, "Background", force=True)
        if (current := self._find(res, ns or None, name)) is None or current["metadata"]["uid"] != uid:
            return obj  # already collected through an ownership cycle
        if res.path == POD.path:
            self._forget_logs(ns, name)
        del self._objects[res.path][ns, name]
        self._uids.discard(uid)
        gone = dict(current, metadata=dict(current["metadata"]))
        self._stamp(gone)  # a DELETED event carries the deletion's resourceVersion, as etcd's does
        self._emit("DELETED", res, gone)
        if policy == "Background":
            self._collect(uid, policy)
        return gone

    def _collect(self, owner_uid: str, policy: str) -> None:
        """Garbage-collect the dependents of a deleted owner, synchronously."""
        dependents = [(self._paths[path], key) for path, objects in self._objects.items() for key, o in objects.items()
                      if any(r.get("uid") == owner_uid for r in o["metadata"].get("ownerReferences") or [])]
        for res, key in dependents:
            obj = self._objects.get(res.path, {}).get(key)
            if obj is None:
                continue
            others = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("uid") != owner_uid]
            if policy == "Orphan" or any(r.get("uid") in self._uids for r in others):
                new = copy.deepcopy(obj)
                if others:
                    new["metadata"]["ownerReferences"] = others
                else:
                    del new["metadata"]["ownerReferences"]
                self._write(res, obj, new)
            else:
                self._remove(res, obj, policy)

    # -- log internals ----------------------------------------------------------------------------------
    def _container_name(self, namespace: str, pod: str, container: str | None) -> str:
        if container:
            return container
        found = self._find(POD, namespace, pod)
        containers = ((found or {}).get("spec") or {}).get("containers") or []
        return containers[0].get("name", "main") if containers else "main"

    def _current_log(self, namespace: str, pod: str, container: str | None) -> _Log:
        key = (namespace, pod, self._container_name(namespace, pod, container))
        if key not in self._logs:
            self._logs[key] = _Log(self.log_line_limit)
        return self._logs[key]

    def _forget_logs(self, namespace: str, pod: str) -> None:
        for logs in (self._logs, self._previous):
            for key in [k for k in logs if k[:2] == (namespace, pod)]:
                logs.pop(key).ended = True
        self._log_cond.notify_all()

    # -- HTTP --------------------------------------------------------------------------------------------
    def _record(self, method: str, path: str) -> None:
        with self._conn_lock:
            self.requests.append((method, path))
            if len(self.requests) > self.requests_limit:
                del self.requests[: -self.requests_limit]

    def _track(self, sock: socket.socket) -> bool:
        """Remember a connection so that ``stop`` can close it; False once stopped."""
        with self._conn_lock:
            self._handler_threads = {t for t in self._handler_threads if t.is_alive()}
            if self._server is None:
                return False
            self._conns.add(sock)
            self._handler_threads.add(threading.current_thread())
            return True

    def _untrack(self, sock: socket.socket) -> None:
        with self._conn_lock:
            self._conns.discard(sock)

    def _dispatch(self, method: str, target: str, headers: Any, raw: bytes) -> _Reply | Streamer:
        who = self.requester(headers.get("Authorization"))
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        parts = [unquote(p) for p in url.path.split("/") if p]
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError as e:
                raise _bad_request(f"the request body is not JSON: {e}") from None
        if method == "GET" and len(parts) <= 3 and (reply := self._discovery(parts)) is not None:
            return reply
        if method == "GET" and url.path in self.aggregated:
            self._authorize_aggregated(parts, who)
            return _Reply(200, self.aggregated[url.path]())
        if parts == ["apis", "authorization.k8s.io", "v1", "selfsubjectaccessreviews"] and method == "POST":
            return _Reply(201, self._access_review(body, who))
        res, namespace, name, sub, watch_path = self._route(parts)
        return self._serve_resource(method, res, namespace, name, sub, query, body, headers, watch_path, who)

    def _authorize_aggregated(self, parts: list[str], who: Requester | None) -> None:
        """Authorize a GET of an aggregated API as the API server does before it proxies the request: the
        generic handler chain's authorization filter runs first (k8s.io/apiserver pkg/server/config.go,
        DefaultBuildHandlerChain, Kubernetes v1.32), so RBAC and the denied verbs apply as to any resource."""
        group, version, rest = parts[1], parts[2], parts[3:]
        namespace, rest = (rest[1], rest[2:]) if rest[:1] == ["namespaces"] and len(rest) > 2 else (None, rest)
        res = Resource(f"{group}/{version}", _kind_from_plural(rest[0]), rest[0], namespaced=namespace is not None)
        self._authorize("get", res, rest[2] if len(rest) > 2 else None, namespace, rest[1] if len(rest) > 1 else None, who)

    def _route(self, parts: list[str]) -> tuple[Resource, str | None, str | None, str | None, bool]:
        """(resource, namespace, name, subresource, legacy /watch/ path) of a resource URL."""
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise _no_route()
        watch_path = rest[:1] == ["watch"]
        rest = rest[1:] if watch_path else rest
        namespaced = len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize")
        namespace, rest = (rest[1], rest[2:]) if namespaced else (None, rest)
        if not 1 <= len(rest) <= 3:
            raise _no_route()
        with self._lock:
            # A removed kind is still routed: authorization comes first, then the 404 (as on a real server).
            res = self._paths.get((group, version, rest[0])) or self._removed.get((group, version, rest[0]))
            if res is None and group and any(g == group for g, _, _ in self._paths):
                res = Resource(f"{group}/{version}", _kind_from_plural(rest[0]), rest[0], namespaced=namespaced, status=True)
                self.add_resource(res)
        if res is None or (namespaced and not res.namespaced) or (res.namespaced and not namespaced and len(rest) > 1):
            raise _no_route()
        return res, namespace, (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else None), watch_path

    def _decode(self, res: Resource, body: Any, validation: str) -> Any:
        """A custom resource as the API server decodes it against its CRD's schema: unknown fields refused
        with ``fieldValidation=Strict``, else pruned (see ``k8s/structural.py``)."""
        schema = self.schemas.get((res.api_version, res.kind))
        if schema is None or not isinstance(body, dict):
            return body
        if validation == "Strict":
            unknown = structural.unknown_fields(body, schema)
            if unknown:
                raise _bad_request(f'{res.kind} in version "{res.version}" cannot be handled as a {res.kind}: strict decoding error: '
                                   + ", ".join(f'unknown field "{field}"' for field in unknown))
        return structural.prune(copy.deepcopy(body), schema)

    def add_schema(self, api_version: str, kind: str, schema: Obj) -> None:
        """Decode ``kind`` against ``schema`` (its CRD's openAPIV3Schema), as an API server with that CRD does."""
        with self._lock:
            self.schemas[api_version, kind] = schema

    def _rbac_objects(self, kind: str, namespace: str | None) -> list[Obj]:
        res = self._kinds[f"{authorizer.RBAC_GROUP}/v1", kind]
        with self._lock:
            return [copy.deepcopy(o) for (ns, _), o in sorted(self._objects.get(res.path, {}).items())
                    if namespace is None or ns == namespace]

    def _authorize(self, verb: str, res: Resource, sub: str | None, namespace: str | None, name: str | None,
                   who: Requester | None = None) -> None:
        if who is not None:
            if not authorizer.allowed(who, verb, res.group, res.plural, sub, namespace, name, self._rbac_objects):
                raise ApiError(403, "Forbidden", authorizer.forbidden_message(who, verb, res.group, res.plural, sub, namespace, name),
                               _details(res, name or ""))
            with self._lock:
                self.granted.add((who.user, verb, res.group, f"{res.plural}/{sub}" if sub else res.plural))
        resource = f"{res.plural}/{sub}" if sub else res.plural
        by_account = who is not None and who.user.startswith("system:serviceaccount:") and any(
            v in (verb, "*") and g in (res.group, "*") and r in (resource, "*") for v, g, r in self.denied_to_service_accounts)
        if by_account or (self.enforce_denied and self._is_denied(verb, res.group, resource, namespace)):
            what = f'{resource} "{name}"' if name else resource
            where = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
            user = who.user if by_account and who is not None else USER
            raise ApiError(403, "Forbidden", f'{what} is forbidden: User "{user}" cannot {verb} resource "{resource}" '
                           f'in API group "{res.group}"{where}', _details(res, name or ""))

    def _confirm_no_escalation(self, who: Requester | None, res: Resource, namespace: str | None, obj: Any) -> None:
        """403 for a user's Role or RoleBinding that grants what the user does not hold (``authorizer.escalation_problem``).
        What the check found held counts as used in ``granted``: a Role that lets its user grant a job's
        narrower Role needs those verbs even if the user never calls them."""
        if who is None or res.group != authorizer.RBAC_GROUP or res.kind not in ("Role", "RoleBinding") or not isinstance(obj, dict):
            return
        problem = authorizer.escalation_problem(who, res.kind, obj, namespace or "", self._rbac_objects)
        name = (obj.get("metadata") or {}).get("name", "")
        if problem:
            raise ApiError(403, "Forbidden", f'{res.plural}.{res.group} "{name}" is forbidden: {problem}', _details(res, name))
        rules = obj.get("rules") or []
        if res.kind == "RoleBinding":
            ref = obj.get("roleRef") or {}
            role = next((r for r in self._rbac_objects(ref.get("kind", ""), namespace if ref.get("kind") == "Role" else None)
                         if r["metadata"]["name"] == ref.get("name")), {})
            rules = role.get("rules") or []
        with self._lock:
            for rule in rules:
                for verb, group, resource, _ in authorizer.simple_rules(rule):
                    self.granted.add((who.user, verb, group, resource))

    def _is_denied(self, verb: str, group: str, resource: str, namespace: str | None) -> bool:
        rules = list(self.denied) + ([] if namespace else list(self.denied_cluster_wide))
        return any(v in (verb, "*") and g in (group, "*") and r in (resource, "*") for v, g, r in rules)

    def _serve_resource(self, method: str, res: Resource, namespace: str | None, name: str | None, sub: str | None,
                        query: dict[str, str], body: Any, headers: Any, watch_path: bool,
                        who: Requester | None = None) -> _Reply | Streamer:
        verb = _verb(method, name, sub, watch_path or _truthy(query.get("watch")))
        if ((sub == "status" and not res.status) or (sub == "log" and res.path != POD.path)
                or (sub == "scale" and res.path not in SCALABLE) or (verb == "create" and res.namespaced and namespace is None)):
            raise _no_route()
        self._authorize(verb, res, sub, namespace, name, who)
        if res.path in self._removed:
            raise _no_route()
        if verb == "watch":
            return self._open_watch(res, namespace, query)
        if sub == "log":
            return self._read_log(namespace or "", name or "", query)
        dry_run = query.get("dryRun") == "All"
        with self._lock:
            if sub == "scale":
                return _Reply(200, self._serve_scale(verb, res, namespace, name or "", body, headers.get("Content-Type", ""), dry_run))
            if verb == "list":
                items = self._select(res, self._matcher(res, namespace, query.get("labelSelector", ""), query.get("fieldSelector", "")))
                return _Reply(200, {"apiVersion": res.api_version, "kind": f"{res.kind}List",
                                    "metadata": {"resourceVersion": str(self._rv)}, "items": items})
            if verb == "create":
                body = self._decode(res, body, query.get("fieldValidation", ""))
                self._confirm_no_escalation(who, res, namespace, body)
                return _Reply(201, self._create(res, body, namespace, dry_run=dry_run, from_api=True))
            if verb == "get":
                found = self._find(res, namespace, name or "")
                if found is None:
                    raise _not_found(res, name or "")
                return _Reply(200, found)
            if verb == "update":
                body = self._decode(res, body, query.get("fieldValidation", "")) if sub is None else body
                self._confirm_no_escalation(who, res, namespace, body)
                return _Reply(200, self._replace(res, namespace, name or "", body, subresource=sub, dry_run=dry_run, from_api=True))
            if verb == "patch":
                if who is not None and res.group == authorizer.RBAC_GROUP:
                    patched = self._patch(res, namespace, name or "", body, headers.get("Content-Type", ""), subresource=sub, dry_run=True)
                    self._confirm_no_escalation(who, res, namespace, patched)
                return _Reply(200, self._patch(res, namespace, name or "", body, headers.get("Content-Type", ""),
                                               subresource=sub, dry_run=dry_run))
            return self._serve_delete(res, namespace, name, query, body if isinstance(body, dict) else {}, dry_run)

    def _serve_scale(self, verb: str, res: Resource, namespace: str | None, name: str, body: Any, content_type: str,
                     dry_run: bool) -> Obj:
        """The ``/scale`` subresource: an autoscaling/v1 Scale read from, and written to, ``spec.replicas``
        (Kubernetes v1.32 pkg/registry/apps/statefulset/storage/storage.go, ScaleREST)."""
        current = self._find(res, namespace, name)
        if current is None:
            raise _not_found(res, name)
        scale = _scale_of(current)
        if verb == "get":
            return scale
        if verb == "update":
            wanted = body if isinstance(body, dict) else {}
            given = (wanted.get("metadata") or {}).get("resourceVersion")
            if given and given != current["metadata"]["resourceVersion"]:
                raise _conflict(res, name)
        else:
            media = content_type.split(";")[0].strip().lower()
            if media == JSON_PATCH_TYPE and isinstance(body, list):
                wanted = json_patch(scale, body)
            elif media in MERGE_PATCH_TYPES and isinstance(body, dict):
                wanted = merge_patch(copy.deepcopy(scale), body)
            else:
                raise _bad_request("a scale patch must be a JSON merge patch object or a JSON patch list")
        replicas = (wanted.get("spec") or {}).get("replicas")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise _invalid(res, name, "spec.replicas", f"Invalid value: {json.dumps(replicas)}: must be greater than or equal to 0")
        new = copy.deepcopy(current)
        new["spec"]["replicas"] = replicas
        return _scale_of(self._write(res, current, new, dry_run))

    def _serve_delete(self, res: Resource, namespace: str | None, name: str | None, query: dict[str, str],
                      options: Obj, dry_run: bool) -> _Reply:
        """DELETE of one object or (without a name) of every object a selector matches."""
        policy = query.get("propagationPolicy") or options.get("propagationPolicy")
        if policy is None and (_truthy(query.get("orphanDependents")) or options.get("orphanDependents") is True):
            policy = "Orphan"
        warnings = []
        if policy is None and res.default_propagation == "Orphan":
            warnings.append(("Warning", '299 - "child pods are preserved by default when jobs are deleted; '
                                        'set propagationPolicy=Background to remove them"'))
        success: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
        grace = _int_param(query, "gracePeriodSeconds")
        if grace is None and isinstance(options.get("gracePeriodSeconds"), int):
            grace = options["gracePeriodSeconds"]
        if name is None:
            wanted = self._matcher(res, namespace, query.get("labelSelector", ""), query.get("fieldSelector", ""))
            for obj in self._select(res, wanted):
                meta = obj["metadata"]
                if self._find(res, meta.get("namespace"), meta["name"]) is not None:  # not collected meanwhile
                    self._delete(res, meta.get("namespace"), meta["name"], propagation=policy, dry_run=dry_run, grace=grace)
            return _Reply(200, success, headers=warnings)
        gone = self._delete(res, namespace, name, propagation=policy, preconditions=options.get("preconditions"), dry_run=dry_run,
                            grace=grace)
        if res.returns_deleted:
            return _Reply(200, gone, headers=warnings)
        return _Reply(200, {**success, "details": {**_details(res, name), "uid": gone["metadata"]["uid"]}}, headers=warnings)

    def _discovery(self, parts: list[str]) -> _Reply | None:
        with self._lock:
            resources = list(self._paths.values())
        groups: dict[str, list[str]] = {}
        for res in resources:
            versions = groups.setdefault(res.group, [])
            if res.version not in versions:
                versions.append(res.version)

        def group_body(name: str) -> Obj:
            versions = [{"groupVersion": f"{name}/{v}", "version": v} for v in groups[name]]
            return {"name": name, "versions": versions, "preferredVersion": versions[0]}

        def resource_list(group: str, version: str) -> Obj:
            verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
            listed = []
            for res in resources:
                if (res.group, res.version) == (group, version):
                    listed.append({"name": res.plural, "singularName": res.kind.lower(), "namespaced": res.namespaced, "kind": res.kind, "verbs": verbs})
                    if res.status:
                        listed.append({"name": f"{res.plural}/status", "singularName": "", "namespaced": res.namespaced, "kind": res.kind, "verbs": ["get", "patch", "update"]})
                    if res.path in SCALABLE:
                        listed.append({"name": f"{res.plural}/scale", "singularName": "", "namespaced": True, "kind": "Scale",
                                       "group": "autoscaling", "version": "v1", "verbs": ["get", "patch", "update"]})
            return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}".lstrip("/"), "resources": listed}

        if parts == ["version"]:
            return _Reply(200, KUBE_VERSION)
        if parts == ["api"]:
            return _Reply(200, {"kind": "APIVersions", "versions": ["v1"],
                                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": self.url.removeprefix("http://")}]})
        if parts == ["apis"]:
            return _Reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group_body(g) for g in groups if g]})
        if parts == ["api", "v1"]:
            return _Reply(200, resource_list("", "v1"))
        if len(parts) == 2 and parts[0] == "apis" and parts[1] in groups:
            return _Reply(200, {"kind": "APIGroup", "apiVersion": "v1", **group_body(parts[1])})
        if len(parts) == 3 and parts[0] == "apis" and parts[2] in groups.get(parts[1], []):
            return _Reply(200, resource_list(parts[1], parts[2]))
        return None

    def _access_review(self, body: Any, who: Requester | None = None) -> Obj:
        spec = (body or {}).get("spec") or {}
        attrs = spec.get("resourceAttributes")
        allowed = True
        if attrs:
            resource = attrs.get("resource", "") + (f"/{attrs['subresource']}" if attrs.get("subresource") else "")
            allowed = not self._is_denied(attrs.get("verb", ""), attrs.get("group", ""), resource, attrs.get("namespace"))
            if who is not None:
                allowed = allowed and authorizer.allowed(who, attrs.get("verb", ""), attrs.get("group", ""), attrs.get("resource", ""),
                                                         attrs.get("subresource") or None, attrs.get("namespace") or None,
                                                         attrs.get("name") or None, self._rbac_objects)
        return {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                "metadata": {"creationTimestamp": None}, "spec": spec,
                "status": {"allowed": allowed, "reason": "RBAC: allowed" if allowed else "RBAC: denied"}}

    # -- watch serving ----------------------------------------------------------------------------------
    def _open_watch(self, res: Resource, namespace: str | None, query: dict[str, str]) -> Streamer:
        wanted = self._matcher(res, namespace, query.get("labelSelector", ""), query.get("fieldSelector", ""))
        timeout = _int_param(query, "timeoutSeconds")
        bookmarks = _truthy(query.get("allowWatchBookmarks"))
        since_text = query.get("resourceVersion", "")
        watch = _Watch(self._lock, wanted, self.watch_queue_limit)
        with self._lock:
            if since_text in ("", "0"):
                watch.queue.extend(("ADDED", o) for o in self._select(res, wanted))
            else:
                since = _int_param(query, "resourceVersion") or 0
                if since < self._floor:
                    watch.close(_expired(since, self._floor).status())
                else:
                    watch.queue.extend((kind, o) for rv, kind, r, o in self._history if rv > since and wanted(r, o))
            if len(watch.queue) > watch.limit:
                watch.queue.clear()
                watch.close(_expired(int(since_text or 0), self._floor).status())
            if self._stopping:
                watch.close()
            if not watch.closed:
                self._watches.add(watch)
        return lambda handler: self._serve_watch(handler, watch, res, timeout, bookmarks)

    def _serve_watch(self, handler: _Handler, watch: _Watch, res: Resource, timeout: int | None, bookmarks: bool) -> None:
        deadline = time.monotonic() + timeout if timeout else None
        last_bookmark = time.monotonic()

        def bookmark(rv: int) -> bytes:
            return _event_line("BOOKMARK", {"kind": res.kind, "apiVersion": res.api_version, "metadata": {"resourceVersion": str(rv)}})

        try:
            handler.start_chunks("application/json")
            while True:
                wait = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
                with self._lock:
                    if not watch.queue and not watch.closed and wait > 0:
                        watch.cond.wait(wait)
                    batch = list(watch.queue)
                    watch.queue.clear()
                    closed, error, rv = watch.closed, watch.error, self._rv
                if batch and self.watch_delay:
                    time.sleep(self.watch_delay)
                handler.chunk(b"".join(_event_line(kind, obj) for kind, obj in batch))
                if closed:
                    if error is not None:
                        handler.chunk(_event_line("ERROR", error))
                    break
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    if bookmarks:
                        handler.chunk(bookmark(rv))
                    break
                if bookmarks and now - last_bookmark >= self.bookmark_interval:
                    handler.chunk(bookmark(rv))
                    last_bookmark = now
                if not batch and handler.client_gone():
                    raise ConnectionAbortedError("the client hung up")
            handler.end_chunks()
        except OSError:
            handler.close_connection = True
        finally:
            with self._lock:
                watch.closed = True
                self._watches.discard(watch)
            watch.done.set()

    # -- log serving ------------------------------------------------------------------------------------
    def _read_log(self, namespace: str, name: str, query: dict[str, str]) -> _Reply | Streamer:
        timestamps, follow, previous = (_truthy(query.get(k)) for k in ("timestamps", "follow", "previous"))
        tail, since_seconds, limit = (_int_param(query, k) for k in ("tailLines", "sinceSeconds", "limitBytes"))
        since_ns = _parse_seconds(query["sinceTime"]) * 10**9 if "sinceTime" in query else None
        if since_seconds is not None:
            since_ns = time.time_ns() - since_seconds * 10**9
        with self._lock:
            pod = self._find(POD, namespace, name)
            if pod is None:
                raise _not_found(POD, name)
            container = self._log_container(pod, query.get("container"))
            key = (namespace, name, container)
            if previous:
                log = self._previous.get(key)
                if log is None:
                    raise _bad_request(f'previous terminated container "{container}" in pod "{name}" not found')
            else:
                log = self._logs.get(key)
                if log is None and (pod.get("status") or {}).get("phase", "Pending") == "Pending":
                    raise _bad_request(f'container "{container}" in pod "{name}" is waiting to start: ContainerCreating')
                log = log or self._logs.setdefault(key, _Log(self.log_line_limit))
            lines, cursor = log.since(0), log.end
        if since_ns is not None:
            lines = [line for line in lines if line[0] >= since_ns]
        if tail is not None:
            lines = lines[-tail:] if tail > 0 else []
        first = _log_bytes(lines, timestamps)
        if not follow or previous:
            return _Reply(200, first[:limit] if limit is not None else first, "text/plain")
        return lambda handler: self._serve_follow(handler, log, cursor, first, timestamps, limit)

    def _log_container(self, pod: Obj, requested: str | None) -> str:
        spec, name = pod.get("spec") or {}, pod["metadata"]["name"]
        names = [c.get("name") for c in spec.get("containers") or []]
        others = [c.get("name") for key in ("initContainers", "ephemeralContainers") for c in spec.get(key) or []]
        if requested:
            if names and requested not in names + others:
                raise _bad_request(f"container {requested} is not valid for pod {name}")
            return requested
        if len(names) > 1:
            raise _bad_request(f"a container name must be specified for pod {name}, choose one of: [{' '.join(names)}]")
        return names[0] if names else "main"

    def _serve_follow(self, handler: _Handler, log: _Log, cursor: int, first: bytes, timestamps: bool, limit: int | None) -> None:
        done = threading.Event()
        with self._lock:
            self._follows.add(done)
            cuts = self._cuts
            rotations = log.rotations
        sent = 0
        try:
            handler.start_chunks("text/plain")
            data = first
            while True:
                if limit is not None:
                    data = data[: max(limit - sent, 0)]
                handler.chunk(data)
                sent += len(data)
                with self._lock:
                    if log.end == cursor and not log.ended and self._cuts == cuts and not self._stopping:
                        self._log_cond.wait(POLL_S)
                    new, cursor = log.since(cursor), log.end
                    if log.rotations != rotations:
                        new = []  # stalled by a rotation: the stream stays open and silent
                    ended, cut = log.ended or self._stopping, self._cuts != cuts
                if cut:
                    handler.cut()
                    return
                data = _log_bytes(new, timestamps)
                if (ended and not data) or (limit is not None and sent >= limit):
                    break
                if not data and handler.client_gone():
                    raise ConnectionAbortedError("the client hung up")
            handler.end_chunks()
        except OSError:
            handler.close_connection = True
        finally:
            with self._lock:
                self._follows.discard(done)
            done.set()


def _verb(method: str, name: str | None, sub: str | None, watching: bool) -> str:
    """The RBAC verb of a request; 405 for a method the URL does not take."""
    if name is None:
        verb = {"GET": "watch" if watching else "list", "POST": "create", "DELETE": "deletecollection"}.get(method)
    elif sub is None:
        verb = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method)
    else:
        allowed = {"status": {"GET": "get", "PUT": "update", "PATCH": "patch"}, "scale": {"GET": "get", "PUT": "update", "PATCH": "patch"},
                   "log": {"GET": "get"}}
        verb = allowed.get(sub, {}).get(method)
    if verb is None:
        raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method on the requested resource ({method})")
    return verb


def _scale_of(obj: Obj) -> Obj:
    """The autoscaling/v1 Scale of a workload with ``spec.replicas`` and a label selector."""
    meta = obj["metadata"]
    labels = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    return {"kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp") if k in meta},
            "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 1)},
            "status": {"replicas": (obj.get("status") or {}).get("replicas", 0),
                       "selector": ",".join(f"{k}={v}" for k, v in sorted(labels.items()))}}


def _event_line(kind: str, obj: Obj) -> bytes:
    return json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode() + b"\n"


# -- the HTTP server ------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    emulator: KubeEmulator

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-response (Watch.stop, cut streams, stop()) are normal here.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _TLSServer(_Server):
    """The in-cluster endpoint: TLS on each accepted connection, the handshake done in the handler's thread."""

    def __init__(self, address: tuple[str, int], handler: Any, context: ssl.SSLContext) -> None:
        self.context = context
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address


@dataclass
class InCluster:
    """Where pods reach the emulator (``KUBERNETES_SERVICE_HOST``/``PORT``) and the CA file they trust."""

    host: str
    port: int
    ca_file: str
    folder: Path
    server: _TLSServer
    thread: threading.Thread


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else small writes wait ~40 ms for delayed ACKs
    server: _Server

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            self.request.do_handshake()  # here, in the handler's thread, not in the accepting loop
            self.request.settimeout(None)
        super().setup()
        if not self.server.emulator._track(self.connection):
            self.connection.shutdown(socket.SHUT_RDWR)  # accepted while stopping: serve nothing

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.emulator._untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        emulator = self.server.emulator
        raw = self._read_body()  # always, so that a keep-alive connection stays in step
        emulator._record(method, self.path)
        try:
            result = emulator._dispatch(method, self.path, self.headers, raw)
        except ApiError as e:
            result = _Reply(e.code, e.status())
        except Exception as e:  # an emulator bug: say so loudly, and answer like a server would
            traceback.print_exc()
            result = _Reply(500, ApiError(500, "InternalError", f"emulator failure: {e!r}").status())
        if isinstance(result, _Reply):
            data = result.body if isinstance(result.body, bytes) else json.dumps(result.body, separators=(",", ":")).encode()
            self.send_response(result.code)
            self.send_header("Content-Type", result.content_type)
            self.send_header("Content-Length", str(len(data)))
            for key, value in result.headers:
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        else:
            result(self)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    # -- streaming helpers -----------------------------------------------------------------------------
    def start_chunks(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))

    def end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def cut(self) -> None:
        """Close the connection without finishing the response."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def client_gone(self) -> bool:
        """True once the client closed its end (no client sends anything while a response streams)."""
        if isinstance(self.connection, ssl.SSLSocket):
            return False  # a TLS record cannot be peeked at; pods make no long requests
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True
