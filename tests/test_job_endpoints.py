"""Serving as jobs without processes: JobEndpoints over an in-memory job backend and a recording
exposure, the Kubernetes exposure over a stand-in backend, and the readiness tables."""

from __future__ import annotations

import dataclasses
import doctest
from typing import Any

import pytest

from dsnb import JobSpec
from dsnb.backends.base import Backend, LogChunk, MetricChunk, Plan
from dsnb.backends.kubernetes import serving as k8s_serving
from dsnb.backends.kubernetes.serving import KubernetesExposure, readiness_from_lines, readiness_from_probe
from dsnb.backends.local import serving as local_serving
from dsnb.backends.logbuffer import JobLogs
from dsnb.errors import ClusterError, InvalidSpecError, JobNotFound
from dsnb.serving import ServeSpec, job_serving
from dsnb.serving.endpoint import Endpoint
from dsnb.serving.job_serving import (
    TOKEN_ENV,
    EndpointsAsJobs,
    JobEndpoints,
    ServiceExposure,
    is_serving_job,
    serving_spec,
)
from dsnb.status import JobState, JobStatus

URL = "http://127.0.0.1:39051/"


class MemoryJobs(EndpointsAsJobs, Backend):
    """Jobs that exist as entries of a dict; ``state`` says what every job's status is."""

    name = "memory"

    def __init__(self, exposure: ServiceExposure) -> None:
        self.specs: dict[str, JobSpec] = {}
        self.cancelled: list[str] = []
        self.state = JobState.RUNNING
        self.job_endpoints = JobEndpoints(self, exposure)

    def render(self, spec: JobSpec) -> Plan:
        return Plan(backend=self.name, spec=spec)

    def apply(self, plan: Plan) -> None:
        self.specs[plan.name] = plan.spec

    def status(self, name: str) -> JobStatus:
        if name not in self.specs:
            raise JobNotFound(name, self.name, sorted(self.specs))
        state = JobState.CANCELLED if name in self.cancelled else self.state
        return JobStatus(name=name, backend=self.name, state=state, message=f"the job is {state.value}")

    def stop_running(self, name: str, status: JobStatus) -> JobStatus:
        self.cancelled.append(name)
        return self.status(name)

    def read_logs(self, name: str, cursor: Any = None, rank: int | None = None) -> LogChunk:
        return LogChunk(lines=[], cursor=cursor)

    def read_metrics(self, name: str, cursor: Any = None) -> MetricChunk:
        return MetricChunk(samples=[], cursor=cursor)

    def jobs(self) -> list[JobStatus]:
        return [self.status(name) for name in reversed(self.specs)]

    def spec_of(self, name: str) -> JobSpec:
        if name not in self.specs:
            raise JobNotFound(name, self.name, sorted(self.specs))
        return dataclasses.replace(self.specs[name], env={k: "***" for k in self.specs[name].env})  # stored redacted


class Recording(ServiceExposure):
    """An exposure that says ready when told, and records what it was asked."""

    def __init__(self) -> None:
        self.ready = False
        self.asked: list[tuple[str, str]] = []

    def expose(self, plan: Plan, spec: ServeSpec) -> None:
        plan.notes.append(f"exposed on port {spec.port}")

    def applied(self, plan: Plan) -> None:
        self.asked.append(("applied", plan.name))

    def endpoint_url(self, name: str) -> str:
        self.asked.append(("url", name))
        return URL

    def endpoint_token(self, name: str) -> str | None:
        self.asked.append(("token", name))
        return "kept-token"

    def server_ready(self, name: str, status: JobStatus) -> tuple[bool, str]:
        self.asked.append(("ready", name))
        return (True, f"ready at {URL}") if self.ready else (False, "loading the model")

    def forget(self, name: str) -> None:
        self.asked.append(("forget", name))


@pytest.fixture
def backend() -> MemoryJobs:
    return MemoryJobs(Recording())


def serve(backend: MemoryJobs, **fields: Any) -> str:
    plan = backend.serve_plan(ServeSpec(name="tiny", model="models:build", **fields))
    backend.apply_serve(plan)
    return plan.name


@pytest.mark.parametrize("module", [job_serving, k8s_serving, local_serving])
def test_the_docstring_examples_hold(module: object) -> None:
    result = doctest.testmod(module)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0


def test_the_plan_is_the_serving_job_under_a_unique_name_with_what_exposes_it(backend) -> None:
    plan = backend.serve_plan(ServeSpec(name="tiny", model="models:build", port=9000))
    assert plan.name.startswith("tiny-") and plan.name != "tiny" and is_serving_job(plan.spec)
    assert plan.notes == ["exposed on port 9000"] and backend.specs == {}  # nothing is started


