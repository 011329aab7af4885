"""Test code that plays Kubernetes' controllers and kubelet against the API emulator.

dsnb talks to the emulator over HTTP exactly as it would to a real API server; this
module stands in for what the cluster does on its own side:

- the StatefulSet controller: creates pods ``<set>-<i>`` from the template, owned by the
  set (so deleting the set collects them), ``podManagementPolicy: Parallel``;
- the scheduler: binds pods to a node, or marks them Unschedulable when told to;
- the kubelet: runs each pod's container command as a real process in its own mount
  namespace, with the pod's volumes (ConfigMaps' ``data`` and ``binaryData`` written out and
  mounted read-only, emptyDirs, a tmpfs ``/dev/shm``, the termination-message file) mounted at
  their paths, the folders of this machine the image has not (``image_lacks``) hidden, the pod's
  environment (values, field references, Secret references), optionally inside a network
  namespace; it streams the output into the pod's log, records how the container ended
  (exit code, reason, termination message or the log's end) and restarts it as
  ``restartPolicy: Always`` does, keeping emptyDirs across restarts; a pod being deleted
  gets SIGTERM, SIGKILL after its grace period, then is deleted for good; the projected
  service account volume holds a token the emulator honours, its CA and the namespace, and
  ``KUBERNETES_SERVICE_HOST``/``PORT`` lead to the emulator's TLS endpoint (through a relay
  from inside a network namespace, ``k8s/relay.py``);
- the kubelet's prober: a container with a ``readinessProbe`` (``httpGet`` or ``tcpSocket``,
  inside the pod's network namespace when it has one) is ready only while its probe passes,
  checked every ``probe_period`` seconds (not the probe's own ``periodSeconds``: tests are
  quicker than clusters); the pod's ``Ready`` and ``ContainersReady`` conditions follow, as
  a Service's endpoints would. Without a probe a running container is ready.

The security context is not enforced (processes run as the test's user).
"""

from __future__ import annotations

import base64
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from k8s.emulator import ApiError

POLL_S = 0.05
VENV_BIN = str(Path(sys.executable).parent)


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def warn(emulator: Any, obj: dict[str, Any], reason: str, message: str, new_api: bool = False) -> None:
    """Record a Warning Event about ``obj``, as a controller's event recorder does.

    ``new_api``: the events.k8s.io recorder (client-go ``tools/events``, through controller-runtime's
    ``Eventf`` as Kubeflow Trainer v2.3.0 uses it), read back through core/v1 with ``eventTime`` set
    and no ``lastTimestamp``; else client-go's core/v1 recorder (``tools/record``, as the StatefulSet
    controller of Kubernetes v1.32 and the MPI Operator v0.8.0 use it), with ``firstTimestamp``/``lastTimestamp``.
    """
    meta = obj["metadata"]
    now = now_rfc3339()
    event = {"apiVersion": "v1", "kind": "Event",
             "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": meta.get("namespace", "default")},
             "involvedObject": {"apiVersion": obj.get("apiVersion", "v1"), "kind": obj["kind"], "name": meta["name"],
                                "namespace": meta.get("namespace", "default"), "uid": meta.get("uid", "")},
             "type": "Warning", "reason": reason, "message": message, "count": 1}
    if new_api:
        event |= {"eventTime": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()), "reportingComponent": "trainer",
                  "action": "Reconciling", "firstTimestamp": None, "lastTimestamp": None}
    else:
        event |= {"firstTimestamp": now, "lastTimestamp": now}
    emulator.create(event)


def pod_conditions(ready: bool) -> list[dict[str, Any]]:
    """A scheduled pod's conditions, as the kubelet reports them, with ``Ready`` as given."""
    now = now_rfc3339()
    return [{"type": kind, "status": "True" if ok else "False", "lastTransitionTime": now}
            for kind, ok in (("PodScheduled", True), ("Initialized", True), ("ContainersReady", ready), ("Ready", ready))]


#: Run inside a pod's network namespace: exit 0 when GET argv[1] answers 200..399, as the kubelet's httpGet probe.
_HTTP_PROBE = ("import sys,urllib.request,urllib.error\n"
               "try:\n r=urllib.request.urlopen(sys.argv[1],timeout=float(sys.argv[2]))\n ok=200<=r.status<400\n"
               "except Exception:\n ok=False\n"
               "sys.exit(0 if ok else 1)")


