"""Test code that plays the KubeRay operator (``ray.io/v1`` RayJob, ``K8sJobMode``) against the API emulator.

For each RayJob it does what KubeRay v1.7 does, closely enough for dsnb's side of the
conversation:

- it sets ``jobDeploymentStatus: Initializing`` (with ``jobId``, ``rayClusterName``,
  ``dashboardURL``, ``startTime``) and creates a RayCluster owned by the RayJob, carrying the
  RayJob's labels; the cluster's head and worker pods come from ``rayClusterSpec``'s
  templates, owned by the RayCluster, with KubeRay's ``ray.io/*`` labels. They run nothing
  (annotation ``sim.dsnb.io/no-process``): **real Ray cannot run inside the sim**, so no
  ``ray start`` runs and there is no dashboard;
- once the head and every worker run, it creates the submitter: a batch/v1 Job named after
  the RayJob (owned by it) and its pod from ``submitterPodTemplate`` (owned by the Job), and
  sets ``jobDeploymentStatus: Running``, ``jobStatus: PENDING``. Instead of ``ray job submit``
  and ``ray job logs --follow``, the pod runs this file as a fake driver
  (``python kuberay_sim.py driver``) with the runtime environment's variables: it prints what
  dsnb's real driver's log looks like through ``ray job logs`` (Ray's ``(RayTrainWorker
  pid=N, ip=...)`` prefixes, each worker's ``DSNB_RAY_WORKER`` announcement, ``DSNB_METRIC``
  lines, the closing ``DSNB_RAY_OUTCOME``) and exits 0, as ``ray job logs`` does whatever
  the job's fate. What it prints is chosen by the job's first script argument (see
  :func:`driver_lines`). With ``run_scripts``, the fake driver runs the job's script for real
  instead, once per Ray Train worker (``RANK``, ``WORLD_SIZE``... as Ray Train sets them), each
  worker's lines under its ``(RayTrainWorker pid=N, ip=...)`` prefix, in the job's shipped
  ``working_dir`` when it has one (unpacked, as dsnb's worker loop does on a worker pod, from the
  worker group's volumes, which the submitter pod then mounts too); the first worker to fail
  ends the group, as Ray Train's does, and the outcome line carries its rank and exit code;
- it reports ``jobStatus: RUNNING`` while the submitter runs and, when it has ended,
  ``Complete``/``SUCCEEDED`` or ``Failed``/``FAILED`` with ``reason: AppFailed``, as the
  dashboard would have told KubeRay (with ``run_scripts``, from the outcome the driver printed);
- with ``shutdownAfterJobFinishes``, ``ttlSecondsAfterFinished`` after the end it deletes the
  RayCluster (the head and worker pods go with it) and keeps the submitter Job and its pod;
- a RayJob gets KubeRay's finalizer: deleting it only marks it until the operator, having stopped
  the Ray job, removes the finalizer; then the RayCluster, the submitter Job and their pods are
  collected (ownerReferences, in the emulator).

For each RayService, as KubeRay v1.7 does for a new one:

- it creates the RayCluster (owned by the RayService) with head and worker pods that run
  nothing, and reports it as the *pending* cluster (``pendingServiceStatus.rayClusterName``,
  conditions ``Ready: False`` reason ``Initializing`` and ``UpgradeInProgress: False``);
- once every Ray pod runs, it reports the Serve application of ``serveConfigV2`` as Serve
  would through the dashboard: ``DEPLOYING`` in ``pendingServiceStatus.applicationStatuses``,
  then either ``DEPLOY_FAILED`` with a traceback-like message (the application's ``args.model``
  is one of ``deploy_errors``: a loader that raises) or ``RUNNING``/``HEALTHY``;
- a RUNNING application gets the cluster promoted: the serve Service ``<name>-serve-svc``
  (port 8000, owned by the RayService) is created, the application statuses move to
  ``activeServiceStatus``, ``pendingServiceStatus`` is emptied, ``serviceStatus: Running``,
  ``numServeEndpoints`` and ``Ready: True`` reason ``NonZeroServeEndpoints``.

A RayService gets KubeRay's finalizer too: deleted, it stays until the operator has deleted its
Ray clusters. No Ray Serve runs, and nothing answers on the serve Service's address.
"""

