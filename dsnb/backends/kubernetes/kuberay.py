"""``Cluster("kuberay", namespace=...)``: Ray Train jobs as KubeRay RayJobs (``ray.io/v1``).

A job is one RayJob (:func:`~dsnb.backends.kubernetes.kuberay_manifests.render_rayjob`): KubeRay creates a Ray
cluster for it (a head and ``spec.nodes`` workers), then a submitter Kubernetes Job that runs
``ray job submit`` with dsnb's driver (:mod:`~dsnb.runtime.ray_train_entry`) as the
entrypoint and follows the driver's log. The driver fits a ``TorchTrainer`` that runs the
user's script on ``world_size`` Ray Train workers, as with ``Cluster("ray")``.

Everything else is the shared Kubernetes machinery (:mod:`dsnb.backends.kubernetes.backend`):
the record ConfigMap owning the RayJob and the Secret of secret-looking env values, watch
caches over the job's pods, the records and the RayJobs, the logs' archive, the final status
in the record, ``jobs()``/``attach()`` from labels, preflight and RBAC.

- **Status** comes from the RayJob's ``jobDeploymentStatus`` and ``jobStatus`` (see
  :meth:`KubeRayBackend.compute_status` and ``docs/operators.md``), and from the pods'
  diagnoses (unschedulable, image pull...), which KubeRay itself does not turn into a failure.
- **Logs**: the submitter pod carries dsnb's labels (role ``submitter``); its log is the
  driver's log, where Ray prefixes each worker line with ``(RayTrainWorker pid=N)``.
  :class:`~dsnb.backends.ray.logs.DriverLogParser` maps those to ranks. A failure names the
  rank and exit code from the driver's ``DSNB_RAY_OUTCOME`` line.
- **Cancel** deletes the RayJob: its Ray cluster, submitter Job and their pods go with it
  (ownerReferences), so nothing keeps running or holding GPUs. Suspending it instead
  (``spec.suspend``) would also delete the Ray cluster, but keeps the RayJob, which KubeRay
  starts again from scratch when it is resumed; a cancelled dsnb job is not meant to come back.

Serving (``cluster.serve(ServeSpec(...))``) makes a RayService instead: the endpoint's record
(``dsnb.io/kind: endpoint``, so ``jobs()`` leaves it out), the Secret, and a RayService whose
Ray cluster has one worker pod per replica and whose ``serveConfigV2`` is dsnb's Serve
application (:mod:`~dsnb.runtime.ray_serve_app`); the status comes from the RayService's
``Ready`` condition and the application's Serve status (:meth:`KubeRayBackend.serve_status`).

Example:
    >>> from dsnb import Cluster, JobSpec
    >>> spec = JobSpec(name="tiny-gpt", script="train.py", nodes=2, image="ghcr.io/org/train-ray:1")
    >>> plan = Cluster("kuberay", namespace="ml").dryrun(spec)
    >>> [m["kind"] for m in plan.manifests]
    ['ConfigMap', 'RayJob']
"""

from __future__ import annotations

import dataclasses
import posixpath
import threading
import time
from typing import Any

from kubernetes.client.exceptions import ApiException

