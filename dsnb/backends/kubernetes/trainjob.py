"""``Cluster("trainjob")``: a Kubeflow Trainer TrainJob (``trainer.kubeflow.org/v1alpha1``).

The TrainJob names a training runtime (by default the ``deepspeed-distributed``
ClusterTrainingRuntime, which runs DeepSpeed over Open MPI with the launcher acting as a node).
The Trainer turns runtime + TrainJob into a JobSet, writes ``/etc/mpi/hostfile`` and the
ssh keys, and starts the pods (where the ranks land: :mod:`~dsnb.backends.kubernetes.trainer_layout`); dsnb fills the trainer part (image, the launcher's ``mpirun``
command, env, ``numNodes``, ``numProcPerNode``, ``resourcesPerNode``) and adds the pod
options and its labels through ``runtimePatches``. The manifest is built and checked with the
Kubeflow SDK's models (``kubeflow_trainer_api``).

Example:
    >>> from dsnb import Cluster, JobSpec
    >>> spec = JobSpec(name="tiny-gpt", script="train.py", nodes=2, procs_per_node=2, image="ghcr.io/org/train:1")
    >>> plan = Cluster("trainjob", namespace="ml").dryrun(spec)
    >>> trainjob = plan.manifests[-1]
    >>> trainjob["spec"]["runtimeRef"]["name"], trainjob["spec"]["trainer"]["numNodes"]
    ('deepspeed-distributed', 2)
"""

from __future__ import annotations

import json
from typing import Any

import urllib3
from kubeflow_trainer_api import models
from kubernetes.client.exceptions import ApiException

from dsnb.backends.base import Plan
from dsnb.backends.kubernetes.backend import EnvSecret, KubernetesBackend, Workload
from dsnb.backends.kubernetes.labels import ROLE, job_labels
from dsnb.backends.kubernetes.labels import role as pod_role
from dsnb.backends.kubernetes.mpijob import launch_spec, mpirun_argv, rank_env
from dsnb.backends.kubernetes.name_limits import check_derived_names
from dsnb.backends.kubernetes.pod_status import started_at, terminating
from dsnb.backends.kubernetes.pod_template import build_pod_template
from dsnb.backends.kubernetes.rbac import TRAINJOB_PERMISSIONS
from dsnb.backends.kubernetes.serving import SERVICE_SUFFIX, KubernetesExposure
from dsnb.backends.kubernetes.status_rules import first_status
from dsnb.backends.kubernetes.trainer_layout import node_pods
from dsnb.backends.kubernetes.trainjob_status import RULES, RUNTIME_CONTAINER, TrainReading, hostname
from dsnb.backends.kubernetes.workdir_bundle import CodeBundle, code_volumes
from dsnb.backends.options import BUILTIN_OPTIONS
from dsnb.backends.profiles import BUILTIN_PROFILES
from dsnb.errors import ClusterError, InvalidSpecError
from dsnb.serving.job_serving import EndpointsAsJobs, JobEndpoints
from dsnb.spec import JobSpec
from dsnb.status import JobStatus

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
RUNTIME_KINDS = ("ClusterTrainingRuntime", "TrainingRuntime")
#: The runtime's container that the trainer settings apply to, and its replicated jobs.
REPLICATED_JOBS = ("launcher", "node")
PATCH_MANAGER = "dsnb.io/pod-options"
REQUEST_TIMEOUT_S = 10
JOB_INDEX = "batch.kubernetes.io/job-completion-index"
TRAINER_INSTALL = 'kubectl apply --server-side -k "https://github.com/kubeflow/trainer.git/manifests/overlays/manager?ref=v2.3.0"'
RUNTIMES_INSTALL = 'kubectl apply --server-side -k "https://github.com/kubeflow/trainer.git/manifests/overlays/runtimes?ref=v2.3.0"'


