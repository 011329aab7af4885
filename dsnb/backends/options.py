"""The options each backend's constructor takes, as data: the CLI's flags and the form's fields come from here.

A backend declares its options in its ``options`` class attribute (like torchx's ``run_opts``);
the built-in backends' are kept in this module too, so that the CLI can offer every flag without
importing any backend (and the kubernetes or ray packages with it).

Example:
    >>> [option.flag for option in BUILTIN_OPTIONS["ray"]][:2]
    ['--address', '--storage-path']
    >>> NAMESPACE.parse("ml")
    'ml'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dsnb.errors import InvalidSpecError


@dataclass(frozen=True)
class Option:
    """One keyword argument of a backend's constructor.

    Attributes:
        name: the keyword, e.g. ``"namespace"``.
        help: one line for ``--help`` and the form.
        type: turns the text of a command line or a form field into the value.
        choices: the values allowed, if only a few are.
        on_command_line: False for values that are Python objects (a ``Configuration``) or
            secrets (a token is never taken on a command line, where other users can read it).
    """

    name: str
    help: str
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    on_command_line: bool = True

    @property
    def flag(self) -> str:
        """The command-line flag, ``--`` and the name with dashes."""
        return "--" + self.name.replace("_", "-")

    def parse(self, text: str) -> Any:
        """The value of ``text``.

        Raises:
            InvalidSpecError: not a value of this option (named as ``Cluster.<option>``, with what it takes).
        """
        if self.choices is not None and text not in self.choices:
            raise InvalidSpecError(self.name, f"{text!r} is not one of {', '.join(self.choices)}", f"pick one of {', '.join(self.choices)}",
                                   spec="Cluster")
        try:
            return self.type(text)
        except (TypeError, ValueError) as e:
            raise InvalidSpecError(self.name, f"{text!r} is not a {getattr(self.type, '__name__', 'value')}", "check the value",
                                   spec="Cluster") from e


HOME = Option("home", "where local jobs are kept (default: $DSNB_HOME/jobs)")
NAMESPACE = Option("namespace", "Kubernetes namespace (default: the kubeconfig context's, else default)")
CONTEXT = Option("context", "kubeconfig context (default: the current one)")
KUBECONFIG = Option("kubeconfig", "kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
CANCEL_WAIT = Option("cancel_wait", "seconds cancel waits for a job's pods to be gone (default 60)", float)
IN_CLUSTER = Option("in_cluster", "use the pod's service account", bool, on_command_line=False)
CONFIGURATION = Option("configuration", "a ready kubernetes.client.Configuration", on_command_line=False)
POD_OPTIONS = Option("pod_options", "PodOptions (or a dict of its fields) for every pod", on_command_line=False)
SHIP_WORKING_DIR = Option("ship_working_dir", "auto: ship a working_dir that is a directory here to the pods (default); "
                                              "always; never: it is a path in the image", choices=("auto", "always", "never"))
KUBERNETES = (NAMESPACE, CONTEXT, KUBECONFIG, CANCEL_WAIT, SHIP_WORKING_DIR, IN_CLUSTER, CONFIGURATION, POD_OPTIONS)

TTL = Option("ttl_seconds_after_finished", "seconds the operator keeps a finished job's resources", int)
STORAGE_PATH = Option("storage_path", "where Ray Train keeps runs and checkpoints (a shared directory or a URI)")
SERVE_URL = Option("serve_url", "where endpoints answer, e.g. http://127.0.0.1:8000 through a port-forward "
                               "(a template may name {name}, {service}, {namespace}, {port})")

BUILTIN_OPTIONS: dict[str, tuple[Option, ...]] = {
    "local": (HOME,),
    "statefulset": (
        Option("launcher", "the launcher in each pod (default torchrun)", choices=("torchrun", "deepspeed")),
        Option("cluster_domain", "the cluster's DNS domain (default cluster.local)"),
        Option("peer_timeout", "seconds a pod waits for its peers' addresses (default 600)", float),
        SERVE_URL,
        *KUBERNETES,
    ),
    "mpijob": (
        Option("clean_pod_policy", "which pods MPI Operator deletes when the job ends (default Running)",
               choices=("None", "Running", "All")),
        TTL,
        SERVE_URL,
        *KUBERNETES,
    ),
    "trainjob": (
        Option("runtime", "the (Cluster)TrainingRuntime jobs name (default deepspeed-distributed)"),
        Option("runtime_kind", "its kind (default ClusterTrainingRuntime)", choices=("ClusterTrainingRuntime", "TrainingRuntime")),
        SERVE_URL,
        *KUBERNETES,
    ),
    "ray": (
        Option("address", "the Ray dashboard of an existing cluster, http://HOST:8265 (its token from $RAY_AUTH_TOKEN "
                          "or ~/.ray/auth_token); default a private head on this machine"),
        STORAGE_PATH,
        Option("num_cpus", "logical CPUs the private head offers", int),
        SERVE_URL,
        Option("token", "the Ray cluster's auth token", on_command_line=False),
    ),
    "kuberay": (
        Option("ray_version", "the Ray version in the image, major.minor.patch"),
        TTL,
        STORAGE_PATH,
        SERVE_URL,
        Option("head_resources", "the Ray head pod's Resources", on_command_line=False),
        *KUBERNETES,
    ),
}
