"""TrainJob node pods run the runtime's image, not the job's: dsnb gives such a job a runtime of its own.

Kubeflow Trainer v2.3.0 applies ``trainer.image`` and ``command`` to the launcher only
(``pkg/runtime/framework/plugins/jobset/builder.go``; kubeflow/trainer#4030), so the stock
``deepspeed-distributed`` runtime's node pods run ``ghcr.io/kubeflow/trainer/deepspeed-runtime``
without the user's code. The simulated Trainer applies the image the same way, and the
remote-shell agent hides the job's code directory on a pod whose image is not the job's, so
ranks there fail as they would on a cluster.
"""

from __future__ import annotations

import pytest

pytest.importorskip("kubernetes")

import yaml  # noqa: E402
from helpers import wait_until  # noqa: E402
from k8s.crds import FOLDER  # noqa: E402
from k8s.fixtures import IMAGE, NAMESPACE, attempts_job, emulator, footprint_of, leftovers, make_cluster, workload  # noqa: E402, F401
from k8s.operators import TrainerSim  # noqa: E402
from k8s.sandbox import mpi_problem, netns_problem  # noqa: E402
from k8s.sim import ClusterSim  # noqa: E402

from dsnb import Cluster, InvalidSpecError, JobFailed, JobState  # noqa: E402
from dsnb.backends.kubernetes import trainjob as trainjob_module  # noqa: E402

problem = netns_problem() or mpi_problem()
pytestmark = pytest.mark.skipif(problem is not None, reason=problem or "")
STOCK = yaml.safe_load((FOLDER / "runtime-deepspeed-distributed.yaml").read_text())
API = "trainer.kubeflow.org/v1alpha1"
OWN_RUNTIME = trainjob_module.own_runtime


def keeping(part: str):
    """dsnb's own_runtime, except that the named runtime's ``part`` ("images" or "restarts") is kept as it is."""
    def own(runtime, name, namespace, image, max_restarts=0):
        made = OWN_RUNTIME(runtime, name, namespace, image, max_restarts)
        for mine, theirs in zip(made["spec"]["template"]["spec"]["replicatedJobs"], runtime["spec"]["template"]["spec"]["replicatedJobs"]):
            if part == "images":
                mine["template"]["spec"]["template"]["spec"]["containers"] = theirs["template"]["spec"]["template"]["spec"]["containers"]
            else:
                mine["template"] = theirs["template"]
        if part == "restarts":
            made["spec"]["template"]["spec"].pop("failurePolicy")
        return made
    return own


def trainer(emulator, subnet: str):  # noqa: F811
    operator = TrainerSim(subnet, STOCK)
    return operator, ClusterSim(emulator, NAMESPACE, controllers=[operator], netns_for=operator.netns_for)


def test_two_nodes_on_the_stock_runtime_run_from_a_runtime_with_the_jobs_image(emulator) -> None:  # noqa: F811
    operator, sim = trainer(emulator, "10.231.71")
    with sim, make_cluster(emulator, "trainjob", cancel_wait=30) as cluster:
        job = cluster.submit(workload("ok", nodes=2, procs_per_node=1))
        own = wait_until(lambda: emulator.get(API, "TrainingRuntime", NAMESPACE, job.name), timeout=30)
        images = {c["image"] for j in own["spec"]["template"]["spec"]["replicatedJobs"]
                  for c in j["template"]["spec"]["template"]["spec"]["containers"]}
        assert images == {IMAGE}
        assert emulator.get(API, "TrainJob", NAMESPACE, job.name)["spec"]["runtimeRef"] == {
            "apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime", "name": job.name}
        assert own["spec"]["mlPolicy"] == STOCK["spec"]["mlPolicy"]  # the rest as the runtime the job named
        final = job.wait(timeout=120)
        assert final.state == JobState.SUCCEEDED, final.diagnosis()
        assert {line.rank for line in job.logs() if line.text.startswith("hello from rank")} == {0, 1}
        assert leftovers(emulator, sim, job.name) == [] and emulator.get(API, "TrainingRuntime", NAMESPACE, job.name) is None


