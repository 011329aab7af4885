"""Preflight for ``Cluster("ray")``: Ray installed, the cluster reachable with its token, room for the job.

Nothing is started: for the private head only this environment is checked (it starts on
first submit).

Example:
    >>> print(Cluster("ray").check())          # doctest: +SKIP
    ✓ ray: ray 2.60.0
    ✓ Ray head: a private head starts on 127.0.0.1 at the first submit (8 logical CPUs)
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from dsnb.backends.ray.head import MIN_LOGICAL_CPUS
from dsnb.preflight import CheckResult, PreflightReport
from dsnb.runtime.ray_train_entry import cpus_per_rank
from dsnb.spec import JobSpec

if TYPE_CHECKING:
    from dsnb.backends.ray.backend import RayBackend

REQUEST_TIMEOUT_S = 5.0


def run_preflight(backend: RayBackend, spec: JobSpec | None) -> PreflightReport:
    """The report for ``backend`` (and ``spec``).

    Raises:
        Nothing: problems are failed lines.
    """
    results: list[CheckResult] = []
    try:
        local_version = importlib.metadata.version("ray")
        results.append(CheckResult("ray", True, f"ray {local_version}"))
    except importlib.metadata.PackageNotFoundError:
        return PreflightReport(backend.name, [CheckResult("ray", False, "ray is not installed", "pip install 'dsnb[ray]'")])
    if backend.address is None:
        cpus = backend._num_cpus or max(os.cpu_count() or 1, MIN_LOGICAL_CPUS)
        if not Path(sys.executable).with_name("ray").exists():
            results.append(CheckResult("Ray head", False, f"no 'ray' command next to {sys.executable}", "pip install 'dsnb[ray]' in this environment"))
        else:
            results.append(CheckResult("Ray head", True, f"a private head starts on 127.0.0.1 at the first submit ({cpus} logical CPUs)"))
        if spec is not None:
            need = spec.world_size * cpus_per_rank(spec)
            results.append(CheckResult("CPUs", need <= cpus, f"the job needs {need:g} logical CPUs, the head offers {cpus}",
                                       f"pass Cluster('ray', num_cpus={int(need + 0.999)}) or fewer ranks"))
        return PreflightReport(backend.name, results)
    results.append(_check_cluster(backend, local_version))
    return PreflightReport(backend.name, results)


def _check_cluster(backend: RayBackend, local_version: str) -> CheckResult:
    request = urllib.request.Request(f"{backend.address}/api/version", headers=backend.headers)
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            version = json.loads(response.read()).get("ray_version", "?")
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return CheckResult("Ray cluster", False, f"{backend.address} refused the request (HTTP {e.code})",
                               "pass token= (from `ray get-auth-token` on the head) or set RAY_AUTH_TOKEN")
        return CheckResult("Ray cluster", False, f"{backend.address} answered HTTP {e.code}", "check that the address is the dashboard's (port 8265)")
    except (OSError, ValueError) as e:
        return CheckResult("Ray cluster", False, f"{backend.address} cannot be reached ({e})",
                           "check the address (the dashboard's, port 8265) and that the cluster is up")
    same = version.split(".")[:2] == local_version.split(".")[:2]
    return CheckResult("Ray cluster", True, f"{backend.address} runs ray {version}"
                       + ("" if same else f"; this client has {local_version}: Ray needs the same version on both sides"),
                       "" if same else f"pip install 'ray=={version}'", warning=not same)
