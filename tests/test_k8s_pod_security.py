"""Every pod of every Kubernetes backend meets the Pod Security Standard "restricted", and has no API token.

The checker (``tests/k8s/pod_security.py``) states each rule of the Kubernetes documentation on
its own; it is tested rule by rule here, then run over every pod dsnb renders (batch and serving,
StatefulSet, MPIJob launcher and workers, RayJob head, workers and submitter, RayService), and,
as the emulator's Pod Security admission on a namespace labelled ``enforce: restricted``, over the
pods the simulated controllers really create, TrainJob's included (their spec comes from dsnb's
own TrainingRuntime and its patches). Relaxing it is explicit (``PodOptions(security_profile=
"baseline")``), and a namespace that refuses what was asked says so in the job's status.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from k8s import pod_security
from k8s.crds import FOLDER
from k8s.fixtures import IMAGE, NAMESPACE, controller_for, emulator, make_cluster, workload  # noqa: F401 - fixtures
from k8s.sandbox import mpi_problem, netns_problem, sandbox_problem
from k8s.sim import ClusterSim

from dsnb import Cluster, JobFailed, JobSpec, JobState, Resources, ServeSpec
from dsnb.backends.kubernetes.pod_options import PodOptions

needs_sandbox = pytest.mark.skipif(sandbox_problem() is not None, reason=sandbox_problem() or "")
needs_mpi = pytest.mark.skipif((netns_problem() or mpi_problem()) is not None, reason=netns_problem() or mpi_problem() or "")
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
RESTRICTED_POD = {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}


def compliant(**changes: Any) -> dict[str, Any]:
    spec = {"securityContext": dict(RESTRICTED_POD), "volumes": [{"name": "v", "emptyDir": {}}],
            "containers": [{"name": "c", "image": "i", "securityContext": dict(RESTRICTED_CONTAINER)}]}
    for key, value in changes.items():
        if key == "container":
            spec["containers"][0]["securityContext"] = {**RESTRICTED_CONTAINER, **value}
        elif key == "pod_context":
            spec["securityContext"] = {**RESTRICTED_POD, **value}
        else:
            spec[key] = value
    return spec


# -- the checker, rule by rule -------------------------------------------------------------------

VIOLATIONS = {
    "HostProcess": compliant(pod_context={"windowsOptions": {"hostProcess": True}}),
    "Host Namespaces": compliant(hostNetwork=True),
    "Privileged Containers": compliant(container={"privileged": True}),
    "Capabilities (baseline)": compliant(container={"capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]}}),
    "HostPath Volumes": compliant(volumes=[{"name": "h", "hostPath": {"path": "/"}}]),
    "Host Ports": compliant(containers=[{"name": "c", "image": "i", "securityContext": RESTRICTED_CONTAINER,
                                         "ports": [{"containerPort": 80, "hostPort": 80}]}]),
    "AppArmor": compliant(pod_context={"appArmorProfile": {"type": "Unconfined"}}),
    "SELinux": compliant(pod_context={"seLinuxOptions": {"type": "spc_t"}}),
    "/proc Mount Type": compliant(container={"procMount": "Unmasked"}),
    "Seccomp (baseline)": compliant(pod_context={"seccompProfile": {"type": "Unconfined"}}),
    "Sysctls": compliant(pod_context={"sysctls": [{"name": "kernel.msgmax", "value": "1"}]}),
    "Volume Types": compliant(volumes=[{"name": "n", "nfs": {"server": "s", "path": "/"}}]),
    "Privilege Escalation": compliant(container={"allowPrivilegeEscalation": True}),
    "Running as Non-root": compliant(pod_context={"runAsNonRoot": False}),
    "Running as Non-root user": compliant(pod_context={"runAsUser": 0}),
    "Seccomp (restricted)": compliant(pod_context={"seccompProfile": None}),
    "Capabilities (restricted)": compliant(container={"capabilities": {"drop": ["NET_RAW"]}}),
}


PAIRED = {"Capabilities (baseline)": ("Capabilities (restricted)",), "Seccomp (baseline)": ("Seccomp (restricted)",),
          "HostPath Volumes": ("Volume Types",)}


def test_a_compliant_pod_breaks_no_rule() -> None:
    assert pod_security.problems(compliant()) == []
    assert pod_security.problems(compliant(container={"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}})) == []


@pytest.mark.parametrize("rule", VIOLATIONS, ids=VIOLATIONS)
def test_each_rule_finds_its_own_violation(rule: str) -> None:
    spec = VIOLATIONS[rule]
    if rule == "Seccomp (restricted)":
        spec["securityContext"].pop("seccompProfile")
    broken = pod_security.broken_rules(spec)
    assert rule in broken, broken
    # one violation, one rule; the restricted form of a baseline rule also covers what the baseline one does
    assert set(broken) <= {rule, *PAIRED.get(rule, ())}, broken
    assert set(pod_security.RESTRICTED) == set(VIOLATIONS)  # every rule of the documentation has a case


def test_baseline_lets_through_what_only_restricted_refuses() -> None:
    root = compliant(pod_context={"runAsNonRoot": None, "runAsUser": None}, container={"allowPrivilegeEscalation": None})
    assert pod_security.broken_rules(root, "baseline") == []
    assert pod_security.broken_rules(root) == ["Privilege Escalation", "Running as Non-root"]


# -- every rendered pod ---------------------------------------------------------------------------

def pod_specs(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every pod template in a manifest, by where it is."""
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if "containers" in node and isinstance(node["containers"], list):
                found[path] = node
                return
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{(value or {}).get('name', i) if isinstance(value, dict) else i}]")

    walk(manifest, manifest["kind"])
    return found


