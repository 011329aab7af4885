"""Create, read and delete the kinds dsnb manages, from their dict manifests.

One table maps each kind to the official client's calls, so backends handle manifests
as plain dicts (what ``dryrun`` prints) and still use the typed client.

Example:
    >>> ref = owner_reference({"apiVersion": "v1", "kind": "ConfigMap",
    ...                        "metadata": {"name": "j", "uid": "1234"}})
    >>> ref["kind"], ref["uid"]
    ('ConfigMap', '1234')
"""

from __future__ import annotations

import json
import re
from typing import Any

from kubernetes.client.exceptions import ApiException

from dsnb.backends.kubernetes.connection import Connection

#: kind -> (client attribute, method suffix) for core and apps kinds.
_TYPED = {
    "ConfigMap": ("core", "config_map"),
    "Secret": ("core", "secret"),
    "Service": ("core", "service"),
    "Pod": ("core", "pod"),
    "StatefulSet": ("apps", "stateful_set"),
    "ServiceAccount": ("core", "service_account"),
    "Role": ("rbac", "role"),
    "RoleBinding": ("rbac", "role_binding"),
    "NetworkPolicy": ("networking", "network_policy"),
}
#: kind -> plural for custom resources.
_CUSTOM_PLURALS = {
    "MPIJob": "mpijobs",
    "TrainJob": "trainjobs",
    "TrainingRuntime": "trainingruntimes",
    "RayJob": "rayjobs",
    "RayService": "rayservices",
    "RayCluster": "rayclusters",
}


def owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    """An ownerReference to ``owner`` (a created object), so deleting it collects the dependent."""
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"],
            "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"]}


def _typed_call(conn: Connection, verb: str, kind: str) -> Any:
    """The official client's ``<verb>_namespaced_<kind>`` method for a core or apps kind."""
    api, suffix = _TYPED[kind]
    return getattr(getattr(conn, api), f"{verb}_namespaced_{suffix}")


def read_json(response: Any) -> dict[str, Any]:
    """The JSON body of an unread (``_preload_content=False``) response; raises on an error status."""
    try:
        if not 200 <= response.status < 300:
            raise ApiException(status=response.status, reason=response.reason, body=response.data)
        return json.loads(response.data)
    finally:
        response.release_conn()


#: The custom kinds dsnb creates.
CUSTOM_KINDS = frozenset(_CUSTOM_PLURALS)


def plural(kind: str) -> str:
    """The URL name of a custom kind dsnb creates, e.g. ``"trainjobs"`` for ``"TrainJob"``.

    Raises:
        KeyError: not a custom kind dsnb knows.
    """
    return _CUSTOM_PLURALS[kind]


def unknown_fields(error: ApiException) -> list[str] | None:
    """The fields a CRD did not know, when the API refused a ``fieldValidation=Strict`` write for them; else None.

    Example:
        >>> unknown_fields(ApiException(status=400, reason="Bad Request"))
        >>> e = ApiException(status=400, reason="Bad Request")
        >>> e.body = '{"message": "strict decoding error: unknown field \\"spec.runtimePatches\\""}'
        >>> unknown_fields(e)
        ['spec.runtimePatches']
    """
    body = str(error.body or "")
    if error.status != 400 or "strict decoding error" not in body:
        return None
    return re.findall(r'unknown field \\?"([^"\\]+)', body)


def create(conn: Connection, manifest: dict[str, Any]) -> dict[str, Any]:
    """Create ``manifest`` in the connection's namespace; return the stored object as a dict.

    Raises:
        ApiException: the server refused (409 exists, 403 forbidden, 422 invalid, ...).
    """
    kind = manifest["kind"]
    if kind in _TYPED:
        call = _typed_call(conn, "create", kind)
        return read_json(call(conn.namespace, manifest, _preload_content=False))
    group, version = manifest["apiVersion"].split("/")
    # Strict: an operator's CRD older than what dsnb renders would drop unknown fields silently
    # (the server's default prunes them), losing dsnb's labels, volumes or limits.
    return conn.custom.create_namespaced_custom_object(group, version, conn.namespace, _CUSTOM_PLURALS[kind], manifest,
                                                       field_validation="Strict")


def read(conn: Connection, api_version: str, kind: str, name: str) -> dict[str, Any] | None:
    """The object as a dict, or None when it does not exist.

    Raises:
        ApiException: any error other than 404.
    """
    try:
        if kind in _TYPED:
            call = _typed_call(conn, "read", kind)
            return read_json(call(name, conn.namespace, _preload_content=False))
        group, version = api_version.split("/")
        return conn.custom.get_namespaced_custom_object(group, version, conn.namespace, _CUSTOM_PLURALS[kind], name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def patch_config_map_data(conn: Connection, name: str, data: dict[str, str]) -> None:
    """Merge ``data`` into a ConfigMap's data.

    Raises:
        ApiException: the server refused.
    """
    read_json(conn.core.patch_namespaced_config_map(name, conn.namespace, {"data": data}, _preload_content=False))


def delete(conn: Connection, api_version: str, kind: str, name: str, uid: str | None = None) -> bool:
    """Delete an object and, in the background, what it owns. False when it was already gone, or when
    ``uid`` is given and the object of that name is another one (the API server checks it: preconditions).

    Raises:
        ApiException: any error other than 404 (and 409 for a uid that does not match).
    """
    options: dict[str, Any] = {"propagationPolicy": "Background"}
    if uid is not None:
        options["preconditions"] = {"uid": uid}
    try:
        if kind in _TYPED:
            call = _typed_call(conn, "delete", kind)
            read_json(call(name, conn.namespace, body=options, _preload_content=False))
        else:
            group, version = api_version.split("/")
            conn.custom.delete_namespaced_custom_object(group, version, conn.namespace, _CUSTOM_PLURALS[kind], name, body=options)
        return True
    except ApiException as e:
        if e.status == 404 or (e.status == 409 and uid is not None):
            return False
        raise
