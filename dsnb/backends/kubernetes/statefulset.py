"""``Cluster("statefulset")``: a StatefulSet and a headless Service, wired by dsnb itself.

Each job is these objects (plus a Secret when the spec's env holds secrets):

- the record ConfigMap ``<job>``: the spec, the pods' entry script and the DeepSpeed config;
- when ``working_dir`` is a directory here, the ConfigMap ``<job>-code`` with it packed
  (:mod:`~dsnb.backends.kubernetes.workdir_bundle`), which the entry unpacks in each pod and starts
  the ranks in;
- a ServiceAccount, Role and RoleBinding ``<job>`` that let the job's pods write their
  outcome into the record and scale their own StatefulSet to 0, and nothing else
  (:func:`~dsnb.backends.kubernetes.rbac.job_role_manifests`);
- a headless Service ``<job>`` (``clusterIP: None``, ``publishNotReadyAddresses: true``),
  which gives pod ``<job>-<i>`` the DNS name ``<job>-<i>.<job>.<namespace>.svc.<domain>``
  before it is ready;
- a StatefulSet ``<job>`` with ``podManagementPolicy: Parallel`` and one replica per node.

Every pod runs :mod:`dsnb.runtime.pod_entry`: node rank from the ordinal, wait for
the peers' DNS names, then torchrun (or the deepspeed launcher) with the master at
ordinal 0. Each node's outcome goes to its pod status and to the record; when every node
finished, or one failed, the pod that saw it scales the StatefulSet to 0, so a finished job
holds no node even when no dsnb client runs. dsnb reads the outcomes from the pods, or from
the record once the pods are gone, and ends the job.

Example:
    >>> from dsnb import Cluster, JobSpec
    >>> spec = JobSpec(name="tiny-gpt", script="train.py", nodes=2, procs_per_node=2, image="ghcr.io/org/train:1")
    >>> plan = Cluster("statefulset", namespace="ml").dryrun(spec)
    >>> [m["kind"] for m in plan.manifests]
    ['ConfigMap', 'ServiceAccount', 'Role', 'RoleBinding', 'Service', 'StatefulSet']
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from typing import Any

from dsnb.backends.base import Plan
from dsnb.backends.kubernetes.backend import EnvSecret, KubernetesBackend, Workload
from dsnb.backends.kubernetes.labels import ROLE, job_labels
from dsnb.backends.kubernetes.pod_status import (
    terminating,
)
from dsnb.backends.kubernetes.pod_template import ExtraVolume, build_pod_template, kubelet_literal
from dsnb.backends.kubernetes.rbac import STATEFULSET_PERMISSIONS, job_role_manifests
from dsnb.backends.kubernetes.record_logs import belongs_to, missing_lines
from dsnb.backends.kubernetes.serving import SERVICE_SUFFIX, KubernetesExposure, container_port, readiness_probe
from dsnb.backends.kubernetes.statefulset_status import RULES, SetReading
from dsnb.backends.kubernetes.status_rules import first_status
from dsnb.backends.kubernetes.workdir_bundle import WORKDIR, CodeBundle, code_env, code_volumes
from dsnb.backends.logbuffer import JobLogs
from dsnb.backends.options import BUILTIN_OPTIONS
from dsnb.backends.profiles import BUILTIN_PROFILES
from dsnb.errors import InvalidSpecError
from dsnb.serving.job_serving import EndpointsAsJobs, JobEndpoints
from dsnb.spec import JobSpec
from dsnb.status import JobStatus

JOB_DIR = "/var/run/dsnb/job"
STATE_DIR = "/var/run/dsnb/state"
TERMINATION_LOG = "/var/run/dsnb/termination-log"
MASTER_PORT = 29500
#: The label the StatefulSet controller gives each pod: its own name.
POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"
#: A StatefulSet's name goes into its pods' controller-revision-hash label (63 characters at most).
MAX_SET_NAME = 52
LAUNCHERS = ("torchrun", "deepspeed")


def entry_files() -> dict[str, str]:
    """The pods' entry script and the module it reports with, as shipped in the record."""
    package = resources.files("dsnb.runtime")
    shipped = {"entry.py": "pod_entry.py", "pod_api.py": "pod_api.py"}
    files = {name: package.joinpath(source).read_text() for name, source in shipped.items()}
    files["stragglers.py"] = resources.files("dsnb").joinpath("stragglers.py").read_text()  # the hang rule
    return files