class TrainJobBackend(EndpointsAsJobs, KubernetesBackend):
    """DeepSpeed on a Kubeflow Trainer TrainJob; see the module docstring.

    Serving (``cluster.serve``) adds a Service ``<job>-serve`` in front of the pod of rank 0: the
    launcher on a runtime that runs it as a node, as ``deepspeed-distributed`` does, else node 0
    (see :mod:`~dsnb.backends.kubernetes.trainer_layout`). A TrainJob's
    ``runtimePatches`` may only set a container's env, mounts and security context, so no
    port or probe can be added from the TrainJob; readiness is read from rank 0's
    ``DSNB_SERVE`` lines in the launcher's log.

    Args:
        runtime: the training runtime to use.
        runtime_kind: ``"ClusterTrainingRuntime"`` (cluster-wide) or ``"TrainingRuntime"``
            (in the job's namespace).
        serve_url: where endpoints answer instead of the in-cluster URL; see
            :class:`~dsnb.backends.kubernetes.serving.KubernetesExposure`.
        **options: see :class:`~dsnb.backends.kubernetes.backend.KubernetesBackend`.

    Raises:
        InvalidSpecError: an unknown runtime kind or an empty runtime name.
    """

    name = "trainjob"
    managed_kind = "TrainJob"
    options = BUILTIN_OPTIONS["trainjob"]
    profiles = BUILTIN_PROFILES["trainjob"]
    permissions = TRAINJOB_PERMISSIONS
    workload_resource = (GROUP, VERSION, PLURAL)
    launcher_logs = True
    container_name = RUNTIME_CONTAINER
    install_hint = TRAINER_INSTALL
    # runtimePatches (labels, volumes, scheduling) and activeDeadlineSeconds exist from Trainer v2.2;
    # v2.0 had podSpecOverrides, v2.1 podTemplateOverrides (the CRDs at each tag).
    upgrade_hint = f"dsnb renders TrainJobs for Kubeflow Trainer v2.2 or later (v2.3.0 tested): upgrade it: {TRAINER_INSTALL}"
    workload = ((f"{GROUP}/{VERSION}", "TrainJob", ""), (f"{GROUP}/{VERSION}", "TrainingRuntime", ""),
                ("v1", "Service", SERVICE_SUFFIX), ("v1", "Secret", "-env"), ("v1", "ConfigMap", "-code"))
    probe_is_readyz = False
    readiness_note = ("readiness: the last DSNB_SERVE line of rank 0 in the launcher's log (a TrainJob cannot add "
                      "probes to the runtime's pods)")

    def __init__(self, runtime: str = "deepspeed-distributed", runtime_kind: str = "ClusterTrainingRuntime",
                 serve_url: str | None = None, **options: Any) -> None:
        if runtime_kind not in RUNTIME_KINDS:
            raise InvalidSpecError("runtime_kind", f"unknown kind {runtime_kind!r}", f"use one of {', '.join(RUNTIME_KINDS)}")
        if not runtime:
            raise InvalidSpecError("runtime", "is empty", "name a runtime, e.g. 'deepspeed-distributed' (see cluster.runtimes())")
        super().__init__(**options)
        self.runtime = runtime
        self.runtime_kind = runtime_kind
        self._runtime: dict[str, Any] | None = None  # the runtime the jobs name, once read
        self.job_endpoints = JobEndpoints(self, KubernetesExposure(self, serve_url))

    # -- rendering -------------------------------------------------------------------------
    def _patches(self, spec: JobSpec, code: CodeBundle | None = None) -> list[dict[str, Any]]:
        """Pod options, dsnb's labels and the shipped code's volumes, as a runtime patch on both replicated jobs
        (both run ranks on a runtime that runs the launcher as a node)."""
        # NET_BIND_SERVICE: the pods run sshd, which images built like the MPI Operator's carry with that file capability.
        template = build_pod_template(spec, ["true"], {}, self.pod_options, add_capabilities=("NET_BIND_SERVICE",),
                                      volumes=code_volumes(spec.name) if code is not None else None)
        pod = template["spec"]
        container = pod["containers"][0]
        allowed = ("nodeSelector", "tolerations", "affinity", "imagePullSecrets", "serviceAccountName", "volumes", "securityContext")
        pod_patch = {key: pod[key] for key in allowed if pod.get(key)}
        # The security context as on every backend (the v2.3.0 CRD lets a patch set the pod's and the container's).
        patched_container = {"name": RUNTIME_CONTAINER, "volumeMounts": container["volumeMounts"],
                             **({"securityContext": container["securityContext"]} if container.get("securityContext") else {})}
        jobs = []
        for role in REPLICATED_JOBS:
            jobs.append({"name": role, "template": {"spec": {"template": {
                "metadata": {"labels": {**job_labels(spec.name), ROLE: role}},
                "spec": {**pod_patch, "containers": [dict(patched_container)]},
            }}}})
        return [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": jobs}}}}]

    def apply(self, plan: Plan) -> None:
        """Create the job from a TrainingRuntime of its own: the named runtime, with the job's image and restarts.

        Kubeflow Trainer v2.3.0 gives the job's image and command to the launcher only
        (``pkg/runtime/framework/plugins/jobset/builder.go``; kubeflow/trainer#4030), so ``node`` pods
        would run the runtime's image, without the job's code; and JobSet v0.12.0 defaults every pod to
        ``restartPolicy: OnFailure`` with the Jobs' default ``backoffLimit`` of 6
        (``pkg/webhooks/jobset_webhook.go``), so a failed ``mpirun`` would train again in place. The
        TrainJob's ``runtimePatches`` can change neither, so the TrainJob names a TrainingRuntime
        ``<job>`` (:func:`own_runtime`), made in the job's namespace and deleted when it ends.

        Raises:
            InvalidSpecError: the named runtime cannot be read (so it cannot be copied).
        """
        runtime = self.base_runtime()
        if runtime is None:
            raise InvalidSpecError("runtime", f"the {self.runtime_kind} {self.runtime!r} cannot be read: dsnb runs a TrainJob "
                                              "from a copy of it, with your image on every pod and your max_restarts",
                                   "check its name (cluster.runtimes()), or ask for read access to it (Trainer's "
                                   "kubeflow-platform install gives it to every user)")
        trainjob = next(m for m in plan.manifests if m["kind"] == "TrainJob")
        own = own_runtime(runtime, plan.name, self.namespace, plan.spec.image, plan.spec.max_restarts)
        plan.manifests.insert(plan.manifests.index(trainjob), own)
        trainjob["spec"]["runtimeRef"] = {"apiGroup": GROUP, "kind": "TrainingRuntime", "name": plan.name}
        super().apply(plan)

    def render_workload(self, spec: JobSpec, secret: EnvSecret, code: CodeBundle | None = None) -> Workload:
        check_derived_names(spec.name, jobset_pod_names(spec.name, spec.nodes), "JobSet's pods")
        name, namespace = spec.name, self.namespace
        env = rank_env(spec, code)
        spec = launch_spec(spec, code)
        exported = [*env, *spec.env, *self.pod_options.nccl]
        shaped = build_pod_template(spec, mpirun_argv(spec, exported), env, self.pod_options,
                                    secret_name=secret.name)["spec"]["containers"][0]
        trainer: dict[str, Any] = {
            "image": spec.image,
            "command": shaped["command"],
            "env": shaped.get("env") or [],
            "numNodes": spec.nodes,
            "numProcPerNode": spec.procs_per_node,
        }
        if shaped.get("resources"):
            trainer["resourcesPerNode"] = shaped["resources"]
        body: dict[str, Any] = {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainJob",
            "metadata": {"name": name, "namespace": namespace, "labels": job_labels(name)},
            "spec": {
                "runtimeRef": {"apiGroup": GROUP, "kind": self.runtime_kind, "name": self.runtime},
                "trainer": trainer,
                "runtimePatches": self._patches(spec, code),
            },
        }
        if spec.timeout:
            body["spec"]["activeDeadlineSeconds"] = max(1, int(spec.timeout))
        trainjob = models.TrainerV1alpha1TrainJob.from_dict(body).to_dict()
        notes = [
            f"dsnb trainjob plan for {name} in namespace {namespace}: {spec.nodes} node(s) x {spec.procs_per_node} process(es) "
            f"on the {self.runtime_kind} {self.runtime!r}; needs Kubeflow Trainer (trainer.kubeflow.org/v1alpha1)",
            f"at submit, the TrainJob runs from a TrainingRuntime {name!r} made from {self.runtime!r} as the cluster has it: "
            f"{spec.image} on every pod (Kubeflow Trainer gives trainer.image to the launcher only) and "
            f"{spec.max_restarts} restart(s) of the whole job (JobSet's failurePolicy); it is deleted when the job ends",
        ]
        return Workload([trainjob], notes, code=code)

    def operator_checks(self, conn: Any) -> list[Any]:
        from dsnb.backends.kubernetes.preflight import check_controller, check_crd, check_runtime

        return [check_crd(conn, self.namespace, GROUP, VERSION, PLURAL, "TrainJob", TRAINER_INSTALL),
                check_controller(conn, "Kubeflow Trainer", ("app.kubernetes.io/name=trainer",), TRAINER_INSTALL),
                check_runtime(conn, self.namespace, self.runtime_kind, self.runtime, RUNTIMES_INSTALL)]

    # -- runtimes --------------------------------------------------------------------------
    def runtimes(self) -> list[dict[str, Any]]:
        """The training runtimes this namespace can use: name, kind, framework, MPI or torch.

        ClusterTrainingRuntimes the user may not list are left out (reading them needs
        cluster-level access); namespaced TrainingRuntimes are always listed.

        Raises:
            ClusterError: the Trainer is not installed, the API refused, or it did not answer.
        """
        found = []
        calls = [("ClusterTrainingRuntime", lambda: self.conn.custom.list_cluster_custom_object(
                     GROUP, VERSION, "clustertrainingruntimes", _request_timeout=REQUEST_TIMEOUT_S)),
                 ("TrainingRuntime", lambda: self.conn.custom.list_namespaced_custom_object(
                     GROUP, VERSION, self.namespace, "trainingruntimes", _request_timeout=REQUEST_TIMEOUT_S))]
        for kind, call in calls:
            try:
                items = call().get("items") or []
            except ApiException as e:
                if kind == "ClusterTrainingRuntime" and e.status == 403:
                    continue
                if e.status == 404:
                    raise ClusterError(f"the Kubernetes API at {self.conn.host}", f"does not serve {kind}s: Kubeflow Trainer is not installed",
                                       f"install it: {TRAINER_INSTALL}") from e
                raise self.api_error(e, f"list {kind}s") from e
            except (urllib3.exceptions.HTTPError, OSError) as e:
                raise ClusterError(f"the Kubernetes API at {self.conn.host}", f"did not answer listing {kind}s ({e})",
                                   "check the cluster is up (kubectl cluster-info)") from e
            for item in items:
                policy = (item.get("spec") or {}).get("mlPolicy") or {}
                found.append({
                    "name": item["metadata"]["name"], "kind": kind,
                    "framework": (item["metadata"].get("labels") or {}).get("trainer.kubeflow.org/framework", ""),
                    "policy": "mpi" if "mpi" in policy else "torch" if "torch" in policy else "",
                    "num_nodes": policy.get("numNodes"),
                })
        return found

    # -- layout ----------------------------------------------------------------------------
    def base_runtime(self) -> dict[str, Any] | None:
        """The runtime the jobs name, read once from the cluster; None when it cannot be read (not allowed,
        missing, no answer)."""
        if self._runtime is None:
            try:
                if self.runtime_kind == "ClusterTrainingRuntime":
                    self._runtime = self.conn.custom.get_cluster_custom_object(
                        GROUP, VERSION, "clustertrainingruntimes", self.runtime, _request_timeout=REQUEST_TIMEOUT_S)
                else:
                    self._runtime = self.conn.custom.get_namespaced_custom_object(
                        GROUP, VERSION, self.namespace, "trainingruntimes", self.runtime, _request_timeout=REQUEST_TIMEOUT_S)
            except (ApiException, ClusterError, urllib3.exceptions.HTTPError, OSError):
                return None
        return self._runtime

    def launcher_is_node(self) -> bool:
        """Whether the runtime runs ranks on the launcher too (``mlPolicy.mpi.runLauncherAsNode``), reading it from
        the cluster if not read yet; True, as for the stock ``deepspeed-distributed``, when it cannot be read."""
        self.base_runtime()
        return self._launcher_is_node_as_known()

    def _launcher_is_node_as_known(self) -> bool:
        """:meth:`launcher_is_node` from the runtime read so far, without asking the cluster (status is computed
        from the watch caches alone)."""
        if self._runtime is None:
            return True
        return bool((((self._runtime.get("spec") or {}).get("mlPolicy") or {}).get("mpi") or {}).get("runLauncherAsNode", False))

    def pods_for(self, spec: JobSpec) -> int:
        """Pods the job asks ``resourcesPerNode`` for: the node pods and the launcher."""
        return node_pods(spec.nodes, self.launcher_is_node()) + 1

    def spec_checks(self, spec: JobSpec) -> list[Any]:
        from dsnb.preflight import CheckResult

        found = super().spec_checks(spec)
        pods = self.pods_for(spec)
        gpus = f" with {spec.resources.gpus} GPU(s) each" if spec.resources.gpus else ""
        detail = f"nodes={spec.nodes} makes {pods} pods{gpus}: Kubeflow Trainer gives resourcesPerNode to the launcher too"
        if not self.launcher_is_node():
            return [*found, CheckResult("layout", True, f"{detail}; the ranks run on the {spec.nodes} node pod(s)")]
        if spec.nodes == 1:
            return [*found, CheckResult("layout", True, f"{detail}, and makes max(nodes-1, 1) = 1 node pod, which runs no rank: "
                                                        "the ranks run on the launcher", warning=True)]
        return [*found, CheckResult("layout", True, f"{detail}; the first ranks run on the launcher, the others on the node pods")]

    # -- serving ---------------------------------------------------------------------------
    def serving_selector(self, name: str) -> dict[str, str]:
        """The pod of rank 0: the launcher when the runtime runs it as a node (see :mod:`trainer_layout`), else node 0."""
        if not self._launcher_is_node_as_known():
            return {**job_labels(name), ROLE: "node", JOB_INDEX: "0"}
        return {**job_labels(name), ROLE: "launcher"}

    def decorate_serving(self, plan: Plan, port: int) -> None:
        """Nothing: a TrainJob's ``runtimePatches`` may not add a port or a probe to the runtime's pods."""

    def apply_serve(self, plan: Plan) -> None:
        """As for every job backend, with the Service in front of rank 0's pod for the runtime the cluster has.

        Raises:
            ClusterError: the API refused, or the runtime may not be read.
        """
        self.launcher_is_node()
        service = next(m for m in plan.manifests if m["kind"] == "Service" and m["metadata"]["name"].endswith(SERVICE_SUFFIX))
        service["spec"]["selector"] = self.serving_selector(plan.name)
        super().apply_serve(plan)

    # -- pods ------------------------------------------------------------------------------
    @staticmethod
    def _role(pod: dict[str, Any]) -> str:
        return pod_role(pod)

    def pod_node(self, pod: dict[str, Any]) -> int | None:
        if self._role(pod) == "launcher":
            return None  # its log carries every rank's lines, tagged by mpirun
        # The node Job's completion index (the label exists from Kubernetes 1.28; the hostname always ends in it).
        index = int((pod["metadata"].get("labels") or {}).get(JOB_INDEX) or hostname(pod).rsplit("-", 1)[-1])
        return index + (1 if self._launcher_is_node_as_known() else 0)

    def logs_from(self, pod: dict[str, Any]) -> bool:
        return self._role(pod) == "launcher"

    # -- status ----------------------------------------------------------------------------
    def compute_status(self, name: str, spec: JobSpec, created_at: float | None, pods: list[dict[str, Any]],
                       events: dict[str, list[dict[str, Any]]] | None = None,
                       workload: dict[str, Any] | None = None) -> JobStatus:
        """The first answer of :data:`.trainjob_status.RULES` (pure; no API calls)."""
        # Running or ended: a finished JobSet deletes its node pods, and the launcher's container has terminated.
        starts = [t for t in (started_at(p, RUNTIME_CONTAINER) for p in pods) if t is not None]
        live = tuple(p for p in pods if not terminating(p))  # stopped by a deletion (the JobSet's end, a restart): no outcome
        reading = TrainReading(name, self.name, spec, created_at, live, events or {}, workload or {},
                               launcher_is_node=self._launcher_is_node_as_known(), first_start=min(starts, default=None))
        return first_status(reading, RULES)

def own_runtime(runtime: dict[str, Any], name: str, namespace: str, image: str | None, max_restarts: int = 0) -> dict[str, Any]:
    """A TrainingRuntime ``name`` in ``namespace``: ``runtime``'s spec with ``image`` on every ``node`` container,
    and ``max_restarts`` as the whole job's restarts.

    Each pod gets ``restartPolicy: Never`` and each Job ``backoffLimit: 0``, so that a failed pod
    fails its Job at once, and the JobSet's ``failurePolicy.maxRestarts`` restarts every Job of the
    job together, as a restart does on the other backends.

    Example:
        >>> stock = {"spec": {"template": {"spec": {"replicatedJobs": [{"name": "node", "template": {"spec": {"template":
        ...     {"spec": {"containers": [{"name": "node", "image": "ghcr.io/kubeflow/trainer/deepspeed-runtime"}]}}}}}]}}}}
        >>> own = own_runtime(stock, "a-x7k2", "ml", "ghcr.io/org/train:1", max_restarts=2)
        >>> jobset = own["spec"]["template"]["spec"]
        >>> jobset["failurePolicy"], jobset["replicatedJobs"][0]["template"]["spec"]["backoffLimit"]
        ({'maxRestarts': 2}, 0)
        >>> jobset["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["image"]
        'ghcr.io/org/train:1'
    """
    spec = json.loads(json.dumps(runtime.get("spec") or {}))
    jobset = spec.setdefault("template", {}).setdefault("spec", {})
    jobset["failurePolicy"] = {"maxRestarts": max_restarts}
    for job in jobset.get("replicatedJobs") or []:
        job_spec = job["template"].setdefault("spec", {})
        job_spec["backoffLimit"] = 0
        pod = job_spec["template"]["spec"]
        pod["restartPolicy"] = "Never"
        pod["automountServiceAccountToken"] = False  # the ranks need no API token (runtimePatches cannot set it)
        for container in pod.get("containers") or []:
            if container.get("name") == RUNTIME_CONTAINER:
                container["image"] = image
    labels = {**((runtime.get("metadata") or {}).get("labels") or {}), **job_labels(name)}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingRuntime",
            "metadata": {"name": name, "namespace": namespace, "labels": labels}, "spec": spec}



def jobset_pod_names(name: str, nodes: int) -> list[str]:
    """The longest pod names JobSet makes for a TrainJob ``name`` on an MPI runtime, random suffix included.

    The JobSet is named after the TrainJob; its pods are ``<jobset>-<replicatedJob>-<job index>-<pod
    index>-<5 random>``, which JobSet v0.12.0's webhook requires to be a DNS-1035 label
    (pkg/webhooks/jobset_webhook.go, placement.GenPodName). Trainer v2.3.0 runs one launcher pod and
    ``max(numNodes - 1, 1)`` node pods (pkg/runtime/framework/plugins/mpi/mpi.go).

    Example:
        >>> [len(n) for n in jobset_pod_names("tiny-gpt-x7k2", 3)]
        [32, 28]
    """
    return [f"{name}-launcher-0-0-abcde", f"{name}-node-0-{node_pods(nodes) - 1}-abcde"]

