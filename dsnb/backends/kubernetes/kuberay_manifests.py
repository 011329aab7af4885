"""KubeRay manifests (``ray.io/v1``) for a :class:`~dsnb.spec.JobSpec`: a RayCluster spec, a RayJob, a RayService.

Pure functions: nothing here talks to a cluster. The Ray cluster has one head and one worker
group of ``spec.nodes`` fixed-size workers. Its pods come from the pod template every
Kubernetes backend uses (dsnb's labels, GPU limits, a memory-backed ``/dev/shm``, a non-root
security context, the :class:`PodOptions`), without the container command: KubeRay writes
``ray start`` there itself.

Secret-looking variables of ``spec.env`` (``HF_TOKEN``, ``*_API_KEY``...) never appear in a
manifest. The pods read them from the Secret named by :func:`env_secret_name` (one key per
variable), which the caller creates next to the RayJob or RayService; Ray's processes inherit
the pods' environment. The other variables are set on the pods and in the Ray runtime
environment too.

Example:
    >>> from dsnb import JobSpec, PodOptions, Resources
    >>> spec = JobSpec(name="tiny-gpt-x7k2", script="train.py", nodes=2, image="ghcr.io/org/train:1",
    ...                resources=Resources(gpus=1))
    >>> job = render_rayjob(spec, PodOptions(), ["python", "-m", "dsnb.runtime.ray_train_entry", "--", "train.py"])
    >>> job["spec"]["entrypoint"]
    'python -m dsnb.runtime.ray_train_entry -- train.py'
    >>> workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    >>> workers["replicas"], workers["rayStartParams"]
    (2, {'num-gpus': '1'})
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import shlex
from typing import Any

import yaml

from dsnb.backends.kubernetes.labels import ROLE, job_labels
from dsnb.backends.kubernetes.pod_options import PodOptions
from dsnb.backends.kubernetes.pod_template import build_pod_template, referenced_env_keys, secret_env_keys
from dsnb.errors import InvalidSpecError
from dsnb.spec import JobSpec, Resources

API_VERSION = "ray.io/v1"
DEFAULT_RAY_VERSION = "2.60.0"
HEAD_CONTAINER = "ray-head"
WORKER_CONTAINER = "ray-worker"
#: KubeRay's name for the container that runs ``ray job submit`` (K8sJobMode).
SUBMITTER_CONTAINER = "ray-job-submitter"
#: What the submitter asks for: KubeRay's own default (it only submits and follows the driver's log).
SUBMITTER_RESOURCES = {"requests": {"cpu": "500m", "memory": "200Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
WORKER_GROUP = "workers"
#: The head's ports, under the names KubeRay looks them up by (head service, job submission, serve service).
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000}
#: KubeRay refuses longer RayJob and RayService names: it adds 6 characters to name the
#: RayCluster, whose service names must stay within 63.
MAX_NAME_LEN = 47
_INT32_MAX = 2**31 - 1
_RAY_VERSION = re.compile(r"^\d+\.\d+\.\d+\Z")


def default_head_resources() -> Resources:
    """What the head asks for when none is given: it runs the GCS, the dashboard and the driver, no training.

    Example:
        >>> default_head_resources()
        Resources(cpu=1, memory='4Gi')
    """
    return Resources(cpu=1, memory="4Gi")


def env_secret_name(spec: JobSpec) -> str | None:
    """The Secret the pods read the secret-looking variables of ``spec.env`` from, or None if there are none.

    Example:
        >>> from dsnb import JobSpec
        >>> env_secret_name(JobSpec(name="a-x7k2", script="t.py", env={"HF_TOKEN": "hf_x"}))
        'a-x7k2-env'
    """
    return f"{spec.name}-env" if secret_env_keys(spec.env) else None


def ray_cluster_spec(spec: JobSpec, options: PodOptions, ray_version: str, *,
                     head_resources: Resources | None = None) -> dict[str, Any]:
    """The ``spec`` of a RayCluster: one head, and one worker group of ``spec.nodes`` workers.

    Ray's token authentication is on (``authOptions.mode: token``): KubeRay v1.5+ makes a Secret
    with a random token for the cluster and gives it (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN``) to
    every Ray container and to the RayJob's submitter, so the head's dashboard and Jobs API
    (reachable from any pod through the head Service) run nothing for a caller without it.

    The head starts with ``num-cpus: "0"`` so that Ray places no task or actor needing a CPU
    there: the training workers all land on the worker pods, while the driver and Ray's own
    actors (which ask for no CPU) still run on the head. Each worker offers Ray the spec's
    GPUs (``num-gpus``) and, for a numeric CPU count, its CPUs rounded up (``num-cpus``;
    KubeRay derives it from the CPU limit otherwise, rounding up as well).

    Args:
        spec: the job, already carrying its unique name; ``resources`` are per worker.
        options: scheduling, volumes and security settings of every pod.
        ray_version: the Ray version in ``spec.image``, ``"major.minor.patch"``.
        head_resources: the head pod's CPU and memory; :func:`default_head_resources` if None.

    Returns:
        A dict for a RayCluster's ``spec``, a RayJob's ``rayClusterSpec`` or a RayService's
        ``rayClusterConfig``.

    Raises:
        InvalidSpecError: no image, no nodes, a malformed Ray version, or head resources with GPUs.

    Example:
        >>> from dsnb import JobSpec, PodOptions, Resources
        >>> spec = JobSpec(name="a-x7k2", script="t.py", nodes=3, image="rayproject/ray:2.60.0",
        ...                resources=Resources(cpu=8, gpus=2), procs_per_node=2)
        >>> cluster = ray_cluster_spec(spec, PodOptions(), "2.60.0")
        >>> cluster["headGroupSpec"]["rayStartParams"]
        {'dashboard-host': '0.0.0.0', 'num-cpus': '0'}
        >>> cluster["workerGroupSpecs"][0]["rayStartParams"]
        {'num-cpus': '8', 'num-gpus': '2'}
        >>> cluster["authOptions"]
        {'mode': 'token'}
    """
    _check_spec(spec, ray_version)
    head_resources = default_head_resources() if head_resources is None else head_resources
    if not isinstance(head_resources, Resources):
        raise InvalidSpecError("head_resources", f"must be a Resources, got {type(head_resources).__name__}",
                               "pass Resources(cpu=1, memory='4Gi')")
    if head_resources.gpus:
        raise InvalidSpecError("head_resources.gpus", "the head runs no training, its GPUs would stay idle",
                               "set gpus=0 on head_resources (the workers get spec.resources.gpus)")
    secret_name = env_secret_name(spec)
    head_spec = dataclasses.replace(spec, resources=head_resources)
    head = _ray_pod_template(head_spec, options, HEAD_CONTAINER, "head", secret_name)
    head["spec"]["containers"][0]["ports"] = [{"name": name, "containerPort": port} for name, port in HEAD_PORTS.items()]
    worker_params: dict[str, str] = {}
    if isinstance(spec.resources.cpu, (int, float)):
        worker_params["num-cpus"] = str(math.ceil(spec.resources.cpu))
    if spec.resources.gpus:
        worker_params["num-gpus"] = str(spec.resources.gpus)
    return {
        "rayVersion": ray_version,
        "authOptions": {"mode": "token"},
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": head,
        },
        "workerGroupSpecs": [{
            "groupName": WORKER_GROUP,
            "replicas": spec.nodes,
            "minReplicas": spec.nodes,
            "maxReplicas": spec.nodes,
            "rayStartParams": worker_params,
            "template": _ray_pod_template(spec, options, WORKER_CONTAINER, "worker", secret_name),
        }],
    }


def submitter_pod_template(spec: JobSpec, options: PodOptions) -> dict[str, Any]:
    """The pod that runs ``ray job submit`` and then follows the driver's log (KubeRay's submitter Job).

    KubeRay writes the container's command itself (as for its default submitter) and runs the
    first container. Given here so that the pod carries dsnb's labels (role ``submitter``):
    its log is the Ray job's driver log, which is how dsnb reads a RayJob's output. Like
    KubeRay's default submitter it is small and GPU-free, with the spec's image and the
    image pull secrets, and none of the workers' scheduling constraints or volumes.

    Example:
        >>> from dsnb import JobSpec, PodOptions
        >>> pod = submitter_pod_template(JobSpec(name="a-x7k2", script="t.py", image="img:1"), PodOptions())
        >>> pod["metadata"]["labels"]["dsnb.io/role"], pod["spec"]["containers"][0]["name"], pod["spec"]["restartPolicy"]
        ('submitter', 'ray-job-submitter', 'Never')
    """
    template = build_pod_template(spec, [], {}, options, {ROLE: "submitter"})
    pod = template["spec"]
    main = pod["containers"][0]
    container = {"name": SUBMITTER_CONTAINER, "image": main["image"], "resources": copy.deepcopy(SUBMITTER_RESOURCES),
                 **({"securityContext": main["securityContext"]} if main.get("securityContext") else {})}
    kept = {key: pod[key] for key in ("imagePullSecrets", "securityContext", "automountServiceAccountToken") if key in pod}
    return {"metadata": template["metadata"], "spec": {"restartPolicy": "Never", "containers": [container], **kept}}


def render_rayjob(spec: JobSpec, options: PodOptions, entrypoint: list[str], ray_version: str = DEFAULT_RAY_VERSION, *,
                  ttl_seconds_after_finished: int = 0, head_resources: Resources | None = None,
                  env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """A RayJob that creates a Ray cluster for ``spec``, runs ``entrypoint`` on it as the driver, then removes it.

    KubeRay submits the job from a Kubernetes Job (``K8sJobMode``) once the cluster is up, and
    deletes the cluster ``ttl_seconds_after_finished`` after the job ends (default 0: at once);
    the cluster keeps its GPUs until then. The driver's log stays readable either way: it is
    the submitter pod's, which KubeRay keeps. ``spec.max_restarts`` becomes ``backoffLimit`` (each retry runs on a new
    cluster) and ``spec.timeout`` ``activeDeadlineSeconds``.

    Secrets: the secret-looking variables of ``spec.env`` are left out of ``runtimeEnvYAML``
    (which is stored in the RayJob in clear text). The pods take them from the Secret named
    by :func:`env_secret_name`, which must exist before the RayJob is created.

    The submitter pod comes from :func:`submitter_pod_template` (dsnb's labels, so its log,
    the driver's, can be found and followed).

    Args:
        spec: the job, already carrying its unique name.
        options: see :func:`ray_cluster_spec`.
        entrypoint: the driver's command line as a list, e.g.
            ``["python", "-m", "dsnb.runtime.ray_train_entry", "--", "train.py"]``; it is
            quoted into one shell command, so each item reaches the driver unchanged.
        ray_version: the Ray version in ``spec.image``.
        ttl_seconds_after_finished: seconds between the job's end and the cluster's deletion.
        head_resources: see :func:`ray_cluster_spec`.
        env_vars: more variables for the Ray job's runtime environment (the driver and every
            worker), e.g. :func:`dsnb.runtime.ray_train_entry.driver_env`; the non-secret
            variables of ``spec.env`` come after them and win. Not for secret values: they
            are written into the RayJob as given.

    Returns:
        The RayJob as a dict (no namespace: the caller sets it).

    Raises:
        InvalidSpecError: as :func:`ray_cluster_spec`, or a name KubeRay refuses, an empty
            entrypoint, a negative TTL, a timeout beyond KubeRay's range, or ``env_vars``
            that are not strings.

    Example:
        >>> from dsnb import JobSpec, PodOptions
        >>> spec = JobSpec(name="a-x7k2", script="t.py", image="rayproject/ray:2.60.0", timeout=600, max_restarts=1)
        >>> job = render_rayjob(spec, PodOptions(), ["python", "t.py", "--note", "two words"])
        >>> job["spec"]["entrypoint"], job["spec"]["activeDeadlineSeconds"], job["spec"]["backoffLimit"]
        ("python t.py --note 'two words'", 600, 1)
    """
    _check_name(spec, "RayJob")
    _check_rayjob_arguments(entrypoint, ttl_seconds_after_finished, env_vars)
    job_spec: dict[str, Any] = {"entrypoint": shlex.join(entrypoint)}
    runtime_env = _runtime_env(spec, env_vars)
    if runtime_env:
        job_spec["runtimeEnvYAML"] = yaml.safe_dump(runtime_env, sort_keys=False)
    job_spec.update({
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": ttl_seconds_after_finished,
        "submissionMode": "K8sJobMode",
        "backoffLimit": spec.max_restarts,
    })
    if spec.timeout:
        if spec.timeout > _INT32_MAX:
            raise InvalidSpecError("timeout", f"{spec.timeout:g} s is beyond what KubeRay accepts ({_INT32_MAX} s)",
                                   "set a shorter timeout, or None for no limit")
        job_spec["activeDeadlineSeconds"] = max(1, int(spec.timeout))
    job_spec["rayClusterSpec"] = ray_cluster_spec(spec, options, ray_version, head_resources=head_resources)
    job_spec["submitterPodTemplate"] = submitter_pod_template(spec, options)
    return {"apiVersion": API_VERSION, "kind": "RayJob",
            "metadata": {"name": spec.name, "labels": job_labels(spec.name)}, "spec": job_spec}


def _check_rayjob_arguments(entrypoint: list[str], ttl_seconds_after_finished: int, env_vars: dict[str, str] | None) -> None:
    """Refuse what :func:`render_rayjob` cannot render (see its ``Raises``)."""
    if isinstance(entrypoint, str):
        raise InvalidSpecError("entrypoint", "must be a list of strings, got one string", f"write entrypoint={shlex.split(entrypoint)!r}")
    if not isinstance(entrypoint, (list, tuple)) or not entrypoint or not all(isinstance(a, str) for a in entrypoint):
        raise InvalidSpecError("entrypoint", f"must be a non-empty list of strings, got {entrypoint!r}",
                               "write entrypoint=['python', '-m', 'dsnb.runtime.ray_train_entry', '--', 'train.py']")
    if (isinstance(ttl_seconds_after_finished, bool) or not isinstance(ttl_seconds_after_finished, int)
            or not 0 <= ttl_seconds_after_finished <= _INT32_MAX):
        raise InvalidSpecError("ttl_seconds_after_finished", f"must be a whole number of seconds >= 0, got {ttl_seconds_after_finished!r}",
                               "set ttl_seconds_after_finished=0 to delete the cluster as soon as the job ends, or e.g. 600 to keep it for debugging")
    if env_vars is not None and (not isinstance(env_vars, dict)
                                 or not all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items())):
        raise InvalidSpecError("env_vars", f"must map names to string values, got {env_vars!r}",
                               "pass env_vars={'NAME': 'value'} (numbers as strings)")


def render_rayservice(spec: JobSpec, options: PodOptions, import_path: str | None = None,
                      deployment: dict[str, Any] | None = None, ray_version: str = DEFAULT_RAY_VERSION, *,
                      head_resources: Resources | None = None, application: dict[str, Any] | None = None) -> dict[str, Any]:
    """A RayService serving one Serve application on a Ray cluster for ``spec``.

    The application is either built here from ``import_path`` and one ``deployment`` (named
    after the job, answering on ``/`` of the serve port 8000), or given whole as
    ``application`` (one item of a Serve config's ``applications``, e.g.
    :func:`dsnb.runtime.ray_serve_app.serve_config`); ``name`` and ``route_prefix`` default
    to the job's name and ``/``. Secrets are handled as in :func:`render_rayjob`:
    ``serveConfigV2`` carries only the variables that are not secret-looking (those of
    ``spec.env`` and of the application's ``runtime_env.env_vars`` alike); the pods read the
    others from the Secret named by :func:`env_secret_name`.

    Args:
        spec: the job, already carrying its unique name; ``resources`` are per worker, and
            ``nodes`` is the worker pod count.
        options: see :func:`ray_cluster_spec`.
        import_path: where Serve finds the application, ``"module:app"`` or ``"module.app"``.
        deployment: the deployment's Serve settings, as written in a Serve config file
            (``name``, ``num_replicas`` or ``autoscaling_config``, ``ray_actor_options``...);
            kept as given.
        ray_version: the Ray version in ``spec.image``.
        head_resources: see :func:`ray_cluster_spec`.
        application: the whole application instead of ``import_path`` and ``deployment``;
            kept as given but for the secret variables.

    Returns:
        The RayService as a dict (no namespace: the caller sets it).

    Raises:
        InvalidSpecError: as :func:`ray_cluster_spec`, or a name KubeRay refuses, a malformed
            import path, a deployment without a name or with both a fixed replica count and
            autoscaling, or both (or neither of) ``application`` and ``import_path``.

    Example:
        >>> from dsnb import JobSpec, PodOptions
        >>> spec = JobSpec(name="chat-x7k2", script="serve.py", image="rayproject/ray:2.60.0")
        >>> service = render_rayservice(spec, PodOptions(), "serve_app:app", {"name": "Chat", "num_replicas": 2})
        >>> yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["deployments"]
        [{'name': 'Chat', 'num_replicas': 2}]
        >>> app = {"import_path": "pkg.serve:build", "args": {"model": "m:f"}, "deployments": [{"name": "M"}]}
        >>> yaml.safe_load(render_rayservice(spec, PodOptions(), application=app)["spec"]["serveConfigV2"])["applications"][0]
        {'import_path': 'pkg.serve:build', 'args': {'model': 'm:f'}, 'deployments': [{'name': 'M'}], 'name': 'chat-x7k2', 'route_prefix': '/'}
    """
    _check_name(spec, "RayService")
    if application is not None:
        if import_path is not None or deployment is not None:
            raise InvalidSpecError("application", "give either a whole application or import_path and deployment, not both",
                                   "pass application=... alone, or import_path= and deployment=")
        app = _given_application(spec, application)
    else:
        if import_path is None or deployment is None:
            raise InvalidSpecError("import_path", "a RayService needs an application",
                                   "pass import_path='serve_app:app' and deployment={'name': 'Model'}, or application=...")
        _check_import_path(import_path, "import_path")
        _check_deployment(deployment, "deployment")
        app = {"name": spec.name, "import_path": import_path, "route_prefix": "/", "runtime_env": _runtime_env(spec),
               "deployments": [copy.deepcopy(deployment)]}
    try:
        serve_config = yaml.safe_dump({"applications": [app]}, sort_keys=False)
    except yaml.YAMLError as e:
        raise InvalidSpecError("application" if application is not None else "deployment", f"cannot be written as YAML ({e})",
                               "use only strings, numbers, booleans, lists and dicts") from e
    return {"apiVersion": API_VERSION, "kind": "RayService",
            "metadata": {"name": spec.name, "labels": job_labels(spec.name)},
            "spec": {"serveConfigV2": serve_config,
                     "rayClusterConfig": ray_cluster_spec(spec, options, ray_version, head_resources=head_resources)}}


def _check_import_path(import_path: Any, field: str) -> None:
    if not isinstance(import_path, str) or not re.fullmatch(r"[A-Za-z_][\w.]*[.:][A-Za-z_]\w*", import_path):
        raise InvalidSpecError(field, f"{import_path!r} is not a Serve import path",
                               "write it like 'serve_app:app' (module, then the bound application)")


def _check_deployment(deployment: Any, field: str) -> None:
    if not isinstance(deployment, dict) or not isinstance(deployment.get("name"), str) or not deployment["name"]:
        raise InvalidSpecError(f"{field}.name", "every deployment needs a name", "pass deployment={'name': 'Model', 'num_replicas': 1}")
    replicas = deployment.get("num_replicas")
    if deployment.get("autoscaling_config") and isinstance(replicas, int) and not isinstance(replicas, bool):
        raise InvalidSpecError(f"{field}.num_replicas", "a fixed replica count cannot go with autoscaling_config",
                               "remove num_replicas (or set it to 'auto') and let autoscaling_config decide")


def _given_application(spec: JobSpec, application: Any) -> dict[str, Any]:
    """``application`` checked, with its defaults and without secret-looking variables (a copy)."""
    if not isinstance(application, dict):
        raise InvalidSpecError("application", f"must be a dict (one Serve application), got {type(application).__name__}",
                               "pass application=serve_config(spec, route_prefix='/')")
    _check_import_path(application.get("import_path"), "application.import_path")
    deployments = application.get("deployments", [])
    if not isinstance(deployments, list):
        raise InvalidSpecError("application.deployments", f"must be a list, got {type(deployments).__name__}",
                               "write deployments=[{'name': 'Model', 'num_replicas': 1}]")
    for deployment in deployments:
        _check_deployment(deployment, "application.deployments")
    app = copy.deepcopy(application)
    app.setdefault("name", spec.name)
    app.setdefault("route_prefix", "/")
    runtime_env = app.get("runtime_env")
    if runtime_env is not None and not isinstance(runtime_env, dict):
        raise InvalidSpecError("application.runtime_env", f"must be a dict, got {type(runtime_env).__name__}",
                               "write runtime_env={'env_vars': {'NAME': 'value'}}")
    env_vars = (runtime_env or {}).get("env_vars")
    if env_vars:
        if not isinstance(env_vars, dict):
            raise InvalidSpecError("application.runtime_env.env_vars", f"must map names to values, got {env_vars!r}",
                                   "write env_vars={'NAME': 'value'}")
        hidden = (set(secret_env_keys(spec.env)) | set(referenced_env_keys(spec.env))
                  | set(secret_env_keys({k: str(v) for k, v in env_vars.items()})))
        app["runtime_env"]["env_vars"] = {k: v for k, v in env_vars.items() if k not in hidden}
    return app


def _check_spec(spec: JobSpec, ray_version: str) -> None:
    if not spec.image:
        raise InvalidSpecError("image", "KubeRay runs the job in a container image",
                               "set image= an image with Ray, torch, DeepSpeed and your code (e.g. built FROM rayproject/ray)")
    if isinstance(spec.nodes, bool) or not isinstance(spec.nodes, int) or spec.nodes < 1:
        raise InvalidSpecError("nodes", f"must be a whole number >= 1, got {spec.nodes!r}", "set nodes=1 or more")
    if not isinstance(ray_version, str) or not _RAY_VERSION.match(ray_version):
        raise InvalidSpecError("ray_version", f"{ray_version!r} is not a Ray version",
                               f"write the version in the image as major.minor.patch, e.g. {DEFAULT_RAY_VERSION!r}")


def _check_name(spec: JobSpec, kind: str) -> None:
    if len(spec.name) > MAX_NAME_LEN:
        raise InvalidSpecError("name", f"{spec.name!r} has {len(spec.name)} characters; KubeRay allows at most {MAX_NAME_LEN} for a {kind}",
                               f"use a name of at most {MAX_NAME_LEN - 5} characters (dsnb adds a 5-character suffix)")


def _runtime_env(spec: JobSpec, extra: dict[str, str] | None = None) -> dict[str, Any]:
    # Secret values and references to the user's Secrets reach the Ray processes through the pods' env.
    hidden = set(secret_env_keys(spec.env)) | set(referenced_env_keys(spec.env))
    env_vars = {**(extra or {}), **{k: v for k, v in spec.env.items() if k not in hidden}}
    return {"env_vars": env_vars} if env_vars else {}


def _ray_pod_template(spec: JobSpec, options: PodOptions, container: str, role: str,
                      secret_name: str | None) -> dict[str, Any]:
    template = build_pod_template(spec, [], {}, options, {ROLE: role}, secret_name=secret_name)
    main = template["spec"]["containers"][0]
    main["name"] = container
    # KubeRay writes the command itself (``ray start`` with the rayStartParams); one set here would run before it.
    main.pop("command", None)
    main.pop("args", None)
    return template
