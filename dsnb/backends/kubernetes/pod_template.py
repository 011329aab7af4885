"""The one pod template every Kubernetes backend builds its pods from.

Image, command, environment, resources (``nvidia.com/gpu`` as a limit), a memory-backed
``/dev/shm`` (NCCL and DataLoader workers need more than the container default of 64 MiB),
NCCL settings, scheduling (node selector, tolerations, affinity), service account, image pull
secrets, an optional checkpoint volume, dsnb's labels, and a security context meeting the Pod
Security Standard ``PodOptions.security_profile`` names ("restricted" by default). Pods get no
API token (``automountServiceAccountToken: false``): a job's code has no business with the API;
a backend whose pods do (the StatefulSet's release) gives them an account of their own.

Example:
    >>> from dsnb import JobSpec, Resources
    >>> spec = JobSpec(name="tiny-gpt", script="train.py", image="ghcr.io/org/train:1",
    ...                resources=Resources(cpu=4, memory="16Gi", gpus=2), procs_per_node=2)
    >>> template = build_pod_template(spec.with_unique_name(), ["torchrun", "train.py"], {}, PodOptions())
    >>> template["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    '2'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubernetes import client

from dsnb.backends.kubernetes.labels import job_labels
from dsnb.backends.kubernetes.pod_options import PodOptions
from dsnb.errors import InvalidSpecError
from dsnb.secrets import REDACTED, SecretRef, is_secret
from dsnb.spec import JobSpec

CONTAINER = "dsnb"
SHM_VOLUME = "dshm"
CHECKPOINT_VOLUME = "checkpoints"
_api = client.ApiClient()


def _model(data: dict[str, Any], kind: str) -> Any:
    """A kubernetes client model from its Kubernetes (camelCase) dict form."""
    return _api.deserialize(json.dumps(data), kind, None)


def _resources(spec: JobSpec) -> client.V1ResourceRequirements:
    amounts: dict[str, Any] = {}
    if spec.resources.cpu is not None:
        amounts["cpu"] = str(spec.resources.cpu)
    if spec.resources.memory is not None:
        amounts["memory"] = spec.resources.memory
    limits = dict(amounts)
    if spec.resources.gpus:
        limits["nvidia.com/gpu"] = str(spec.resources.gpus)  # extended resources are set as limits
    return client.V1ResourceRequirements(requests=amounts or None, limits=limits or None)


@dataclass(frozen=True)
class ExtraVolume:
    """A volume a backend adds to the pod, and where the container mounts it (Kubernetes dicts)."""

    volume: dict[str, Any]
    mount_path: str
    read_only: bool = False


def secret_env_keys(env: dict[str, Any]) -> list[str]:
    """The keys of ``env`` whose values are kept in the job's Secret rather than in the pod spec
    (a :class:`~dsnb.secrets.SecretRef` names a Secret of the user's instead).

    >>> secret_env_keys({"HF_TOKEN": "hf_x", "NCCL_DEBUG": "WARN", "DB_URL": "postgres://u:pw@db/x", "OLD_TOKEN": "***"})
    ['HF_TOKEN', 'DB_URL']
    """
    return [k for k, v in env.items() if is_secret(k, v) and v != REDACTED]


def referenced_env_keys(env: dict[str, Any]) -> list[str]:
    """The keys of ``env`` that name a key of a Secret the user already has (:class:`~dsnb.secrets.SecretRef`)."""
    return [k for k, v in env.items() if isinstance(v, SecretRef)]


def _env_vars(variables: dict[str, Any], secret_name: str | None, downward: dict[str, str]) -> list[client.V1EnvVar]:
    hidden = set(secret_env_keys(variables)) if secret_name else set()
    result = [client.V1EnvVar(name=k, value_from=client.V1EnvVarSource(
        field_ref=client.V1ObjectFieldSelector(field_path=path))) for k, path in downward.items()]
    for key, value in variables.items():
        if isinstance(value, SecretRef):
            ref = client.V1SecretKeySelector(name=value.name, key=value.key)
            result.append(client.V1EnvVar(name=key, value_from=client.V1EnvVarSource(secret_key_ref=ref)))
        elif key in hidden:
            ref = client.V1SecretKeySelector(name=secret_name, key=key)
            result.append(client.V1EnvVar(name=key, value_from=client.V1EnvVarSource(secret_key_ref=ref)))
        else:
            result.append(client.V1EnvVar(name=key, value=value))
    return result


def kubelet_literal(text: str) -> str:
    """``text`` as a container's command or argument, unchanged by the kubelet, which expands
    ``$(VAR)`` and turns ``$$`` into ``$`` there: every ``$`` is doubled.

    >>> kubelet_literal("--msg=$(HOME) costs $$5")
    '--msg=$$(HOME) costs $$$$5'
    """
    return text.replace("$", "$$")


def pod_security_context(options: PodOptions) -> client.V1PodSecurityContext:
    """The pod's part of ``options.security_profile``: the runtime's default seccomp profile always;
    for "restricted", a non-root user (``run_as_user``) too.

    Example:
        >>> _api.sanitize_for_serialization(pod_security_context(PodOptions(security_profile="baseline")))
        {'seccompProfile': {'type': 'RuntimeDefault'}}
    """
    seccomp = client.V1SeccompProfile(type="RuntimeDefault")
    if options.security_profile != "restricted":
        return client.V1PodSecurityContext(seccomp_profile=seccomp)
    uid = options.run_as_user
    return client.V1PodSecurityContext(run_as_non_root=True, run_as_user=uid, run_as_group=uid, fs_group=uid, seccomp_profile=seccomp)


def container_security_context(options: PodOptions, add_capabilities: tuple[str, ...] = ()) -> client.V1SecurityContext | None:
    """A container's part of ``options.security_profile``: for "restricted", no privilege escalation and
    every capability dropped but ``add_capabilities`` (the profile allows ``NET_BIND_SERVICE`` only).

    Example:
        >>> _api.sanitize_for_serialization(container_security_context(PodOptions()))
        {'allowPrivilegeEscalation': False, 'capabilities': {'drop': ['ALL']}}
    """
    if options.security_profile != "restricted":
        return None
    return client.V1SecurityContext(allow_privilege_escalation=False,
                                    capabilities=client.V1Capabilities(drop=["ALL"], add=list(add_capabilities) or None))


def build_pod_template(
    spec: JobSpec,
    command: list[str],
    env: dict[str, str],
    options: PodOptions,
    extra_labels: dict[str, str] | None = None,
    *,
    args: list[str] | None = None,
    downward_env: dict[str, str] | None = None,
    secret_name: str | None = None,
    volumes: list[ExtraVolume] | None = None,
    termination_message_path: str | None = None,
    add_capabilities: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The pod template (as a Kubernetes dict) for the pods of ``spec``.

    Args:
        spec: the job, already carrying its unique name.
        command: what the container runs (a backend's launcher command).
        env: environment the backend adds (rank wiring); ``spec.env`` and the NCCL settings
            follow, so the spec wins over the backend and NCCL settings are explicit.
        options: cluster-side settings.
        extra_labels: labels the backend adds (e.g. a role), on top of dsnb's job labels.
        args: the container's arguments (after ``command``).
        downward_env: variables filled by Kubernetes from the pod's fields
            (``{"DSNB_POD_NAME": "metadata.name"}``).
        secret_name: a Secret holding the secret-looking values of ``spec.env``; those
            variables then reference it instead of carrying their value.
        volumes: volumes the backend adds, with their mount paths.
        termination_message_path: where the container writes its termination message; the
            log's end is used when it writes none.
        add_capabilities: capabilities kept after dropping all (Pod Security "restricted" allows
            only ``NET_BIND_SERVICE``), e.g. for an sshd binary that carries it as a file capability.

    Returns:
        A ``PodTemplateSpec`` as a dict, ready for a StatefulSet, MPIJob, TrainJob or RayCluster.

    Raises:
        InvalidSpecError: the spec has no image.
    """
    if not spec.image:
        raise InvalidSpecError("image", "Kubernetes backends run the job in a container image",
                               "set image='ghcr.io/org/train:1.0' (an image with your code, torch and DeepSpeed)")
    variables = {**env, **spec.env, **options.nccl}
    mounts, pod_volumes = _volumes(spec, options, volumes or [])
    container = client.V1Container(
        name=CONTAINER,
        image=spec.image,
        command=list(command),
        args=list(args) if args else None,
        working_dir=spec.working_dir,
        env=_env_vars(variables, secret_name, downward_env or {}) or None,
        termination_message_path=termination_message_path,
        termination_message_policy="FallbackToLogsOnError" if termination_message_path else None,
        resources=_resources(spec),
        volume_mounts=mounts,
        security_context=container_security_context(options, add_capabilities),
    )
    labels = {**job_labels(spec.name), **(extra_labels or {})}
    template = client.V1PodTemplateSpec(metadata=client.V1ObjectMeta(labels=labels), spec=_pod_spec(container, pod_volumes, options))
    return _api.sanitize_for_serialization(template)


def _volumes(spec: JobSpec, options: PodOptions, extra: list[ExtraVolume]) -> tuple[list[client.V1VolumeMount], list[client.V1Volume]]:
    """The container's mounts and the pod's volumes: shared memory, the checkpoint claim, the backend's own."""
    mounts = [client.V1VolumeMount(name=SHM_VOLUME, mount_path="/dev/shm")]
    shm_limit = options.shm_size or spec.resources.memory
    pod_volumes = [client.V1Volume(name=SHM_VOLUME, empty_dir=client.V1EmptyDirVolumeSource(medium="Memory", size_limit=shm_limit))]
    if options.checkpoint_pvc:
        mounts.append(client.V1VolumeMount(name=CHECKPOINT_VOLUME, mount_path=options.checkpoint_mount))
        pod_volumes.append(client.V1Volume(
            name=CHECKPOINT_VOLUME,
            persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(claim_name=options.checkpoint_pvc),
        ))
    for item in extra:
        volume = _model(item.volume, "V1Volume")
        mounts.append(client.V1VolumeMount(name=volume.name, mount_path=item.mount_path, read_only=item.read_only or None))
        pod_volumes.append(volume)
    return mounts, pod_volumes


def _pod_spec(container: client.V1Container, volumes: list[client.V1Volume], options: PodOptions) -> client.V1PodSpec:
    """The pod around ``container``: scheduling, pull secrets and the restricted security context from ``options``."""
    return client.V1PodSpec(
        containers=[container],
        volumes=volumes,
        restart_policy=None,  # each backend decides (a StatefulSet requires Always)
        service_account_name=options.service_account,
        node_selector=options.node_selector or None,
        tolerations=[_model(t, "V1Toleration") for t in options.tolerations] or None,
        affinity=_model(options.affinity, "V1Affinity") if options.affinity else None,
        image_pull_secrets=[client.V1LocalObjectReference(name=s) for s in options.image_pull_secrets] or None,
        security_context=pod_security_context(options),
        automount_service_account_token=False,
    )