def test_status_is_running_only_once_the_server_is_ready(backend) -> None:
    exposure = backend.job_endpoints.exposure
    name = serve(backend)
    loading = backend.endpoint_status(name)
    assert (loading.state, loading.message) == (JobState.STARTING, "loading the model")
    exposure.ready = True
    assert backend.endpoint_status(name).state == JobState.RUNNING
    assert [(s.name, s.state) for s in backend.endpoints()] == [(name, JobState.RUNNING)]
    backend.state = JobState.FAILED
    asked = len(exposure.asked)
    assert backend.endpoint_status(name).state == JobState.FAILED and len(exposure.asked) == asked  # an ended job is not asked


def test_only_serving_jobs_are_endpoints(backend) -> None:
    name = serve(backend)
    backend.submit(JobSpec(name="train", command=["python", "train.py"]))
    assert [s.name for s in backend.endpoints()] == [name]
    batch = next(n for n in backend.specs if n.startswith("train-"))
    for call in (backend.endpoint_status, backend.stop_endpoint, lambda n: serving_spec(backend, n)):
        with pytest.raises(JobNotFound) as error:
            call(batch)
        assert f"endpoint {batch!r} not found" in str(error.value) and name in str(error.value)  # names the endpoints there are
    assert backend.cancelled == []


def test_the_exposure_gives_the_address_and_the_token_and_hears_of_each_start(backend) -> None:
    exposure = backend.job_endpoints.exposure
    name = serve(backend)
    assert backend.endpoint_url(name) == URL
    assert backend.endpoint_headers(name) == {"Authorization": "Bearer kept-token"}
    assert exposure.asked == [("applied", name), ("url", name), ("token", name)]


def test_stop_cancels_the_job_forgets_the_endpoint_and_can_be_called_again(backend) -> None:
    exposure = backend.job_endpoints.exposure
    name = serve(backend)
    assert backend.stop_endpoint(name).state == JobState.CANCELLED
    assert backend.cancelled == [name] and exposure.asked[-1] == ("forget", name)
    assert backend.stop_endpoint(name).state == JobState.CANCELLED and backend.cancelled == [name]


def test_an_endpoint_of_a_job_backend_reads_its_jobs_logs(backend) -> None:
    assert Endpoint(backend, "tiny-abcd").served_as_job
    assert not Endpoint(object(), "tiny-abcd").served_as_job  # type: ignore[arg-type]


def test_the_default_exposure_asks_the_server_and_keeps_no_token() -> None:
    class Unreachable(ServiceExposure):
        def endpoint_url(self, name: str) -> str:
            raise ClusterError(f"endpoint {name!r}", "has no address yet", "wait")

    status = JobStatus(name="tiny", backend="memory", state=JobState.RUNNING)
    ready, message = Unreachable().server_ready("tiny", status)
    assert not ready and message.startswith("waiting for the server's address (endpoint 'tiny': has no address yet")
    assert Unreachable().endpoint_token("tiny") is None
    assert Unreachable().serving_job(ServeSpec(name="tiny", model="models:build", token="served-token")).env == {
        TOKEN_ENV: "served-token"}


# -- readiness on Kubernetes ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("probe_passes", "report", "expected"),
    [
        (True, None, (True, "ready: rank 0 (pod p-0) passes its readiness probe, GET /readyz on port 8000")),
        (False, {"ready": False, "reason": "stopped"}, (False, "rank 0 (pod p-0) is not ready: stopped")),
        (False, {"ready": False}, (False, "rank 0 (pod p-0) is not ready: not ready")),
        (False, {"ready": True}, (False, "rank 0 reports ready; waiting for pod p-0 to pass its readiness probe "
                                         "(GET /readyz on port 8000)")),
        (False, None, (False, "starting the server on rank 0 (pod p-0): waiting for GET /readyz on port 8000 to answer 200")),
    ],
)
def test_readiness_where_rank_0_probes_readyz(probe_passes: bool, report: Any, expected: tuple[bool, str]) -> None:
    assert readiness_from_probe("p-0", probe_passes, report, 8000) == expected


@pytest.mark.parametrize(
    ("report", "state", "expected"),
    [
        ({"ready": True}, JobState.RUNNING, (True, "ready: rank 0 (pod p-0) answers on port 8000")),
        ({"ready": False, "reason": "stopped"}, JobState.RUNNING, (False, "rank 0 (pod p-0) is not ready: stopped")),
        (None, JobState.STARTING, (False, "ranks are starting")),
        (None, JobState.RUNNING, (False, "loading the model: rank 0 (pod p-0) has not reported ready yet")),
    ],
)
def test_readiness_from_rank_0s_lines(report: Any, state: JobState, expected: tuple[bool, str]) -> None:
    status = JobStatus(name="p", backend="mpijob", state=state, message="ranks are starting")
    assert readiness_from_lines("p-0", report, 8000, status) == expected


