"""Whether this machine can run pods as processes in their own mount and network namespaces."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess


@functools.cache
def sandbox_problem() -> str | None:
    """None when private mount namespaces work here, else why not (the skip reason)."""
    if os.geteuid() != 0:
        return "running pods as processes needs root (mount namespaces and bind mounts)"
    if not shutil.which("unshare"):
        return "the unshare command (util-linux) is missing"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a private mount namespace here: {probe.stderr.strip()}"
    return None


@functools.cache
def netns_problem() -> str | None:
    """None when network namespaces with veth pairs can be made here, else why not."""
    problem = sandbox_problem()
    if problem:
        return problem
    if not shutil.which("ip"):
        return "the ip command (iproute2) is missing"
    name = f"dsnb-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    return None


@functools.cache
def mpi_problem() -> str | None:
    """None when Open MPI's ``mpirun`` and ``orted`` are installed here, else why not (the skip reason)."""
    for program in ("mpirun", "orted"):
        if not shutil.which(program):
            return f"Open MPI's {program} is missing (Debian: apt-get install openmpi-bin)"
    version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True)
    if version.returncode != 0 or "Open MPI" not in version.stdout:
        return f"mpirun is not Open MPI's: {(version.stdout + version.stderr).strip()[:200]}"
    return None