def volume_dirs(sim: ClusterSim, namespace: str, pod: dict[str, Any], root: Path) -> dict[str, tuple[str, str]]:
    """The pod's volumes as host folders under ``root``: volume name -> (host path, kind), kind ``"files"``
    (read-only, as the kubelet mounts ConfigMap, Secret and projected volumes since v1.9.4), ``"dir"`` or
    ``"tmpfs"`` (emptyDirs). A ConfigMap's ``data`` and ``binaryData`` are written as its files."""
    result: dict[str, tuple[str, str]] = {}
    for volume in pod["spec"].get("volumes") or []:
        path = root / volume["name"]
        if "configMap" in volume or "secret" in volume:
            path.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                source = sim.emulator.get("v1", "ConfigMap", namespace, volume["configMap"]["name"]) or {}
                files = {k: v.encode() for k, v in (source.get("data") or {}).items()}
                files.update({k: base64.b64decode(v) for k, v in (source.get("binaryData") or {}).items()})
            else:
                source = sim.emulator.get("v1", "Secret", namespace, volume["secret"]["secretName"]) or {}
                files = {k: base64.b64decode(v) for k, v in (source.get("data") or {}).items()}
                files.update({k: str(v).encode() for k, v in (source.get("stringData") or {}).items()})
            for key, content in files.items():
                (path / key).write_bytes(content)
            result[volume["name"]] = (str(path), "files")
        elif "projected" in volume:
            # The kubelet's projected service account volume: a token it asks the API server for (TokenRequest),
            # the cluster's CA and the namespace (v1.32 pkg/volume/projected). A token for an account that
            # does not exist cannot be had: the pod then never starts (FailedMount).
            path.mkdir(parents=True, exist_ok=True)
            for source in volume["projected"].get("sources") or []:
                if "serviceAccountToken" in source:
                    account = pod["spec"].get("serviceAccountName") or "default"
                    token = sim.emulator.service_account_token(namespace, account)
                    (path / source["serviceAccountToken"].get("path", "token")).write_text(token)
                elif "configMap" in source:
                    (path / "ca.crt").write_text(Path(sim.in_cluster().ca_file).read_text())
                elif "downwardAPI" in source:
                    (path / "namespace").write_text(namespace)
            result[volume["name"]] = (str(path), "files")
        elif "emptyDir" in volume:
            memory = (volume.get("emptyDir") or {}).get("medium") == "Memory"
            path.mkdir(parents=True, exist_ok=True)
            result[volume["name"]] = (str(path), "tmpfs" if memory else "dir")
    return result


def mount_steps(mounts: list[tuple[str, str, str]], hidden: tuple[str, ...] = ()) -> list[str]:
    """Shell steps, in a private mount namespace, that hide ``hidden`` (folders of this machine the pod's
    image has not) under an empty tmpfs, then mount each (host path, kind, mount path) as the kubelet would."""
    steps = [f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(path)}" for path in hidden]
    for host, kind, mount_path in mounts:
        target = shlex.quote(mount_path)
        if kind == "tmpfs":
            steps.append(f"mkdir -p {target} && mount -t tmpfs -o size=1g tmpfs {target}")
        else:
            steps.append(f"mkdir -p {target} && mount --bind {shlex.quote(host)} {target}")
            if kind == "files":
                steps.append(f"mount -o remount,bind,ro {target}")
    return steps