def test_without_its_own_runtime_the_ranks_on_the_node_pod_find_no_code(emulator, monkeypatch) -> None:  # noqa: F811
    """The negative control: as dsnb did before, the node pod runs the runtime's image and its ranks fail (the
    code is in the job's image: working_dir is a path there, not shipped)."""
    monkeypatch.setattr(trainjob_module, "own_runtime", keeping("images"))
    operator, sim = trainer(emulator, "10.231.72")
    with sim, make_cluster(emulator, "trainjob", cancel_wait=30, ship_working_dir="never") as cluster:
        job = cluster.submit(workload("ok", nodes=2, procs_per_node=1))
        with pytest.raises(JobFailed) as info:
            job.wait(timeout=120)
        status = info.value.status
        assert status.failed_rank == 1 and status.exit_code == 1, status.diagnosis()  # rank 1 is on the node pod
        assert any("FileNotFoundError" in line and "workload.py" in line for line in status.last_lines), status.last_lines
        assert leftovers(emulator, sim, job.name) == []


def test_one_node_runs_every_rank_on_the_launcher_with_the_runtime_as_named(emulator) -> None:  # noqa: F811
    operator, sim = trainer(emulator, "10.231.73")
    with sim, make_cluster(emulator, "trainjob", cancel_wait=30) as cluster:
        job = cluster.submit(workload("ok", nodes=1, procs_per_node=2))
        final = job.wait(timeout=120)
        assert final.state == JobState.SUCCEEDED, final.diagnosis()
        assert {r.host for r in final.replicas} == {operator.pod_name(f"{job.name}-launcher-0-0")}
        assert emulator.list(API, "TrainingRuntime", NAMESPACE) == []


def test_a_runtime_dsnb_cannot_read_is_refused(emulator) -> None:  # noqa: F811
    operator, sim = trainer(emulator, "10.231.74")
    with sim, Cluster("trainjob", namespace=NAMESPACE, configuration=emulator.configuration(), runtime="team-runtime") as cluster:
        wait_until(lambda: emulator.get(API, "ClusterTrainingRuntime", None, "deepspeed-distributed"), timeout=10)
        before = footprint_of(emulator, sim)()
        with pytest.raises(InvalidSpecError) as info:
            cluster.submit(workload("ok", nodes=1, procs_per_node=1))
        assert info.value.field == "runtime" and "cannot be read" in str(info.value) and "cluster.runtimes()" in info.value.fix
        assert footprint_of(emulator, sim)() == before


# -- restarts --------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_restarts, fails, state, attempts", [
    (0, 1, JobState.FAILED, 1),  # no restart: one run, as on every backend (not JobSet's 7)
    (1, 1, JobState.SUCCEEDED, 2),  # one restart: the second run succeeds
    (1, 5, JobState.FAILED, 2),
])
def test_max_restarts_means_whole_job_restarts(emulator, tmp_path, max_restarts, fails, state, attempts) -> None:  # noqa: F811
    operator, sim = trainer(emulator, "10.231.75")
    with sim, make_cluster(emulator, "trainjob", cancel_wait=30) as cluster:
        job = cluster.submit(attempts_job(tmp_path, fails, max_restarts=max_restarts))
        own = wait_until(lambda: emulator.get(API, "TrainingRuntime", NAMESPACE, job.name), timeout=30)
        assert own["spec"]["template"]["spec"]["failurePolicy"] == {"maxRestarts": max_restarts}
        try:
            final = job.wait(timeout=120)
        except JobFailed as e:
            final = e.status
        assert final.state == state, final.diagnosis()
        assert (tmp_path / "attempts").read_text() == "x" * attempts
        assert leftovers(emulator, sim, job.name) == []


def test_the_stock_runtime_alone_would_run_a_failed_job_seven_times(emulator, tmp_path, monkeypatch) -> None:  # noqa: F811
    """The negative control: JobSet's OnFailure and the Jobs' backoffLimit of 6, as a TrainJob on the stock
    runtime gets them without dsnb's runtime of its own."""
    monkeypatch.setattr(trainjob_module, "own_runtime", keeping("restarts"))
    operator, sim = trainer(emulator, "10.231.76")
    with sim, make_cluster(emulator, "trainjob", cancel_wait=30) as cluster:
        job = cluster.submit(attempts_job(tmp_path, 100))
        wait_until(lambda: (tmp_path / "attempts").exists() and len((tmp_path / "attempts").read_text()) >= 7, timeout=120)
        job.cancel()
        assert len((tmp_path / "attempts").read_text()) == 7
