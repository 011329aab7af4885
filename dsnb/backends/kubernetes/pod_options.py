"""Cluster-side settings of the pods a Kubernetes backend creates, checked before anything is created.

Example:
    >>> PodOptions(node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    ...            nccl={"NCCL_DEBUG": "WARN"}).run_as_user
    1000
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dsnb.errors import InvalidSpecError
from dsnb.spec_problems import Check, Problem, collect, field_values, raise_first

_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?\Z")
_NCCL_KEY = re.compile(r"^NCCL_[A-Z0-9_]+\Z")
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}
_PEER_KEYS = {"podSelector", "namespaceSelector", "ipBlock"}
#: The Pod Security Standards a job's pods can be made to meet (https://kubernetes.io/docs/concepts/security/pod-security-standards/).
SECURITY_PROFILES = ("restricted", "baseline")


def _check_name(value: str | None, field_name: str, what: str) -> None:
    if value is not None and (not isinstance(value, str) or len(value) > 253 or not _DNS1123.match(value)):
        raise InvalidSpecError(field_name, f"{value!r} is not a valid {what} name", "use lower-case letters, digits, '-' and '.'")


def _check_names(values: Mapping[str, Any]) -> None:
    _check_name(values["service_account"], "options.service_account", "ServiceAccount")
    _check_name(values["checkpoint_pvc"], "options.checkpoint_pvc", "PersistentVolumeClaim")
    for secret in values["image_pull_secrets"]:
        _check_name(secret, "options.image_pull_secrets", "Secret")


def _check_node_selector(values: Mapping[str, Any]) -> None:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in values["node_selector"].items()):
        raise InvalidSpecError("options.node_selector", "keys and values must be strings", "write it like {'pool': 'gpu'}")


def _check_tolerations(values: Mapping[str, Any]) -> None:
    for toleration in values["tolerations"]:
        unknown = set(toleration) - _TOLERATION_KEYS
        if unknown:
            raise InvalidSpecError("options.tolerations", f"unknown toleration keys {sorted(unknown)}",
                                   f"use {sorted(_TOLERATION_KEYS)}")


def _check_shm_size(values: Mapping[str, Any]) -> None:
    shm_size = values["shm_size"]
    if shm_size is not None and not _QUANTITY.match(str(shm_size)):
        raise InvalidSpecError("options.shm_size", f"{shm_size!r} is not a Kubernetes quantity", "write it like '8Gi'")


def _check_nccl(values: Mapping[str, Any]) -> None:
    for key, value in values["nccl"].items():
        if not isinstance(key, str) or not _NCCL_KEY.match(key) or not isinstance(value, str):
            raise InvalidSpecError("options.nccl", f"{key!r}={value!r} is not an NCCL setting",
                                   "use NCCL_* names with string values, e.g. {'NCCL_DEBUG': 'WARN'}")


def _check_checkpoint_mount(values: Mapping[str, Any]) -> None:
    if not values["checkpoint_mount"].startswith("/"):
        raise InvalidSpecError("options.checkpoint_mount", f"{values['checkpoint_mount']!r} is not an absolute path",
                               "write it like '/checkpoints'")


def _check_run_as_user(values: Mapping[str, Any]) -> None:
    user = values["run_as_user"]
    if isinstance(user, bool) or not isinstance(user, int) or user <= 0:
        raise InvalidSpecError("options.run_as_user", f"must be a non-root user id, got {user!r}", "use e.g. 1000")


def _check_serve_ingress(values: Mapping[str, Any]) -> None:
    for peer in values["serve_ingress_from"]:
        if not isinstance(peer, dict) or not peer or set(peer) - _PEER_KEYS:
            raise InvalidSpecError("options.serve_ingress_from", f"{peer!r} is not a NetworkPolicy peer",
                                   f"use dicts with {sorted(_PEER_KEYS)}, e.g. {{'namespaceSelector': {{'matchLabels': {{'team': 'web'}}}}}}")
    if values["serve_ingress_from"] and not values["network_policy"]:
        raise InvalidSpecError("options.serve_ingress_from", "says who may reach a served model, but no NetworkPolicy is made",
                               "set network_policy=True as well")


def _check_queue(values: Mapping[str, Any]) -> None:
    # Label values: 63 characters at most (https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/).
    for key, what in (("queue", "LocalQueue"), ("priority_class", "WorkloadPriorityClass")):
        value = values[key]
        if value is not None and (not isinstance(value, str) or len(value) > 63 or not _DNS1123.match(value)
                                  or "." in value and key == "queue"):
            raise InvalidSpecError(f"options.{key}", f"{value!r} is not a valid {what} name",
                                   "use at most 63 lower-case letters, digits and '-', e.g. 'team-a'")
    if values["priority_class"] is not None and values["queue"] is None:
        raise InvalidSpecError("options.priority_class", "is Kueue's WorkloadPriorityClass, but no queue is named",
                               "set queue= as well (the LocalQueue the job waits in)")


def _check_security_profile(values: Mapping[str, Any]) -> None:
    if values["security_profile"] not in SECURITY_PROFILES:
        raise InvalidSpecError("options.security_profile", f"unknown profile {values['security_profile']!r}",
                               f"use one of {', '.join(SECURITY_PROFILES)} (the Pod Security Standards dsnb can meet)")


#: The checks of PodOptions, in the order the first problem is reported.
_OPTION_CHECKS = tuple(Check(check) for check in (
    _check_names, _check_node_selector, _check_tolerations, _check_shm_size, _check_nccl, _check_checkpoint_mount,
    _check_run_as_user, _check_serve_ingress, _check_security_profile, _check_queue,
))


@dataclass(frozen=True)
class PodOptions:
    """Where and how pods run; the same for every Kubernetes backend.

    Frozen: ``dataclasses.replace(options, network_policy=True)`` makes a changed copy, checked again.

    Attributes:
        service_account: the ServiceAccount the pods run as.
        node_selector: node labels the pods require.
        tolerations: Kubernetes tolerations, as dicts (``{"key": ..., "operator": ..., "effect": ...}``).
        affinity: a Kubernetes affinity, as a dict.
        image_pull_secrets: names of Secrets for pulling the image.
        checkpoint_pvc: a PersistentVolumeClaim mounted at ``checkpoint_mount`` on every pod.
        checkpoint_mount: where the claim is mounted.
        shm_size: size of the memory-backed ``/dev/shm``; defaults to the spec's memory per node.
        nccl: NCCL settings (``NCCL_*`` variables such as NCCL_DEBUG, NCCL_SOCKET_IFNAME, NCCL_IB_DISABLE).
        run_as_user: the non-root user id of the containers; 0 is refused (run as root by
            building an image for it, not from here).
        security_profile: the Pod Security Standard every pod meets: ``"restricted"`` (default:
            non-root, no privilege escalation, all capabilities dropped but ``NET_BIND_SERVICE``
            where sshd needs it, the runtime's default seccomp profile), or ``"baseline"``, which
            keeps only the seccomp profile and runs as the image's user (root images), for
            namespaces that allow it.
        network_policy: add a NetworkPolicy ``<job>`` that lets the job's pods take traffic only
            from each other (see :mod:`dsnb.backends.kubernetes.network_policy`).
        serve_ingress_from: with ``network_policy``, who may reach a served model's port:
            NetworkPolicy peers as dicts, e.g. ``[{"namespaceSelector": {"matchLabels":
            {"kubernetes.io/metadata.name": "web"}}}]``.
        queue: the Kueue LocalQueue the job waits in (``kueue.x-k8s.io/queue-name`` on the object Kueue
            manages: the StatefulSet, MPIJob, TrainJob or RayJob; see :mod:`dsnb.backends.kubernetes.kueue`).
        priority_class: with ``queue``, Kueue's WorkloadPriorityClass for the job
            (``kueue.x-k8s.io/priority-class``).

    Raises:
        InvalidSpecError: a malformed name, toleration, quantity, NCCL key or user id.
    """

    service_account: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    affinity: dict[str, Any] | None = None
    image_pull_secrets: list[str] = field(default_factory=list)
    checkpoint_pvc: str | None = None
    checkpoint_mount: str = "/checkpoints"
    shm_size: str | None = None
    nccl: dict[str, str] = field(default_factory=dict)
    run_as_user: int = 1000
    security_profile: str = "restricted"
    network_policy: bool = False
    serve_ingress_from: list[dict[str, Any]] = field(default_factory=list)
    queue: str | None = None
    priority_class: str | None = None

    def __post_init__(self) -> None:
        raise_first(collect(_OPTION_CHECKS, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "JobSpec"))

    @classmethod
    def problems(cls, **fields: Any) -> list[Problem]:
        """Every problem of ``PodOptions(**fields)``, without raising.

        Raises:
            TypeError: an unknown field.

        Example:
            >>> [p.field for p in PodOptions.problems(shm_size="lots", run_as_user=0)]
            ['options.shm_size', 'options.run_as_user']
        """
        return collect(_OPTION_CHECKS, field_values(cls, fields), "JobSpec")