class PodRunner:
    """One pod's container, run as a process tree; restarts it while the pod exists."""

    def __init__(self, sim: ClusterSim, pod: dict[str, Any]) -> None:
        self.sim = sim
        self.namespace = pod["metadata"]["namespace"]
        self.name = pod["metadata"]["name"]
        self.hostname = pod["spec"].get("hostname") or self.name  # as the kubelet sets it (63 characters at most)
        self.pod = pod
        self.root = Path(tempfile.mkdtemp(prefix=f"pod-{self.name}-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.restarts = 0
        self.terminating = False
        self.termination_file = self.root / "termination-log"
        self.thread = threading.Thread(target=self._run, name=f"kubelet-{self.name}", daemon=True)
        self._status_lock = threading.Lock()
        self._status: dict[str, Any] | None = None  # the running container's status, while it runs

    # -- sandbox ---------------------------------------------------------------------------
    def _volume_dirs(self) -> dict[str, tuple[str, str]]:
        """volume name -> (host path, kind); ConfigMaps and Secrets written out."""
        return volume_dirs(self.sim, self.namespace, self.pod, self.root / "volumes")

    def _env(self, container: dict[str, Any]) -> dict[str, str]:
        (self.root / "tmp").mkdir(exist_ok=True)
        env = {"PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": os.environ.get("HOME", "/root"),
               "HOSTNAME": self.name, "TMPDIR": str(self.root / "tmp")}  # a container's own /tmp
        # Every container learns where the API server is, as the kubelet's service environment gives it
        # (v1.32 pkg/kubelet/kubelet_pods.go, getServiceEnvVarMap: the "kubernetes" Service, always).
        netns = self.sim.netns_for(self.name) if self.sim.netns_for else None
        host, port = self.sim.api_address(netns)
        env.update(KUBERNETES_SERVICE_HOST=host, KUBERNETES_SERVICE_PORT=str(port), KUBERNETES_SERVICE_PORT_HTTPS=str(port))
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = var["value"]
                continue
            source = var.get("valueFrom") or {}
            if "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                env[var["name"]] = {"metadata.name": self.name, "metadata.namespace": self.namespace}[path]
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secret = self.sim.emulator.get("v1", "Secret", self.namespace, ref["name"]) or {}
                if ref["key"] in (secret.get("stringData") or {}):
                    env[var["name"]] = secret["stringData"][ref["key"]]
                else:
                    env[var["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        return env

    def _argv(self, container: dict[str, Any], volumes: dict[str, tuple[str, str]]) -> list[str]:
        steps = mount_steps([(*volumes[m["name"]], m["mountPath"]) for m in container.get("volumeMounts") or []],
                            self.sim.image_lacks)
        termination = container.get("terminationMessagePath") or "/dev/termination-log"
        self.termination_file = self.root / "termination-log"
        self.termination_file.write_text("")
        steps.append(f"mkdir -p {shlex.quote(os.path.dirname(termination))} && touch {shlex.quote(termination)} "
                     f"&& mount --bind {shlex.quote(str(self.termination_file))} {shlex.quote(termination)}")
        if container.get("workingDir"):
            steps.append(f"cd {shlex.quote(container['workingDir'])}")
        # The kubelet gives each pod its own hostname (spec.hostname, else the pod's name) and an /etc/hosts
        # where it resolves (pkg/kubelet/kubelet_pods.go in v1.32: GeneratePodHostNameAndDomain, ensureHostsFile). A pod in a network namespace gets
        # that namespace's hosts file from `ip netns exec`; one on this host's network gets its own here.
        netns = self.sim.netns_for(self.name) if self.sim.netns_for else None
        if netns is None:
            hosts = self.root / "hosts"
            hosts.write_text(Path("/etc/hosts").read_text() + f"\n127.0.0.1\t{self.hostname}\n")
            steps.append(f"mount --bind {shlex.quote(str(hosts))} /etc/hosts")
        steps.append(f"hostname {shlex.quote(self.hostname)}")
        script = " && ".join(steps) + ' && exec "$@"'
        argv = ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", script, "sh",
                *(container.get("command") or []), *(container.get("args") or [])]
        return (["ip", "netns", "exec", netns] if netns else []) + argv

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> PodRunner:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        process = self.process
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
        self.thread.join(15)
        shutil.rmtree(self.root, ignore_errors=True)

    def terminate(self, grace: float) -> None:
        """Stop the container of a pod being deleted, as the kubelet does: SIGTERM, SIGKILL after the grace
        period, its end recorded in the pod's status, then the pod deleted for good (grace 0)
        (v1.32 pkg/kubelet/kuberuntime/kuberuntime_container.go killContainer; status_manager.go)."""
        if self.terminating:
            return
        self.terminating = True
        threading.Thread(target=self._terminate, args=(grace,), name=f"kubelet-kill-{self.name}", daemon=True).start()

    def _terminate(self, grace: float) -> None:
        self.stopping.set()
        process = self.process
        code = None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                code = process.wait(grace)
            except ProcessLookupError:
                code = process.wait()
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                code = process.wait()
        self.thread.join(15)
        try:
            if code is not None:
                container = self.pod["spec"]["containers"][0]
                message = self.termination_file.read_text() if self.termination_file.exists() else ""
                self._set_status({"name": container["name"], "restartCount": self.restarts, "ready": False,
                                  "image": container.get("image"), "imageID": "", "state": {"terminated": {
                                      "exitCode": code if code >= 0 else 128 - code, "reason": "Error" if code else "Completed",
                                      "message": message, "finishedAt": now_rfc3339()}}})
                self.sim.emulator.end_log(self.namespace, self.name)
            self.sim.emulator.delete("v1", "Pod", self.namespace, self.name, grace_period=0)
        except ApiError:
            pass  # gone already
        shutil.rmtree(self.root, ignore_errors=True)

    def _set_status(self, container_status: dict[str, Any], phase: str = "Running") -> None:
        with self._status_lock:
            self._status = container_status if "running" in container_status["state"] else None
            self.sim.emulator.patch_status("v1", "Pod", self.namespace, self.name,
                                           {"phase": phase, "containerStatuses": [container_status],
                                            "conditions": pod_conditions(bool(container_status.get("ready")))})

    # -- readiness probes ------------------------------------------------------------------
    def _probe_passes(self, container: dict[str, Any], probe: dict[str, Any]) -> bool:
        """One readiness check, from inside the pod's network (its namespace, else the host's)."""
        netns = self.sim.netns_for(self.name) if self.sim.netns_for else None
        timeout = float(probe.get("timeoutSeconds", 1))
        check = probe.get("httpGet") or probe.get("tcpSocket")
        if check is None:
            return True  # exec probes are not run here
        port = check["port"]
        if isinstance(port, str):  # a named container port
            port = next(p["containerPort"] for p in container.get("ports") or [] if p.get("name") == port)
        if "httpGet" in probe:
            url = f"http://127.0.0.1:{port}{check.get('path', '/')}"
            if not netns:
                try:
                    with urllib.request.urlopen(url, timeout=timeout) as response:
                        return 200 <= response.status < 400
                except (OSError, ValueError):  # HTTPError (4xx, 5xx) is an OSError too
                    return False
            argv = [sys.executable, "-c", _HTTP_PROBE, url, str(timeout)]
            try:
                return subprocess.run((["ip", "netns", "exec", netns] if netns else []) + argv, capture_output=True,
                                      timeout=timeout + 5).returncode == 0
            except subprocess.TimeoutExpired:
                return False
        if netns:
            code = f"import socket;socket.create_connection(('127.0.0.1',{int(port)}),{timeout})"
            return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code], capture_output=True).returncode == 0
        try:
            socket.create_connection(("127.0.0.1", int(port)), timeout).close()
            return True
        except OSError:
            return False

    def _probe_loop(self, container: dict[str, Any], probe: dict[str, Any], process: subprocess.Popen[bytes]) -> None:
        """Probe the running container; patch its ``ready`` and the pod's conditions on every change."""
        ready = False
        while not self.stopping.is_set() and process.poll() is None:
            passes = self._probe_passes(container, probe)
            if passes != ready:
                with self._status_lock:
                    if self._status is None or process.poll() is not None or self.stopping.is_set():
                        return
                    self._status = {**self._status, "ready": passes}
                    try:
                        self.sim.emulator.patch_status("v1", "Pod", self.namespace, self.name, {
                            "containerStatuses": [self._status], "conditions": pod_conditions(passes)})
                    except Exception:  # noqa: BLE001 - the pod was deleted meanwhile
                        return
                ready = passes
            self.stopping.wait(self.sim.probe_period)

    def _run(self) -> None:
        container = self.pod["spec"]["containers"][0]
        volumes = self._volume_dirs()
        last_terminated: dict[str, Any] | None = None
        while not self.stopping.is_set():
            started = now_rfc3339()
            self.process = subprocess.Popen(self._argv(container, volumes), env=self._env(container),
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            probe = container.get("readinessProbe")
            status = {"name": container["name"], "restartCount": self.restarts, "ready": not probe,
                      "image": container.get("image"), "imageID": "", "containerID": f"sim://{self.name}-{self.restarts}",
                      "state": {"running": {"startedAt": started}}}
            if last_terminated:
                status["lastState"] = {"terminated": last_terminated}
            self._set_status(status)
            if probe:
                threading.Thread(target=self._probe_loop, args=(container, probe, self.process),
                                 name=f"prober-{self.name}", daemon=True).start()
            tail: list[str] = []
            assert self.process.stdout is not None
            for raw in self.process.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                tail = (tail + [line])[-80:]
                self.sim.emulator.append_log(self.namespace, self.name, line)
            code = self.process.wait()
            if self.stopping.is_set() or self.sim.emulator.get("v1", "Pod", self.namespace, self.name) is None:
                return
            message = self.termination_file.read_text()
            if not message and code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                message = "\n".join(tail)[-2048:]
            last_terminated = {"exitCode": code if code >= 0 else 128 - code, "reason": "Completed" if code == 0 else "Error",
                               "message": message, "startedAt": started, "finishedAt": now_rfc3339()}
            self.sim.emulator.end_log(self.namespace, self.name)
            policy = self.pod["spec"].get("restartPolicy", "Always")
            finished = policy == "Never" or (policy == "OnFailure" and code == 0)
            phase = ("Succeeded" if code == 0 else "Failed") if finished else "Running"
            self._set_status({"name": container["name"], "restartCount": self.restarts, "ready": False,
                              "image": container.get("image"), "imageID": "", "state": {"terminated": last_terminated}},
                             phase=phase)
            if finished:
                return
            self.stopping.wait(self.sim.restart_delay)
            if self.stopping.is_set() or self.sim.emulator.get("v1", "Pod", self.namespace, self.name) is None:
                return
            self.restarts += 1
            self.sim.emulator.restart_container(self.namespace, self.name)


class ClusterSim:
    """StatefulSet controller, scheduler and kubelet for one namespace of the emulator.

    Args:
        emulator: the running ``KubeEmulator``.
        namespace: the namespace to act in.
        netns_for: pod name -> network namespace to run it in (None: the host's network).
        unschedulable: a message; when set, new pods stay Pending as Unschedulable with it.
        image_pull_error: a message; when set, scheduled pods never start: ImagePullBackOff.
        hold: when True, scheduled pods stay in ContainerCreating (e.g. waiting for a volume).
        controllers: more controllers (``reconcile(sim)`` each), e.g. the simulated operators in
            ``k8s/operators.py``; pods they mark ``sim.dsnb.io/no-process`` are reported running
            without running anything (an sshd that mpirun reaches another way).
        restart_delay: seconds before an exited container is restarted.
        probe_period: seconds between two readiness checks of a container with a ``readinessProbe``.
        image_lacks: folders of this machine that the pods' image has not (e.g. the user's ``working_dir``):
            every pod, and every process ``mpirun`` starts in one (``k8s/rsh_agent.py``), finds them empty.
    """

    def __init__(self, emulator: Any, namespace: str, netns_for: Callable[[str], str | None] | None = None,
                 unschedulable: str | None = None, image_pull_error: str | None = None,
                 hold: bool = False, restart_delay: float = 0.3, controllers: list[Any] | None = None,
                 probe_period: float = 0.2, image_lacks: tuple[str, ...] = ()) -> None:
        self.emulator = emulator
        self.namespace = namespace
        self.netns_for = netns_for
        self.unschedulable = unschedulable
        self.image_pull_error = image_pull_error
        self.hold = hold
        self.controllers = controllers or []
        self.restart_delay = restart_delay
        self.probe_period = probe_period
        self.image_lacks = tuple(str(p) for p in image_lacks)
        self.runners: dict[str, PodRunner] = {}
        self.pods_created = 0
        self._api_relay: Any = None  # the Unix socket pods in network namespaces reach the API server through
        self._api_forwarders: dict[str, subprocess.Popen[bytes]] = {}  # network namespace -> its relay process
        self._reported: set[tuple[str, str]] = set()  # (set, message) of the FailedCreate Events recorded
        self.apt_sshd_images = {"ghcr.io/kubeflow/trainer/deepspeed-runtime"}  # images whose sshd has no file capability
        self._capped: Path | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="cluster-sim", daemon=True)

    def __enter__(self) -> ClusterSim:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._capped is not None:
            shutil.rmtree(self._capped.parent, ignore_errors=True)
        for runner in list(self.runners.values()):
            runner.stop()
        self.runners.clear()
        for controller in self.controllers:
            controller.close()
        for forwarder in self._api_forwarders.values():
            forwarder.kill()
            forwarder.wait()
        self._api_forwarders.clear()
        if self._api_relay is not None:
            self._api_relay.close()
            shutil.rmtree(Path(self._api_relay.path).parent, ignore_errors=True)
            self._api_relay = None

    def in_cluster(self) -> Any:
        """The emulator's in-cluster endpoint (TLS, its CA)."""
        return self.emulator.in_cluster()

    def api_address(self, netns: str | None) -> tuple[str, int]:
        """Where a pod (on this host's network, or in ``netns``) reaches the API server: the in-cluster
        endpoint itself, or, inside a namespace, a relay on that namespace's 127.0.0.1 (``k8s/relay.py``)."""
        endpoint = self.in_cluster()
        if netns is None:
            return endpoint.host, endpoint.port
        from k8s import relay

        with self._lock:
            if self._api_relay is None:
                folder = Path(tempfile.mkdtemp(prefix="sim-api-"))
                os.chmod(folder, 0o755)
                self._api_relay = relay.UnixToTcp(str(folder / "api.sock"), endpoint.port)
            if netns not in self._api_forwarders:
                self._api_forwarders[netns] = subprocess.Popen(
                    ["ip", "netns", "exec", netns, sys.executable, relay.__file__, str(endpoint.port), self._api_relay.path],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                self._wait_listening(netns, endpoint.port)
        return "127.0.0.1", endpoint.port

    @staticmethod
    def _wait_listening(netns: str, port: int) -> None:
        probe = f"import socket;socket.create_connection(('127.0.0.1',{port}),1).close()"
        for _ in range(100):
            if subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", probe], capture_output=True).returncode == 0:
                return
            time.sleep(0.05)

    def running_processes(self) -> list[str]:
        """Pods whose container process is still alive."""
        return [name for name, r in list(self.runners.items()) if r.process is not None and r.process.poll() is None]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._reconcile()
            except Exception as e:  # noqa: BLE001 - keep playing the cluster; show what went wrong
                print(f"cluster-sim: {e!r}", file=sys.stderr)
            self._stop.wait(POLL_S)

    def _exec_refused(self, pod: dict[str, Any], container: dict[str, Any]) -> str | None:
        """Exec a pretended container's program as the runtime would, under its security context; the
        runtime's error when the kernel refuses, else None.

        The program is an sshd as the MPI Operator's base image builds it (v0.8.0 build/base/Dockerfile: setcap
        CAP_NET_BIND_SERVICE=+eip), here a copy of ``true`` with that file capability: the kernel refuses to
        exec it when the bounding set lacks the capability (security/commoncap.c). Images listed in
        ``apt_sshd_images`` install sshd without one (Kubeflow Trainer's deepspeed-runtime)."""
        if container.get("image") in self.apt_sshd_images or not (container.get("command") or [""])[0].endswith("/sshd"):
            return None  # only sshd is pretended to carry a file capability
        context = container.get("securityContext") or {}
        pod_context = pod["spec"].get("securityContext") or {}
        caps = context.get("capabilities") or {}
        argv = ["setpriv"]
        user = context.get("runAsUser", pod_context.get("runAsUser"))
        if user is not None:
            argv += [f"--reuid={user}", f"--regid={context.get('runAsGroup', pod_context.get('runAsGroup', user))}", "--clear-groups"]
        if "ALL" in (caps.get("drop") or []):
            argv.append("--bounding-set=-all" + "".join(f",+{c.lower()}" for c in caps.get("add") or []))
        if context.get("allowPrivilegeEscalation") is False:
            argv.append("--no-new-privs")
        done = subprocess.run([*argv, str(self._capped_program())], capture_output=True, text=True)
        if done.returncode == 0:
            return None
        program = (container.get("command") or ["?"])[0]
        return (f"failed to create containerd task: failed to create shim task: OCI runtime create failed: runc create failed: "
                f'unable to start container process: exec: "{program}": operation not permitted: unknown')

    def _capped_program(self) -> Path:
        if self._capped is None:
            folder = Path(tempfile.mkdtemp(prefix="sim-sshd-"))
            self._capped = folder / "sshd"
            shutil.copy("/bin/true", self._capped)
            os.chmod(folder, 0o755)
            subprocess.run(["setcap", "cap_net_bind_service=+eip", str(self._capped)], check=True)
        return self._capped

    def _reconcile(self) -> None:
        em, ns = self.emulator, self.namespace
        for stateful_set in em.list("apps/v1", "StatefulSet", ns):  # the StatefulSet controller
            name = stateful_set["metadata"]["name"]
            template = stateful_set["spec"]["template"]
            replicas = stateful_set["spec"].get("replicas", 1)
            owned = [p for p in em.list("v1", "Pod", ns) if any(r.get("uid") == stateful_set["metadata"]["uid"]
                                                                for r in p["metadata"].get("ownerReferences") or [])]
            # Scaling down deletes the pods whose ordinal is past the replicas; with podManagementPolicy
            # Parallel all of them at once (v1.32 pkg/controller/statefulset/stateful_set_control.go, processCondemned).
            for pod in owned:
                ordinal = int(pod["metadata"]["name"].rsplit("-", 1)[1])
                if ordinal >= replicas and not pod["metadata"].get("deletionTimestamp"):
                    em.delete("v1", "Pod", ns, pod["metadata"]["name"])
            if (stateful_set.get("status") or {}).get("replicas") != len(owned):
                em.patch_status("apps/v1", "StatefulSet", ns, name, {"replicas": len(owned)})
            for ordinal in range(replicas):
                pod_name = f"{name}-{ordinal}"
                if em.get("v1", "Pod", ns, pod_name) is not None:
                    continue
                labels = {**template["metadata"].get("labels", {}), "statefulset.kubernetes.io/pod-name": pod_name,
                          "apps.kubernetes.io/pod-index": str(ordinal)}
                try:
                    em.create({
                        "apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": pod_name, "namespace": ns, "labels": labels,
                                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name,
                                                          "uid": stateful_set["metadata"]["uid"], "controller": True}]},
                        "spec": {**template["spec"], "hostname": pod_name, "subdomain": stateful_set["spec"]["serviceName"]},
                        "status": {"phase": "Pending"},
                    })
                except ApiError as e:
                    # Kubernetes' StatefulSet controller (v1.32 pkg/controller/statefulset/stateful_pod_control.go,
                    # recordPodEvent) reports a refused pod only as a FailedCreate Warning on the set, and retries.
                    if (name, e.message) not in self._reported:
                        self._reported.add((name, e.message))
                        warn(em, stateful_set, "FailedCreate", f"create Pod {pod_name} in StatefulSet {name} failed error: {e.message}")
                    break
                self.pods_created += 1
        for controller in self.controllers:
            controller.reconcile(self)
        pods = {p["metadata"]["name"]: p for p in em.list("v1", "Pod", ns)}
        for pod_name in list(self.runners):
            if pod_name not in pods:
                self.runners.pop(pod_name).stop()
            elif pods[pod_name]["metadata"].get("deletionTimestamp"):
                self.runners[pod_name].terminate(float(pods[pod_name]["metadata"].get("deletionGracePeriodSeconds") or 0))
        for pod_name, pod in pods.items():
            if pod_name in self.runners:
                continue
            if pod["metadata"].get("deletionTimestamp"):
                em.delete("v1", "Pod", ns, pod_name, grace_period=0)  # no container of it runs: the kubelet lets it go
                continue
            if not pod["spec"].get("nodeName"):
                if self.unschedulable:
                    em.patch_status("v1", "Pod", ns, pod_name, {"conditions": [{
                        "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": self.unschedulable}]})
                    continue
                pod = em.update({**pod, "spec": {**pod["spec"], "nodeName": "node-1"}})
                em.patch_status("v1", "Pod", ns, pod_name, {"conditions": [{"type": "PodScheduled", "status": "True"}]})
            if self.hold:
                continue
            if (pod["metadata"].get("annotations") or {}).get("sim.dsnb.io/no-process"):
                if (pod.get("status") or {}).get("phase") not in ("Running", "Failed"):
                    container = pod["spec"]["containers"][0]
                    refused = self._exec_refused(pod, container)
                    if refused:
                        em.patch_status("v1", "Pod", ns, pod_name, {"phase": "Failed", "containerStatuses": [{
                            "name": container["name"], "image": container.get("image"), "imageID": "", "ready": False,
                            "restartCount": 0, "state": {"terminated": {"exitCode": 128, "reason": "StartError", "message": refused,
                                                                        "finishedAt": now_rfc3339()}}}]})
                        continue
                    em.patch_status("v1", "Pod", ns, pod_name, {"phase": "Running", "conditions": pod_conditions(True),
                                                                "containerStatuses": [{
                        "name": container["name"], "image": container.get("image"), "imageID": "", "ready": True,
                        "restartCount": 0, "state": {"running": {"startedAt": now_rfc3339()}}}]})
                continue
            if self.image_pull_error:
                container = pod["spec"]["containers"][0]
                em.patch_status("v1", "Pod", ns, pod_name, {"containerStatuses": [{
                    "name": container["name"], "image": container["image"], "imageID": "", "ready": False, "restartCount": 0,
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": self.image_pull_error}}}]})
                continue
            self.runners[pod_name] = PodRunner(self, pod).start()
