"""What every Kubernetes backend shares: connection, job records, watches, logs, teardown.

Each job is recorded in a ConfigMap named after it (the *record*): the spec, the files
the pods mount, and, once the job ended, its final status. Every other object of the job
carries an ownerReference to the record, so deleting the record collects everything.
Status comes from two watch-based caches (pods and records), never from polling pods.
When a job reaches a final state dsnb reads the rest of its logs, keeps the last lines
and metrics in a second ConfigMap (``<job>-logs``), writes the final status into the
record and deletes the workload; the record stays, so ``jobs()`` and ``attach()`` still
report the job (``kubectl delete configmap <job>`` forgets it).

A subclass renders manifests (``dryrun``), names the workload objects to delete, and
computes a job's status from its pods.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from kubernetes.client.exceptions import ApiException

from dsnb.backends.base import Backend, LogChunk, MetricChunk, Plan
from dsnb.backends.kubernetes import objects
from dsnb.backends.kubernetes.connection import Connection, connect
from dsnb.backends.kubernetes.diagnose import classify_object_events, event_time
from dsnb.backends.kubernetes.informer import Informer
from dsnb.backends.kubernetes.kueue import MANAGED_KINDS, pending_message, queue_labels
from dsnb.backends.kubernetes.labels import JOB, MANAGED_SELECTOR, job_labels
from dsnb.backends.kubernetes.logs import PodLogFollower, container_started, split_rank
from dsnb.backends.kubernetes.network_policy import network_policy
from dsnb.backends.kubernetes.pod_options import PodOptions
from dsnb.backends.kubernetes.pod_template import CONTAINER, REDACTED, secret_env_keys
from dsnb.backends.kubernetes.rbac import Permission
from dsnb.backends.kubernetes.workdir_bundle import SHIP_MODES, CodeBundle, local_directory, pack
from dsnb.backends.logbuffer import JobLogs
from dsnb.errors import ClusterError, InvalidSpecError, JobNotFound
from dsnb.metrics import sample_to_dict
from dsnb.runtime.pod_entry import Outcome
from dsnb.spec import JobSpec, redact_env
from dsnb.status import LAUNCHER_LINE_RANK, JobState, JobStatus, MetricSample

if TYPE_CHECKING:
    from dsnb.serving.spec import ServeSpec

KIND = "dsnb.io/kind"
BACKEND = "dsnb.io/backend"
CREATED = "dsnb.io/created-at"
#: The record's note of the Kueue LocalQueue the job waits in.
QUEUE = "dsnb.io/queue"
RECORD_SELECTOR = f"{MANAGED_SELECTOR},{KIND}=record"
SYNC_TIMEOUT_S = 30
EVENTS_EVERY_S = 5.0
#: Up to this many objects (waiting pods and the objects made for the job), their Warning Events are
#: listed one object at a time (``involvedObject.name``); past it, the namespace's Warnings at once.
PER_OBJECT_EVENT_LISTS = 8
#: Kinds of the objects made for a job whose Warning Events the status shows (their controllers
#: report there, and only there, what stops them: a refused pod, a name they cannot use).
OBJECT_EVENT_KINDS = ("StatefulSet", "MPIJob", "TrainJob", "JobSet", "Job", "RayJob", "RayCluster", "RayService")
READ_LIMIT = 5000
#: The record's key for the uids of the objects the job created (teardown deletes those only).
OBJECTS_KEY = "objects.json"
ARCHIVE_LOG_BYTES = 700_000
ARCHIVE_METRIC_BYTES = 250_000


def record_manifest(spec: JobSpec | ServeSpec, backend: str, files: dict[str, str], kind: str = "record") -> dict[str, Any]:
    """The record ConfigMap of a job (``kind`` ``"record"``) or of an endpoint: its spec (secrets shown
    as ``***``) and the files its pods mount.

    Example:
        >>> from dsnb import JobSpec
        >>> record = record_manifest(JobSpec(name="a-x1y2", script="t.py", env={"HF_TOKEN": "hf_x"}), "statefulset", {})
        >>> record["metadata"]["labels"]["dsnb.io/kind"], json.loads(record["data"]["spec.json"])["env"]
        ('record', {'HF_TOKEN': '***'})
    """
    data = spec.to_dict()
    data["env"] = redact_env(spec.env)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": spec.name,
            "labels": {**job_labels(spec.name), KIND: kind, BACKEND: backend},
            "annotations": {CREATED: f"{time.time():.3f}"},
        },
        "data": {"spec.json": json.dumps(data, indent=1), **files},
    }


@dataclasses.dataclass(frozen=True)
class EnvSecret:
    """The Secret holding a job's secret-looking env values, as a plan carries it.

    Attributes:
        name: the Secret's name (``<job>-env``), or None when the spec has no secret values.
        manifest: the Secret with its values shown as ``***`` (what the plan prints).
        values: ``{secret name: {key: value}}`` for ``plan.extra["secret_values"]`` (what apply creates).
        notes: a remark for the plan's notes.
    """

    name: str | None
    manifest: dict[str, Any] | None
    values: dict[str, dict[str, str]]
    notes: tuple[str, ...]


def env_secret(spec: JobSpec, namespace: str) -> EnvSecret:
    """The Secret for ``spec.env``'s secret-looking values (pods reference it with ``secretKeyRef``).

    Example:
        >>> from dsnb import JobSpec
        >>> secret = env_secret(JobSpec(name="a-x1y2", script="t.py", env={"HF_TOKEN": "hf_x"}), "ml")
        >>> secret.manifest["stringData"], secret.values
        ({'HF_TOKEN': '***'}, {'a-x1y2-env': {'HF_TOKEN': 'hf_x'}})
    """
    keys = secret_env_keys(spec.env)
    if not keys:
        return EnvSecret(None, None, {}, ())
    name = f"{spec.name}-env"
    manifest = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "namespace": namespace, "labels": job_labels(spec.name)},
                "stringData": {k: REDACTED for k in keys}}
    note = f"the Secret's values ({', '.join(keys)}) are shown as *** here; fill them in before applying"
    return EnvSecret(name, manifest, {name: {k: spec.env[k] for k in keys}}, (note,))


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one Kubernetes backend renders for a job; the record, the Secret and the NetworkPolicy
    every job gets are :meth:`KubernetesBackend.render`'s.

    Attributes:
        manifests: the backend's objects, in creation order (the namespace is filled in for them).
        notes: remarks for the top of the plan.
        files: more files for the record ConfigMap (its pods mount it).
        ingress: more ingress rules for the job's NetworkPolicy (``PodOptions(network_policy=True)``).
        code: the job's packed ``working_dir``, which :meth:`KubernetesBackend.assemble` ships in the
            ConfigMap ``<job>-code`` (the pods that run the job's code mount it); None when it ships none.
    """

    manifests: list[dict[str, Any]]
    notes: list[str]
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    ingress: list[dict[str, Any]] | None = None
    code: CodeBundle | None = None


