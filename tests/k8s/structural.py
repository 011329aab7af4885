"""What an API server does with fields a CRD's structural schema does not know: prune them, or refuse.

Custom resources are decoded against their CRD's ``openAPIV3Schema``. With
``fieldValidation=Strict`` an unknown field is refused (400, "strict decoding error: unknown
field ..."); otherwise it is dropped (pruned) and the object is stored without it, which is what
happens to fields a newer client sends to an older operator's CRD (Kubernetes v1.32,
``staging/src/k8s.io/apiextensions-apiserver/pkg/apiserver/schema/pruning``; the default is ``Warn``, whose warning
the Python client does not show). ``metadata`` is the API server's own and left alone, as are
subtrees marked ``x-kubernetes-preserve-unknown-fields`` or typed ``x-kubernetes-embedded-resource``.

Example:
    >>> schema = {"type": "object", "properties": {"spec": {"type": "object", "properties": {"a": {"type": "string"}}}}}
    >>> unknown_fields({"spec": {"a": "x", "b": 1}}, schema)
    ['spec.b']
    >>> prune({"spec": {"a": "x", "b": 1}}, schema)
    {'spec': {'a': 'x'}}
"""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]
_TOP = ("apiVersion", "kind", "metadata")


def _walk(value: Any, schema: Obj, path: str, found: list[str], drop: bool) -> None:
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key in list(value):
            where = f"{path}.{key}" if path else key
            if properties is not None and key in properties:
                _walk(value[key], properties[key], where, found, drop)
            elif isinstance(extra, dict):
                _walk(value[key], extra, where, found, drop)
            elif properties is not None or extra is False:
                if not path and key in _TOP:
                    continue
                found.append(where)
                if drop:
                    del value[key]
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            _walk(item, schema["items"], f"{path}[{index}]", found, drop)


def unknown_fields(obj: Obj, schema: Obj) -> list[str]:
    """The dotted paths of fields of ``obj`` that ``schema`` does not know, in document order."""
    found: list[str] = []
    _walk(obj, schema, "", found, drop=False)
    return found


def prune(obj: Obj, schema: Obj) -> Obj:
    """``obj`` without the fields ``schema`` does not know (changed in place, and returned)."""
    _walk(obj, schema, "", [], drop=True)
    return obj
