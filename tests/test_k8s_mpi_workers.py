"""MPI workers as the MPI Operator's images and sshd make them: sshd's file capability, the ranks' environment.

The simulated kubelet execs each worker's sshd as the runtime would, under the rendered security
context (``setpriv`` with the bounding set, user and no-new-privs the context implies), on a
binary carrying ``CAP_NET_BIND_SERVICE`` as a file capability, as ``mpioperator/openmpi`` builds
it (``build/base/Dockerfile``): a context that drops the capability fails the worker, as on a
cluster.
"""

from __future__ import annotations

import pytest

pytest.importorskip("kubernetes")

from k8s.fixtures import NAMESPACE, attempts_job, emulator, leftovers, make_cluster, workload  # noqa: E402, F401
from k8s.operators import MPIOperatorSim  # noqa: E402
from k8s.sandbox import mpi_problem, netns_problem  # noqa: E402
from k8s.sim import ClusterSim  # noqa: E402

from dsnb import JobFailed, JobState  # noqa: E402
from dsnb.backends.kubernetes import mpijob as mpijob_module  # noqa: E402

problem = netns_problem() or mpi_problem()
pytestmark = pytest.mark.skipif(problem is not None, reason=problem or "")


def test_workers_keep_net_bind_service_for_sshd_and_drop_everything_else(emulator) -> None:  # noqa: F811
    operator = MPIOperatorSim("10.231.81")
    with ClusterSim(emulator, NAMESPACE, controllers=[operator], netns_for=operator.netns_for) as sim, \
            make_cluster(emulator, "mpijob", cancel_wait=30) as cluster:
        job = cluster.submit(workload("ok", nodes=2, procs_per_node=1))
        final = job.wait(timeout=120)
        assert final.state == JobState.SUCCEEDED, final.diagnosis()
        assert leftovers(emulator, sim, job.name) == []
    worker = cluster.dryrun(workload("ok", nodes=2, procs_per_node=1)).manifests[-1]["spec"]["mpiReplicaSpecs"]["Worker"]
    context = worker["template"]["spec"]["containers"][0]["securityContext"]
    assert context == {"allowPrivilegeEscalation": False, "capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]}}


def test_a_worker_without_the_capability_cannot_start_sshd(emulator, monkeypatch) -> None:  # noqa: F811
    """The negative control: with every capability dropped, the kernel refuses to exec sshd."""
    build = mpijob_module.build_pod_template
    monkeypatch.setattr(mpijob_module, "build_pod_template", lambda *a, **kw: build(*a, **{**kw, "add_capabilities": ()}))
    operator = MPIOperatorSim("10.231.82")
    with ClusterSim(emulator, NAMESPACE, controllers=[operator], netns_for=operator.netns_for) as sim, \
            make_cluster(emulator, "mpijob", cancel_wait=30) as cluster:
        job = cluster.submit(workload("ok", nodes=2, procs_per_node=1))
        with pytest.raises(JobFailed) as info:
            job.wait(timeout=60)
        message = info.value.status.message
        assert "sshd" in message and "operation not permitted" in message, message
        assert leftovers(emulator, sim, job.name) == []


def test_ranks_on_workers_run_the_images_python_through_sshds_bare_environment(emulator, monkeypatch) -> None:  # noqa: F811
    """sshd gives the ranks its default PATH (the system's python3, without dsnb); the launcher passes on the
    image's PATH, where its Python is (here the test venv, as a venv or conda in an image). Without that,
    the negative control: the script cannot import dsnb on the workers."""
    operator = MPIOperatorSim("10.231.83")
    with ClusterSim(emulator, NAMESPACE, controllers=[operator], netns_for=operator.netns_for) as sim, \
            make_cluster(emulator, "mpijob", cancel_wait=30) as cluster:
        assert cluster.submit(workload("ok", nodes=2, procs_per_node=1)).wait(timeout=120).state == JobState.SUCCEEDED
        monkeypatch.setattr(mpijob_module, "MASTER_PRELUDE", mpijob_module.MASTER_PRELUDE.replace('x="$x -x $v"', "true"))
        job = cluster.submit(workload("ok", nodes=2, procs_per_node=1))
        with pytest.raises(JobFailed) as info:
            job.wait(timeout=120)
        assert any("ModuleNotFoundError" in line or "No module named" in line for line in info.value.status.last_lines), \
            info.value.status.diagnosis()
        assert leftovers(emulator, sim, job.name) == []


# -- the launcher is a batch/v1 Job -------------------------------------------------------------

def test_max_restarts_are_new_launcher_pods_of_the_launcher_job(emulator, tmp_path) -> None:  # noqa: F811
    operator = MPIOperatorSim("10.231.84")
    with ClusterSim(emulator, NAMESPACE, controllers=[operator], netns_for=operator.netns_for) as sim, \
            make_cluster(emulator, "mpijob", cancel_wait=30) as cluster:
        job = cluster.submit(attempts_job(tmp_path, 1, max_restarts=1))
        final = job.wait(timeout=120)
        assert final.state == JobState.SUCCEEDED, final.diagnosis()
        assert (tmp_path / "attempts").read_text() == "xx"
        assert [line.text for line in job.logs() if line.text.startswith("attempt")] == ["attempt 1", "attempt 2"]
        assert leftovers(emulator, sim, job.name) == []


def test_the_timeout_is_the_launcher_jobs_deadline(emulator) -> None:  # noqa: F811
    operator = MPIOperatorSim("10.231.85")
    with ClusterSim(emulator, NAMESPACE, controllers=[operator], netns_for=operator.netns_for) as sim, \
            make_cluster(emulator, "mpijob", cancel_wait=30) as cluster:
        job = cluster.submit(workload("sleep", nodes=1, procs_per_node=1, timeout=3))
        with pytest.raises(JobFailed) as info:
            job.wait(timeout=60)
        assert "DeadlineExceeded" in info.value.status.message, info.value.status.message
        assert leftovers(emulator, sim, job.name) == []


def test_a_job_that_ended_unwatched_keeps_its_log_for_a_later_client(emulator) -> None:  # noqa: F811
    """No TTL by default: the ended launcher pod (holding no resources) keeps the only copy of the ranks'
    output until a client finalizes the job; with a TTL, the launcher Job and its pod go."""
    operator = MPIOperatorSim("10.231.86")
    with ClusterSim(emulator, NAMESPACE, controllers=[operator], netns_for=operator.netns_for) as sim:
        with make_cluster(emulator, "mpijob") as first:
            name = first.submit(workload("ok", nodes=1, procs_per_node=2)).name
        from helpers import wait_until

        wait_until(lambda: any(c["type"] == "Succeeded" for c in (emulator.get("kubeflow.org/v2beta1", "MPIJob", NAMESPACE, name)
                                                                  .get("status") or {}).get("conditions") or []), timeout=60)
        assert emulator.get("batch/v1", "Job", NAMESPACE, f"{name}-launcher") is not None
        with make_cluster(emulator, "mpijob") as later:
            job = later.attach(name)
            assert job.status().state == JobState.SUCCEEDED
            assert {line.rank for line in job.logs() if line.text.startswith("hello from rank")} == {0, 1}
        assert leftovers(emulator, sim, name) == []
        with make_cluster(emulator, "mpijob", ttl_seconds_after_finished=1) as short:
            brief = short.submit(workload("ok", nodes=1, procs_per_node=2)).name
        wait_until(lambda: emulator.get("batch/v1", "Job", NAMESPACE, f"{brief}-launcher") is None, timeout=60)
        assert emulator.get("kubeflow.org/v2beta1", "MPIJob", NAMESPACE, brief) is not None  # the MPIJob stays
        assert [p for p in emulator.list("v1", "Pod", NAMESPACE) if "launcher" in p["metadata"]["name"]] == []
