"""The shared pod template: valid against the Kubernetes schema (strict), and faithful to spec and options."""

from __future__ import annotations

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")
pytest.importorskip("kubernetes")

from dsnb import InvalidSpecError, JobSpec, Resources  # noqa: E402
from dsnb.backends.kubernetes.labels import JOB, MANAGED_BY, job_selector  # noqa: E402
from dsnb.backends.kubernetes.pod_options import PodOptions  # noqa: E402
from dsnb.backends.kubernetes.pod_template import build_pod_template  # noqa: E402

K8S_VERSION = kubernetes_validate.utils.latest_version()
FULL_OPTIONS = PodOptions(
    service_account="trainer",
    node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 30}],
    affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu"]}]}]}}},
    image_pull_secrets=["regcred"],
    checkpoint_pvc="ckpt",
    shm_size="8Gi",
    nccl={"NCCL_DEBUG": "WARN", "NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_DISABLE": "1"},
)


def spec(**changes) -> JobSpec:
    fields = {"name": "tiny-gpt", "script": "train.py", "image": "ghcr.io/org/train:1", "procs_per_node": 2,
              "resources": Resources(cpu=4, memory="16Gi", gpus=2), "env": {"HF_HOME": "/cache"}, **changes}
    return JobSpec(**fields).with_unique_name()


def as_pod(template: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **template["metadata"]}, "spec": template["spec"]}


@pytest.mark.parametrize("options", [PodOptions(), FULL_OPTIONS], ids=["defaults", "every-option"])
@pytest.mark.parametrize("resources", [Resources(), Resources(cpu="500m", memory="2Gi"), Resources(cpu=4, memory="16Gi", gpus=2)],
                         ids=["none", "cpu-memory", "gpus"])
def test_template_is_a_valid_pod_in_strict_mode(options: PodOptions, resources: Resources) -> None:
    job = spec(resources=resources, procs_per_node=2 if resources.gpus else 1)
    template = build_pod_template(job, ["torchrun", "train.py"], {"NODE_RANK": "0"}, options)
    kubernetes_validate.validate(as_pod(template, f"{job.name}-0"), K8S_VERSION, strict=True)


def test_template_carries_the_spec_and_the_options() -> None:
    job = spec()
    template = build_pod_template(job, ["torchrun", "train.py"], {"NODE_RANK": "0", "HF_HOME": "/backend"}, FULL_OPTIONS,
                                  extra_labels={"dsnb.io/role": "worker"})
    assert template["metadata"]["labels"] == {MANAGED_BY: "dsnb", JOB: job.name, "dsnb.io/role": "worker"}
    pod = template["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/org/train:1" and container["command"] == ["torchrun", "train.py"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {"NODE_RANK": "0", "HF_HOME": "/cache", "NCCL_DEBUG": "WARN", "NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_DISABLE": "1"}
    assert container["resources"] == {"requests": {"cpu": "4", "memory": "16Gi"},
                                      "limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2"}}
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {"name": "checkpoints", "mountPath": "/checkpoints"} in container["volumeMounts"]
    assert pod["serviceAccountName"] == "trainer" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["tolerations"][0]["tolerationSeconds"] == 30
    assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def test_shm_follows_memory_and_cpu_jobs_ask_no_gpu() -> None:
    template = build_pod_template(spec(resources=Resources(memory="4Gi"), procs_per_node=1), ["python", "t.py"], {}, PodOptions())
    (container,) = template["spec"]["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert template["spec"]["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}


def test_a_job_without_image_is_refused() -> None:
    with pytest.raises(InvalidSpecError, match="JobSpec.image: .*container image"):
        build_pod_template(spec(image=None), ["python"], {}, PodOptions())


def test_job_selector_matches_the_labels() -> None:
    job = spec()
    labels = build_pod_template(job, ["python"], {}, PodOptions())["metadata"]["labels"]
    assert job_selector(job.name) == ",".join(f"{k}={v}" for k, v in labels.items())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"service_account": "Trainer_SA"}, "options.service_account"),
        ({"checkpoint_pvc": "ckpt/1"}, "options.checkpoint_pvc"),
        ({"image_pull_secrets": ["Reg Cred"]}, "options.image_pull_secrets"),
        ({"node_selector": {"pool": 1}}, "options.node_selector"),
        ({"tolerations": [{"key": "a", "opertor": "Exists"}]}, "options.tolerations"),
        ({"shm_size": "8GB"}, "options.shm_size"),
        ({"nccl": {"DEBUG": "WARN"}}, "options.nccl"),
        ({"checkpoint_mount": "checkpoints"}, "options.checkpoint_mount"),
        ({"run_as_user": 0}, "options.run_as_user"),
    ],
)
def test_bad_options_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidSpecError) as info:
        PodOptions(**kwargs)
    assert info.value.field == field


def test_strict_validation_catches_a_malformed_template() -> None:
    """The schema check above can fail: a misspelt field is refused."""
    job = spec()
    pod = as_pod(build_pod_template(job, ["python"], {}, PodOptions()), f"{job.name}-0")
    pod["spec"]["containers"][0]["volumeMount"] = pod["spec"]["containers"][0].pop("volumeMounts")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
