"""``Cluster("mpijob")``: DeepSpeed over OpenMPI through the MPI Operator (``kubeflow.org/v2beta1``).

The operator does the wiring: it starts the workers (non-root ``sshd``), waits until they are
ready, writes ``/etc/mpi/hostfile`` (one line per worker, ``slots`` = processes per node) and
the ssh keys, then starts the launcher. dsnb renders the MPIJob, the launcher's ``mpirun``
command, follows the job and explains its failures.

Each rank is started by ``mpirun`` through a few lines of Python (:mod:`dsnb.runtime.rank_shim`) that
turn Open MPI's variables (``OMPI_COMM_WORLD_RANK``...) into the torch.distributed ones
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``; ``MASTER_ADDR`` is the hostfile's first host), so
the same training script runs here as on every other backend, without mpi4py.
``--tag-output`` marks each line with its rank, so logs are split per rank. When ``working_dir`` is
a directory here, its packed copy (the ConfigMap ``<job>-code``) is mounted on the workers and the
shim unpacks it there (once per pod) and starts the rank in it.

Example:
    >>> from dsnb import Cluster, JobSpec
    >>> spec = JobSpec(name="tiny-gpt", script="train.py", nodes=2, procs_per_node=2, image="ghcr.io/org/train:1")
    >>> plan = Cluster("mpijob", namespace="ml").dryrun(spec)
    >>> [m["kind"] for m in plan.manifests]
    ['ConfigMap', 'MPIJob']
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from dsnb.backends.base import Plan
from dsnb.backends.kubernetes.backend import EnvSecret, KubernetesBackend, Workload
from dsnb.backends.kubernetes.labels import ROLE, job_labels, role
from dsnb.backends.kubernetes.mpijob_status import RULES, SSHD_PORT, MPIReading
from dsnb.backends.kubernetes.name_limits import check_derived_names
from dsnb.backends.kubernetes.pod_template import build_pod_template, kubelet_literal
from dsnb.backends.kubernetes.rbac import MPIJOB_PERMISSIONS
from dsnb.backends.kubernetes.serving import SERVICE_SUFFIX, KubernetesExposure, container_port
from dsnb.backends.kubernetes.status_rules import first_status
from dsnb.backends.kubernetes.workdir_bundle import CodeBundle, code_env, code_volumes
from dsnb.backends.options import BUILTIN_OPTIONS
from dsnb.backends.profiles import BUILTIN_PROFILES
from dsnb.errors import InvalidSpecError
from dsnb.runtime import rank_shim
from dsnb.serving.job_serving import EndpointsAsJobs, JobEndpoints
from dsnb.spec import JobSpec
from dsnb.status import JobStatus

GROUP, VERSION, PLURAL = "kubeflow.org", "v2beta1", "mpijobs"
HOSTFILE = "/etc/mpi/hostfile"
SSH_DIR = "/home/mpiuser/.ssh"
MASTER_PORT = rank_shim.MASTER_PORT
#: The label the MPI Operator (v2beta1) gives each worker pod: its index, which is its line in the hostfile.
REPLICA_INDEX = "training.kubeflow.org/replica-index"
OPERATOR_INSTALL = "kubectl apply --server-side -f https://raw.githubusercontent.com/kubeflow/mpi-operator/v0.8.0/deploy/v2beta1/mpi-operator.yaml"

#: The launcher's shell prelude, run before mpirun with the operator's hostfile as ``$0`` (the
#: hostfile is mounted on the launcher only; ``MASTER_ADDR`` is exported to the ranks):
#:
#: - when the launcher's own host is in the hostfile (a TrainJob runtime with ``runLauncherAsNode``),
#:   that host goes first in the copy mpirun is given, since Open MPI 4 puts the first ranks on
#:   mpirun's own node wherever it is listed; then ``MASTER_ADDR`` is the first host, where rank 0
#:   runs, under every Open MPI;
#: - the image's environment goes to the ranks (``-x``): sshd starts them with its own default
#:   ``PATH`` and none of the image's ``ENV``, so a Python in a venv or conda, ``LD_LIBRARY_PATH``,
#:   ``PYTHONPATH`` and the image's NCCL and CUDA settings would be lost on the workers.
IMAGE_ENV = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX")
MASTER_PRELUDE = (
    'me="$(hostname)"; h="${TMPDIR:-/tmp}/dsnb-hostfile.$$"; '
    'grep -E "^$me([. ]|$)" "$0" > "$h"; grep -vE "^$me([. ]|$)" "$0" >> "$h"; '
    'export MASTER_ADDR="$(head -n 1 "$h" | cut -d " " -f 1)"; '
    f'x=""; for v in {" ".join(IMAGE_ENV)} $(env | grep -oE "^(NCCL|CUDA|NVIDIA)_[A-Za-z0-9_]*=" | tr -d =); do '
    'env | grep -q "^$v=" && x="$x -x $v"; done; '
    'for a do shift; if [ "$a" = mpirun ] && [ -z "$m" ]; then m=1; set -- "$@" "$a" $x; prev="$a"; continue; fi; '
    '[ "$prev" = --hostfile ] && a="$h"; prev="$a"; set -- "$@" "$a"; done; '
    'exec "$@"'
)
#: The text ``mpirun`` runs on every rank with ``python3 -c`` (:mod:`dsnb.runtime.rank_shim`).
RANK_SHIM = Path(rank_shim.__file__).read_text()


def program_argv(spec: JobSpec) -> list[str]:
    """What every rank runs after the shim: the script (run by the shim itself), or the command."""
    if spec.script is not None:
        return ["--run", spec.script, *spec.args]
    if spec.function is not None:
        return spec.function.argv()  # type: ignore[union-attr]
    return [*spec.command, *spec.args]  # type: ignore[misc]


def rank_env(spec: JobSpec, code: CodeBundle | None = None) -> dict[str, str]:
    """The environment mpirun passes to every rank (with ``-x``), beside ``spec.env``.

    Ranks start under the workers' sshd, not from the pod spec, so the DeepSpeed config
    travels inline (``DSNB_DEEPSPEED_CONFIG_JSON``) rather than as a mounted file; with shipped
    ``code``, where the shim finds it and unpacks it.
    """
    env = {
        "DSNB_JOB_NAME": spec.name,
        "DSNB_DIST_BACKEND": spec.dist_backend,
        "MASTER_PORT": str(MASTER_PORT),
        "GLOO_SOCKET_IFNAME": "eth0",
    }
    if spec.accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    if spec.threads_per_rank is not None:
        env["OMP_NUM_THREADS"] = str(spec.threads_per_rank)
    if spec.deepspeed_config is not None:
        env["DSNB_DEEPSPEED_CONFIG_JSON"] = json.dumps(spec.deepspeed_config, separators=(",", ":"))
    if code is not None:
        env.update(code_env())
    return env


def launch_spec(spec: JobSpec, code: CodeBundle | None) -> JobSpec:
    """``spec`` as the MPI pods run it: with shipped ``code`` the shim starts each rank where it unpacks
    it, so ``mpirun`` gets no ``--wdir`` (the directory is on this machine, not in the pods)."""
    return dataclasses.replace(spec, working_dir=None) if code is not None else spec


def mpirun_argv(spec: JobSpec, exported: list[str], hostfile: str = HOSTFILE) -> list[str]:
    """The launcher's command: ``mpirun`` over the operator's hostfile, one process per slot,
    after a shell prelude that sets ``MASTER_ADDR`` to the hostfile's first host.

    Example:
        >>> from dsnb import JobSpec
        >>> mpirun_argv(JobSpec(name="a", script="t.py", nodes=2, procs_per_node=2), ["DSNB_DIST_BACKEND"])[4:12]
        ['mpirun', '--tag-output', '-np', '4', '--hostfile', '/etc/mpi/hostfile', '--map-by', 'slot']
    """
    argv = ["sh", "-c", MASTER_PRELUDE, hostfile, "mpirun", "--tag-output", "-np", str(spec.world_size), "--hostfile", hostfile,
            "--map-by", "slot", "--bind-to", "none",
            # TCP only, on the pod network: no InfiniBand/UCX assumptions for the MPI part
            # (NCCL still uses what the nodes offer for the collectives).
            "--mca", "pml", "ob1", "--mca", "btl", "tcp,self",
            "--mca", "btl_tcp_if_include", "eth0", "--mca", "oob_tcp_if_include", "eth0"]
    if spec.working_dir:
        argv += ["--wdir", spec.working_dir]
    for name in ["MASTER_ADDR", *exported]:
        argv += ["-x", name]
    # The kubelet would expand $(VAR) in the user's arguments (the container's command): keep them as given.
    return argv + ["python3", "-c", RANK_SHIM, *(kubelet_literal(a) for a in program_argv(spec))]


class MPIJobBackend(EndpointsAsJobs, KubernetesBackend):
    """DeepSpeed on an MPI Operator MPIJob; see the module docstring.

    Serving (``cluster.serve``) adds a Service ``<job>-serve`` in front of worker 0, where
    ``mpirun --map-by slot`` places rank 0 (the hostfile's first host; the launcher runs no
    rank). The workers keep their sshd readiness probe, which the operator waits for before it
    starts the launcher (``WaitForWorkersReady``): a ``GET /readyz`` probe there would never
    pass, since the server starts only with the launcher. Readiness is read from rank 0's
    ``DSNB_SERVE`` lines in the launcher's log instead.

    Args:
        clean_pod_policy: the MPIJob's ``runPolicy.cleanPodPolicy`` (``Running`` keeps the
            launcher's log after the job ends; ``All`` removes every pod).
        ttl_seconds_after_finished: ``runPolicy.ttlSecondsAfterFinished``. The MPI Operator gives it to the
            launcher's ``batch/v1`` Job, so Kubernetes deletes that Job and its pod, the launcher's log,
            this long after the end; the MPIJob itself stays. None (the default) keeps the launcher's
            pod, which holds no resources once it ended, until dsnb finalizes the job (keeping its log
            in the record) or it is deleted, so a client that looks only later still finds the log.
        serve_url: where endpoints answer instead of the in-cluster URL; see
            :class:`~dsnb.backends.kubernetes.serving.KubernetesExposure`.
        **options: see :class:`~dsnb.backends.kubernetes.backend.KubernetesBackend`.

    Raises:
        InvalidSpecError: an unknown clean pod policy.
    """

    name = "mpijob"
    managed_kind = "MPIJob"
    options = BUILTIN_OPTIONS["mpijob"]
    profiles = BUILTIN_PROFILES["mpijob"]
    permissions = MPIJOB_PERMISSIONS
    workload_resource = (GROUP, VERSION, PLURAL)
    launcher_logs = True
    install_hint = OPERATOR_INSTALL
    upgrade_hint = f"dsnb renders MPIJobs for the MPI Operator v0.8 (kubeflow.org/v2beta1): upgrade it: {OPERATOR_INSTALL}"
    workload = ((f"{GROUP}/{VERSION}", "MPIJob", ""), ("v1", "Service", SERVICE_SUFFIX), ("v1", "Secret", "-env"),
                ("v1", "ConfigMap", "-code"))
    probe_is_readyz = False
    readiness_note = ("readiness: the last DSNB_SERVE line of rank 0 in the launcher's log (the workers keep "
                      "their sshd probe: the operator starts the launcher only once they pass it)")

    def __init__(self, clean_pod_policy: str = "Running", ttl_seconds_after_finished: int | None = None,
                 serve_url: str | None = None, **options: Any) -> None:
        if clean_pod_policy not in ("None", "Running", "All"):
            raise InvalidSpecError("clean_pod_policy", f"unknown policy {clean_pod_policy!r}", "use 'None', 'Running' or 'All'")
        super().__init__(**options)
        self.clean_pod_policy = clean_pod_policy
        self.ttl_seconds_after_finished = ttl_seconds_after_finished
        self.job_endpoints = JobEndpoints(self, KubernetesExposure(self, serve_url))

    # -- rendering -------------------------------------------------------------------------
    def render_workload(self, spec: JobSpec, secret: EnvSecret, code: CodeBundle | None = None) -> Workload:
        # MPI Operator v0.8.0 refuses (with only a Warning Event) an MPIJob whose last worker
        # pod name, <name>-worker-<N-1>, is no DNS-1035 label (pkg/apis/kubeflow/validation/validation.go).
        check_derived_names(spec.name, [f"{spec.name}-worker-{spec.nodes - 1}"], "the MPI Operator's worker pods")
        name, namespace = spec.name, self.namespace
        env = rank_env(spec, code)
        spec = launch_spec(spec, code)
        # Ranks inherit the launcher's environment only through mpirun -x.
        exported = [*env, *spec.env, *self.pod_options.nccl]
        launcher = build_pod_template(
            spec, mpirun_argv(spec, exported), env, self.pod_options, {ROLE: "launcher"},
            secret_name=secret.name,
        )
        # The launcher only runs mpirun: it needs no GPUs and little memory.
        launcher["spec"]["containers"][0]["resources"] = {"requests": {"cpu": "500m", "memory": "512Mi"}}
        # The MPI Operator's base image gives sshd a file capability (build/base/Dockerfile: setcap
        # CAP_NET_BIND_SERVICE=+eip /usr/sbin/sshd), and the kernel refuses to exec such a binary
        # when the bounding set lacks it: keep that one capability (Pod Security "restricted" allows it).
        worker = build_pod_template(
            spec, ["/usr/sbin/sshd", "-De", "-f", "/home/mpiuser/.sshd_config"], {}, self.pod_options,
            {ROLE: "worker"}, secret_name=secret.name, add_capabilities=("NET_BIND_SERVICE",),
            volumes=code_volumes(name) if code is not None else None,  # the ranks run there
        )
        worker["spec"]["containers"][0]["readinessProbe"] = {"tcpSocket": {"port": SSHD_PORT}, "initialDelaySeconds": 2, "periodSeconds": 2}
        run_policy: dict[str, Any] = {"cleanPodPolicy": self.clean_pod_policy, "backoffLimit": spec.max_restarts}
        if self.ttl_seconds_after_finished is not None:
            run_policy["ttlSecondsAfterFinished"] = self.ttl_seconds_after_finished
        if spec.timeout:
            run_policy["activeDeadlineSeconds"] = max(1, int(spec.timeout))
        mpijob = {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "MPIJob",
            "metadata": {"name": name, "labels": job_labels(name)},
            "spec": {
                "slotsPerWorker": spec.procs_per_node,
                "runLauncherAsWorker": False,
                "mpiImplementation": "OpenMPI",
                "launcherCreationPolicy": "WaitForWorkersReady",
                "sshAuthMountPath": SSH_DIR,
                "runPolicy": run_policy,
                "mpiReplicaSpecs": {
                    "Launcher": {"replicas": 1, "restartPolicy": "Never", "template": launcher},
                    "Worker": {"replicas": spec.nodes, "restartPolicy": "Never", "template": worker},
                },
            },
        }
        notes = [
            f"dsnb mpijob plan for {name} in namespace {namespace}: {spec.nodes} worker(s) x {spec.procs_per_node} slot(s), "
            "mpirun on the launcher; needs the MPI Operator (kubeflow.org/v2beta1)",
            "the image needs Open MPI, a non-root sshd for user mpiuser on port 2222 "
            "(like mpioperator/openmpi), torch and DeepSpeed",
        ]
        return Workload([mpijob], notes, code=code)

    def operator_checks(self, conn: Any) -> list[Any]:
        from dsnb.backends.kubernetes.preflight import check_controller, check_crd

        return [check_crd(conn, self.namespace, GROUP, VERSION, PLURAL, "MPIJob", OPERATOR_INSTALL),
                check_controller(conn, "MPI Operator", ("app.kubernetes.io/name=mpi-operator", "app=mpi-operator"), OPERATOR_INSTALL)]

    # -- serving ---------------------------------------------------------------------------
    def serving_selector(self, name: str) -> dict[str, str]:
        """Worker 0: dsnb's worker labels and the operator's replica index."""
        return {**job_labels(name), ROLE: "worker", REPLICA_INDEX: "0"}

    def decorate_serving(self, plan: Plan, port: int) -> None:
        """The serving port on the workers (rank 0 listens on worker 0; LOCAL_RANK 0 on the others)."""
        for manifest in plan.manifests:
            if manifest["kind"] == "MPIJob":
                worker = manifest["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
                worker["ports"] = [container_port(port)]

    # -- pods ------------------------------------------------------------------------------
    _role = staticmethod(role)

    def pod_node(self, pod: dict[str, Any]) -> int | None:
        if self._role(pod) == "launcher":
            return None
        return int(pod["metadata"]["name"].rsplit("-", 1)[1])

    def logs_from(self, pod: dict[str, Any]) -> bool:
        return self._role(pod) == "launcher"  # mpirun gathers every rank's output there

    # -- status ----------------------------------------------------------------------------
    def compute_status(self, name: str, spec: JobSpec, created_at: float | None, pods: list[dict[str, Any]],
                       events: dict[str, list[dict[str, Any]]] | None = None,
                       workload: dict[str, Any] | None = None) -> JobStatus:
        """The first answer of :data:`.mpijob_status.RULES` (pure; no API calls)."""
        return first_status(MPIReading(name, self.name, spec, created_at, tuple(pods), events or {}, workload or {}), RULES)