def user_argv(spec: JobSpec) -> list[str]:
    """The user's program and its arguments, as given (the launcher's arguments come before them).

    >>> from dsnb import JobSpec
    >>> user_argv(JobSpec(name="a", script="train.py", args=["--out={node_rank}"]))
    ['train.py', '--out={node_rank}']
    """
    if spec.function is not None:
        return spec.function.argv()  # type: ignore[union-attr]
    return [spec.script, *spec.args] if spec.script is not None else [*spec.command, *spec.args]  # type: ignore[misc]


def launcher_argv(spec: JobSpec, launcher: str, master_addr: str) -> list[str]:
    """The launcher command every node runs; ``{node_rank}`` and ``{hostfile}`` are filled in the pod.

    Example:
        >>> from dsnb import JobSpec
        >>> launcher_argv(JobSpec(name="a", script="train.py", nodes=2, procs_per_node=2), "torchrun", "a-0.a")
        ['torchrun', '--nnodes=2', '--nproc_per_node=2', '--node_rank={node_rank}', '--master_addr=a-0.a', '--master_port=29500', '--tee=3', '--log-dir=/var/run/dsnb/state/torchrun', 'train.py']
    """
    program = user_argv(spec)
    if launcher == "deepspeed":
        argv = ["deepspeed"]
        if spec.nodes > 1:
            argv += ["--hostfile={hostfile}", "--no_ssh", "--node_rank={node_rank}",
                     f"--master_addr={master_addr}", f"--master_port={MASTER_PORT}"]
        else:
            argv += [f"--num_gpus={spec.procs_per_node}", f"--master_port={MASTER_PORT}"]
        if spec.script is None:
            argv.append("--no_python")
        return argv + program
    argv = ["torchrun"]
    if spec.nodes > 1:
        argv += [f"--nnodes={spec.nodes}", f"--nproc_per_node={spec.procs_per_node}", "--node_rank={node_rank}",
                 f"--master_addr={master_addr}", f"--master_port={MASTER_PORT}"]
    else:
        argv += ["--standalone", f"--nproc_per_node={spec.procs_per_node}"]
    # --tee prefixes each line with the local rank, which dsnb turns into the global rank.
    argv += ["--tee=3", f"--log-dir={STATE_DIR}/torchrun"]
    if spec.max_restarts:
        argv.append(f"--max-restarts={spec.max_restarts}")
    if spec.script is None:
        argv.append("--no-python")
    return argv + program



