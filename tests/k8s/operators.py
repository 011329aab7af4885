"""Test code that plays the MPI Operator and Kubeflow Trainer against the API emulator.

Each simulated operator reads its custom resources from the emulator and does what the real
one does on a cluster, closely enough for dsnb's side of the conversation:

- it gives every pod of a job its own network namespace (``tests/k8s/netns.py``) with the
  DNS names the operator's headless Service would give, and writes ``/etc/mpi/hostfile``
  (a ConfigMap mounted on the launcher, as the operators do);
- it creates the worker (MPIJob) or node (TrainJob) pods owned by the job, with the labels the
  real controllers add (the MPI Operator's ``training.kubeflow.org/...`` with the worker's
  ``replica-index``; JobSet's ``jobset.sigs.k8s.io/...`` and the Job's completion index);
  their sshd is not run: ``mpirun`` reaches their namespaces through ``rsh_agent.py`` instead of ssh,
  and what it starts there sees the pod's volumes (its ConfigMaps written out read-only, its emptyDirs,
  once per pod: a retried launcher finds them as they were), as a process sshd starts in the pod's
  container would (the host's ``/dev/shm`` stands in for a memory-backed emptyDir);
- when the workers are ready it creates the launcher pod, with the environment the operator
  sets for Open MPI (``OMPI_MCA_orte_default_hostfile``, ``..._keep_fqdn_hostnames``) plus
  the agent; ``ClusterSim`` runs it for real;
- it reports the job's conditions from the launcher's exit (MPIJob ``Created``/``Running``/
  ``Succeeded``/``Failed``; TrainJob ``Complete``/``Failed``), and with cleanPodPolicy
  Running removes the workers when the job ends.

Deleting the job collects its pods (ownerReferences, in the emulator) and the network.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from k8s.netns import PodNetwork
from k8s.sim import ClusterSim, now_rfc3339, volume_dirs, warn

AGENT = Path(__file__).with_name("rsh_agent.py")
# What an sshd session's PATH is: OpenSSH's compiled default user path as Debian 12 builds openssh 9.2
# (--with-default-path in its debian/rules), not the
# image's ENV (the MPI Operator's sshd_config sets no environment). The image's PATH here is the
# test venv's, which reaches the ranks only if mpirun passes it on (-x PATH).
LOGIN_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/games"
FAKE = "sim.dsnb.io/no-process"  # a pod whose container the kubelet only pretends to run (sshd)


def _owner(obj: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": True}


def _condition(kind: str, message: str = "", reason: str = "") -> dict[str, Any]:
    return {"type": kind, "status": "True", "reason": reason or kind, "message": message, "lastTransitionTime": now_rfc3339()}


class _MPIJobs:
    """What both operators share: one network, hostfile, launcher and outcome per job."""

    api_version = ""
    kind = ""
    hostfile_suffix = "-config"  # the ConfigMap holding the hostfile: <job> + this

    def __init__(self, subnet: str) -> None:
        self.subnet = subnet
        self.networks: dict[str, PodNetwork] = {}
        self.pods: dict[str, str] = {}  # pod name -> job
        self.host_of: dict[str, str] = {}  # pod name -> its hostname (its identity on the job's network)
        self.conditions: dict[str, list[dict[str, Any]]] = {}
        self.refused: set[str] = set()
        self.pod_volumes: dict[str, tuple[Path, list[list[str]]]] = {}  # fake pod uid -> (its folder, its mounts)

    # -- what each operator defines --------------------------------------------------------
    def layout(self, job: dict[str, Any]) -> tuple[str, list[tuple[str, str, dict[str, Any], str]], int]:
        """(launcher pod name, [(pod name, DNS name, template, role) of the hosts], slots per host)."""
        raise NotImplementedError

    def launcher_template(self, job: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def pod_labels(self, job: dict[str, Any], pod: str, role: str) -> dict[str, str]:
        """The labels the controller adds to a pod, on top of its template's."""
        return {}

    def refusal(self, job: dict[str, Any]) -> tuple[str, str, bool] | None:
        """(reason, message, events.k8s.io recorder) of the Warning Event with which the operator
        gives up on ``job`` without creating anything, or None when it goes ahead."""
        return None

    def pod_name(self, host: str) -> str:
        """The name of the pod whose hostname is ``host`` (the same, unless a Job controller adds a random part)."""
        return host

    def prepare(self, sim: ClusterSim, job: dict[str, Any]) -> None:
        """Read what the job refers to, once, before anything else is done with it."""

    def launcher_owner(self, sim: ClusterSim, job: dict[str, Any]) -> dict[str, Any]:
        """What owns the launcher pod (the job itself, unless the operator makes a Job for it)."""
        return job

    def done(self, sim: ClusterSim, job: dict[str, Any], code: int) -> None:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------
    def netns_for(self, pod: str) -> str | None:
        job = self.pods.get(pod)
        return self.networks[job].namespace(self.host_of.get(pod, pod)) if job in self.networks else None

    def close(self) -> None:
        for network in self.networks.values():
            network.close()
        self.networks.clear()
        for folder, _ in self.pod_volumes.values():
            shutil.rmtree(folder, ignore_errors=True)
        self.pod_volumes.clear()

    def _set_conditions(self, sim: ClusterSim, job: dict[str, Any], *kinds: tuple[str, ...]) -> None:
        """Add conditions given as (type, message) or (type, message, reason); the reason defaults to the type."""
        name = job["metadata"]["name"]
        known = self.conditions.setdefault(name, [])
        added = [_condition(*kind) for kind in kinds if kind[0] not in {c["type"] for c in known}]
        if added:
            known += added
            sim.emulator.patch_status(self.api_version, self.kind, sim.namespace, name,
                                      {"conditions": list(known), "startTime": known[0]["lastTransitionTime"]})

    def reconcile(self, sim: ClusterSim) -> None:
        em, ns = sim.emulator, sim.namespace
        alive = set()
        for job in em.list(self.api_version, self.kind, ns):
            name = job["metadata"]["name"]
            alive.add(name)
            self.prepare(sim, job)
            refused = self.refusal(job)
            if refused is not None:  # a Warning Event, no condition, nothing created: the job waits for ever
                if name not in self.refused:
                    self.refused.add(name)
                    warn(em, job, refused[0], refused[1], new_api=refused[2])
                continue
            launcher, hosts, slots = self.layout(job)
            if name not in self.networks:
                network = PodNetwork([launcher, *(pod for pod, _, _, _ in hosts if pod != launcher)], subnet=self.subnet)
                network.__enter__()
                network.hosts({pod: [dns, dns + ".cluster.local", dns.split(".")[0]] for pod, dns, _, _ in hosts}
                              | ({launcher: [launcher]} if launcher not in {p for p, _, _, _ in hosts} else {}))
                self.networks[name] = network
                for host in [launcher, *(pod for pod, _, _, _ in hosts)]:
                    self.pods[self.pod_name(host)] = name
                    self.host_of[self.pod_name(host)] = host
                em.create({"apiVersion": "v1", "kind": "ConfigMap",
                           "metadata": {"name": f"{name}{self.hostfile_suffix}", "namespace": ns, "ownerReferences": [_owner(job)]},
                           "data": {"hostfile": "".join(f"{dns} slots={slots}\n" for _, dns, _, _ in hosts)}})
                self._set_conditions(sim, job, ("Created", f"{self.kind} {ns}/{name} is created."))
            for pod, _, template, role in hosts:
                if pod != launcher and em.get("v1", "Pod", ns, self.pod_name(pod)) is None and not self._finished(name):
                    self._create_pod(sim, job, pod, template, fake=True, labels=self.pod_labels(job, pod, role))
            workers = [em.get("v1", "Pod", ns, self.pod_name(pod)) for pod, _, _, _ in hosts if pod != launcher]
            ready = all(p is not None and (p.get("status") or {}).get("phase") == "Running" for p in workers)
            launcher_pod = em.get("v1", "Pod", ns, self.pod_name(launcher))
            if ready and launcher_pod is None and not self._finished(name):
                self._create_launcher(sim, job, launcher)
            elif launcher_pod is not None:
                self._follow_launcher(sim, job, launcher_pod)
        for name in list(self.networks):
            if name not in alive and not any(job == name and pod in sim.runners for pod, job in self.pods.items()):
                self.networks.pop(name).close()

    def _finished(self, name: str) -> bool:
        return any(c["type"] in ("Succeeded", "Failed", "Complete") for c in self.conditions.get(name, []))

    def _create_pod(self, sim: ClusterSim, job: dict[str, Any], host: str, template: dict[str, Any], fake: bool,
                    extra_spec: dict[str, Any] | None = None, labels: dict[str, str] | None = None,
                    owner: dict[str, Any] | None = None) -> None:
        metadata = template.get("metadata") or {}
        # Both operators give each pod its DNS identity: hostname and the job's headless Service as subdomain.
        extra_spec = {"hostname": host, "subdomain": job["metadata"]["name"], **(extra_spec or {})}
        sim.emulator.create({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.pod_name(host), "namespace": sim.namespace, "labels": {**(metadata.get("labels") or {}), **(labels or {})},
                         "annotations": {FAKE: "true"} if fake else {}, "ownerReferences": [_owner(owner or job)]},
            "spec": {**template["spec"], **(extra_spec or {})},
            "status": {"phase": "Pending"},
        })

    def _create_launcher(self, sim: ClusterSim, job: dict[str, Any], launcher: str) -> None:
        name = job["metadata"]["name"]
        template = json.loads(json.dumps(self.launcher_template(job)))
        spec = template["spec"]
        container = spec["containers"][0]
        hostfile = "/etc/mpi/hostfile"
        container.setdefault("env", []).extend({"name": k, "value": v} for k, v in {
            # what the operators set for Open MPI
            "OMPI_MCA_orte_default_hostfile": hostfile,
            "OMPI_MCA_orte_keep_fqdn_hostnames": "true",
            "OMPI_MCA_plm_rsh_args": "-o ConnectionAttempts=10",
            "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            # instead of ssh: enter the worker's network namespace
            "OMPI_MCA_plm_rsh_agent": f"{sys.executable} {AGENT}",
            "DSNB_RSH_NETNS": json.dumps({self.host_of[pod]: self.networks[name].namespace(self.host_of[pod])
                                          for pod, job_name in self.pods.items() if job_name == name}),
            "DSNB_RSH_LOGIN_PATH": LOGIN_PATH,
            # What each host's image lacks: the user's code, on a pod that does not run the launcher's image.
            "DSNB_RSH_IMAGE_LACKS": json.dumps(self._lacking(sim, job, container)),
            "DSNB_RSH_MOUNTS": json.dumps(self._mounts(sim, job)),
        }.items())
        container.setdefault("volumeMounts", []).append({"name": "mpi-job-config", "mountPath": "/etc/mpi"})
        spec.setdefault("volumes", []).append({"name": "mpi-job-config", "configMap": {"name": f"{name}{self.hostfile_suffix}"}})
        spec.setdefault("restartPolicy", "Never")  # the MPI Operator's launcher: as its replica spec says (Never here)
        self._create_pod(sim, job, launcher, template, fake=False, labels=self.pod_labels(job, launcher, "launcher"),
                         owner=self.launcher_owner(sim, job))
        self._set_conditions(sim, job, ("Running", f"launcher {self.pod_name(launcher)} is running"))

    def _lacking(self, sim: ClusterSim, job: dict[str, Any], launcher: dict[str, Any]) -> dict[str, list[str]]:
        """Host -> the directories its pod's image has not: those no image of the cluster has
        (``ClusterSim.image_lacks``), and the code directory mpirun starts the ranks in (``--wdir``) on each
        host whose image differs from the launcher's (which is the job's)."""
        command = list(launcher.get("command") or [])
        code = command[command.index("--wdir") + 1] if "--wdir" in command else None
        _, hosts, _ = self.layout(job)
        lacking = {host: [*sim.image_lacks, *([code] if code and template["spec"]["containers"][0].get("image") != launcher.get("image") else [])]
                   for host, _, template, _ in hosts}
        return {host: paths for host, paths in lacking.items() if paths}

    def _mounts(self, sim: ClusterSim, job: dict[str, Any]) -> dict[str, list[list[str]]]:
        """Host -> the [host folder, kind, mount path] of its pod's container mounts, for the pods whose sshd is
        not run: a process sshd starts there sees them. Written out once per pod (by uid), as its kubelet would."""
        _, hosts, _ = self.layout(job)
        result = {}
        for host, _, _, _ in hosts:
            pod = sim.emulator.get("v1", "Pod", sim.namespace, self.pod_name(host))
            if pod is None or not (pod["metadata"].get("annotations") or {}).get(FAKE):
                continue
            uid = pod["metadata"]["uid"]
            if uid not in self.pod_volumes:
                folder = Path(tempfile.mkdtemp(prefix=f"sim-{host}-"))
                volumes = volume_dirs(sim, sim.namespace, pod, folder)
                mounts = [[*volumes[m["name"]], m["mountPath"]] for m in pod["spec"]["containers"][0].get("volumeMounts") or []
                          if m["name"] in volumes and volumes[m["name"]][1] != "tmpfs"]
                self.pod_volumes[uid] = (folder, mounts)
            result[host] = self.pod_volumes[uid][1]
        return result

    def _follow_launcher(self, sim: ClusterSim, job: dict[str, Any], pod: dict[str, Any]) -> None:
        phase = (pod.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed") and not self._finished(job["metadata"]["name"]):
            statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
            code = ((statuses[0].get("state") or {}).get("terminated") or {}).get("exitCode", 1)
            self.done(sim, job, code)


class MPIOperatorSim(_MPIJobs):
    """The MPI Operator (kubeflow.org/v2beta1) for one namespace; see the module docstring.

    The launcher is a ``batch/v1`` Job ``<job>-launcher`` owned by the MPIJob, carrying the
    MPIJob's ``runPolicy`` as ``ttlSecondsAfterFinished``, ``activeDeadlineSeconds`` and
    ``backoffLimit`` (mpi_job_controller.go v0.8.0, newLauncherJob); its pods are
    ``<job>-launcher-<5 random>``, a new one per retry. The sim plays that Job's controller and
    Kubernetes' TTL controller too; the MPIJob itself is never deleted by a TTL.
    """

    api_version = "kubeflow.org/v2beta1"
    kind = "MPIJob"

    def __init__(self, subnet: str) -> None:
        super().__init__(subnet)
        self.attempts: dict[str, int] = {}  # job -> launcher pods started so far, minus one
        self.ended_at: dict[str, float] = {}

    def pod_name(self, host: str) -> str:
        """Workers are named as their hosts; the launcher Job's pods get the Job controller's random part."""
        if not host.endswith("-launcher"):
            return host
        attempt = self.attempts.get(host.removesuffix("-launcher"), 0)
        digest = hashlib.sha256(f"{host}/{attempt}".encode()).digest()
        return f"{host}-{''.join('bcdfghjklmnpqrstvwxz2456789'[b % 27] for b in digest[:5])}"

    def launcher_owner(self, sim: ClusterSim, job: dict[str, Any]) -> dict[str, Any]:
        name, policy = job["metadata"]["name"], job["spec"].get("runPolicy") or {}
        found = sim.emulator.get("batch/v1", "Job", sim.namespace, f"{name}-launcher")
        if found is None:
            spec = {"backoffLimit": policy.get("backoffLimit", 6), "template": {"spec": {"containers": [{"name": "launcher"}]}}}
            for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds"):
                if policy.get(key) is not None:
                    spec[key] = policy[key]
            found = sim.emulator.create({"apiVersion": "batch/v1", "kind": "Job",
                                         "metadata": {"name": f"{name}-launcher", "namespace": sim.namespace,
                                                      "ownerReferences": [_owner(job)]}, "spec": spec})
        return found

    def _follow_launcher(self, sim: ClusterSim, job: dict[str, Any], pod: dict[str, Any]) -> None:
        """The launcher Job's controller: a new pod per failure up to ``backoffLimit``, the deadline, the TTL."""
        em, ns, name = sim.emulator, sim.namespace, job["metadata"]["name"]
        launcher_job = em.get("batch/v1", "Job", ns, f"{name}-launcher")
        if launcher_job is None:
            return
        if self._finished(name):
            ttl = launcher_job["spec"].get("ttlSecondsAfterFinished")
            if ttl is not None and time.time() - self.ended_at.get(name, time.time()) >= ttl:
                em.delete("batch/v1", "Job", ns, launcher_job["metadata"]["name"], propagation="Background")
            return
        deadline = launcher_job["spec"].get("activeDeadlineSeconds")
        started = calendar_seconds(launcher_job["metadata"]["creationTimestamp"])
        if deadline is not None and time.time() - started > deadline:
            em.delete("v1", "Pod", ns, pod["metadata"]["name"])
            # Kubernetes' Job controller (pkg/controller/job/job_controller.go, v1.32): DeadlineExceeded.
            self.done(sim, job, 1, reason="DeadlineExceeded", why="Job was active longer than specified deadline")
            return
        phase = (pod.get("status") or {}).get("phase")
        if phase == "Succeeded":
            self.done(sim, job, 0)
        elif phase == "Failed":
            if self.attempts.get(name, 0) < launcher_job["spec"].get("backoffLimit", 6):
                self.attempts[name] = self.attempts.get(name, 0) + 1  # the next round starts a new launcher pod
                self.pods[self.pod_name(f"{name}-launcher")] = name
                self.host_of[self.pod_name(f"{name}-launcher")] = f"{name}-launcher"
            else:
                statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
                code = ((statuses[0].get("state") or {}).get("terminated") or {}).get("exitCode", 1)
                pod_status = pod.get("status") or {}
                # Kubernetes' Job controller (pkg/controller/job/job_controller.go, v1.32) says BackoffLimitExceeded.
                self.done(sim, job, code, reason=f"BackoffLimitExceeded/{pod_status.get('reason') or ''}",
                          why=f"Job has reached the specified backoff limit: {pod_status.get('message') or ''}")

    def layout(self, job: dict[str, Any]) -> tuple[str, list[tuple[str, str, dict[str, Any], str]], int]:
        name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
        spec = job["spec"]
        worker = spec["mpiReplicaSpecs"]["Worker"]
        hosts = [(f"{name}-worker-{i}", f"{name}-worker-{i}.{name}.{ns}.svc", worker["template"], "worker")
                 for i in range(worker["replicas"])]
        return f"{name}-launcher", hosts, spec.get("slotsPerWorker", 1)

    def launcher_template(self, job: dict[str, Any]) -> dict[str, Any]:
        return job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]

    def refusal(self, job: dict[str, Any]) -> tuple[str, str, bool] | None:
        """MPI Operator v0.8.0: the last worker's name must be a DNS-1035 label, else a ValidationError
        Event and no requeue (pkg/apis/kubeflow/validation/validation.go; mpi_job_controller.go, syncHandler)."""
        name = job["metadata"]["name"]
        host = f"{name}-worker-{max(job['spec']['mpiReplicaSpecs']['Worker'].get('replicas') or 1, 1) - 1}"
        if len(host) <= 63:
            return None
        return ("ValidationError", f'Found validation errors: metadata.name: Invalid value: "{name}": will not able to create pod '
                                   f'and service with invalid DNS label "{host}": must be no more than 63 characters', False)

    def pod_labels(self, job: dict[str, Any], pod: str, role: str) -> dict[str, str]:
        """The v2beta1 controller's ``defaultLabels`` (operator, job, role) and, on workers, the replica index."""
        labels = {"training.kubeflow.org/operator-name": "mpi-operator",
                  "training.kubeflow.org/job-name": job["metadata"]["name"], "training.kubeflow.org/job-role": role}
        if role == "worker":
            labels["training.kubeflow.org/replica-index"] = pod.rsplit("-", 1)[1]
        return labels

    def done(self, sim: ClusterSim, job: dict[str, Any], code: int, reason: str = "", why: str = "") -> None:
        name, ns = job["metadata"]["name"], sim.namespace
        self.ended_at[name] = time.time()
        if code == 0:
            self._set_conditions(sim, job, ("Succeeded", f"MPIJob {ns}/{name} successfully completed."))
        else:
            # v0.8.0 copies the launcher Job's Failed condition, reason and message (updateMPIJobFailedStatus in
            # mpi_job_controller.go); for BackoffLimitExceeded it appends the last failed pod's reason and message.
            self._set_conditions(sim, job, ("Failed", why or f"MPIJob {ns}/{name} has failed", reason or "MPIJobFailed"))
        if (job["spec"].get("runPolicy") or {}).get("cleanPodPolicy", "Running") in ("Running", "All"):
            for pod, job_name in list(self.pods.items()):
                if job_name == name and "worker" in pod and sim.emulator.get("v1", "Pod", ns, pod) is not None:
                    sim.emulator.delete("v1", "Pod", ns, pod)