from dsnb.backends.base import Plan
from dsnb.backends.kubernetes import objects
from dsnb.backends.kubernetes.backend import (
    BACKEND,
    CREATED,
    KIND,
    EnvSecret,
    KubernetesBackend,
    Workload,
    env_secret,
    record_manifest,
)
from dsnb.backends.kubernetes.kuberay_manifests import (
    _RAY_VERSION,
    API_VERSION,
    DEFAULT_RAY_VERSION,
    ROLE,
    SUBMITTER_CONTAINER,
    render_rayjob,
    render_rayservice,
)
from dsnb.backends.kubernetes.kuberay_status import (
    RAYJOB_RULES,
    SERVICE_RULES,
    RayJobReading,
    ServiceReading,
)
from dsnb.backends.kubernetes.labels import MANAGED_SELECTOR
from dsnb.backends.kubernetes.logs import PodLogFollower
from dsnb.backends.kubernetes.network_policy import KUBERAY_OPERATOR, RAY_DASHBOARD_PORT, allow_serving
from dsnb.backends.kubernetes.pod_status import container_status, terminating
from dsnb.backends.kubernetes.pod_template import referenced_env_keys, secret_env_keys
from dsnb.backends.kubernetes.preflight import KUBERAY_INSTALL
from dsnb.backends.kubernetes.rbac import KUBERAY_PERMISSIONS
from dsnb.backends.kubernetes.status_rules import first_status
from dsnb.backends.kubernetes.workdir_bundle import CodeBundle, code_env, code_volumes
from dsnb.backends.logbuffer import JobLogs
from dsnb.backends.options import BUILTIN_OPTIONS
from dsnb.backends.profiles import BUILTIN_PROFILES
from dsnb.backends.ray.logs import DriverLogParser
from dsnb.errors import InvalidSpecError, JobNotFound
from dsnb.runtime import ray_serve_app, ray_train_entry
from dsnb.serving.spec import ServeSpec
from dsnb.spec import JobSpec, Resources
from dsnb.status import JobState, JobStatus

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
#: The ``dsnb.io/kind`` of an endpoint's record (a job's is ``record``), so ``jobs()`` leaves endpoints out.
ENDPOINT_KIND = "endpoint"
ENDPOINT_SELECTOR = f"{MANAGED_SELECTOR},{KIND}={ENDPOINT_KIND}"
#: The port of KubeRay's serve Service ``<name>-serve-svc`` (Ray Serve's HTTP proxy).
SERVE_PORT = 8000
#: Where Ray Train keeps runs and checkpoints without a checkpoint PVC: the pod's own disk.
DEFAULT_STORAGE = "/home/ray/ray-runs"
#: How many lines of a job's driver log are remembered to skip a retried submitter's replay.
GIVEN_LIMIT = 200_000
#: Seconds to wait, once the RayJob has ended, for the submitter to print the driver log's end.
DRIVER_LOG_WAIT_S = 10.0


def storage_path(options: Any, given: str | None = None) -> str:
    """Where Ray Train keeps a job's runs and checkpoints on KubeRay.

    ``given`` (e.g. ``s3://bucket/runs``) if set; else ``<checkpoint mount>/ray-runs`` on the
    checkpoint PVC, which every pod mounts; else ``/home/ray/ray-runs`` on each pod's own disk
    (not shared, gone with the pods: resuming from a checkpoint needs the PVC or a URI).

    Example:
        >>> from dsnb import PodOptions
        >>> storage_path(PodOptions(checkpoint_pvc="ckpt")), storage_path(PodOptions())
        ('/checkpoints/ray-runs', '/home/ray/ray-runs')
    """
    if given:
        return given
    if options.checkpoint_pvc:
        return posixpath.join(options.checkpoint_mount, "ray-runs")
    return DEFAULT_STORAGE


def mount_code(cluster: dict[str, Any], job: str) -> None:
    """Mount job ``job``'s code ConfigMap and the emptyDir it is unpacked into on the Ray head and workers of
    ``cluster`` (a ``rayClusterSpec``): Ray may place a Train worker on either.

    Example:
        >>> cluster = {"headGroupSpec": {"template": {"spec": {"containers": [{"name": "ray-head"}]}}}, "workerGroupSpecs": []}
        >>> mount_code(cluster, "a-x7k2")
        >>> [m["mountPath"] for m in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]]
        ['/var/run/dsnb/code', '/var/run/dsnb/workdir']
    """
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    for group in groups:
        pod = group["template"]["spec"]
        for item in code_volumes(job):
            pod.setdefault("volumes", []).append(item.volume)
            mount = {"name": item.volume["name"], "mountPath": item.mount_path, **({"readOnly": True} if item.read_only else {})}
            pod["containers"][0].setdefault("volumeMounts", []).append(mount)