from __future__ import annotations

import json
import os
import random
import runpy
import string
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

FAKE = "sim.dsnb.io/no-process"
API = "ray.io/v1"
JOB_FINALIZER = "ray.io/rayjob-finalizer"  # ray-operator/controllers/ray/utils/constant.go, v1.7.0
SERVICE_FINALIZER = "ray.io/rayservice-finalizer"
#: The fake driver's behaviour, by the job's first script argument.
MODES = ("ok", "fail", "sleep")
OUTCOME = "DSNB_RAY_OUTCOME "  # dsnb.runtime.ray_train_entry.OUTCOME_TAG: the sim imports no dsnb


def _suffix() -> str:
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=5))


def _owner(obj: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def runtime_env_vars(rayjob: dict[str, Any]) -> dict[str, str]:
    """The ``env_vars`` of a RayJob's ``runtimeEnvYAML`` (what Ray gives the driver and workers)."""
    text = rayjob["spec"].get("runtimeEnvYAML") or ""
    return dict((yaml.safe_load(text) or {}).get("env_vars") or {}) if text else {}


def job_mode(rayjob: dict[str, Any]) -> str:
    job = json.loads(runtime_env_vars(rayjob).get("DSNB_RAY_JOB", "{}"))
    args = job.get("args") or []
    return args[0] if args and args[0] in MODES else "ok"


class KubeRaySim:
    """The KubeRay operator for one namespace; see the module docstring.

    Args:
        end_early: report the Ray job's end as soon as it runs, while the submitter is still
            printing the driver log's end (1 s later), as happens when KubeRay hears of the end
            from the dashboard before ``ray job logs`` has caught up.
        drop_submitter_once: the first submitter pod's ``ray job logs --follow`` fails after the
            first step (KubeRay v1.7.0 notes it can exit non-zero on a closed WebSocket,
            rayjob_controller.go); its Job (``backoffLimit: 2``) starts another pod, whose
            ``ray job logs --follow`` prints the driver's log again from the start.
        run_scripts: the driver runs the job's script for real on each worker (see the module docstring).

    Attributes:
        seen: RayJob name -> the RayJob as first seen.
        submitter_pods: RayJob name -> how many submitter pods were made for it.
    """

    def __init__(self, end_early: bool = False, deploy_errors: dict[str, str] | None = None,
                 drop_submitter_once: bool = False, run_scripts: bool = False) -> None:
        self.end_early = end_early
        self.run_scripts = run_scripts
        self.drop_submitter_once = drop_submitter_once
        self.deploy_errors = dict(deploy_errors or {})
        self.seen: dict[str, dict[str, Any]] = {}
        self.auth: dict[str, str] = {}  # RayCluster name -> the Secret holding its token
        self.submitter_pods: dict[str, int] = {}  # RayJob name -> submitter pods made for it
        self.jobs: dict[str, dict[str, Any]] = {}  # RayJob name -> what the operator keeps in memory
        self.services: dict[str, dict[str, Any]] = {}  # RayService name -> what the operator keeps in memory

    def netns_for(self, pod: str) -> str | None:
        return None

    def close(self) -> None:
        self.jobs.clear()
        self.services.clear()

    # -- the controller --------------------------------------------------------------------
    def reconcile(self, sim: Any) -> None:
        em, ns = sim.emulator, sim.namespace
        alive = set()
        for rayjob in em.list(API, "RayJob", ns):
            name = rayjob["metadata"]["name"]
            alive.add(name)
            if self._finalize(sim, rayjob, JOB_FINALIZER, done=True):
                continue
            self.seen.setdefault(name, rayjob)
            state = self.jobs.get(name)
            if state is None or state["uid"] != rayjob["metadata"]["uid"]:
                state = self.jobs[name] = {"uid": rayjob["metadata"]["uid"], "cluster": f"{name}-{_suffix()}", "ended": False}
                self._create_cluster(sim, rayjob, state["cluster"])
                self._status(sim, name, {"jobDeploymentStatus": "Initializing", "jobId": name, "startTime": _now(),
                                         "rayClusterName": state["cluster"],
                                         "dashboardURL": f"{state['cluster']}-head-svc.{ns}.svc.cluster.local:8265"})
                continue
            if state["ended"]:
                self._shutdown_after_finish(sim, rayjob, state)
                continue
            status = rayjob.get("status") or {}
            deployment = status.get("jobDeploymentStatus")
            if deployment == "Initializing":
                ray_pods = em.list("v1", "Pod", ns, f"ray.io/cluster={state['cluster']}")
                expected = 1 + sum(g.get("replicas", 1) for g in rayjob["spec"]["rayClusterSpec"].get("workerGroupSpecs") or [])
                if len(ray_pods) == expected and all((p.get("status") or {}).get("phase") == "Running" for p in ray_pods):
                    state["submitter"] = self._create_submitter(sim, rayjob)
                    self._status(sim, name, {"jobDeploymentStatus": "Running", "jobStatus": "PENDING"})
            elif deployment == "Running":
                pod = em.get("v1", "Pod", ns, state["submitter"])
                phase = ((pod or {}).get("status") or {}).get("phase")
                if phase == "Failed" and state.get("submitters", 1) <= 2:  # the submitter Job's backoffLimit: 2
                    state["submitters"] = state.get("submitters", 1) + 1
                    state["submitter"] = self._create_submitter(sim, rayjob, retry=True)
                    continue
                if phase == "Running" and status.get("jobStatus") == "PENDING":
                    self._status(sim, name, {"jobStatus": "RUNNING", "rayJobInfo": {"startTime": _now()}})
                elif phase in ("Succeeded", "Failed") or (self.end_early and status.get("jobStatus") == "RUNNING"):
                    self._end(sim, rayjob, state)
        for name in [n for n in self.jobs if n not in alive]:
            del self.jobs[name]
        self._reconcile_services(sim)

    def _finalize(self, sim: Any, obj: dict[str, Any], finalizer: str, done: bool) -> bool:
        """KubeRay v1.7.0's finalizers: a new RayJob or RayService gets its finalizer (rayjob_controller.go,
        ``RayJobStopJobFinalizer``; rayservice_controller.go, ``RayServiceFinalizer``); one being deleted loses
        it once KubeRay is done (``done``: the Ray job stopped, whether or not that worked; a RayService's Ray
        clusters gone), and only then does the API server let it go. True while the object is being deleted."""
        meta = obj["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if meta.get("deletionTimestamp"):
            if done and finalizer in finalizers:
                sim.emulator.update({**obj, "metadata": {**meta, "finalizers": [f for f in finalizers if f != finalizer]}})
            return True
        if finalizer not in finalizers:
            sim.emulator.update({**obj, "metadata": {**meta, "finalizers": [*finalizers, finalizer]}})
        return False

    def _status(self, sim: Any, name: str, status: dict[str, Any]) -> None:
        sim.emulator.patch_status(API, "RayJob", sim.namespace, name, status)

    def _create_cluster(self, sim: Any, owner: dict[str, Any], cluster_name: str) -> None:
        em, ns = sim.emulator, sim.namespace
        spec = owner["spec"]["rayClusterSpec" if owner["kind"] == "RayJob" else "rayClusterConfig"]
        cluster = em.create({
            "apiVersion": API, "kind": "RayCluster",
            "metadata": {"name": cluster_name, "namespace": ns, "ownerReferences": [_owner(owner)],
                         "labels": {**(owner["metadata"].get("labels") or {}),
                                    "ray.io/originated-from-cr-name": owner["metadata"]["name"],
                                    "ray.io/originated-from-crd": owner["kind"]}},
            "spec": spec,
        })
        auth = self._auth_secret(sim, cluster)
        head = _with_token(spec["headGroupSpec"]["template"], auth)
        self._pod(sim, f"{cluster_name}-head-{_suffix()}", head, cluster,
                  {"ray.io/cluster": cluster_name, "ray.io/node-type": "head", "ray.io/group": "headgroup"})
        for group in spec.get("workerGroupSpecs") or []:
            for _ in range(group.get("replicas", 1)):
                self._pod(sim, f"{cluster_name}-{group['groupName']}-worker-{_suffix()}", _with_token(group["template"], auth),
                          cluster, {"ray.io/cluster": cluster_name, "ray.io/node-type": "worker", "ray.io/group": group["groupName"]})

    def _auth_secret(self, sim: Any, cluster: dict[str, Any]) -> str | None:
        """KubeRay v1.7.0 with ``authOptions.mode: token`` and no ``secretName`` (raycluster_controller.go,
        reconcileAuthSecret/createAuthSecret): a Secret named after the RayCluster, owned by it, holding a random
        ``auth_token``. Its name, or None when the cluster has no token authentication."""
        options = cluster["spec"].get("authOptions") or {}
        if options.get("mode", "token" if options else "disabled") != "token":
            return None
        if options.get("secretName"):
            return options["secretName"]
        name = cluster["metadata"]["name"]
        sim.emulator.create({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                             "metadata": {"name": name, "namespace": sim.namespace, "labels": {"ray.io/cluster": name},
                                          "ownerReferences": [_owner(cluster)]},
                             "stringData": {"auth_token": "".join(random.choices(string.ascii_letters + string.digits, k=43))}})
        self.auth[name] = name
        return name

    def _pod(self, sim: Any, name: str, template: dict[str, Any], owner: dict[str, Any], labels: dict[str, str],
             fake: bool = True, spec: dict[str, Any] | None = None) -> None:
        sim.emulator.create({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": sim.namespace,
                         "labels": {**((template.get("metadata") or {}).get("labels") or {}), **labels},
                         "annotations": {FAKE: "true"} if fake else {}, "ownerReferences": [_owner(owner)]},
            "spec": spec or template["spec"],
            "status": {"phase": "Pending"},
        })

    def _create_submitter(self, sim: Any, rayjob: dict[str, Any], retry: bool = False) -> str:
        em, ns = sim.emulator, sim.namespace
        name = rayjob["metadata"]["name"]
        self.submitter_pods[name] = self.submitter_pods.get(name, 0) + 1
        if retry:  # another pod of the same submitter Job, whose follow does not drop
            job = em.get("batch/v1", "Job", ns, name)
            template = json.loads(json.dumps(self.jobs[name]["submitter_template"]))
            for var in template["spec"]["containers"][0]["env"]:
                if var["name"] == "DSNB_SIM_DROP_AFTER":
                    var["value"] = ""
            pod_name = f"{name}-{_suffix()}"
            self._pod(sim, pod_name, template, job, {"batch.kubernetes.io/job-name": name, "job-name": name},
                      fake=False, spec=template["spec"])
            return pod_name
        template = json.loads(json.dumps(rayjob["spec"].get("submitterPodTemplate") or {}))
        if not template:
            head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
            template = {"spec": {"restartPolicy": "Never", "containers": [{"name": "ray-job-submitter", "image": head["image"]}]}}
        job = em.create({"apiVersion": "batch/v1", "kind": "Job",
                         "metadata": {"name": name, "namespace": ns, "ownerReferences": [_owner(rayjob)],
                                      "labels": {"ray.io/originated-from-cr-name": name, "ray.io/originated-from-crd": "RayJob"}},
                         "spec": {"backoffLimit": 2, "template": template}})
        pod_spec = template["spec"]
        container = pod_spec["containers"][0]
        state = self.jobs[name]
        address = f"http://{state['cluster']}-head-svc.{ns}.svc.cluster.local:8265"
        # What KubeRay adds, then the runtime environment as Ray gives it to the driver.
        env = {"RAY_DASHBOARD_ADDRESS": address, "RAY_JOB_SUBMISSION_ID": name, **runtime_env_vars(rayjob),
               "DSNB_SIM_MODE": job_mode(rayjob), "DSNB_SIM_LATE_TAIL": "1" if self.end_early else "",
               "DSNB_SIM_DROP_AFTER": "1" if self.drop_submitter_once else "",
               "DSNB_SIM_RUN_SCRIPT": "1" if self.run_scripts else ""}
        container["env"] = [*(container.get("env") or []), *({"name": k, "value": v} for k, v in env.items())]
        container["command"] = [sys.executable, str(Path(__file__).resolve()), "driver"]
        if self.run_scripts:  # the Ray Train workers run here: the pod mounts what the worker pods do
            worker = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
            mounts = {m["name"] for m in worker["containers"][0].get("volumeMounts") or []} - {"dshm"}
            pod_spec["volumes"] = [*(pod_spec.get("volumes") or []), *(v for v in worker.get("volumes") or [] if v["name"] in mounts)]
            container["volumeMounts"] = [*(container.get("volumeMounts") or []),
                                         *(m for m in worker["containers"][0].get("volumeMounts") or [] if m["name"] in mounts)]
        if state["cluster"] in self.auth:  # rayjob_controller.go v1.7.0: SetContainerTokenAuthEnvVars on the submitter
            container["env"] = _token_env(container["env"], self.auth[state["cluster"]])
            container["env"].append({"name": "DSNB_SIM_CLUSTER_AUTH", "value": "token"})
        state["submitter_template"] = json.loads(json.dumps(template))
        pod_name = f"{name}-{_suffix()}"
        self._pod(sim, pod_name, template, job, {"batch.kubernetes.io/job-name": name, "job-name": name},
                  fake=False, spec=pod_spec)
        return pod_name

    def _shutdown_after_finish(self, sim: Any, rayjob: dict[str, Any], state: dict[str, Any]) -> None:
        """KubeRay v1.7.0 with ``shutdownAfterJobFinishes`` (rayjob_controller.go, handleShutdownAfterJobFinishes):
        ``ttlSecondsAfterFinished`` after the end it deletes the RayCluster, and with it the head and worker
        pods, but keeps the submitter Job and its pod (the driver's log) and the RayJob."""
        if not rayjob["spec"].get("shutdownAfterJobFinishes") or state.get("shut_down"):
            return
        if time.time() - state["ended_at"] < rayjob["spec"].get("ttlSecondsAfterFinished", 0):
            return
        state["shut_down"] = True
        if sim.emulator.get(API, "RayCluster", sim.namespace, state["cluster"]) is not None:
            sim.emulator.delete(API, "RayCluster", sim.namespace, state["cluster"])

    def _end(self, sim: Any, rayjob: dict[str, Any], state: dict[str, Any]) -> None:
        name = rayjob["metadata"]["name"]
        state["ended"], state["ended_at"] = True, time.time()
        end = {"endTime": _now(), "rayJobInfo": {**((rayjob.get("status") or {}).get("rayJobInfo") or {}), "endTime": _now()}}
        if self._failed(sim, rayjob, state):
            # KubeRay v1.7.0 copies Ray's job message (rayjob_controller.go, ``Status.Message = jobInfo.Message``);
            # Ray's own for a failed entrypoint names its exit code and the log's tail, not a rank.
            self._status(sim, name, {**end, "jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed",
                                     "failed": 1, "message": "Job entrypoint command failed with exit code 1, last available "
                                                             "logs (truncated to 20,000 chars):\nTraining errored after 1 iterations"})
        else:
            self._status(sim, name, {**end, "jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "succeeded": 1})

    def _failed(self, sim: Any, rayjob: dict[str, Any], state: dict[str, Any]) -> bool:
        """Whether the Ray job failed: by the outcome its driver printed when it ran the script, else by its mode."""
        if not self.run_scripts:
            return job_mode(rayjob) == "fail"
        outcomes = [line for line in sim.emulator.log_lines(sim.namespace, state["submitter"]) if line.startswith(OUTCOME)]
        return not outcomes or json.loads(outcomes[-1][len(OUTCOME):]).get("exit_code") != 0

    # -- RayServices -----------------------------------------------------------------------
    def _reconcile_services(self, sim: Any) -> None:
        em, ns = sim.emulator, sim.namespace
        alive = set()
        for service in em.list(API, "RayService", ns):
            name = service["metadata"]["name"]
            alive.add(name)
            if service["metadata"].get("deletionTimestamp"):  # KubeRay deletes its Ray clusters first (cleanUpRayClusterInstance)
                owned = [c for c in em.list(API, "RayCluster", ns)
                         if any(r.get("uid") == service["metadata"]["uid"] for r in c["metadata"].get("ownerReferences") or [])]
                for cluster in owned:
                    em.delete(API, "RayCluster", ns, cluster["metadata"]["name"])
                self._finalize(sim, service, SERVICE_FINALIZER, done=not owned)
                continue
            self._finalize(sim, service, SERVICE_FINALIZER, done=False)
            state = self.services.get(name)
            if state is None or state["uid"] != service["metadata"]["uid"]:
                state = self.services[name] = {"uid": service["metadata"]["uid"], "cluster": f"{name}-{_suffix()}", "step": "cluster"}
                self._create_cluster(sim, service, state["cluster"])
                self._service_status(sim, name, {
                    "conditions": [_condition("Ready", "False", "Initializing", "RayService is initializing"),
                                   _condition("UpgradeInProgress", "False", "NoActiveCluster", "no active cluster")],
                    "pendingServiceStatus": {"rayClusterName": state["cluster"]}, "observedGeneration": 1,
                    "lastUpdateTime": _now()})
                continue
            apps = (yaml.safe_load(service["spec"].get("serveConfigV2") or "") or {}).get("applications") or []
            if state["step"] == "cluster":
                ray_pods = em.list("v1", "Pod", ns, f"ray.io/cluster={state['cluster']}")
                expected = 1 + sum(g.get("replicas", 1) for g in service["spec"]["rayClusterConfig"].get("workerGroupSpecs") or [])
                if len(ray_pods) == expected and all((p.get("status") or {}).get("phase") == "Running" for p in ray_pods):
                    state["step"] = "deploying"
                    self._service_status(sim, name, {"pendingServiceStatus": {"applicationStatuses": {
                        app["name"]: {"status": "DEPLOYING", "serveDeploymentStatuses": {
                            d["name"]: {"status": "UPDATING"} for d in app.get("deployments") or []}} for app in apps}}})
            elif state["step"] == "deploying":
                failing = {app["name"]: self.deploy_errors[model] for app in apps
                           if (model := (app.get("args") or {}).get("model")) in self.deploy_errors}
                if failing:
                    state["step"] = "failed"
                    self._service_status(sim, name, {"pendingServiceStatus": {"applicationStatuses": {
                        app: {"status": "DEPLOY_FAILED", "message": _deploy_failure(app, error), "serveDeploymentStatuses": None}
                        for app, error in failing.items()}}})
                    continue
                state["step"] = "running"
                em.create({"apiVersion": "v1", "kind": "Service",
                           "metadata": {"name": f"{name}-serve-svc", "namespace": ns, "ownerReferences": [_owner(service)],
                                        "labels": {"ray.io/serve": f"{name}-serve", "ray.io/originated-from-cr-name": name,
                                                   "ray.io/originated-from-crd": "RayService"}},
                           "spec": {"selector": {"ray.io/cluster": state["cluster"], "ray.io/serve": "true"},
                                    "ports": [{"name": "serve", "port": 8000, "targetPort": 8000}]}})
                running = {app["name"]: {"status": "RUNNING", "serveDeploymentStatuses": {
                    d["name"]: {"status": "HEALTHY"} for d in app.get("deployments") or []}} for app in apps}
                endpoints = len(em.list("v1", "Pod", ns, f"ray.io/cluster={state['cluster']}"))
                self._service_status(sim, name, {
                    "activeServiceStatus": {"rayClusterName": state["cluster"], "applicationStatuses": running},
                    "pendingServiceStatus": None, "serviceStatus": "Running", "numServeEndpoints": endpoints,
                    "conditions": [_condition("Ready", "True", "NonZeroServeEndpoints", "Number of serve endpoints is greater than 0"),
                                   _condition("UpgradeInProgress", "False", "NoPendingCluster", "no pending cluster")],
                    "lastUpdateTime": _now()})
        for name in [n for n in self.services if n not in alive]:
            del self.services[name]

    def _service_status(self, sim: Any, name: str, status: dict[str, Any]) -> None:
        sim.emulator.patch_status(API, "RayService", sim.namespace, name, status)


def _token_env(env: list[dict[str, Any]], secret: str) -> list[dict[str, Any]]:
    """``env`` with Ray's token variables, as KubeRay v1.7.0 adds them (common/pod.go, SetContainerTokenAuthEnvVars):
    ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` from the Secret's ``auth_token``, unless already set."""
    names = {var["name"] for var in env}
    added = [] if "RAY_AUTH_MODE" in names else [{"name": "RAY_AUTH_MODE", "value": "token"}]
    if "RAY_AUTH_TOKEN" not in names:
        added.append({"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "auth_token"}}})
    return [*env, *added]


def _with_token(template: dict[str, Any], secret: str | None) -> dict[str, Any]:
    """A Ray pod template whose Ray container has the token variables (KubeRay's configureTokenAuth)."""
    if secret is None:
        return template
    template = json.loads(json.dumps(template))
    container = template["spec"]["containers"][0]
    container["env"] = _token_env(container.get("env") or [], secret)
    return template


def _condition(kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": _now()}


def _deploy_failure(app: str, error: str) -> str:
    """What Serve says of an application whose builder or replica constructor raised."""
    return (f"Deploying application {app} failed: The deployment failed to start 3 times in a row. "
            "This may be due to a problem with its constructor or initial health check failing.\n"
            "Traceback (most recent call last):\n"
            '  File "/home/ray/anaconda3/lib/python3.11/site-packages/dsnb/runtime/server/model.py", line 52, in load_module\n'
            f"{error}")


# -- the fake driver -------------------------------------------------------------------------------
def driver_lines(job: dict[str, Any], mode: str, submission_id: str) -> tuple[list[str], list[str]]:
    """(lines before the training steps, lines after them) of the driver's log through ``ray job logs``.

    ``mode``: ``ok`` (3 steps per rank, then success), ``fail`` (rank 1 exits with code 3
    after one step), ``sleep`` (steps until stopped).
    """
    workers, procs = job["num_workers"], job["procs_per_node"]
    head = [f"Job '{submission_id}' submitted successfully",
            "Tailing logs until the job exits (disable with --no-wait):",
            f"(TrainController pid=70) Started training worker group of size {workers}"]
    for rank in range(workers):
        node = rank // procs
        head.append(f"(RayTrainWorker pid={100 + rank}, ip=10.244.{node}.5) DSNB_RAY_WORKER "
                    + json.dumps({"rank": rank, "pid": 100 + rank, "node": node}))
    if mode == "fail":
        tail = [f"(RayTrainWorker pid=101, ip=10.244.{1 // procs}.5) Traceback (most recent call last):",
                f"(RayTrainWorker pid=101, ip=10.244.{1 // procs}.5) RuntimeError: rank 1 ran out of data",
                "Training errored after 1 iterations",
                OUTCOME + json.dumps({"exit_code": 1, "failed_rank": 1, "rank_exit_code": 3,
                                                  "error": "rank 1 exited with code 3"})]
    else:
        tail = ["Training finished", OUTCOME + json.dumps({"exit_code": 0})]
    return head, tail


def step_lines(job: dict[str, Any], step: int) -> list[str]:
    procs = job["procs_per_node"]
    lines = []
    for rank in range(job["num_workers"]):
        prefix = f"(RayTrainWorker pid={100 + rank}, ip=10.244.{rank // procs}.5)"
        lines.append(f"{prefix} step {step} on rank {rank}")
        lines.append(f"{prefix} DSNB_METRIC " + json.dumps({"step": step, "loss": round(3.0 - 0.5 * step, 3)}))
    return lines


def _worker_argv(job: dict[str, Any]) -> list[str]:
    """What one worker runs: the job's script or module in Python, its function through dsnb's
    runner (which dsnb's worker loop calls in the worker's Python), or its command as given."""
    if job.get("function"):
        from dsnb.runtime import function_runner

        return [sys.executable, "-c", Path(function_runner.__file__).read_text(), job["function"]["payload"],
                job["function"]["python"]]
    if job.get("script"):
        return [sys.executable, job["script"], *job["args"]]
    if job.get("module"):
        return [sys.executable, "-m", job["module"], *job["args"]]
    return list(job["command"])


def run_workers(job: dict[str, Any], submission_id: str) -> int:
    """Run the job's script once per worker, as Ray Train's worker group would, and print the driver's log.

    Each worker gets the variables Ray Train's ``TorchConfig`` sets (Ray 2.60.0,
    ``ray/train/torch/config.py``: ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``NODE_RANK``, ``RANK``,
    ``WORLD_SIZE``); its output comes under its actor prefix. The first worker to exit non-zero
    ends the others, as Ray 2.60.0's Train controller shuts the worker group down on a worker
    failure (``ray/train/v2/_internal/execution/controller/controller.py``), and is named in the
    outcome line as dsnb's driver names it. Always returns 0, as ``ray job logs`` does.
    """
    workers, procs = job["num_workers"], job["procs_per_node"]
    workdir = None
    if os.environ.get("DSNB_CODE_BUNDLE"):  # what dsnb's worker loop does first on a worker pod (enter_code)
        unpacker = runpy.run_path(os.path.join(os.path.dirname(os.environ["DSNB_CODE_BUNDLE"]), "unpack.py"))
        workdir = unpacker["unpack_from_environment"](os.environ)
    print(f"Job '{submission_id}' submitted successfully", flush=True)
    print(f"(TrainController pid=70) Started training worker group of size {workers}", flush=True)
    printing = threading.Lock()
    children = []
    for rank in range(workers):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank % procs), "WORLD_SIZE": str(workers),
               "LOCAL_WORLD_SIZE": str(procs), "NODE_RANK": str(rank // procs), "PYTHONUNBUFFERED": "1"}
        child = subprocess.Popen(_worker_argv(job), env=env, cwd=workdir or os.path.dirname(job.get("script") or "") or None,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        prefix = f"(RayTrainWorker pid={child.pid}, ip=10.244.{rank // procs}.5)"
        print(f"{prefix} DSNB_RAY_WORKER " + json.dumps({"rank": rank, "pid": child.pid, "node": rank // procs}), flush=True)
        children.append((rank, child, prefix))

    def relay(child: subprocess.Popen, prefix: str) -> None:
        for line in child.stdout:
            with printing:
                print(f"{prefix} {line.rstrip()}", flush=True)

    relays = [threading.Thread(target=relay, args=(child, prefix), daemon=True) for _, child, prefix in children]
    for thread in relays:
        thread.start()
    failed = None
    while failed is None and any(child.poll() is None for _, child, _ in children):
        failed = next(((rank, child.returncode) for rank, child, _ in children if child.poll()), None)
        time.sleep(0.05)
    failed = failed or next(((rank, child.returncode) for rank, child, _ in children if child.returncode), None)
    for _, child, _ in children:
        if child.poll() is None:
            child.kill()
            child.wait()
    for thread in relays:
        thread.join(timeout=5)
    if failed is None:
        outcome = {"exit_code": 0}
        print("Training finished", flush=True)
    else:
        error = f"rank {failed[0]} exited with code {failed[1]}"
        outcome = {"exit_code": 1, "failed_rank": failed[0], "rank_exit_code": failed[1], "error": error}
        print(f"Training errored: {error}", flush=True)
    print(OUTCOME + json.dumps(outcome), flush=True)
    return 0


def fake_driver() -> int:
    if os.environ.get("DSNB_SIM_CLUSTER_AUTH") == "token" and not os.environ.get("RAY_AUTH_TOKEN"):
        # What `ray job submit` gets from a head with token authentication when it has no token.
        print("RuntimeError: Request failed with status code 401: Unauthenticated: no valid authentication token", flush=True)
        return 1
    job = json.loads(os.environ["DSNB_RAY_JOB"])
    if os.environ.get("DSNB_SIM_RUN_SCRIPT"):
        return run_workers(job, os.environ.get("RAY_JOB_SUBMISSION_ID", job["name"]))
    mode = os.environ.get("DSNB_SIM_MODE", "ok")
    head, tail = driver_lines(job, mode, os.environ.get("RAY_JOB_SUBMISSION_ID", job["name"]))
    for line in head:
        print(line, flush=True)
    steps = 1 if mode == "fail" else 3
    step = 0
    while mode == "sleep" or step < steps:
        step += 1
        for line in step_lines(job, step):
            print(line, flush=True)
        if os.environ.get("DSNB_SIM_DROP_AFTER") and step >= int(os.environ["DSNB_SIM_DROP_AFTER"]):
            return 1  # `ray job logs --follow` lost its connection
        time.sleep(0.2 if mode == "sleep" else 0.05)
    if os.environ.get("DSNB_SIM_LATE_TAIL"):
        time.sleep(1.0)
    for line in tail:
        print(line, flush=True)
    return 0  # `ray job logs --follow` ends with 0 whatever the job's fate


if __name__ == "__main__" and sys.argv[1:] == ["driver"]:
    sys.exit(fake_driver())