SPEC = JobSpec(name="tiny", script="train.py", image=IMAGE, nodes=2, procs_per_node=2, resources=Resources(gpus=2, cpu=4, memory="8Gi"),
               env={"HF_TOKEN": "hf_x"})
SERVE = ServeSpec(name="tiny", model="tiny_models:tiny_mlp", image=IMAGE, nodes=2)


@pytest.mark.parametrize("backend, options", [
    ("statefulset", {}), ("mpijob", {}), ("ray", {"kuberay": True}),
], ids=["statefulset", "mpijob", "kuberay"])
@pytest.mark.parametrize("what", ["batch", "serving"])
def test_every_rendered_pod_meets_restricted_and_has_no_token_but_the_job_needs(backend: str, options: dict, what: str) -> None:
    cluster = Cluster(backend, namespace=NAMESPACE, **options)
    serve = SERVE if backend != "ray" else ServeSpec(name="tiny", model="tiny_models:tiny_mlp", image=IMAGE, replicas=2)
    plan = cluster.dryrun(SPEC if what == "batch" else serve)
    pods = {where: spec for manifest in plan.manifests for where, spec in pod_specs(manifest).items()}
    assert pods, plan.to_yaml()
    for where, spec in pods.items():
        assert pod_security.problems(spec) == [], where
        own_account = backend == "statefulset"  # its pods release the job themselves, as its own account
        assert spec.get("automountServiceAccountToken") is own_account, where


def test_trainjob_patches_carry_the_security_context_and_its_runtime_mounts_no_token() -> None:
    from dsnb.backends.kubernetes.trainjob import own_runtime

    plan = Cluster("trainjob", namespace=NAMESPACE).dryrun(SPEC)
    trainjob = next(m for m in plan.manifests if m["kind"] == "TrainJob")
    for job in trainjob["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
        pod = job["template"]["spec"]["template"]["spec"]
        assert pod["securityContext"] == {**RESTRICTED_POD, "runAsGroup": 1000, "fsGroup": 1000}
        assert pod["containers"][0]["securityContext"] == {**RESTRICTED_CONTAINER,
                                                            "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}
    runtime = yaml.safe_load((FOLDER / "runtime-deepspeed-distributed.yaml").read_text())
    for job in own_runtime(runtime, "tiny-x", NAMESPACE, IMAGE)["spec"]["template"]["spec"]["replicatedJobs"]:
        assert job["template"]["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


# -- what the controllers create, under Pod Security admission -----------------------------------

def restricted_namespace(emulator) -> None:  # noqa: F811
    namespace = emulator.get("v1", "Namespace", None, NAMESPACE)
    namespace["metadata"].setdefault("labels", {})[pod_security.LEVEL_LABEL] = "restricted"
    emulator.update(namespace)
    emulator.admission.append(pod_security.admission(lambda name: emulator.get("v1", "Namespace", None, name)))


@pytest.mark.parametrize("backend", [pytest.param("statefulset", marks=needs_sandbox), pytest.param("mpijob", marks=needs_mpi),
                                     pytest.param("trainjob", marks=needs_mpi), pytest.param("kuberay", marks=needs_sandbox)])
def test_every_pod_the_controllers_create_is_admitted_in_a_restricted_namespace(emulator, backend: str) -> None:  # noqa: F811
    restricted_namespace(emulator)
    operator = controller_for(backend, "10.231.71")
    seen: dict[str, dict[str, Any]] = {}

    def keep(obj: dict[str, Any]) -> None:
        if obj.get("kind") == "Pod":
            seen[obj["metadata"]["name"]] = obj["spec"]

    emulator.admission.append(lambda obj: keep(obj))
    options = {"kuberay": True} if backend == "kuberay" else {}
    with ClusterSim(emulator, NAMESPACE, controllers=[operator] if operator else [],
                    netns_for=operator.netns_for if operator else None):
        with make_cluster(emulator, "ray" if backend == "kuberay" else backend, **options) as cluster:
            job = cluster.submit(workload("ok", **({} if backend == "statefulset" else {"nodes": 2, "procs_per_node": 1})))
            assert job.wait(timeout=120).state == JobState.SUCCEEDED
    assert seen, "no pod was created"
    for name, spec in seen.items():  # every pod got through admission, and meets the profile on its own
        assert pod_security.problems(spec) == [], name


@needs_sandbox
def test_a_relaxed_profile_is_refused_by_a_restricted_namespace_with_the_reason_and_the_fix(emulator) -> None:  # noqa: F811
    restricted_namespace(emulator)
    with ClusterSim(emulator, NAMESPACE), \
            make_cluster(emulator, pod_options=PodOptions(security_profile="baseline")) as cluster:
        job = cluster.submit(workload("ok"))
        with pytest.raises(JobFailed) as info:
            job.wait(timeout=60)
    message = info.value.status.message
    assert 'violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false' in message
    assert "runAsNonRoot != true" in message and "keep dsnb's default security context" in message


def test_an_unknown_profile_is_refused() -> None:
    from dsnb import InvalidSpecError

    with pytest.raises(InvalidSpecError, match="options.security_profile"):
        PodOptions(security_profile="privileged")
