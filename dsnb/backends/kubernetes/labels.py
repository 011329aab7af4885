"""Labels on everything dsnb creates on Kubernetes, so jobs are found again from labels alone.

Example:
    >>> job_labels("tiny-gpt-x7k2")
    {'app.kubernetes.io/managed-by': 'dsnb', 'dsnb.io/job': 'tiny-gpt-x7k2'}
    >>> job_selector("tiny-gpt-x7k2")
    'app.kubernetes.io/managed-by=dsnb,dsnb.io/job=tiny-gpt-x7k2'
"""

from __future__ import annotations

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "dsnb"
JOB = "dsnb.io/job"
#: Selects every resource dsnb manages, in any job.
MANAGED_SELECTOR = f"{MANAGED_BY}={MANAGER}"
#: What a pod does in its job: "launcher", "worker", "node", "head", ...
ROLE = "dsnb.io/role"


def job_labels(name: str) -> dict[str, str]:
    """The labels of every resource of job ``name``."""
    return {MANAGED_BY: MANAGER, JOB: name}


def job_selector(name: str) -> str:
    """A label selector for the resources of job ``name``."""
    return ",".join(f"{k}={v}" for k, v in job_labels(name).items())


def role(pod: dict) -> str:
    """The role dsnb labelled a pod with (``""`` for none).

    Example:
        >>> role({"metadata": {"labels": {"dsnb.io/role": "launcher"}}})
        'launcher'
    """
    return (pod["metadata"].get("labels") or {}).get(ROLE, "")
