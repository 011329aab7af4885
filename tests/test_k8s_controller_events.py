"""Controllers that give up on an object with only a Warning Event: dsnb's status says so and ends the wait.

The MPI Operator (a name it cannot use), Kubeflow Trainer (a JobSet that JobSet's webhook
refuses) and the StatefulSet controller (a pod that admission refuses) set no condition and
make no pod: what they say is only in an Event about the object dsnb created. The simulated
controllers record those Events as upstream does (each names its upstream file); the API
emulator's ``admission`` checks refuse pods as Pod Security admission would.
"""

from __future__ import annotations

import importlib

import pytest

pytest.importorskip("kubernetes")

import yaml  # noqa: E402
from k8s.crds import FOLDER  # noqa: E402
from k8s.fixtures import IMAGE, NAMESPACE, emulator, leftovers, make_cluster, workload  # noqa: E402, F401 - fixtures
from k8s.operators import MPIOperatorSim, TrainerSim  # noqa: E402
from k8s.sim import ClusterSim  # noqa: E402

from dsnb import JobFailed, JobSpec, JobState  # noqa: E402

RESTRICTED = ('violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false (container "dsnb" must set '
              'securityContext.allowPrivilegeEscalation=false)')


@pytest.mark.parametrize("backend, length, said", [
    ("mpijob", 50, "MPIJob {name}: the MPI Operator refused it: Found validation errors: metadata.name: Invalid value"),
    ("trainjob", 40, "TrainJob {name}: Kubeflow Trainer cannot create its JobSet: TrainJob resources reconciliation failed: "
                     'admission webhook "vjobset.kb.io" denied the request'),
])
def test_a_name_the_controller_refuses_fails_the_job_with_its_event(emulator, monkeypatch, backend, length, said) -> None:  # noqa: F811
    """Submitted as an older dsnb would (without the name check), the job fails with the controller's words."""
    module = importlib.import_module(f"dsnb.backends.kubernetes.{backend}")
    monkeypatch.setattr(module, "check_derived_names", lambda *args: None)
    if backend == "mpijob":
        operator = MPIOperatorSim("10.231.51")
    else:
        operator = TrainerSim("10.231.52", yaml.safe_load((FOLDER / "runtime-deepspeed-distributed.yaml").read_text()))
    with ClusterSim(emulator, NAMESPACE, controllers=[operator]) as sim, make_cluster(emulator, backend) as cluster:
        job = cluster.submit(JobSpec(name="n" * length, script="train.py", nodes=2, image=IMAGE))
        with pytest.raises(JobFailed) as info:
            job.wait(timeout=30)
        message = info.value.status.message
        assert message.startswith(said.format(name=job.name)) and "63 characters" in message, message
        assert emulator.list("v1", "Pod", NAMESPACE) == []  # the controller made nothing
        assert leftovers(emulator, sim, job.name) == []  # and dsnb removed what it had made


def test_pods_refused_by_admission_fail_the_job_with_the_reason_and_the_fix(emulator) -> None:  # noqa: F811
    emulator.admission.append(lambda obj: RESTRICTED if obj["kind"] == "Pod" else None)
    with ClusterSim(emulator, NAMESPACE) as sim, make_cluster(emulator) as cluster:
        job = cluster.submit(workload("ok"))
        with pytest.raises(JobFailed) as info:
            job.wait(timeout=30)
        status = info.value.status
        assert status.state == JobState.FAILED and all(r.state == JobState.FAILED for r in status.replicas)
        assert status.message.startswith(f"StatefulSet {job.name}: its pods cannot be created: create Pod {job.name}-0 in "
                                         f'StatefulSet {job.name} failed error: pods "{job.name}-0" is forbidden: {RESTRICTED}')
        assert 'Fix: the namespace enforces the "restricted" Pod Security profile' in status.message
        assert leftovers(emulator, sim, job.name) == []


def test_a_quota_that_refuses_pods_keeps_the_job_pending_with_the_reason(emulator) -> None:  # noqa: F811
    """A full ResourceQuota may free up: the job waits, saying why."""
    quota = 'exceeded quota: team-a, requested: requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=8, limited: requests.nvidia.com/gpu=8'
    emulator.admission.append(lambda obj: quota if obj["kind"] == "Pod" else None)
    with ClusterSim(emulator, NAMESPACE) as sim, make_cluster(emulator, cancel_wait=20) as cluster:
        job = cluster.submit(workload("ok"))
        from helpers import wait_until

        wait_until(lambda: "exceeded quota" in job.status().message, timeout=30, message=lambda: job.status())
        status = job.status()
        assert status.state == JobState.PENDING and "ResourceQuota is used up" in status.message
        assert job.cancel().state == JobState.CANCELLED
        assert leftovers(emulator, sim, job.name) == []