def code_of(spec: JobSpec, mode: str = "auto") -> CodeBundle | None:
    """The packed ``working_dir`` a job ships to its pods (see :mod:`.workdir_bundle`), or None when it has
    none, or names a path in the image.

    Example:
        >>> code_of(JobSpec(name="a", script="train.py", working_dir="/app")) is None
        True

    Raises:
        InvalidSpecError: ``working_dir`` cannot be shipped (no such directory, past the limits), or a
            relative ``script`` is not among the files shipped.
    """
    source = local_directory(spec.working_dir, mode)
    if source is None:
        return None
    code = pack(source)
    script = spec.script
    if script is not None and not os.path.isabs(script) and os.path.normpath(script).replace(os.sep, "/") not in code.files:
        raise InvalidSpecError("script", f"{script!r} is not among the files shipped from working_dir {code.source!r}",
                               "check the path (relative to working_dir), and that no .gitignore leaves it out")
    return code


def _made_objects(record: dict[str, Any]) -> dict[str, str]:
    """``{"Kind/name": uid}`` of the objects the job's apply created, as its record keeps them."""
    try:
        made = json.loads((record.get("data") or {}).get(OBJECTS_KEY) or "{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in made.items()} if isinstance(made, dict) else {}


def _not_held(e: ApiException) -> str:
    """The permissions an escalation refusal lists ("attempting to grant RBAC permissions not currently held")."""
    try:
        message = json.loads(e.body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        return ""
    _, found, rest = message.partition("not currently held:")
    return " ".join(rest.split()) if found else ""


def _api_message(e: ApiException) -> str:
    """The API server's message in a refusal (its Status object's), else the HTTP reason."""
    try:
        return str(json.loads(e.body).get("message", e.reason or ""))
    except (TypeError, ValueError, AttributeError):
        return e.reason or ""


def _bounded_jsonl(rows: list[Any], limit: int) -> str:
    """The last rows that fit in ``limit`` bytes, one JSON document per line."""
    kept: list[str] = []
    size = 0
    for row in reversed(rows):
        text = json.dumps(row, separators=(",", ":"))
        size += len(text) + 1
        if size > limit:
            break
        kept.append(text)
    return "\n".join(reversed(kept))


class KubernetesBackend(Backend):
    """The shared part of the Kubernetes backends.

    Args:
        namespace: where jobs go (default: the kubeconfig context's, else ``default``).
        kubeconfig: a kubeconfig file (default ``$KUBECONFIG`` or ``~/.kube/config``).
        context: a kubeconfig context (default: the current one).
        in_cluster: use the pod's service account (default: when running in a pod).
        configuration: a ready ``kubernetes.client.Configuration`` instead of a file.
        pod_options: :class:`PodOptions` (or a dict of its fields) for every pod.
        cancel_wait: seconds ``cancel`` waits for the job's pods to be gone.
        ship_working_dir: ``"auto"`` (default): a ``working_dir`` that is a directory on this machine is
            shipped to the pods in a ConfigMap (:mod:`.workdir_bundle`), an absolute one that is not
            is a path in the image; ``"always"``: it must be a directory here; ``"never"``: it is a
            path in the image.

    ``dryrun`` never contacts the cluster: it only reads the kubeconfig for the namespace.
    """

    #: What the backend does in the namespace (checked by ``check()``, printed by ``dsnb rbac``).
    permissions: tuple[Permission, ...] = ()
    #: The kind of the object Kueue manages for a job of this backend (see :mod:`.kueue`).
    managed_kind: str = ""
    #: How to install what the backend needs in the cluster (an operator), for error messages.
    install_hint = ""
    #: How to upgrade an operator whose CRD lacks fields dsnb sets, for error messages.
    upgrade_hint = ""
    #: The container whose log holds the job's output.
    container_name = CONTAINER
    #: Whether one launcher's log carries every rank's output (mpirun), so failures are read from it.
    launcher_logs = False
    #: (group, version, plural) of the custom object whose status the backend reads, if any.
    workload_resource: tuple[str, str, str] | None = None
    #: The workload's kinds, deleted when the job ends: (apiVersion, kind, name suffix).
    workload: tuple[tuple[str, str, str], ...] = ()
    #: The ``dsnb.io/backend`` label of the backend's records; its name unless records made by an
    #: earlier release carry another (those must stay visible).
    record_label = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("record_label"):
            cls.record_label = cls.name

    def __init__(
        self,
        namespace: str | None = None,
        kubeconfig: str | os.PathLike[str] | None = None,
        context: str | None = None,
        in_cluster: bool | None = None,
        configuration: Any = None,
        pod_options: PodOptions | dict[str, Any] | None = None,
        cancel_wait: float = 60.0,
        ship_working_dir: str = "auto",
    ) -> None:
        if ship_working_dir not in SHIP_MODES:
            raise InvalidSpecError("ship_working_dir", f"{ship_working_dir!r} is not one of {', '.join(SHIP_MODES)}",
                                   "use 'auto' (ship a local directory), 'always' or 'never' (a path in the image)", spec="Cluster")
        self.ship_working_dir = ship_working_dir
        if isinstance(pod_options, dict):
            pod_options = PodOptions(**pod_options)
        self.pod_options = pod_options or PodOptions()
        self.cancel_wait = cancel_wait
        self._namespace = namespace
        self._connect_args = {"kubeconfig": kubeconfig, "context": context, "in_cluster": in_cluster,
                              "configuration": configuration}
        self._conn: Connection | None = None
        self._lock = threading.RLock()
        self._informers: dict[str, Informer] = {}
        self._logs: dict[str, JobLogs] = {}
        self._followers: dict[str, dict[str, PodLogFollower]] = {}
        self._finalizing: dict[str, threading.Lock] = {}
        self._specs: dict[str, JobSpec] = {}
        self._events: dict[str, tuple[float, dict[str, list[dict[str, Any]]]]] = {}
        self._ended: dict[str, JobStatus] = {}  # jobs this backend ended, until the watch shows it

    # -- connection ------------------------------------------------------------------------
    @property
    def conn(self) -> Connection:
        """The API connection, made on first use.

        Raises:
            ClusterError: no usable kubeconfig or in-cluster configuration.
        """
        with self._lock:
            if self._conn is None:
                self._conn = connect(namespace=self._namespace, **self._connect_args)
            return self._conn

    @property
    def namespace(self) -> str:
        """The namespace jobs go to; reading it does not contact the cluster."""
        if self._namespace is None:
            try:
                self._namespace = self.conn.namespace
            except ClusterError:
                return "default"  # a dry run without any cluster configured
        return self._namespace

    def api_error(self, e: ApiException, doing: str) -> ClusterError:
        """A clear error for a refused request: what was refused, and how to fix it."""
        where = f"namespace {self.namespace!r} on {self.conn.host}"
        known = self._refusal(e, doing, where)
        if known is not None:
            return known
        fields = objects.unknown_fields(e)
        if fields is not None:
            return ClusterError(where, f"could not {doing}: the cluster's CustomResourceDefinition does not know "
                                       f"{', '.join(fields) or 'some fields'} (its operator is older than the version dsnb renders for)",
                                self.upgrade_hint or "upgrade the operator (dsnb check shows the versions it expects)")
        return ClusterError(where, f"could not {doing}: {e.status} {_api_message(e)}", "see the message; check the spec and PodOptions")

    def _refusal(self, e: ApiException, doing: str, where: str) -> ClusterError | None:
        """The error for a refusal with a known fix (not allowed, no namespace, no operator, bad credentials), or None."""
        if e.status == 403:
            held = _not_held(e)  # a Role or RoleBinding granting more than the user holds (RBAC's escalation check)
            return ClusterError(where, f"not allowed to {doing}" + (f": it grants what you do not hold: {held}" if held else ""),
                                f"ask for the Role that `dsnb rbac --backend {self.name} --user <you>` prints")
        if e.status == 404 and "namespaces" in str(e.body or ""):
            return ClusterError(where, "the namespace does not exist", f"kubectl create namespace {self.namespace}")
        if e.status == 404 and self.install_hint and "could not find the requested resource" in str(e.body or ""):
            return ClusterError(self.conn.host, f"could not {doing}: the API does not serve that kind (the operator is not installed)",
                                f"install it: {self.install_hint} (dsnb check --backend {self.name} shows what is missing)")
        if e.status == 401:
            return ClusterError(self.conn.host, "the credentials were refused", "log in again (refresh your kubeconfig)")
        return None

    def _unreachable(self, informer: Informer) -> ClusterError:
        error = informer.error
        if isinstance(error, ApiException):
            return self.api_error(error, "list and watch its objects")
        return ClusterError(f"the Kubernetes API at {self.conn.host}", f"did not answer within {SYNC_TIMEOUT_S} s ({error})",
                            "check the cluster is up and your kubeconfig points at it (kubectl get pods)")

    def _informer(self, kind: str) -> Informer:
        """The watch cache of ``"pods"``, ``"records"`` or ``"workloads"`` (the backend's custom objects)."""
        with self._lock:
            if kind not in self._informers:
                if kind == "pods":
                    informer = Informer(self.conn.core.list_namespaced_pod, self.namespace, label_selector=MANAGED_SELECTOR)
                elif kind == "records":
                    informer = Informer(self.conn.core.list_namespaced_config_map, self.namespace, label_selector=RECORD_SELECTOR)
                else:
                    group, version, plural = self.workload_resource  # type: ignore[misc]
                    informer = Informer(self.conn.custom.list_namespaced_custom_object, group, version, self.namespace, plural,
                                        label_selector=MANAGED_SELECTOR)
                self._informers[kind] = informer.start()
            informer = self._informers[kind]
        if not informer.wait_synced(SYNC_TIMEOUT_S):
            raise self._unreachable(informer)
        if informer.refused is not None:  # listed, but the watch that keeps the cache current is refused
            what = {"pods": "pods", "records": "ConfigMaps (job records)"}.get(kind) or self.workload_resource[2]  # type: ignore[index]
            raise self.api_error(informer.refused, f"watch {what}")
        return informer

    # -- records ---------------------------------------------------------------------------
    def _record(self, name: str) -> dict[str, Any]:
        record = self._informer("records").get(name)
        if record is None or (record["metadata"].get("labels") or {}).get(BACKEND) != self.record_label:
            raise JobNotFound(name, self.name, self._names())
        return record

    def _names(self) -> list[str]:
        return sorted(r["metadata"]["name"] for r in self._informer("records").items()
                      if (r["metadata"].get("labels") or {}).get(BACKEND) == self.record_label)

    def job_pods(self, name: str) -> list[dict[str, Any]]:
        """The job's pods (those labelled with its name), from the pods' watch cache.

        Raises:
            ClusterError: the pods may not be listed or watched.
        """
        return self._informer("pods").items(lambda p: (p["metadata"].get("labels") or {}).get(JOB) == name)

    def _log_pods(self, name: str) -> list[dict[str, Any]]:
        return [pod for pod in self.job_pods(name) if self.logs_from(pod)]

    def spec_of(self, name: str) -> JobSpec:
        if name not in self._specs:
            self._specs[name] = JobSpec.from_dict(json.loads(self._record(name)["data"]["spec.json"]))
        return self._specs[name]

    # -- submitting ------------------------------------------------------------------------
    def apply(self, plan: Plan) -> None:
        """Create the record, then every other manifest owned by it; undo all on a refusal.

        Secrets are shown as ``***`` in ``plan.manifests``; their values come from ``plan.extra``.
        """
        record, rest = plan.manifests[0], plan.manifests[1:]
        secret_values = plan.extra.get("secret_values", {})
        try:
            created = objects.create(self.conn, record)
        except ApiException as e:
            if e.status == 409:
                raise InvalidSpecError("name", f"a job called {plan.name!r} exists already", "submit again (a new suffix is drawn)") from e
            raise self.api_error(e, f"create ConfigMap {plan.name!r}") from e
        owner = objects.owner_reference(created)
        made: dict[str, str] = {}
        for manifest in rest:
            body = {**manifest, "metadata": {**manifest["metadata"], "ownerReferences": [owner]}}
            if manifest["kind"] == "Secret":
                body["stringData"] = secret_values[manifest["metadata"]["name"]]
            try:
                made[f"{manifest['kind']}/{manifest['metadata']['name']}"] = objects.create(self.conn, body)["metadata"]["uid"]
            except ApiException as e:
                objects.delete(self.conn, "v1", "ConfigMap", plan.name)  # collects what was created
                raise self.api_error(e, f"create {manifest['kind']} {manifest['metadata']['name']!r}") from e
        try:  # what the job's end may delete: these objects, by uid, and nothing else of those names
            objects.patch_config_map_data(self.conn, plan.name, {OBJECTS_KEY: json.dumps(made, separators=(",", ":"))})
        except ApiException as e:
            objects.delete(self.conn, "v1", "ConfigMap", plan.name)
            raise self.api_error(e, f"patch ConfigMap {plan.name!r}") from e
        self._specs[plan.name] = plan.spec
        if (record["metadata"].get("labels") or {}).get(KIND) == "record":  # a job's record, which the records' watch sees
            self._await_cached(plan.name)

    def _await_cached(self, name: str) -> None:
        """Wait (up to ``SYNC_TIMEOUT_S``) until the records' watch has brought the record just created.

        The API server answers a create before its watchers hear of it, so without this a
        ``status()`` right after ``submit`` could say the job does not exist.
        """
        records = self._informer("records")
        deadline = time.monotonic() + SYNC_TIMEOUT_S
        version = records.version
        while records.get(name) is None and (left := deadline - time.monotonic()) > 0:
            version = records.wait_for_change(version, left)

    # -- rendering -------------------------------------------------------------------------
    def render(self, spec: JobSpec) -> Plan:
        """The job's record ConfigMap, the Secret of its secret env values (if any), the backend's
        :meth:`render_workload`, and with ``PodOptions(network_policy=True)`` its NetworkPolicy, all in
        the namespace; nothing is created.

        Raises:
            InvalidSpecError: the spec cannot run on this backend (see :meth:`render_workload`).
        """
        code = code_of(spec, self.ship_working_dir)
        secret = env_secret(spec, self.namespace)
        work = self.render_workload(spec, secret, code)
        plan = self.assemble(spec, record_manifest(spec, self.record_label, work.files), secret, work)
        if spec.working_dir and code is None:
            plan.notes.append(f"working_dir {spec.working_dir!r} is a path in the image (it is not a directory here): "
                              "the code must be in the image")
        return plan

    def assemble(self, spec: JobSpec, record: dict[str, Any], secret: EnvSecret, work: Workload) -> Plan:
        """The plan of ``spec``: in creation order the ``record`` (which owns the rest), the ``secret`` (if the
        spec has secret values), the ConfigMap ``<job>-code`` of the ``work``'s code (if it ships some), the
        ``work``'s manifests and, with ``PodOptions(network_policy=True)``, the NetworkPolicy, all in the
        namespace; the notes of ``work``, its code and ``secret``.

        Raises:
            Nothing: no cluster is contacted (the namespace comes from the kubeconfig, else ``default``).
        """
        namespace = self.namespace
        name = record["metadata"]["name"]
        code = [work.code.config_map(name, {**job_labels(name), KIND: "code"})] if work.code else []
        manifests = [record, *([secret.manifest] if secret.manifest else []), *code, *work.manifests]
        self._queue(record, work.manifests)
        if self.pod_options.network_policy:
            manifests.append(network_policy(name, namespace, work.ingress))
        for manifest in manifests:
            manifest["metadata"]["namespace"] = namespace
        return Plan(backend=self.name, spec=spec, manifests=manifests,
                    notes=[*work.notes, *(work.code.notes(name) if work.code else []), *secret.notes],
                    extra={"secret_values": secret.values})

    def _queue(self, record: dict[str, Any], manifests: list[dict[str, Any]]) -> None:
        """With ``PodOptions(queue=...)``, label the object Kueue manages and note the queue in the record.

        Raises:
            InvalidSpecError: none of ``manifests`` is of a kind Kueue manages (a RayService).
        """
        labels = queue_labels(self.pod_options)
        if not labels:
            return
        managed = [m for m in manifests if m.get("kind") in MANAGED_KINDS]
        if not managed:
            kinds = ", ".join(sorted({m.get("kind", "?") for m in manifests}))
            raise InvalidSpecError("options.queue", f"Kueue manages none of this plan's objects ({kinds})",
                                   "leave queue unset here; Kueue queues StatefulSets, MPIJobs, TrainJobs and RayJobs")
        for manifest in managed:
            manifest["metadata"].setdefault("labels", {}).update(labels)
        record["metadata"].setdefault("annotations", {})[QUEUE] = self.pod_options.queue

    @abc.abstractmethod
    def render_workload(self, spec: JobSpec, secret: EnvSecret, code: CodeBundle | None = None) -> Workload:
        """The backend's own objects for ``spec`` (which carries its unique name), whose pods take the
        secret env values from ``secret``, and, when ``code`` is given, mount and unpack it (the
        returned :class:`Workload` carries it on, for :meth:`assemble` to ship).

        Raises:
            InvalidSpecError: the spec cannot run on this backend (the field and fix named).
        """

    # -- status ----------------------------------------------------------------------------
    @abc.abstractmethod
    def compute_status(self, name: str, spec: JobSpec, created_at: float | None, pods: list[dict[str, Any]],
                       events: dict[str, list[dict[str, Any]]] | None = None,
                       workload: dict[str, Any] | None = None) -> JobStatus:
        """The status of a running job from its pods, their recent events and the workload
        object (an MPIJob, a TrainJob) where the backend has one (pure; no API calls)."""

    def _waiting_events(self, name: str, pods: list[dict[str, Any]]) -> tuple[dict[str, list[dict[str, Any]]],
                                                                              dict[tuple[str, str], list[dict[str, Any]]]]:
        """Events of the job's pods that have not started (a mount or pull problem shows only there),
        and of the objects made for the job (a controller that cannot go on says so only there:
        a refused pod, a name it cannot use), each oldest first.

        Read at most every ``EVENTS_EVERY_S`` per job, while the job is pending or starting; events
        are best effort (without the permission, the diagnosis uses pod status alone).
        """
        now = time.monotonic()
        cached = self._events.get(name)
        if cached is not None and now - cached[0] < EVENTS_EVERY_S:
            return cached[1]
        waiting = {p["metadata"]["name"] for p in pods if not container_started(p, self.container_name)}
        made_for_job = {name, f"{name}-launcher", f"{name}-launcher-0", f"{name}-node-0"}  # the workload and its Jobs
        on_pods: dict[str, list[dict[str, Any]]] = {}
        on_objects: dict[tuple[str, str], list[dict[str, Any]]] = {}
        # Warnings only (what the diagnosis reads): a busy namespace's events are mostly Normal ones. Asked
        # per object while that is a few requests; for a large job one list of the namespace's Warnings is fewer.
        asked = sorted(waiting | made_for_job)
        selectors = ([f"type=Warning,involvedObject.name={n}" for n in asked] if len(asked) <= PER_OBJECT_EVENT_LISTS
                     else ["type=Warning"])
        for event in self._warning_events(selectors):
            involved = event.get("involvedObject") or {}
            kind, involved_name = involved.get("kind"), involved.get("name")
            if kind == "Pod" and involved_name in waiting:
                on_pods.setdefault(involved_name, []).append(event)
            elif kind in OBJECT_EVENT_KINDS and involved_name in made_for_job:
                on_objects.setdefault((kind, involved_name), []).append(event)
        for events in [*on_pods.values(), *on_objects.values()]:
            events.sort(key=event_time)
        self._events[name] = (now, (on_pods, on_objects))
        return on_pods, on_objects

    def _warning_events(self, selectors: list[str]) -> list[dict[str, Any]]:
        """The namespace's events matching any of ``selectors``; what was read before a refusal (best effort)."""
        found: list[dict[str, Any]] = []
        try:
            for selector in selectors:
                response = self.conn.core.list_namespaced_event(self.namespace, field_selector=selector, _preload_content=False)
                found += objects.read_json(response).get("items") or []
        except ApiException:
            pass
        return found

    def _object_problem(self, current: JobStatus, on_objects: dict[tuple[str, str], list[dict[str, Any]]]) -> JobStatus:
        """``current``, unless a controller reported that it cannot go on with the job's objects."""
        for (kind, object_name), events in sorted(on_objects.items()):
            problem = classify_object_events(kind, object_name, events)
            if problem is None:
                continue
            if not problem.fatal:
                return dataclasses.replace(current, message=str(problem))
            return dataclasses.replace(current, state=JobState.FAILED, message=str(problem), replicas=tuple(
                dataclasses.replace(r, state=JobState.FAILED) for r in current.replicas))
        return current

    def status(self, name: str) -> JobStatus:
        record = self._record(name)
        if name in self._ended:  # ended here: the watch may not have brought the record's update yet
            return self._ended[name]
        final = record.get("data", {}).get("status.json")
        if final:
            return JobStatus.from_dict(json.loads(final))
        created = float(record["metadata"].get("annotations", {}).get(CREATED, "0") or 0) or None
        pods = self.job_pods(name)
        workload = self.workload_state(name, record)
        current = self.compute_status(name, self.spec_of(name), created, pods, None, workload)
        if current.state in (JobState.PENDING, JobState.STARTING):
            on_pods, on_objects = self._waiting_events(name, pods)
            if on_pods:
                current = self.compute_status(name, self.spec_of(name), created, pods, on_pods, workload)
            if current.state in (JobState.PENDING, JobState.STARTING):
                current = self._object_problem(current, on_objects)
            current = self._queued(name, record, current)
        if current.state == JobState.FAILED and current.failed_rank is None and self.launcher_logs:
            current = self._failure_from_launcher(name, current)
        if current.state.is_terminal():
            return self._finalize(name, current)
        return current

    def _queued(self, name: str, record: dict[str, Any], current: JobStatus) -> JobStatus:
        """``current``, or PENDING with Kueue's reason while Kueue holds a job put in a queue."""
        queue = (record["metadata"].get("annotations") or {}).get(QUEUE)
        if not queue:
            return current
        waiting = pending_message(self.conn, self.namespace, queue, self.managed_kind, name)
        return current if waiting is None else dataclasses.replace(current, state=JobState.PENDING, message=waiting)

    def workload_state(self, name: str, record: dict[str, Any]) -> dict[str, Any] | None:
        """What ``compute_status`` reads beside the pods: the backend's custom object, if it has one."""
        return self._informer("workloads").get(name) if self.workload_resource else None

    def end_of_logs(self, name: str, logs: JobLogs, record: dict[str, Any]) -> None:
        """Add to ``logs``, before they are archived, what the job kept of its output elsewhere (its record)."""

    def _failure_from_launcher(self, name: str, failed: JobStatus) -> JobStatus:
        """Name the failing rank, its exit code and last lines from the launcher's output
        (mpirun reports the first process that exited non-zero)."""
        outcome = Outcome(node=0, procs_per_node=self.spec_of(name).procs_per_node)
        lines, _ = self._collect_logs(name).read(0, None, 10**9)
        for line in lines:
            outcome.feed(f"[1,{line.rank}]<stdout>:{line.text}" if line.rank >= 0 else line.text)
        if outcome.failed_rank is None:
            # mpirun failed before any rank did (ssh, daemons, hostfile): its own last lines say why.
            said = tuple(line.text for line in lines if line.rank == LAUNCHER_LINE_RANK and line.text.strip())[-20:]
            return dataclasses.replace(failed, last_lines=said) if said else failed
        report = outcome.report(1)
        code = outcome.rank_exit_code
        return dataclasses.replace(
            failed, failed_rank=report["failed_rank"], exit_code=code, last_lines=tuple(report["last_lines"]),
            message=f"rank {report['failed_rank']} exited with code {code}; {failed.message}",
        )

    def jobs(self) -> list[JobStatus]:
        records = [r for r in self._informer("records").items()
                   if (r["metadata"].get("labels") or {}).get(BACKEND) == self.record_label]
        records.sort(key=lambda r: float(r["metadata"].get("annotations", {}).get(CREATED, "0") or 0), reverse=True)
        result = []
        for record in records:
            try:
                result.append(self.status(record["metadata"]["name"]))
            except JobNotFound:
                continue  # deleted meanwhile
            except (InvalidSpecError, ValueError, KeyError, TypeError) as e:
                result.append(self._unreadable(record, e))  # one odd record must not hide every other job
        return result

    def _unreadable(self, record: dict[str, Any], error: Exception) -> JobStatus:
        """What ``jobs()`` lists for a record this dsnb cannot read (a newer dsnb's, or a damaged one):
        its final status when it has one, else FAILED saying why; nothing of the job is touched."""
        name = record["metadata"]["name"]
        try:
            return JobStatus.from_dict(json.loads(record["data"]["status.json"]))
        except (KeyError, TypeError, ValueError):
            created = float((record["metadata"].get("annotations") or {}).get(CREATED, "0") or 0) or None
            return JobStatus(name=name, backend=self.name, state=JobState.FAILED, created_at=created,
                             message=f"this dsnb cannot read the job's record ({error}); it may come from a newer dsnb: "
                                     "look at it with that version, or remove it with kubectl delete configmap " + name)

    # -- ending ----------------------------------------------------------------------------
    def _finalize(self, name: str, final: JobStatus) -> JobStatus:
        """Record the final status, keep the logs' end, delete the workload (once)."""
        with self._lock:
            lock = self._finalizing.setdefault(name, threading.Lock())
        with lock:
            record = self._record(name)
            if name in self._ended:
                return self._ended[name]
            done = record.get("data", {}).get("status.json")
            if done:
                return JobStatus.from_dict(json.loads(done))
            logs = self._collect_logs(name)
            self.end_of_logs(name, logs, record)
            refused = [(pod, f.refused) for pod, f in self._followers.get(name, {}).items() if f.refused is not None]
            lines, _ = logs.read(0, None, 10**9)
            if refused:  # the job still ends and is cleaned up; its status says why it has no logs
                pod, error = refused[0]
                why = self.api_error(error, f"read the log of pod {pod!r}")  # type: ignore[arg-type]
                kept = "only the end each node kept in the job's record is shown" if lines else "its logs were not kept"
                final = dataclasses.replace(final, message=f"{final.message}; {kept}: {why}".lstrip("; "))
            samples, _ = logs.samples(0)
            archive = {
                "logs.jsonl": _bounded_jsonl([[ln.rank, round(ln.time, 6), ln.text] for ln in lines], ARCHIVE_LOG_BYTES),
                "metrics.jsonl": _bounded_jsonl([sample_to_dict(s) for s in samples], ARCHIVE_METRIC_BYTES),
            }
            try:
                objects.create(self.conn, {
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": f"{name}-logs", "labels": {**job_labels(name), KIND: "logs"},
                                 "ownerReferences": [objects.owner_reference({**record, "apiVersion": "v1", "kind": "ConfigMap"})]},
                    "data": archive,
                })
            except ApiException as e:
                if e.status != 409:
                    raise self.api_error(e, f"keep the logs of {name!r}") from e
            try:
                objects.patch_config_map_data(self.conn, name, {"status.json": json.dumps(final.to_dict())})
                made = _made_objects(record)
                for api_version, kind, suffix in self.workload:
                    uid = made.get(f"{kind}/{name + suffix}")
                    if uid is not None:  # only what this job created: an object of that name with another uid is left alone
                        objects.delete(self.conn, api_version, kind, name + suffix, uid=uid)
            except ApiException as e:
                raise self.api_error(e, f"end job {name!r}") from e
            self._stop_followers(name)
            self._ended[name] = final
            return final

    def stop_running(self, name: str, current: JobStatus) -> JobStatus:
        now = time.time()
        cancelled = JobStatus(
            name=name, backend=self.name, state=JobState.CANCELLED, replicas=tuple(
                type(r)(rank=r.rank, state=JobState.CANCELLED, host=r.host) for r in current.replicas),
            message="cancelled by the user", created_at=current.created_at,
            started_at=current.started_at, finished_at=now,
        )
        final = self._finalize(name, cancelled)
        pods = self._informer("pods")
        deadline = time.monotonic() + self.cancel_wait
        seen = pods.version
        while self.job_pods(name) and time.monotonic() < deadline:
            seen = pods.wait_for_change(seen, min(1.0, deadline - time.monotonic()))
        return final

    # -- logs and metrics ------------------------------------------------------------------
    def pod_node(self, pod: dict[str, Any]) -> int | None:
        """The node rank a pod runs (from its ordinal); None for a job-wide launcher."""
        return int(pod["metadata"]["name"].rsplit("-", 1)[1])

    def logs_from(self, pod: dict[str, Any]) -> bool:
        """Whether the ranks' output appears in this pod's log (MPI workers only run sshd)."""
        return True

    def _follow(self, name: str, logs: JobLogs, pod: dict[str, Any]) -> PodLogFollower:
        spec = self.spec_of(name)
        node = self.pod_node(pod)
        pod_name = pod["metadata"]["name"]
        pods = self._informer("pods")

        def sink(text: str, when: float) -> None:
            rank, line = split_rank(text, node, spec.procs_per_node)
            logs.add(rank, line, when)

        def wait(timeout: float) -> None:
            pods.wait_for_change(pods.version, timeout)

        return PodLogFollower(self.conn.core, self.namespace, pod_name, self.container_name, lambda: pods.get(pod_name), wait, sink)

    def _collect_logs(self, name: str) -> JobLogs:
        """Every line so far: live followers are finished, unread pods read once."""
        with self._lock:
            logs = self._logs.setdefault(name, JobLogs())
            followers = self._followers.setdefault(name, {})
            for pod in self._log_pods(name):
                pod_name = pod["metadata"]["name"]
                if pod_name not in followers:
                    followers[pod_name] = self._follow(name, logs, pod)
                followers[pod_name].finish()
            return logs

    def _stop_followers(self, name: str) -> None:
        for follower in self._followers.pop(name, {}).values():
            follower.stop()

    def job_logs(self, name: str) -> JobLogs:
        """The job's line buffer: live (following its pods) or loaded from the archive.

        Raises:
            JobNotFound: no such job.
            ClusterError: a pod's log or the archive may not be read.
        """
        record = self._record(name)
        ended = name in self._ended or bool(record.get("data", {}).get("status.json"))
        with self._lock:
            logs = self._logs.get(name)
            if logs is None:
                logs = self._logs[name] = JobLogs()
                if ended:
                    self._load_archive(name, logs)
                    return logs
            if ended:
                return logs
            followers = self._followers.setdefault(name, {})
            for pod in self._log_pods(name):
                pod_name = pod["metadata"]["name"]
                if pod_name not in followers:
                    follower = self._follow(name, logs, pod)
                    try:
                        follower.catch_up()
                    except ApiException as e:
                        if e.status in (401, 403):
                            raise self.api_error(e, f"read the log of pod {pod_name!r}") from e
                        # else not started yet: the follower retries
                    followers[pod_name] = follower.start()
            for pod_name, follower in followers.items():
                if follower.refused is not None:
                    raise self.api_error(follower.refused, f"read the log of pod {pod_name!r}")
        return logs

    def _load_archive(self, name: str, logs: JobLogs) -> None:
        try:
            archive = objects.read(self.conn, "v1", "ConfigMap", f"{name}-logs")
        except ApiException as e:
            raise self.api_error(e, f"read the logs of {name!r}") from e
        data = (archive or {}).get("data") or {}
        for row in data.get("logs.jsonl", "").splitlines():
            rank, when, text = json.loads(row)
            logs.add(rank, text, when, parse_metrics=False)
        logs.add_samples(MetricSample(**json.loads(row)) for row in data.get("metrics.jsonl", "").splitlines())

    def read_logs(self, name: str, cursor: Any = None, rank: int | None = None) -> LogChunk:
        lines, position = self.job_logs(name).read(cursor or 0, rank, READ_LIMIT)
        return LogChunk(lines=lines, cursor=position)

    def read_log_tail(self, name: str, count: int, rank: int | None = None) -> LogChunk:
        lines, position = self.job_logs(name).tail(count, rank)
        return LogChunk(lines=lines, cursor=position)

    def read_metrics(self, name: str, cursor: Any = None) -> MetricChunk:
        samples, position = self.job_logs(name).samples(cursor or 0)
        return MetricChunk(samples=samples, cursor=position)

    def close(self) -> None:
        with self._lock:
            for name in list(self._followers):
                self._stop_followers(name)
            for informer in self._informers.values():
                informer.stop()
            self._informers.clear()
            self._logs.clear()
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def operator_checks(self, conn: Connection) -> list[Any]:
        """Preflight lines for what the backend relies on in the cluster (CRDs, operators)."""
        return []

    def pods_for(self, spec: JobSpec) -> int:
        """How many pods of ``spec`` ask for ``resources`` (the GPU check counts them)."""
        return spec.nodes

    def spec_checks(self, spec: JobSpec) -> list[Any]:
        """Preflight lines about ``spec`` on this cluster: whether the served CRD takes every field dsnb sets."""
        from dsnb.backends.kubernetes.preflight import check_fields

        if self.workload_resource is None:
            return []
        try:
            plan = self.dryrun(spec)
        except InvalidSpecError:
            return []  # the spec's own problem is raised when it is submitted
        plural = self.workload_resource[2]
        return [check_fields(self.conn, self.namespace, m, self.upgrade_hint) for m in plan.manifests
                if m["kind"] in objects.CUSTOM_KINDS and objects.plural(m["kind"]) == plural]

    def memory_there(self, spec: JobSpec | None = None) -> Any:
        """The GPU and CPU memory a pod of ``spec`` gets (``dsnb.fit.MemoryThere``): node labels and allocatable."""
        from dsnb.backends.kubernetes.preflight import memory_there

        try:
            conn = self.conn
        except ClusterError as e:
            from dsnb.fit import MemoryThere

            return MemoryThere(source=f"no cluster to ask ({e})")
        return memory_there(conn, spec)

    def check(self, spec: JobSpec | None = None) -> Any:
        """A PreflightReport: API, namespace, each permission, and GPU nodes for a GPU ``spec``."""
        from dsnb.backends.kubernetes.preflight import run_preflight

        return run_preflight(self, spec)