class TrainerSim(_MPIJobs):
    """Kubeflow Trainer v2.3.0 running a TrainJob on an MPI runtime whose launcher is a node too."""

    api_version = "trainer.kubeflow.org/v1alpha1"
    kind = "TrainJob"
    hostfile_suffix = "-mpi-hostfile"  # pkg/constants/constants.go MPIHostfileConfigMapSuffix

    def pod_name(self, host: str) -> str:
        """An Indexed Job's pod: ``<job>-<index>-<5 random>`` (Kubernetes' Job controller), while JobSet sets
        its hostname to ``<jobset>-<replicatedJob>-<job index>-<pod index>`` (jobset v0.12.0). A JobSet
        restart makes new Jobs, so new pods with new names."""
        alphabet = "bcdfghjklmnpqrstvwxz2456789"  # apimachinery's rand.String letters
        attempt = next((n for job, n in self.restarts.items() if host.startswith(job + "-")), 0)
        digest = hashlib.sha256(f"{host}/{attempt}".encode()).digest()
        return f"{host}-{''.join(alphabet[b % len(alphabet)] for b in digest[:5])}"

    def __init__(self, subnet: str, runtime: dict[str, Any]) -> None:
        """``runtime``: a ClusterTrainingRuntime the cluster has installed (put into the emulator on the first round)."""
        super().__init__(subnet)
        self.installed = runtime
        self._runtimes: dict[str, dict[str, Any]] = {}  # job -> the runtime it was made from
        self.restarts: dict[str, int] = {}  # job -> how many times its JobSet was restarted

    def reconcile(self, sim: ClusterSim) -> None:
        meta = self.installed["metadata"]
        if sim.emulator.get(self.installed["apiVersion"], self.installed["kind"], None, meta["name"]) is None:
            sim.emulator.create(json.loads(json.dumps(self.installed)))
        super().reconcile(sim)

    def prepare(self, sim: ClusterSim, job: dict[str, Any]) -> None:
        self.runtime_of(sim, job)

    def runtime_of(self, sim: ClusterSim, job: dict[str, Any]) -> dict[str, Any]:
        """The (Cluster)TrainingRuntime the TrainJob names, read when the job is first seen (as the Trainer does)."""
        name = job["metadata"]["name"]
        if name not in self._runtimes:
            ref = job["spec"]["runtimeRef"]
            namespace = None if ref.get("kind") == "ClusterTrainingRuntime" else sim.namespace
            self._runtimes[name] = sim.emulator.get(self.api_version, ref.get("kind", "ClusterTrainingRuntime"), namespace,
                                                    ref["name"]) or self.installed
        return self._runtimes[name]

    def _replicated(self, job: dict[str, Any], role: str) -> dict[str, Any]:
        """The runtime's pod template for ``role``, with the TrainJob's trainer and patches applied.

        As Trainer v2.3.0's JobSet builder (pkg/runtime/framework/plugins/jobset/builder.go, ``Trainer``):
        image, command and args go only to the replicatedJob labelled as the trainer step (the launcher),
        env to it and, with runLauncherAsNode, to the node too; resourcesPerNode to both
        (pkg/runtime/core/trainingruntime.go)."""
        runtime = self._runtimes[job["metadata"]["name"]]
        template = next(j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"] if j["name"] == role)
        pod = json.loads(json.dumps(template["template"]["spec"]["template"]))
        trainer = job["spec"]["trainer"]
        container = pod["spec"]["containers"][0]
        trainer_step = ((template["template"].get("metadata") or {}).get("labels") or {}).get(
            "trainer.kubeflow.org/trainjob-ancestor-step") == "trainer"
        if trainer_step:
            container["image"] = trainer.get("image") or container.get("image")
            if trainer.get("command"):
                container["command"] = trainer["command"]
        container["env"] = [*(container.get("env") or []), *(trainer.get("env") or [])]
        container["resources"] = trainer.get("resourcesPerNode") or {}
        # JobSet v0.12.0's webhook defaults every pod template to OnFailure (pkg/webhooks/jobset_webhook.go).
        pod["spec"].setdefault("restartPolicy", "OnFailure")
        for patch in job["spec"].get("runtimePatches") or []:
            for replicated in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
                if replicated["name"] != role:
                    continue
                patched = replicated["template"]["spec"]["template"]
                pod.setdefault("metadata", {}).setdefault("labels", {}).update(patched.get("metadata", {}).get("labels", {}))
                spec_patch = dict(patched.get("spec") or {})
                for container_patch in spec_patch.pop("containers", []):
                    if container_patch["name"] == container["name"]:  # JobSet's strategic merge: containers by name
                        container.setdefault("volumeMounts", []).extend(container_patch.get("volumeMounts", []))
                        if "securityContext" in container_patch:
                            container["securityContext"] = {**(container.get("securityContext") or {}), **container_patch["securityContext"]}
                pod["spec"].update(spec_patch)
        return pod

    def layout(self, job: dict[str, Any]) -> tuple[str, list[tuple[str, str, dict[str, Any], str]], int]:
        """Trainer v2.3.0 with runLauncherAsNode: max(numNodes - 1, 1) node pods and the launcher, all in the
        hostfile with numProcPerNode slots, in the runtime's replicatedJobs order (pkg/runtime/framework/
        plugins/mpi/mpi.go EnforceMLPolicy and buildHostFileConfigMap; JobSet's endpoints
        ``<job>-<replicatedJob>-0-<i>.<job>``, pkg/runtime/framework/plugins/jobset/jobset.go)."""
        name = job["metadata"]["name"]
        trainer = job["spec"]["trainer"]
        launcher = f"{name}-launcher-0-0"
        hosts = []
        for replicated in self._runtimes[name]["spec"]["template"]["spec"]["replicatedJobs"]:
            if replicated["name"] == "launcher":
                hosts.append((launcher, f"{launcher}.{name}", self._replicated(job, "launcher"), "launcher"))
            elif replicated["name"] == "node":
                node = self._replicated(job, "node")
                for i in range(max(trainer["numNodes"] - 1, 1)):
                    pod = json.loads(json.dumps(node))
                    pod["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] = str(i)
                    hosts.append((f"{name}-node-0-{i}", f"{name}-node-0-{i}.{name}", pod, "node"))
        return launcher, hosts, trainer["numProcPerNode"]

    def launcher_template(self, job: dict[str, Any]) -> dict[str, Any]:
        return self._replicated(job, "launcher")

    def refusal(self, job: dict[str, Any]) -> tuple[str, str, bool] | None:
        """JobSet v0.12.0's webhook refuses a JobSet whose longest pod name, ``<jobset>-<replicatedJob>-<job
        index>-<pod index>-abcde``, passes 63 characters (pkg/webhooks/jobset_webhook.go); Kubeflow Trainer
        v2.3.0 then only records TrainJobResourcesCreationFailed (pkg/controller/trainjob_controller.go)."""
        name = job["metadata"]["name"]
        counts = {"node": max(job["spec"]["trainer"].get("numNodes", 1) - 1, 1), "launcher": 1}
        for index, replicated in enumerate(self._runtimes[name]["spec"]["template"]["spec"]["replicatedJobs"]):
            role = replicated["name"]
            if len(f"{name}-{role}-0-{counts.get(role, 1) - 1}-abcde") > 63:
                return ("TrainJobResourcesCreationFailed",
                        'TrainJob resources reconciliation failed: admission webhook "vjobset.kb.io" denied the request: '
                        f'spec.replicatedJobs[{index}].name: Invalid value: "{name}-{role}-0": JobSet name is too long, '
                        "pod names generated for this JobSet will exceed 63 characters", True)
        return None

    def pod_labels(self, job: dict[str, Any], pod: str, role: str) -> dict[str, str]:
        """JobSet's labels; the Job's completion index (the node pods' comes with their template)."""
        labels = {"jobset.sigs.k8s.io/jobset-name": job["metadata"]["name"], "jobset.sigs.k8s.io/replicatedjob-name": role,
                  "jobset.sigs.k8s.io/job-index": "0"}
        if role == "launcher":
            labels["batch.kubernetes.io/job-completion-index"] = "0"
        return labels

    def _follow_launcher(self, sim: ClusterSim, job: dict[str, Any], pod: dict[str, Any]) -> None:
        """The launcher's Job and the JobSet: a Job fails once its pod failed more than ``backoffLimit``
        times (the batch default is 6; with OnFailure the kubelet restarts the container in place and
        each restart counts), and a failed Job restarts every Job of the JobSet while
        ``failurePolicy.maxRestarts`` allows, else fails it (jobset v0.12.0 failure policy)."""
        name = job["metadata"]["name"]
        if self._finished(name):
            return
        status = ((pod.get("status") or {}).get("containerStatuses") or [{}])[0]
        terminated = (status.get("state") or {}).get("terminated") or {}
        phase = (pod.get("status") or {}).get("phase")
        if phase == "Succeeded":
            self.done(sim, job, 0)
            return
        if not terminated or terminated.get("exitCode", 0) == 0:
            return
        launcher = next(j for j in self._runtimes[name]["spec"]["template"]["spec"]["replicatedJobs"] if j["name"] == "launcher")
        backoff = (launcher["template"].get("spec") or {}).get("backoffLimit", 6)
        failures = int(status.get("restartCount") or 0) + 1
        if phase != "Failed" and failures <= backoff:
            return  # the kubelet restarts it in place (OnFailure)
        max_restarts = ((self._runtimes[name]["spec"]["template"]["spec"].get("failurePolicy") or {}).get("maxRestarts", 0))
        if self.restarts.get(name, 0) < max_restarts:
            self.restarts[name] = self.restarts.get(name, 0) + 1
            for pod_name, job_name in list(self.pods.items()):
                if job_name == name and sim.emulator.get("v1", "Pod", sim.namespace, pod_name) is not None:
                    sim.emulator.delete("v1", "Pod", sim.namespace, pod_name)
            _, hosts, _ = self.layout(job)
            launcher_host, *_ = self.layout(job)
            for host in [launcher_host, *(h for h, _, _, _ in hosts)]:
                self.pods[self.pod_name(host)] = name
                self.host_of[self.pod_name(host)] = host
            return
        if phase != "Failed":  # the Job controller stops a pod that the kubelet would restart again
            sim.emulator.delete("v1", "Pod", sim.namespace, pod["metadata"]["name"])
        self.done(sim, job, terminated.get("exitCode", 1))

    def done(self, sim: ClusterSim, job: dict[str, Any], code: int) -> None:
        """The JobSet's end. A finished JobSet deletes its Jobs that are still active (the node Job, whose
        pods only run sshd), foreground, so their pods go too (jobset v0.12.0 pkg/controllers/jobset_controller.go,
        Reconcile: ``if jobSetFinished(js) { r.deleteJobs(ctx, ownedJobs.active) }``)."""
        name = job["metadata"]["name"]
        if code == 0:
            self._set_conditions(sim, job, ("Complete", "jobset completed successfully"))
        else:
            self._set_conditions(sim, job, ("Failed", f"jobset failed: the launcher of {name} exited with code {code}"))
        for pod_name, job_name in list(self.pods.items()):
            pod = sim.emulator.get("v1", "Pod", sim.namespace, pod_name) if job_name == name else None
            if pod is not None and self.host_of.get(pod_name, "").startswith(f"{name}-node-") and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                sim.emulator.delete("v1", "Pod", sim.namespace, pod_name)


def calendar_seconds(stamp: str) -> float:
    """Seconds since the epoch of an RFC 3339 timestamp such as ``2026-12-04T10:00:00Z``."""
    return calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))


def wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
