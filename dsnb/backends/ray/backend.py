"""``Cluster("ray")``: DeepSpeed under Ray Train, submitted through Ray's Job Submission API.

Two placements, one backend (KubeRay, Ray on Kubernetes, is a backend of its own,
``Cluster("kuberay", namespace=...)``: :mod:`dsnb.backends.kubernetes.kuberay`):

- ``Cluster("ray")``: a private Ray head on 127.0.0.1 (see :mod:`.head`), started on first
  use, shared by the process's ray clusters, stopped when the last one closes;
- ``Cluster("ray", address="http://HOST:8265", token=...)``: an existing Ray cluster (its
  dashboard address); the token is sent when the cluster uses token authentication.

A job is one Ray job whose driver (:mod:`dsnb.runtime.ray_train_entry`) fits a ``TorchTrainer`` running the
user's script on ``world_size`` workers. Status comes from Ray's job status (:mod:`.job_status`),
logs from the job's driver log (followed in the background by :mod:`.log_follower`, each worker
line mapped back to its rank), metrics from the ``dsnb.report`` lines in it. The submission id
is the dsnb job name, so ``cluster.attach(name)`` works from any process that reaches the same
Ray cluster.

Example:
    >>> from dsnb import Cluster, JobSpec
    >>> plan = Cluster("ray").dryrun(JobSpec(name="tiny-gpt", script="train.py", procs_per_node=2))
    >>> plan.manifests[0]["entrypoint"]
    'python -m dsnb.runtime.ray_train_entry'
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shlex
import threading
import time
from pathlib import Path
from typing import Any

from dsnb.backends.base import Backend, LogChunk, MetricChunk, Plan
from dsnb.backends.kubernetes.status_rules import first_status
from dsnb.backends.options import BUILTIN_OPTIONS
from dsnb.backends.profiles import BUILTIN_PROFILES
from dsnb.backends.ray.head import LocalHead, acquire_head, release_head
from dsnb.backends.ray.job_status import JOB_RULES, SPEC_KEY, RayJobReading, state_of
from dsnb.backends.ray.log_follower import DriverLogFollower
from dsnb.backends.ray.serve import ServeClient, app_state
from dsnb.errors import BackendUnavailable, ClusterError, JobNotFound
from dsnb.preflight import PreflightReport
from dsnb.runtime import ray_serve_app, ray_train_entry
from dsnb.secrets import refuse_references
from dsnb.serving.spec import ServeSpec
from dsnb.spec import JobSpec, redact_env
from dsnb.status import JobState, JobStatus

JOB_KEY = "dsnb.io/job"
READ_LIMIT = 5000
#: How long a running job's status is reused: every read is work for the head's dashboard,
#: which shares the machine with the training.
LOG_REFRESH_S = 0.5
CANCEL_TIMEOUT_S = 60.0
#: How long a submit waits for a just-started head's job agent, and for one answer.
AGENT_WAIT_S = 60.0
SUBMIT_TIMEOUT_S = 120.0
#: Left out of the working directory Ray uploads for the job.
UPLOAD_EXCLUDES = [".git", "__pycache__", "*.pyc", ".ipynb_checkpoints", "checkpoints/", ".venv/"]


def dsnb_home() -> Path:
    from dsnb.backends.local.jobdir import dsnb_home as home

    return home()


@dataclasses.dataclass
class _Tracked:
    """What this client knows of one job: Ray's last answer, and its driver log's follower."""

    follower: DriverLogFollower | None = None
    info: Any = None
    info_at: float = 0.0
    info_final: bool = False
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class RayBackend(Backend):
    """Ray Train jobs on a local Ray head or an existing Ray cluster (on Kubernetes, ``Cluster("kuberay")``).

    Args:
        address: the Ray dashboard of an existing cluster, ``"http://HOST:8265"``; None
            starts a private head on this machine.
        token: the cluster's auth token (token authentication); by default ``RAY_AUTH_TOKEN``
            or ``~/.ray/auth_token`` when either exists. Never shown or logged.
        storage_path: where Ray Train keeps runs and checkpoints: a directory every Ray node
            sees, or a URI (``s3://...``, ``gs://...``); default ``$DSNB_HOME/ray-runs`` locally,
            Ray's own default (``~/ray_results`` on the head) on a cluster.
        num_cpus: logical CPUs the private head offers (default ``max(cores, 8)``).
        serve_url: where the cluster's Serve HTTP proxy answers, for endpoints; default the
            address's host on port 8000 (the private head picks a free port on 127.0.0.1).

    Raises:
        ClusterError: (on first use) the Ray cluster cannot be reached or refuses the token.

    Example:
        >>> Cluster("ray", address="http://ray-head.ml:8265")   # doctest: +SKIP
        Cluster(backend='ray')
    """

    name = "ray"
    options = BUILTIN_OPTIONS["ray"]
    profiles = BUILTIN_PROFILES["ray"]

    def __init__(self, address: str | None = None, *, token: str | None = None, storage_path: str | None = None,
                 num_cpus: int | None = None, serve_url: str | None = None) -> None:
        if importlib.util.find_spec("ray") is None:
            raise BackendUnavailable("ray", "needs the 'ray' package, which is not installed", "pip install 'dsnb[ray]'")
        self.address = address.rstrip("/") if address else None
        if self.address and "://" not in self.address:
            self.address = f"http://{self.address}"
        self._token = token if token is not None else (_default_token() if address else None)
        self.storage_path = storage_path or (None if address else str(dsnb_home() / "ray-runs"))
        self._num_cpus = num_cpus
        self._serve_url = serve_url.rstrip("/") if serve_url else None
        self._head: LocalHead | None = None
        self._client_obj: Any = None
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()

    # -- connection --------------------------------------------------------------------

    @property
    def dashboard_url(self) -> str:
        """The Ray dashboard this backend talks to (starting the private head if needed).

        Raises:
            ClusterError: the private head did not start.
        """
        if self.address:
            return self.address
        return self._local_head().dashboard_url

    def _local_head(self) -> LocalHead:
        with self._lock:
            if self._head is None or not self._head.alive:
                if self._head is not None:
                    release_head(self._head)
                self._head = acquire_head(self._num_cpus)
                self._client_obj = None
            return self._head

    @property
    def headers(self) -> dict[str, str]:
        token = self._token if self.address else self._local_head().token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _client(self) -> Any:
        with self._lock:
            if self._client_obj is not None:
                return self._client_obj
        # Made outside self._lock: the URL, the token and the error message read the private head,
        # which takes that lock (not reentrant).
        from ray.job_submission import JobSubmissionClient

        try:
            client = JobSubmissionClient(self.dashboard_url, headers=self.headers or None)
        except Exception as e:  # ConnectionError, RuntimeError (HTTP 401/403)
            raise self._unreachable(e) from e
        with self._lock:
            if self._client_obj is None:
                self._client_obj = client
            return self._client_obj

    def _unreachable(self, error: Exception) -> ClusterError:
        text = str(error)
        if "401" in text or "403" in text or "nauthori" in text or "token" in text.lower():
            fix = ("pass token= (the cluster's token from `ray get-auth-token` on its head) or set RAY_AUTH_TOKEN"
                   if not self._token else "the token was refused: check it with `ray get-auth-token` on the head")
            return ClusterError(f"Ray cluster at {self.address}", "refused the request (authentication)", fix)
        return ClusterError(f"Ray cluster at {self.dashboard_url}", f"cannot be reached ({text.splitlines()[0][:200] if text else type(error).__name__})",
                            "check the address (the dashboard's, port 8265) and that the cluster is up: `ray status` on its head")

    def _started(self) -> bool:
        """Whether there can be jobs at all: a cluster address, or a private head that runs."""
        return bool(self.address) or (self._head is not None and self._head.alive)

    # -- submit ------------------------------------------------------------------------

    def render(self, spec: JobSpec) -> Plan:
        """The Ray job submission for ``spec``: entrypoint, runtime environment, metadata; nothing is sent.

        Raises:
            InvalidSpecError: a :class:`~dsnb.SecretRef` in ``env`` (it names a Kubernetes Secret).
        """
        refuse_references(spec.env, self.name)
        storage = self.storage_path or "~/ray_results"
        env = {**ray_train_entry.driver_env(spec, storage), **{k: str(v) for k, v in spec.env.items()}}
        working_dir = str(Path(spec.working_dir or os.getcwd()).resolve())
        runtime_env = {"working_dir": working_dir, "excludes": list(UPLOAD_EXCLUDES), "env_vars": env}
        metadata = {JOB_KEY: spec.name, SPEC_KEY: json.dumps(_public_spec(spec), separators=(",", ":"))}
        submission = {"address": self.address or "(a private Ray head on 127.0.0.1)", "submission_id": spec.name,
                      "entrypoint": shlex.join(ray_train_entry.DRIVER_ARGV),
                      "entrypoint_num_cpus": 0,
                      "runtime_env": {**runtime_env, "env_vars": redact_env(env)}, "metadata": metadata}
        notes = [f"Ray Train: TorchTrainer with {spec.world_size} workers "
                 f"({spec.accelerator.upper()}, {spec.dist_backend}); runs and checkpoints in {storage}/{ray_train_entry.run_name(spec.name)}"]
        if redact_env(env) != env:
            notes.append("secret-looking env values travel in the job's runtime environment: "
                          "whoever can read this Ray cluster's dashboard can read them")
        return Plan(backend=self.name, spec=spec, manifests=[submission], notes=notes,
                    extra={"runtime_env": runtime_env, "metadata": metadata})

    def apply(self, plan: Plan) -> None:
        """Submit the job to Ray.

        Raises:
            ClusterError: Ray is unreachable or refused the job (nothing is left behind).
        """
        client = self._client()
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                _bounded(lambda: client.submit_job(
                    entrypoint=shlex.join(ray_train_entry.DRIVER_ARGV), submission_id=plan.name,
                    runtime_env=plan.extra["runtime_env"], metadata=plan.extra["metadata"], entrypoint_num_cpus=0),
                    SUBMIT_TIMEOUT_S, f"Ray at {self.dashboard_url} did not answer the submit")
                break
            except Exception as e:
                # A head that just started answers before its node's job agent has registered, or
                # while that agent still restarts (the dashboard then reports "Server disconnected").
                if any(sign in str(e) for sign in _AGENT_STARTING) and time.monotonic() < deadline:
                    if self._submitted(client, plan.name):
                        break  # the agent took it before the connection dropped
                    time.sleep(0.5)
                    continue
                raise ClusterError(f"Ray job {plan.name!r}", f"was refused: {str(e).strip().splitlines()[-1][:300]}",
                                   "see the message; a working_dir over Ray's upload limit (500 MiB) needs excludes or a smaller directory") from e
        with self._lock:
            self._tracked[plan.name] = _Tracked()

    @staticmethod
    def _submitted(client: Any, name: str) -> bool:
        try:
            client.get_job_info(name)
            return True
        except Exception:  # noqa: BLE001 - not there (or not readable yet): submit again
            return False

    # -- reading -----------------------------------------------------------------------

    def _info(self, name: str) -> Any:
        tracked = self._tracked.get(name)
        now = time.monotonic()
        if tracked is not None and tracked.info is not None and (
                tracked.info_final or now - tracked.info_at < LOG_REFRESH_S):
            return tracked.info
        info = self._fetch_info(name)
        tracked = self._track(name)
        tracked.info, tracked.info_at = info, now
        tracked.info_final = state_of(info).is_terminal()
        return info

    def _fetch_info(self, name: str) -> Any:
        if not self._started():
            raise JobNotFound(name, self.name)
        try:
            return self._client().get_job_info(name)
        except ClusterError:
            raise
        except Exception as e:
            if "does not exist" in str(e) or "404" in str(e):
                raise JobNotFound(name, self.name) from e
            raise self._unreachable(e) from e

    def _track(self, name: str) -> _Tracked:
        with self._lock:
            return self._tracked.setdefault(name, _Tracked())

    def _ingest(self, name: str, terminal: bool) -> DriverLogFollower:
        """Follow the driver log while the job runs; read the rest of it, once, when the job has ended."""
        tracked = self._track(name)
        with tracked.lock:
            if tracked.follower is None:
                tracked.follower = DriverLogFollower(self._client(), name)
            follower = tracked.follower
            if follower.complete:
                return follower
            try:
                if terminal:
                    follower.finish()
                else:
                    follower.follow()  # the first time: the log so far, read now; then the tail, in the background
            except Exception as e:
                if "does not exist" in str(e):
                    raise JobNotFound(name, self.name) from e
                raise self._unreachable(e) from e
            return follower

    def status(self, name: str) -> JobStatus:
        """The job's status from Ray, with ranks from its log.

        Raises:
            JobNotFound: Ray has no job of that name.
            ClusterError: Ray cannot be reached.
        """
        info = self._info(name)
        return self._status_from(name, info, self._ingest(name, state_of(info).is_terminal()))

    def _status_from(self, name: str, info: Any, follower: DriverLogFollower | None) -> JobStatus:
        """The first answer of :data:`JOB_RULES` (Ray's job status, with what the driver log said)."""
        if follower is None:
            return first_status(RayJobReading(name, self.name, info), JOB_RULES)
        return first_status(RayJobReading(name, self.name, info, follower.announced(), follower.outcome, follower.logs), JOB_RULES)

    def read_logs(self, name: str, cursor: Any = None, rank: int | None = None) -> LogChunk:
        """Lines since ``cursor``. Raises: JobNotFound."""
        tracked = self._refresh(name)
        lines, position = tracked.logs.read(cursor or 0, rank, READ_LIMIT)
        return LogChunk(lines=lines, cursor=position)

    def read_log_tail(self, name: str, count: int, rank: int | None = None) -> LogChunk:
        """The last ``count`` lines. Raises: JobNotFound."""
        lines, position = self._refresh(name).logs.tail(count, rank)
        return LogChunk(lines=lines, cursor=position)

    def read_metrics(self, name: str, cursor: Any = None) -> MetricChunk:
        """Samples since ``cursor``. Raises: JobNotFound."""
        samples, position = self._refresh(name).logs.samples(cursor or 0)
        return MetricChunk(samples=samples, cursor=position)

    def _refresh(self, name: str) -> DriverLogFollower:
        follower = self._track(name).follower
        if follower is not None and follower.complete:
            return follower
        info = self._info(name)
        return self._ingest(name, state_of(info).is_terminal())

    # -- control -----------------------------------------------------------------------

    def stop_running(self, name: str, status: JobStatus) -> JobStatus:
        """Stop the Ray job (its driver, the Train controller and workers) and wait for it to end.

        Raises:
            JobNotFound: Ray has no job of that name.
            ClusterError: Ray cannot be reached, or the job did not stop in time.
        """
        try:
            self._client().stop_job(name)
        except Exception as e:
            raise self._unreachable(e) from e
        deadline = time.monotonic() + CANCEL_TIMEOUT_S
        while time.monotonic() < deadline:
            status = self.status(name)
            if status.state.is_terminal():
                return status
            time.sleep(0.2)
        raise ClusterError(f"Ray job {name!r}", f"still {status.state.value} {CANCEL_TIMEOUT_S:.0f} s after it was stopped",
                           f"stop it by hand: ray job stop {name} --address {self.dashboard_url}")

    def jobs(self) -> list[JobStatus]:
        """dsnb's jobs on this Ray cluster, newest first (none before the private head started).

        Raises:
            ClusterError: Ray cannot be reached.
        """
        if not self._started():
            return []
        try:
            infos = self._client().list_jobs()
        except Exception as e:
            raise self._unreachable(e) from e
        found = []
        for info in infos:
            name = (info.metadata or {}).get(JOB_KEY)
            if name and info.submission_id == name:
                tracked = self._tracked.get(name)
                found.append(self._status_from(name, info, tracked.follower if tracked else None))
        return sorted(found, key=lambda s: s.created_at or 0, reverse=True)

    def spec_of(self, name: str) -> JobSpec:
        """The spec, from the job's metadata (secret env values as ``***``). Raises: JobNotFound."""
        info = self._info(name)
        return JobSpec.from_dict(json.loads((info.metadata or {})[SPEC_KEY]))

    def check(self, spec: JobSpec | None = None) -> PreflightReport:
        """Ray installed; the cluster reachable with this token; enough CPUs/GPUs for ``spec``.

        Raises:
            Nothing: problems are failed lines of the report.
        """
        from dsnb.backends.ray.preflight import run_preflight

        return run_preflight(self, spec)

    # -- serving -----------------------------------------------------------------------

    def _serve(self) -> ServeClient:
        return ServeClient(self.dashboard_url, self.headers)

    def serve_plan(self, spec: ServeSpec) -> Plan:
        """The Serve application for ``spec`` (its config, as ``serve deploy`` takes it); nothing is deployed.

        Raises:
            InvalidSpecError: a token, or a model split over ranks (Ray Serve replicas hold a whole model).
        """
        ray_serve_app.check_servable(spec)
        unique = spec.with_unique_name()
        working_dir = str(Path(unique.working_dir or os.getcwd()).resolve())
        app = ray_serve_app.serve_config(unique, route_prefix=f"/{unique.name}", working_dir=working_dir)
        app["args"][SPEC_KEY] = json.dumps(_public_spec(unique), separators=(",", ":"))
        shown = {**app, "runtime_env": {**app["runtime_env"], "env_vars": redact_env(app["runtime_env"]["env_vars"])}}
        notes = [f"Ray Serve application {unique.name!r}: {unique.model} behind deepspeed.init_inference, "
                 + (f"{unique.min_replicas}..{unique.max_replicas} replicas (autoscaling)" if unique.autoscaling
                    else f"{unique.replicas} replica(s)")]
        return Plan(backend=self.name, spec=unique, manifests=[{"applications": [shown]}], notes=notes, extra={"app": app})  # type: ignore[arg-type]

    def apply_serve(self, plan: Plan) -> None:
        """Deploy the application next to the others running on the cluster.

        Raises:
            ClusterError: Ray is unreachable or refused the config.
        """
        client = self._serve()
        app = json.loads(json.dumps(plan.extra["app"]))
        # A Serve config takes only remote URIs: ship the working directory as a package first,
        # the way a job submission does (the SDK's own upload, which returns a gcs:// URI).
        app["runtime_env"]["excludes"] = list(UPLOAD_EXCLUDES)
        try:
            self._client()._upload_working_dir_if_needed(app["runtime_env"])
        except (OSError, RuntimeError, ValueError) as e:
            raise ClusterError(f"working_dir {plan.extra['app']['runtime_env'].get('working_dir')!r}", f"could not be shipped to Ray ({e})",
                               "use a smaller directory (Ray takes at most 500 MiB) or a remote URI") from e
        http_options = None
        if self.address is None:
            http_options = {"host": "127.0.0.1", "port": self._local_head().serve_port}
        client.change(plan.name, app, http_options)  # safe beside other clients' deploys and stops

    def _app(self, name: str) -> dict[str, Any]:
        if not self._started():
            raise JobNotFound(name, self.name, kind="endpoint")
        apps = self._serve().applications()
        app = apps.get(name)
        if app is None or SPEC_KEY not in ((app.get("deployed_app_config") or {}).get("args") or {}):
            raise JobNotFound(name, self.name, sorted(apps), kind="endpoint")
        return app

    def endpoint_url(self, name: str) -> str:
        """``<serve proxy>/<name>``. Raises: JobNotFound, ClusterError."""
        app = self._app(name)
        prefix = app.get("route_prefix") or f"/{name}"
        if self._serve_url:
            base = self._serve_url
        elif self.address is None:
            base = f"http://127.0.0.1:{self._local_head().serve_port}"
        else:
            host = self.address.split("://", 1)[1].rsplit(":", 1)[0]
            base = f"http://{host}:8000"
        return base + prefix

    def endpoint_status(self, name: str) -> JobStatus:
        """From the application's Serve status and its replicas'. Raises: JobNotFound, ClusterError."""
        app = self._app(name)
        state, message, replicas = app_state(app)
        started = app.get("last_deployed_time_s")
        return JobStatus(name=name, backend=self.name, state=state, replicas=replicas, message=message,
                         created_at=started, started_at=started)

    def stop_endpoint(self, name: str) -> JobStatus:
        """Remove the application (its replicas stop); the others keep running. Raises: JobNotFound."""
        self._app(name)
        client = self._serve()
        client.change(name, None, None)
        deadline = time.monotonic() + CANCEL_TIMEOUT_S
        while name in client.applications() and time.monotonic() < deadline:
            time.sleep(0.2)
        return JobStatus(name=name, backend=self.name, state=JobState.CANCELLED, message="stopped")

    def endpoints(self) -> list[JobStatus]:
        """dsnb's Serve applications on this cluster. Raises: ClusterError."""
        if not self._started():
            return []
        found = []
        for name, app in self._serve().applications().items():
            if SPEC_KEY in ((app.get("deployed_app_config") or {}).get("args") or {}):
                state, message, replicas = app_state(app)
                found.append(JobStatus(name=name, backend=self.name, state=state, replicas=replicas, message=message,
                                       created_at=app.get("last_deployed_time_s")))
        return found

    def close(self) -> None:
        """Stop following logs and forget the client; with a private head, stop it when no other ray
        cluster of this process uses it."""
        with self._lock:
            head, self._head, self._client_obj = self._head, None, None
            followers = [tracked.follower for tracked in self._tracked.values() if tracked.follower is not None]
            for tracked in self._tracked.values():
                tracked.follower = None
        for follower in followers:
            follower.stop()
        if head is not None:
            release_head(head)

    def __repr__(self) -> str:
        return f"RayBackend(address={self.address!r})"


def _bounded(call: Any, timeout: float, what: str) -> Any:
    """``call()`` in a daemon thread, so that a server that never answers cannot hang the caller.

    Ray's SDK sends its requests without a time limit; a cell must not wait forever.

    Raises:
        TimeoutError: no answer within ``timeout`` seconds (the thread is left to end on its own).
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as e:  # handed to the caller below
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True, name="dsnb-ray-request")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{what} within {timeout:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


_AGENT_STARTING = ("No available agent", "Server disconnected")


def _default_token() -> str | None:
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _public_spec(spec: JobSpec) -> dict[str, Any]:
    data = spec.to_dict()
    data["env"] = redact_env(spec.env)
    data["name"] = spec.name
    return data