class KubeRayBackend(KubernetesBackend):
    """Ray Train jobs on KubeRay; see the module docstring.

    Args:
        ray_version: the Ray version in ``spec.image`` (``major.minor.patch``); KubeRay
            starts the cluster for it.
        ttl_seconds_after_finished: KubeRay deletes the Ray cluster (and frees its GPUs) this long
            after the job ends, with no dsnb client needed; default 0, at once. dsnb removes the
            whole RayJob when a client sees the job end.
        head_resources: the head pod's CPU and memory (default 1 CPU, 4Gi; no GPUs).
        storage_path: where Ray Train keeps runs and checkpoints (see :func:`storage_path`).
        serve_url: where endpoints answer, e.g. ``"http://127.0.0.1:8000"`` through
            ``kubectl port-forward svc/<endpoint>-serve-svc 8000``; default the serve
            Service's in-cluster address (see :meth:`endpoint_url`).
        **options: see :class:`~dsnb.backends.kubernetes.backend.KubernetesBackend`.

    Raises:
        InvalidSpecError: a malformed Ray version, or head resources that are not a Resources.
    """

    name = "kuberay"
    managed_kind = "RayJob"
    options = BUILTIN_OPTIONS["kuberay"]
    profiles = BUILTIN_PROFILES["kuberay"]
    # Its records have said "ray" since it was spelled Cluster("ray", kuberay=True): jobs made then stay visible.
    record_label = "ray"
    permissions = KUBERAY_PERMISSIONS
    workload_resource = (GROUP, VERSION, PLURAL)
    launcher_logs = True
    container_name = SUBMITTER_CONTAINER
    install_hint = KUBERAY_INSTALL
    upgrade_hint = f"dsnb renders RayJobs and RayServices for KubeRay v1.7 (ray.io/v1): upgrade it: {KUBERAY_INSTALL}"
    workload = ((API_VERSION, "RayJob", ""), ("v1", "Secret", "-env"), ("v1", "ConfigMap", "-code"))

    def __init__(self, ray_version: str = DEFAULT_RAY_VERSION, ttl_seconds_after_finished: int = 0,
                 head_resources: Resources | None = None, storage_path: str | None = None,
                 serve_url: str | None = None, **options: Any) -> None:
        if not isinstance(ray_version, str) or not _RAY_VERSION.match(ray_version):
            raise InvalidSpecError("ray_version", f"{ray_version!r} is not a Ray version",
                                   f"write the version in the image as major.minor.patch, e.g. {DEFAULT_RAY_VERSION!r}")
        if head_resources is not None and not isinstance(head_resources, Resources):
            raise InvalidSpecError("head_resources", f"must be a Resources, got {type(head_resources).__name__}",
                                   "pass Resources(cpu=1, memory='4Gi')")
        super().__init__(**options)
        self.ray_version = ray_version
        self.ttl_seconds_after_finished = ttl_seconds_after_finished
        self.head_resources = head_resources
        self.storage_path = storage_path
        self.serve_url = serve_url.rstrip("/") if serve_url else None
        self._stopped_endpoints: set[str] = set()
        self._parsers: dict[str, tuple[DriverLogParser, threading.Lock]] = {}
        self._given: dict[str, list[tuple[int, str]]] = {}  # job -> what its submitter pods gave, in order

    # -- rendering -------------------------------------------------------------------------
    def render_workload(self, spec: JobSpec, secret: EnvSecret, code: CodeBundle | None = None) -> Workload:
        """The RayJob; KubeRay's operator may reach its head's dashboard through a NetworkPolicy. With shipped
        ``code`` the head and worker pods mount it, and each Ray Train worker unpacks it (once per pod) and
        starts there (:func:`dsnb.runtime.ray_train_entry.enter_code`).

        Raises:
            InvalidSpecError: no image, a name KubeRay refuses, or a bad Ray version.
        """
        name, namespace = spec.name, self.namespace
        storage = storage_path(self.pod_options, self.storage_path)
        driver_spec = spec
        if code is not None:
            driver_spec = dataclasses.replace(spec, working_dir=None)
        elif spec.working_dir and spec.script and not posixpath.isabs(spec.script):
            # Ray's workers need not start in the containers' working directory: find the script anyway.
            driver_spec = dataclasses.replace(spec, script=posixpath.join(spec.working_dir, spec.script))
        env = {**ray_train_entry.driver_env(driver_spec, storage), **(code_env() if code is not None else {})}
        rayjob = render_rayjob(spec if code is None else driver_spec, self.pod_options, list(ray_train_entry.DRIVER_ARGV), self.ray_version,
                               ttl_seconds_after_finished=self.ttl_seconds_after_finished,
                               head_resources=self.head_resources, env_vars=env)
        if code is not None:
            mount_code(rayjob["spec"]["rayClusterSpec"], name)
        if self.storage_path:
            where = "as given"
        elif self.pod_options.checkpoint_pvc:
            where = f"on the PersistentVolumeClaim {self.pod_options.checkpoint_pvc!r}, which every pod mounts"
        else:
            where = "on each pod's own disk: not shared, and gone with the pods; PodOptions(checkpoint_pvc=...) makes runs resumable"
        notes = [
            f"dsnb KubeRay plan for {name} in namespace {namespace}: a RayJob with a Ray {self.ray_version} cluster of one head "
            f"and {spec.nodes} worker pod(s); Ray Train runs {spec.world_size} worker(s) "
            f"({spec.accelerator.upper()}, {spec.dist_backend}); needs the KubeRay operator (ray.io/v1)",
            f"Ray Train runs and checkpoints: {storage}/{ray_train_entry.run_name(name)} ({where})",
            "the image needs Ray (the same version), torch, DeepSpeed, dsnb and your code (build it FROM rayproject/ray)",
        ]
        # KubeRay asks the head's dashboard for the job's status.
        return Workload([rayjob], notes, ingress=[{"from": [KUBERAY_OPERATOR], "ports": [{"port": RAY_DASHBOARD_PORT}]}], code=code)

    def operator_checks(self, conn: Any) -> list[Any]:
        from dsnb.backends.kubernetes.preflight import check_kuberay

        return check_kuberay(conn, self.namespace)

    # -- pods and logs ---------------------------------------------------------------------
    @staticmethod
    def _role(pod: dict[str, Any]) -> str:
        return (pod["metadata"].get("labels") or {}).get(ROLE, "")

    def pod_node(self, pod: dict[str, Any]) -> int | None:
        return None  # Ray places the ranks; the driver's log says which rank wrote a line

    def logs_from(self, pod: dict[str, Any]) -> bool:
        return self._role(pod) == "submitter"  # it follows the driver's log, which has every rank's lines

    def _parser(self, name: str) -> tuple[DriverLogParser, threading.Lock]:
        with self._lock:
            return self._parsers.setdefault(name, (DriverLogParser(), threading.Lock()))

    def _follow(self, name: str, logs: JobLogs, pod: dict[str, Any]) -> PodLogFollower:
        """Follow one submitter pod. A retried submitter (its Job's ``backoffLimit`` is 2) runs ``ray job logs
        --follow`` again, which prints the driver's log from the start: the lines an earlier submitter pod
        already gave are skipped, in order, so no line or metric is kept twice."""
        parser, lock = self._parser(name)
        pod_name = pod["metadata"]["name"]
        pods = self._informer("pods")
        given = self._given.setdefault(name, [])  # what this job's submitter pods gave, in order
        replay = {"at": 0, "live": not given}

        def sink(text: str, when: float) -> None:
            with lock:
                entry = parser.feed(text)
                if entry is None:
                    return
                if not replay["live"]:
                    if replay["at"] < len(given) and given[replay["at"]] == entry:
                        replay["at"] += 1
                        return  # printed again by this retried pod
                    replay["live"] = True
                if len(given) < GIVEN_LIMIT:
                    given.append(entry)
            logs.add(entry[0], entry[1], when)

        def wait(timeout: float) -> None:
            pods.wait_for_change(pods.version, timeout)

        return PodLogFollower(self.conn.core, self.namespace, pod_name, self.container_name, lambda: pods.get(pod_name), wait, sink)

    def _submitter_done(self, name: str) -> bool:
        for pod in self.job_pods(name):
            if self.logs_from(pod) and (container_status(pod, self.container_name).get("state") or {}).get("running"):
                return False
        return True

    def _await_driver_log(self, name: str) -> None:
        """Give the submitter a moment to print the driver log's end (KubeRay reports the end from the dashboard)."""
        pods = self._informer("pods")
        deadline = time.monotonic() + DRIVER_LOG_WAIT_S
        seen = pods.version
        while not self._submitter_done(name) and time.monotonic() < deadline:
            seen = pods.wait_for_change(seen, min(1.0, deadline - time.monotonic()))

    def _failure_from_launcher(self, name: str, failed: JobStatus) -> JobStatus:
        """Name the failing rank, its exit code and last lines from the driver's outcome line."""
        self._await_driver_log(name)
        logs = self._collect_logs(name)
        outcome = self._parser(name)[0].outcome or {}
        rank = outcome.get("failed_rank")
        if not isinstance(rank, int):
            tail, _ = logs.tail(20, None)
            said = tuple(line.text for line in tail if line.text.strip())
            error = outcome.get("error")
            message = f"{error}; {failed.message}" if error and error not in failed.message else failed.message
            return dataclasses.replace(failed, message=message, last_lines=said or failed.last_lines)
        code = outcome.get("rank_exit_code")
        code = code if isinstance(code, int) else failed.exit_code
        tail, _ = logs.tail(15, rank)
        replicas = tuple(dataclasses.replace(r, exit_code=code) if r.rank == rank else r for r in failed.replicas)
        return dataclasses.replace(
            failed, failed_rank=rank, exit_code=code, replicas=replicas, last_lines=tuple(line.text for line in tail),
            message=f"rank {rank} exited with code {code}; {failed.message}",
        )

    def _finalize(self, name: str, final: JobStatus) -> JobStatus:
        if final.state == JobState.SUCCEEDED:
            self._await_driver_log(name)  # keep the driver log's last lines in the archive
        try:
            return super()._finalize(name, final)
        finally:
            with self._lock:
                self._parsers.pop(name, None)
                self._given.pop(name, None)

    # -- status ----------------------------------------------------------------------------
    def compute_status(self, name: str, spec: JobSpec, created_at: float | None, pods: list[dict[str, Any]],
                       events: dict[str, list[dict[str, Any]]] | None = None,
                       workload: dict[str, Any] | None = None) -> JobStatus:
        """The job's status from its RayJob and pods: the first answer of :data:`.kuberay_status.RAYJOB_RULES`
        (pure; no API calls)."""
        live = tuple(p for p in pods if not terminating(p))  # stopped by a deletion (the cluster's shutdown, a cancel)
        reading = RayJobReading(name, self.name, spec, created_at, live, events or {}, workload or {}, namespace=self.namespace)
        return first_status(reading, RAYJOB_RULES)

    def serve_plan(self, spec: ServeSpec) -> Plan:
        """The endpoint's record, the Secret of secret env values (if any) and a RayService; nothing is created.

        The RayService's Ray cluster has one head (``num-cpus: "0"``: no replica there) and one
        worker pod per replica (``max_replicas`` when autoscaling), each with the per-replica
        resources. ``serveConfigV2`` holds one application, dsnb's
        (:func:`~dsnb.runtime.ray_serve_app.serve_config` on route ``/``) without a working
        directory: the model's code must be in the image. Secret-looking env values are left out
        of it; the pods read them from the Secret, and Ray's processes inherit them.

        Raises:
            InvalidSpecError: no image, a name KubeRay refuses, or a bad Ray version.
        """
        ray_serve_app.check_servable(spec)
        if not spec.image:
            raise InvalidSpecError("image", "KubeRay serves the model from a container image",
                                   f"set image= an image built FROM rayproject/ray:{self.ray_version} with dsnb, torch, "
                                   "DeepSpeed and the model's code", spec="ServeSpec")
        unique = spec.with_unique_name()
        name, namespace = unique.name, self.namespace
        workers = unique.max_replicas if unique.autoscaling else unique.replicas
        assert workers is not None
        cluster_spec = JobSpec(name=name, command=["serve"], nodes=workers, image=unique.image, env=dict(unique.env),
                               resources=unique.resources)
        app = ray_serve_app.serve_config(unique, route_prefix="/")
        hidden = set(secret_env_keys(unique.env)) | set(referenced_env_keys(unique.env))
        app["runtime_env"]["env_vars"] = {k: v for k, v in app["runtime_env"]["env_vars"].items() if k not in hidden}
        rayservice = render_rayservice(cluster_spec, self.pod_options, ray_version=self.ray_version,
                                       head_resources=self.head_resources, application=app)
        replicas = (f"{unique.min_replicas}..{unique.max_replicas} replicas (autoscaling)" if unique.autoscaling
                    else f"{unique.replicas} replica(s)")
        notes = [
            f"dsnb KubeRay plan for endpoint {name} in namespace {namespace}: a RayService with a Ray {self.ray_version} "
            f"cluster of one head and {workers} worker pod(s), one per replica; Ray Serve runs {unique.model} behind "
            f"deepspeed.init_inference, {replicas}; needs the KubeRay operator (ray.io/v1)",
            "the image needs Ray (the same version), torch, DeepSpeed, dsnb and the model's code: nothing is shipped "
            "(no working_dir), so the loader's module must be importable in the image (installed, or on PYTHONPATH)"
            + (f"; working_dir {unique.working_dir!r} is not used on KubeRay" if unique.working_dir else ""),
            f"in-cluster URL: {self._in_cluster_url(name)} (KubeRay's serve Service, made once the application runs); "
            f"from outside: kubectl port-forward -n {namespace} svc/{name}-serve-svc {SERVE_PORT} and "
            f"serve_url='http://127.0.0.1:{SERVE_PORT}'",
        ]
        if unique.model_kind == "huggingface":
            notes.insert(2, f"the model directory {unique.model} must exist in the pods (in the image or on a mounted volume)")
        # Assembled as a job's plan, but its record holds the ServeSpec (what a new kernel reads back), under
        # kind "endpoint" so that jobs() leaves it out. KubeRay asks the head's dashboard for Serve's status.
        record = record_manifest(unique, self.record_label, {}, kind=ENDPOINT_KIND)
        work = Workload([rayservice], notes, ingress=[{"from": [KUBERAY_OPERATOR], "ports": [{"port": RAY_DASHBOARD_PORT}]}])
        plan = self.assemble(unique, record, env_secret(cluster_spec, namespace), work)  # type: ignore[arg-type]
        allow_serving(plan.manifests, SERVE_PORT, self.pod_options.serve_ingress_from)  # into the NetworkPolicy, if any
        return plan

    def apply_serve(self, plan: Plan) -> None:
        """Create the record, then the Secret and the RayService owned by it; undo all on a refusal.

        Raises:
            ClusterError: the API refused (without the RayService CRD: how to install KubeRay).
        """
        try:
            self.apply(plan)
        finally:
            self._specs.pop(plan.name, None)  # an endpoint is no job
        self._stopped_endpoints.discard(plan.name)

    def _in_cluster_url(self, name: str) -> str:
        return f"http://{name}-serve-svc.{self.namespace}.svc.cluster.local:{SERVE_PORT}/"

    def _endpoint_records(self) -> list[dict[str, Any]]:
        try:
            response = self.conn.core.list_namespaced_config_map(
                self.namespace, label_selector=f"{ENDPOINT_SELECTOR},{BACKEND}={self.record_label}", _preload_content=False)
            return list(objects.read_json(response).get("items") or [])
        except ApiException as e:
            raise self.api_error(e, "list ConfigMaps") from e

    def _endpoint_record(self, name: str) -> dict[str, Any] | None:
        try:
            record = objects.read(self.conn, "v1", "ConfigMap", name)
        except ApiException as e:
            raise self.api_error(e, f"read ConfigMap {name!r}") from e
        labels = ((record or {}).get("metadata") or {}).get("labels") or {}
        return record if labels.get(KIND) == ENDPOINT_KIND and labels.get(BACKEND) == self.record_label else None

    def _endpoint_not_found(self, name: str) -> JobNotFound:
        return JobNotFound(name, self.name, sorted(r["metadata"]["name"] for r in self._endpoint_records()), kind="endpoint")

    def _rayservice(self, name: str) -> dict[str, Any] | None:
        try:
            return objects.read(self.conn, API_VERSION, "RayService", name)
        except ApiException as e:
            raise self.api_error(e, f"read RayService {name!r}") from e

    def endpoint_url(self, name: str) -> str:
        """KubeRay's serve Service in the cluster, ``http://<name>-serve-svc.<namespace>.svc.cluster.local:8000/``,
        or ``serve_url`` when given (e.g. a ``kubectl port-forward``). Raises: JobNotFound."""
        if self._endpoint_record(name) is None:
            raise self._endpoint_not_found(name)
        return f"{self.serve_url}/" if self.serve_url else self._in_cluster_url(name)

    def endpoint_status(self, name: str) -> JobStatus:
        """From the RayService's status and the Ray pods (see :meth:`serve_status`). Raises: JobNotFound, ClusterError."""
        record = self._endpoint_record(name)
        if record is None:
            if name in self._stopped_endpoints:
                return JobStatus(name=name, backend=self.name, state=JobState.CANCELLED, message="stopped")
            raise self._endpoint_not_found(name)
        return self.serve_status(name, _created(record), self._rayservice(name), self.job_pods(name))

    def stop_endpoint(self, name: str) -> JobStatus:
        """Delete the record: the RayService (its Ray cluster and pods) and the Secret go with it.

        Waits up to ``cancel_wait`` seconds for the RayService and the pods to be gone; safe
        to call again.

        Raises:
            JobNotFound: no endpoint of that name.
        """
        record = self._endpoint_record(name)
        if record is None:
            if name in self._stopped_endpoints:
                return JobStatus(name=name, backend=self.name, state=JobState.CANCELLED, message="stopped")
            raise self._endpoint_not_found(name)
        try:
            objects.delete(self.conn, "v1", "ConfigMap", name)
        except ApiException as e:
            raise self.api_error(e, f"delete the endpoint {name!r}") from e
        self._stopped_endpoints.add(name)
        pods = self._informer("pods")
        deadline = time.monotonic() + self.cancel_wait
        seen = pods.version
        while (self.job_pods(name) or self._rayservice(name) is not None) and time.monotonic() < deadline:
            seen = pods.wait_for_change(seen, min(0.5, max(0.0, deadline - time.monotonic())))
        return JobStatus(name=name, backend=self.name, state=JobState.CANCELLED, message="stopped by the user",
                         created_at=_created(record), finished_at=time.time())

    def endpoints(self) -> list[JobStatus]:
        """The statuses of this namespace's endpoints (their records), newest first. Raises: ClusterError."""
        records = sorted(self._endpoint_records(), key=_created, reverse=True)
        if not records:
            return []
        try:
            listed = self.conn.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, "rayservices",
                                                                    label_selector=MANAGED_SELECTOR)
        except ApiException as e:
            if e.status != 404:
                raise self.api_error(e, "list RayServices") from e
            listed = {}
        services = {s["metadata"]["name"]: s for s in listed.get("items") or []}
        return [self.serve_status(r["metadata"]["name"], _created(r), services.get(r["metadata"]["name"]),
                                  self.job_pods(r["metadata"]["name"])) for r in records]

    def serve_status(self, name: str, created_at: float | None, service: dict[str, Any] | None,
                     pods: list[dict[str, Any]]) -> JobStatus:
        """An endpoint's status from its RayService and Ray pods: the first answer of
        :data:`.kuberay_status.SERVICE_RULES` (pure; no API calls)."""
        return first_status(ServiceReading(name, self.name, created_at, service, tuple(pods)), SERVICE_RULES)


def _created(record: dict[str, Any]) -> float | None:
    try:
        return float((record["metadata"].get("annotations") or {}).get(CREATED, "0") or 0) or None
    except ValueError:
        return None