class StatefulSetBackend(EndpointsAsJobs, KubernetesBackend):
    """DeepSpeed on a StatefulSet + headless Service; see the module docstring.

    Serving (``cluster.serve``) adds a Service ``<job>-serve`` in front of pod ``<job>-0``
    (rank 0), and the port and a ``GET /readyz`` readiness probe to every pod: the headless
    Service publishes not-ready pods, so the probe never delays the rendezvous.

    Args:
        launcher: ``"torchrun"`` (default; log lines split per rank) or ``"deepspeed"``.
        cluster_domain: the cluster's DNS domain.
        peer_timeout: seconds a pod waits for its peers' DNS names before failing.
        serve_url: where endpoints answer instead of the in-cluster URL; see
            :class:`~dsnb.backends.kubernetes.serving.KubernetesExposure`.
        **options: see :class:`~dsnb.backends.kubernetes.backend.KubernetesBackend`.

    Raises:
        InvalidSpecError: an unknown launcher.

    Example:
        >>> StatefulSetBackend(namespace="ml", launcher="deepspeed").launcher
        'deepspeed'
    """

    name = "statefulset"
    managed_kind = "StatefulSet"
    watches_hangs = True  # the pod entry stops a node whose rank hung (dsnb.runtime.pod_entry.HangWatch)
    options = BUILTIN_OPTIONS["statefulset"]
    profiles = BUILTIN_PROFILES["statefulset"]
    permissions = STATEFULSET_PERMISSIONS
    workload = (("apps/v1", "StatefulSet", ""), ("v1", "Service", ""), ("v1", "Service", SERVICE_SUFFIX),
                ("v1", "Secret", "-env"), ("v1", "ConfigMap", "-code"))
    probe_is_readyz = True
    readiness_note = "readiness: pod <job>-0's Ready condition (every pod probes GET /readyz on the port)"

    def __init__(self, launcher: str = "torchrun", cluster_domain: str = "cluster.local",
                 peer_timeout: float = 600, serve_url: str | None = None, **options: Any) -> None:
        if launcher not in LAUNCHERS:
            raise InvalidSpecError("launcher", f"unknown launcher {launcher!r}", f"use one of {', '.join(LAUNCHERS)}")
        super().__init__(**options)
        self.launcher = launcher
        self.cluster_domain = cluster_domain
        self.peer_timeout = peer_timeout
        self.job_endpoints = JobEndpoints(self, KubernetesExposure(self, serve_url))

    # -- rendering -------------------------------------------------------------------------
    def _env(self, spec: JobSpec) -> dict[str, str]:
        env = {
            "DSNB_JOB_NAME": spec.name,
            "DSNB_NODES": str(spec.nodes),
            "DSNB_PROCS_PER_NODE": str(spec.procs_per_node),
            "DSNB_SET": spec.name,
            "DSNB_SERVICE": spec.name,
            "DSNB_CLUSTER_DOMAIN": self.cluster_domain,
            "DSNB_PEER_TIMEOUT": f"{self.peer_timeout:g}",
            "DSNB_STATE_DIR": STATE_DIR,
            "DSNB_TERMINATION_LOG": TERMINATION_LOG,
            "DSNB_DIST_BACKEND": spec.dist_backend,
            "DSNB_RELEASE": "1",  # the pods end the job themselves (pod_api), through the job's Role
            "LOCAL_SIZE": str(spec.procs_per_node),  # DeepSpeed's AutoTP on CPU reads it
            # torchrun sets it too; the deepspeed launcher does not, and Accelerate and Lightning scripts read it
            "LOCAL_WORLD_SIZE": str(spec.procs_per_node),
            "PYTHONUNBUFFERED": "1",
        }
        if spec.timeout:
            env["DSNB_TIMEOUT"] = f"{spec.timeout:g}"
        if spec.hang_timeout:
            env["DSNB_HANG_TIMEOUT"] = f"{spec.hang_timeout:g}"
        if spec.accelerator == "cpu":
            env["DS_ACCELERATOR"] = "cpu"
        if spec.nodes > 1:
            env["GLOO_SOCKET_IFNAME"] = "eth0"  # else gloo binds the hostname's loopback address
        if spec.threads_per_rank is not None:
            env["OMP_NUM_THREADS"] = str(spec.threads_per_rank)
        if spec.deepspeed_config is not None:
            env["DSNB_DEEPSPEED_CONFIG"] = f"{JOB_DIR}/deepspeed.json"
        return env

    def render_workload(self, spec: JobSpec, secret: EnvSecret, code: CodeBundle | None = None) -> Workload:
        if len(spec.name) > MAX_SET_NAME:
            raise InvalidSpecError("name", f"{spec.name!r} is too long for a StatefulSet ({MAX_SET_NAME} characters with the suffix)",
                                   f"use at most {MAX_SET_NAME - 5} characters")
        name, namespace = spec.name, self.namespace
        master = f"{name}-0.{name}.{namespace}.svc.{self.cluster_domain}"
        files = entry_files()
        if spec.deepspeed_config is not None:
            files["deepspeed.json"] = json.dumps(spec.deepspeed_config, indent=1)
        node_labels = {**job_labels(name), ROLE: "node"}
        args = launcher_argv(spec, self.launcher, master)
        program = len(user_argv(spec))
        env = {**self._env(spec), "DSNB_LAUNCHER_ARGC": str(len(args) - program), **(code_env() if code else {})}
        template = build_pod_template(
            # With shipped code the ranks start where the entry unpacks it.
            dataclasses.replace(spec, working_dir=WORKDIR) if code else spec,
            ["python3", f"{JOB_DIR}/entry.py"], env, self.pod_options, {ROLE: "node"},
            args=args[:len(args) - program] + [kubelet_literal(a) for a in args[len(args) - program:]],
            downward_env={"DSNB_POD_NAME": "metadata.name", "DSNB_NAMESPACE": "metadata.namespace"},
            secret_name=secret.name,
            volumes=[
                ExtraVolume({"name": "dsnb-job", "configMap": {"name": name, "defaultMode": 0o444}}, JOB_DIR, read_only=True),
                ExtraVolume({"name": "dsnb-state", "emptyDir": {}}, STATE_DIR),
                *(code_volumes(name) if code else []),
            ],
            termination_message_path=TERMINATION_LOG,
        )
        template["spec"]["restartPolicy"] = "Always"  # the only policy a StatefulSet accepts
        account = self.pod_options.service_account
        template["spec"]["serviceAccountName"] = account or name
        template["spec"]["automountServiceAccountToken"] = True  # the entry reports with it, whatever the account says
        service = {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "labels": job_labels(name)},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": node_labels,
                     "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}]},
        }
        stateful_set = {
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": name, "labels": job_labels(name)},
            "spec": {"serviceName": name, "replicas": spec.nodes, "podManagementPolicy": "Parallel",
                     "selector": {"matchLabels": node_labels}, "template": template},
        }
        ranks = "torchrun --tee (lines per rank)" if self.launcher == "torchrun" else "the deepspeed launcher (lines per node)"
        notes = [
            f"dsnb statefulset plan for {name} in namespace {namespace}: {spec.nodes} pod(s) x {spec.procs_per_node} rank(s) via {ranks}",
            "apply with: kubectl apply -f <this file>; remove with: kubectl delete "
            f"statefulset,service,configmap,secret,serviceaccount,role,rolebinding -l dsnb.io/job={name}",
            f"when the job ends its pods scale StatefulSet {name} to 0 themselves, as ServiceAccount {account or name} "
            f"(Role {name}: its record and its StatefulSet's scale, nothing else)",
        ]
        return Workload([*job_role_manifests(name, namespace, account), service, stateful_set], notes, files, code=code)

    # -- serving ---------------------------------------------------------------------------
    def serving_selector(self, name: str) -> dict[str, str]:
        """Pod ``<job>-0`` (node 0, where rank 0 runs), by the label the StatefulSet controller sets."""
        return {**job_labels(name), ROLE: "node", POD_NAME_LABEL: f"{name}-0"}

    def decorate_serving(self, plan: Plan, port: int) -> None:
        """The port and ``GET /readyz`` on every pod: on node 0 it is rank 0's HTTP API, on the
        others the LOCAL_RANK 0 process answers the probes only."""
        for manifest in plan.manifests:
            if manifest["kind"] == "StatefulSet":
                container = manifest["spec"]["template"]["spec"]["containers"][0]
                container["ports"] = [container_port(port)]
                container["readinessProbe"] = readiness_probe(port)

    # -- status ----------------------------------------------------------------------------
    def workload_state(self, name: str, record: dict[str, Any]) -> dict[str, Any] | None:
        """The record: the job's pods write their outcomes into it (``outcome-<node>.json``)."""
        return record

    def end_of_logs(self, name: str, logs: JobLogs, record: dict[str, Any]) -> None:
        """Each node's kept output from the record, after the lines read from its pod (see :mod:`record_logs`)."""
        data = record.get("data") or {}
        procs = self.spec_of(name).procs_per_node
        lines, _ = logs.read(0, None, 10**9)
        for node in range(self.spec_of(name).nodes):
            have = [(line.rank, line.text) for line in lines if belongs_to(line.rank, node, procs)]
            for rank, text, when in missing_lines(data, node, procs, have):
                logs.add(rank, text, when)

    def compute_status(self, name: str, spec: JobSpec, created_at: float | None, pods: list[dict[str, Any]],
                       events: dict[str, list[dict[str, Any]]] | None = None,
                       workload: dict[str, Any] | None = None) -> JobStatus:
        """The first answer of :data:`.statefulset_status.RULES` (pure; no API calls); ``workload`` is the record."""
        live = tuple(p for p in pods if not terminating(p))  # stopped by its deletion (the release, a cancel): no outcome
        return first_status(SetReading(name, self.name, spec, created_at, live, events or {}, workload or {}), RULES)

