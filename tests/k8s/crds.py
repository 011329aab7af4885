"""Validate custom resources against their upstream CRD schemas (``tests/k8s/crds/``).

Example:
    >>> validate_custom({"apiVersion": "kubeflow.org/v2beta1", "kind": "MPIJob", "metadata": {"name": "a"},
    ...                  "spec": {"mpiReplicaSpecs": {}}})
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import Any

import jsonschema

FOLDER = Path(__file__).parent / "crds"


@functools.cache
def schemas() -> dict[tuple[str, str, str], dict[str, Any]]:
    """(group, version, kind) -> openAPIV3Schema, for every stored CRD."""
    found = {}
    for path in FOLDER.glob("*.json.gz"):
        with gzip.open(path, "rt") as f:
            crd = json.load(f)
        for version, schema in crd["versions"].items():
            found[crd["group"], version, crd["kind"]] = schema
    return found


def validate_custom(manifest: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``manifest`` fits its CRD's schema.

    Unknown fields are refused too (the API server prunes them silently, which would hide a
    misspelt field), by setting ``additionalProperties: false`` wherever the schema lists
    ``properties`` and allows nothing else.
    """
    group, version = manifest["apiVersion"].split("/")
    schema = schemas()[group, version, manifest["kind"]]
    jsonschema.validate(manifest, _strict(schema))


@functools.cache
def _strict_cached(text: str) -> dict[str, Any]:
    return _close(json.loads(text))


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    return _strict_cached(json.dumps(schema, sort_keys=True))


def _close(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _close(v) for k, v in node.items()}
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_close(v) for v in node]
    return node
