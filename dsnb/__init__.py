"""dsnb: launch, watch and stop distributed DeepSpeed work from a notebook.

Example:
    >>> from dsnb import Cluster, JobSpec
    >>> spec = JobSpec(name="tiny-gpt", script="train.py", procs_per_node=2)
"""

from dsnb.backends.kubernetes.pod_options import PodOptions
from dsnb.cluster import Cluster
from dsnb.errors import (
    BackendUnavailable,
    ClusterError,
    DsnbError,
    InvalidSpecError,
    JobFailed,
    JobNotFound,
    WaitTimeout,
)
from dsnb.job import Job
from dsnb.metrics import report
from dsnb.runtime import checkpoint_dir, deepspeed_config
from dsnb.secrets import Secret, SecretRef
from dsnb.serving.endpoint import Endpoint
from dsnb.serving.spec import ServeSpec
from dsnb.spec import JobSpec, Resources
from dsnb.status import JobState, JobStatus, LogLine, MetricSample, ReplicaStatus

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable", "Cluster", "ClusterError", "DsnbError", "Endpoint", "InvalidSpecError", "Job", "JobFailed",
    "JobNotFound", "JobSpec", "JobState", "JobStatus", "LogLine", "MetricSample", "PodOptions", "ReplicaStatus",
    "Resources", "Secret", "SecretRef", "ServeSpec", "WaitTimeout", "checkpoint_dir", "deepspeed_config", "report",
]
