"""The Pod Security Standards, as the Kubernetes documentation states them, one named rule per check.

Written from https://kubernetes.io/docs/concepts/security/pod-security-standards/ (the "baseline"
and "restricted" policies, Kubernetes v1.32): each rule below is one row of its tables, and
returns the problems it finds in a pod spec, worded as Pod Security admission words them
(``allowPrivilegeEscalation != false (container "dsnb" must set ...)``). The emulator can
enforce it as the admission plugin does for a namespace labelled
``pod-security.kubernetes.io/enforce`` (:func:`admission`).

Example:
    >>> problems({"containers": [{"name": "c", "image": "i"}]}, "restricted")[:2]
    ['allowPrivilegeEscalation != false (container "c" must set securityContext.allowPrivilegeEscalation=false)', 'unrestricted capabilities (container "c" must set securityContext.capabilities.drop=["ALL"])']
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

Obj = dict[str, Any]
LEVEL_LABEL = "pod-security.kubernetes.io/enforce"

#: Baseline: capabilities a container may add beyond the runtime's defaults.
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                         "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
#: Baseline: sysctls considered safe.
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
#: Restricted: the only volume types allowed.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


def _containers(spec: Obj) -> Iterator[Obj]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from spec.get(key) or []


def _context(container: Obj) -> Obj:
    return container.get("securityContext") or {}


def _pod_context(spec: Obj) -> Obj:
    return spec.get("securityContext") or {}


# -- baseline ------------------------------------------------------------------------------------------

def host_process(spec: Obj) -> list[str]:
    """HostProcess: Windows pods may not run as host processes."""
    contexts = [_pod_context(spec), *(_context(c) for c in _containers(spec))]
    return ["hostProcess" for c in contexts if (c.get("windowsOptions") or {}).get("hostProcess")][:1]


def host_namespaces(spec: Obj) -> list[str]:
    """Host Namespaces: hostNetwork, hostPID and hostIPC must be unset or false."""
    used = [f"{key}=true" for key in ("hostNetwork", "hostPID", "hostIPC") if spec.get(key)]
    return [f"host namespaces ({', '.join(used)})"] if used else []


def privileged(spec: Obj) -> list[str]:
    """Privileged Containers: securityContext.privileged must be unset or false."""
    return [f'privileged (container "{c["name"]}" must not set securityContext.privileged=true)'
            for c in _containers(spec) if _context(c).get("privileged")]


def baseline_capabilities(spec: Obj) -> list[str]:
    """Capabilities (baseline): only the allowed ones may be added."""
    found = []
    for c in _containers(spec):
        extra = sorted(set((_context(c).get("capabilities") or {}).get("add") or []) - BASELINE_CAPABILITIES)
        if extra:
            found.append(f'non-default capabilities (container "{c["name"]}" must not include {", ".join(extra)} in '
                         "securityContext.capabilities.add)")
    return found


def host_path_volumes(spec: Obj) -> list[str]:
    """HostPath Volumes: none."""
    used = [v["name"] for v in spec.get("volumes") or [] if "hostPath" in v]
    return [f"hostPath volumes (volumes {', '.join(used)})"] if used else []


def host_ports(spec: Obj) -> list[str]:
    """Host Ports: unset or 0."""
    return [f'hostPort (container "{c["name"]}" uses hostPort {p["hostPort"]})'
            for c in _containers(spec) for p in c.get("ports") or [] if p.get("hostPort")]


def app_armor(spec: Obj) -> list[str]:
    """AppArmor: not "Unconfined" where set."""
    contexts = [_pod_context(spec), *(_context(c) for c in _containers(spec))]
    return ["forbidden AppArmor profile (Unconfined)" for c in contexts
            if (c.get("appArmorProfile") or {}).get("type") == "Unconfined"][:1]


def se_linux(spec: Obj) -> list[str]:
    """SELinux: type unset or one of the container types; user and role unset."""
    allowed_types = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
    for context in [_pod_context(spec), *(_context(c) for c in _containers(spec))]:
        options = context.get("seLinuxOptions") or {}
        if options.get("type", "") not in allowed_types or options.get("user") or options.get("role"):
            return ["seLinuxOptions"]
    return []


def proc_mount(spec: Obj) -> list[str]:
    """/proc Mount Type: the default."""
    return [f'procMount (container "{c["name"]}" must not set securityContext.procMount)'
            for c in _containers(spec) if _context(c).get("procMount") not in (None, "Default")]


def baseline_seccomp(spec: Obj) -> list[str]:
    """Seccomp (baseline): not "Unconfined"."""
    contexts = [_pod_context(spec), *(_context(c) for c in _containers(spec))]
    return ["seccompProfile (type Unconfined)" for c in contexts if (c.get("seccompProfile") or {}).get("type") == "Unconfined"][:1]


def sysctls(spec: Obj) -> list[str]:
    """Sysctls: only the safe set."""
    unsafe = [s.get("name") for s in _pod_context(spec).get("sysctls") or [] if s.get("name") not in SAFE_SYSCTLS]
    return [f"forbidden sysctls ({', '.join(unsafe)})"] if unsafe else []


# -- restricted ----------------------------------------------------------------------------------------

def volume_types(spec: Obj) -> list[str]:
    """Volume Types: only configMap, csi, downwardAPI, emptyDir, ephemeral, persistentVolumeClaim, projected, secret."""
    bad = [v["name"] for v in spec.get("volumes") or [] if not (set(v) - {"name"}) <= RESTRICTED_VOLUMES]
    return [f"restricted volume types (volumes {', '.join(bad)})"] if bad else []


def privilege_escalation(spec: Obj) -> list[str]:
    """Privilege Escalation: allowPrivilegeEscalation must be false in every container."""
    return [f'allowPrivilegeEscalation != false (container "{c["name"]}" must set securityContext.allowPrivilegeEscalation=false)'
            for c in _containers(spec) if _context(c).get("allowPrivilegeEscalation") is not False]


def running_as_non_root(spec: Obj) -> list[str]:
    """Running as Non-root: runAsNonRoot true for the pod or every container, and false nowhere."""
    pod = _pod_context(spec).get("runAsNonRoot")
    bad = [c["name"] for c in _containers(spec) if _context(c).get("runAsNonRoot") is False
           or (pod is not True and _context(c).get("runAsNonRoot") is not True)]
    if pod is False or bad:
        return [f"runAsNonRoot != true (pod or containers {', '.join(bad) or '*'} must set securityContext.runAsNonRoot=true)"]
    return []


def running_as_non_root_user(spec: Obj) -> list[str]:
    """Running as Non-root user: runAsUser is never 0."""
    contexts = [_pod_context(spec), *(_context(c) for c in _containers(spec))]
    return ["runAsUser=0 (pod and containers must not set runAsUser=0)" for c in contexts if c.get("runAsUser") == 0][:1]


def restricted_seccomp(spec: Obj) -> list[str]:
    """Seccomp (restricted): RuntimeDefault or Localhost, for the pod or every container."""
    allowed = {"RuntimeDefault", "Localhost"}
    pod = (_pod_context(spec).get("seccompProfile") or {}).get("type")
    bad = [c["name"] for c in _containers(spec)
           if (_context(c).get("seccompProfile") or {}).get("type", pod) not in allowed]
    return [f'seccompProfile (pod or containers {", ".join(bad)} must set securityContext.seccompProfile.type to '
            '"RuntimeDefault" or "Localhost")'] if bad else []


def restricted_capabilities(spec: Obj) -> list[str]:
    """Capabilities (restricted): drop ALL, and add nothing but NET_BIND_SERVICE."""
    found = []
    for c in _containers(spec):
        caps = _context(c).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            found.append(f'unrestricted capabilities (container "{c["name"]}" must set securityContext.capabilities.drop=["ALL"])')
        extra = sorted(set(caps.get("add") or []) - {"NET_BIND_SERVICE"})
        if extra:
            found.append(f'unrestricted capabilities (container "{c["name"]}" must not include {", ".join(extra)} '
                         "in securityContext.capabilities.add)")
    return found


BASELINE: dict[str, Callable[[Obj], list[str]]] = {
    "HostProcess": host_process, "Host Namespaces": host_namespaces, "Privileged Containers": privileged,
    "Capabilities (baseline)": baseline_capabilities, "HostPath Volumes": host_path_volumes, "Host Ports": host_ports,
    "AppArmor": app_armor, "SELinux": se_linux, "/proc Mount Type": proc_mount, "Seccomp (baseline)": baseline_seccomp,
    "Sysctls": sysctls,
}
RESTRICTED: dict[str, Callable[[Obj], list[str]]] = {
    **BASELINE, "Volume Types": volume_types, "Privilege Escalation": privilege_escalation,
    "Running as Non-root": running_as_non_root, "Running as Non-root user": running_as_non_root_user,
    "Seccomp (restricted)": restricted_seccomp, "Capabilities (restricted)": restricted_capabilities,
}
LEVELS = {"privileged": {}, "baseline": BASELINE, "restricted": RESTRICTED}


def problems(spec: Obj, level: str = "restricted") -> list[str]:
    """What a pod spec breaks of ``level``'s rules, in the documentation's order (empty: it meets the level)."""
    return [found for check in LEVELS[level].values() for found in check(spec)]


def broken_rules(spec: Obj, level: str = "restricted") -> list[str]:
    """The names of the rules of ``level`` a pod spec breaks."""
    return [name for name, check in LEVELS[level].items() if check(spec)]


def admission(lookup_namespace: Callable[[str], Obj | None]) -> Callable[[Obj], str | None]:
    """An emulator admission check: Pod Security admission enforcing each namespace's
    ``pod-security.kubernetes.io/enforce`` level on the pods created in it (Kubernetes v1.32
    staging/src/k8s.io/pod-security-admission, its message shape)."""
    def check(obj: Obj) -> str | None:
        if obj.get("kind") != "Pod":
            return None
        namespace = lookup_namespace(obj["metadata"].get("namespace", "default")) or {}
        level = ((namespace.get("metadata") or {}).get("labels") or {}).get(LEVEL_LABEL)
        if level not in ("baseline", "restricted"):
            return None
        found = problems(obj.get("spec") or {}, level)
        return f'violates PodSecurity "{level}:latest": ' + ", ".join(found) if found else None

    return check