class StandInHost:
    """What KubernetesExposure uses of a Kubernetes job backend, without a cluster: one endpoint, tiny-abcd."""

    name = "mpijob"
    namespace = "ml"
    container_name = "dsnb"
    probe_is_readyz = False
    readiness_note = "readiness: rank 0's lines"

    def __init__(self, **fields: Any) -> None:
        self.pods: list[dict[str, Any]] = []
        self.logs = JobLogs()
        self.spec = ServeSpec(name="tiny-abcd", model="models:build", port=9000, **fields).to_job_spec()

    @property
    def conn(self) -> Any:
        raise ClusterError("the Kubernetes API", "is not there in this test", "read no Secret")

    def jobs(self) -> list[JobStatus]:
        return [JobStatus(name="tiny-abcd", backend=self.name, state=JobState.RUNNING)]

    def spec_of(self, name: str) -> JobSpec:
        if name != "tiny-abcd":
            raise JobNotFound(name, self.name)
        return self.spec

    def serving_selector(self, name: str) -> dict[str, str]:
        return {"dsnb.io/job": name, "node": "0"}

    def job_pods(self, name: str) -> list[dict[str, Any]]:
        return self.pods

    def job_logs(self, name: str) -> JobLogs:
        return self.logs


def pod(name: str, node: str, running: bool) -> dict[str, Any]:
    state = {"running": {"startedAt": "2025-01-01T00:00:00Z"}} if running else {"waiting": {"reason": "ContainerCreating"}}
    return {"metadata": {"name": name, "labels": {"dsnb.io/job": "tiny-abcd", "node": node}},
            "status": {"containerStatuses": [{"name": "dsnb", "state": state}]}}


def test_kubernetes_readiness_follows_rank_0s_pod_and_its_last_serve_line() -> None:
    host = StandInHost()
    exposure = KubernetesExposure(host)  # type: ignore[arg-type]
    running = JobStatus(name="tiny-abcd", backend="mpijob", state=JobState.RUNNING, message="running")
    host.pods = [pod("tiny-abcd-worker-1", "1", True)]
    assert exposure.server_ready("tiny-abcd", running) == (False, "running")  # rank 0's pod is not there
    host.pods.append(pod("tiny-abcd-worker-0", "0", False))
    assert exposure.server_ready("tiny-abcd", running) == (False, "running")
    host.pods[-1] = pod("tiny-abcd-worker-0", "0", True)
    host.logs.add(1, 'DSNB_SERVE {"ready": true}', 1.0)  # another rank's line counts for nothing
    assert exposure.server_ready("tiny-abcd", running)[1].startswith("loading the model")
    host.logs.add(0, 'DSNB_SERVE {"ready": true, "url": "http://0.0.0.0:9000/"}', 2.0)
    assert exposure.server_ready("tiny-abcd", running) == (True, "ready: rank 0 (pod tiny-abcd-worker-0) answers on port 9000")
    host.logs.add(0, 'DSNB_SERVE {"ready": false, "reason": "stopped"}', 3.0)
    assert exposure.server_ready("tiny-abcd", running)[1].endswith("is not ready: stopped")
    exposure.forget("tiny-abcd")  # read again from the start: the last line still says stopped
    assert exposure.server_ready("tiny-abcd", running)[1].endswith("is not ready: stopped")


def test_kubernetes_urls_and_a_name_too_long_for_the_service() -> None:
    host = StandInHost()
    assert KubernetesExposure(host).endpoint_url("tiny-abcd") == "http://tiny-abcd-serve.ml.svc:9000/"  # type: ignore[arg-type]
    forwarded = KubernetesExposure(host, "https://{name}.{namespace}.example.com:{port}/")  # type: ignore[arg-type]
    assert forwarded.endpoint_url("tiny-abcd") == "https://tiny-abcd.ml.example.com:9000/"
    with pytest.raises(JobNotFound, match="endpoint 'nope-x1y2' not found on backend 'mpijob'.*known: tiny-abcd"):
        forwarded.endpoint_url("nope-x1y2")
    long = ServeSpec(name="x" * 58, model="models:build")
    plan = Plan(backend="mpijob", spec=long.to_job_spec())  # <name>-serve: 64 characters
    with pytest.raises(InvalidSpecError, match="ServeSpec.name: .* leaves no room for its Service"):
        KubernetesExposure(host).expose(plan, long)  # type: ignore[arg-type]


def test_the_kubernetes_token_is_kept_from_the_start_and_read_from_the_secret_after() -> None:
    exposure = KubernetesExposure(StandInHost())  # type: ignore[arg-type]
    assert exposure.endpoint_token("tiny-abcd") is None  # served without a token: no Secret is read
    exposure = KubernetesExposure(StandInHost(token="served-token"))  # type: ignore[arg-type]
    plan = Plan(backend="mpijob", spec=exposure.host.spec, extra={"secret_values": {"tiny-abcd-env": {TOKEN_ENV: "served-token"}}})
    exposure.applied(plan)
    assert exposure.endpoint_token("tiny-abcd") == "served-token"
    exposure.forget("tiny-abcd")
    with pytest.raises(ClusterError, match="read no Secret"):  # another kernel reads the Secret
        exposure.endpoint_token("tiny-abcd")
