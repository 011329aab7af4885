"""The Ray Serve application dsnb deploys: one deployment whose replicas each run dsnb's model server.

``dsnb.runtime.ray_serve_app:build`` is the application builder named in the Serve config
(:func:`serve_config`), for a local Ray, an existing Ray cluster (through the Serve REST API)
and a KubeRay RayService alike. A replica loads the model once and serves the same HTTP
application as ``python -m dsnb.runtime.server`` (:mod:`dsnb.runtime.server.app`) behind Serve's
proxy, with the spec's server options: ``POST /`` with ``{"inputs": ...}``, the OpenAI and KServe
v2 routes, streaming, continuous batching of generations, LoRA adapters and ``/metrics`` (the
replica's own). A malformed request gets a 400 with the reason, an oversized one a 413.

Example:
    >>> from dsnb.serving import ServeSpec
    >>> spec = ServeSpec(name="tiny-x7k2", model="models:build", min_replicas=1, max_replicas=3)
    >>> app = serve_config(spec, route_prefix="/tiny-x7k2")
    >>> app["deployments"][0]["autoscaling_config"]
    {'min_replicas': 1, 'max_replicas': 3, 'initial_replicas': 1}
"""

from __future__ import annotations

from typing import Any

from dsnb.serving.spec import ServeSpec

DEPLOYMENT = "DsnbModel"
IMPORT_PATH = "dsnb.runtime.ray_serve_app:build"


def deployment_config(spec: ServeSpec) -> dict[str, Any]:
    """The Serve settings of the one deployment: replica count or autoscaling bounds, resources per replica.

    Example:
        >>> from dsnb import Resources
        >>> deployment_config(ServeSpec(name="a", model="m:f", replicas=2, resources=Resources(cpu=2, gpus=1)))
        {'name': 'DsnbModel', 'num_replicas': 2, 'ray_actor_options': {'num_cpus': 2.0, 'num_gpus': 1}}
    """
    deployment: dict[str, Any] = {"name": DEPLOYMENT}
    if spec.autoscaling:
        deployment["autoscaling_config"] = {"min_replicas": spec.min_replicas, "max_replicas": spec.max_replicas,
                                            "initial_replicas": spec.replicas}
    else:
        deployment["num_replicas"] = spec.replicas
    options: dict[str, Any] = {"num_cpus": float(spec.resources.cpu) if isinstance(spec.resources.cpu, (int, float)) else 1.0}
    if spec.resources.gpus:
        options["num_gpus"] = spec.resources.gpus
    deployment["ray_actor_options"] = options
    return deployment


def check_servable(spec: ServeSpec) -> None:
    """Refuse what Ray Serve replicas do not offer: a token, or one model over several ranks.

    Raises:
        InvalidSpecError: ``token`` is set, or ``nodes``/``procs_per_node`` are above 1.
    """
    from dsnb.errors import InvalidSpecError

    if spec.token is not None:
        raise InvalidSpecError("token", "Ray Serve endpoints are not authenticated by dsnb",
                               "leave token out and protect the Ray cluster (its token, network policy), or serve on "
                               "Cluster('local') or a Kubernetes backend", spec="ServeSpec")
    if spec.world_size > 1:
        raise InvalidSpecError("procs_per_node" if spec.procs_per_node > 1 else "nodes",
                               "a Ray Serve replica holds the whole model; splitting one model over ranks needs a job backend",
                               "use replicas= for more copies, or serve on Cluster('local') or a Kubernetes backend",
                               spec="ServeSpec")


def replica_env(spec: ServeSpec) -> dict[str, str]:
    """Environment of every replica: DeepSpeed on CPU when no GPU is asked for, then the spec's own."""
    env = {} if spec.resources.gpus else {"DS_ACCELERATOR": "cpu"}
    return {**env, **spec.env}


def serve_config(spec: ServeSpec, route_prefix: str, working_dir: str | None = None) -> dict[str, Any]:
    """One application of a Serve config file (the ``applications`` list's item) for ``spec``.

    Args:
        spec: what to serve, carrying its unique name.
        route_prefix: where its HTTP route starts, e.g. ``"/tiny-x7k2"``.
        working_dir: a directory or URI Ray ships to the replicas (the loader's code).
    """
    runtime_env: dict[str, Any] = {"env_vars": replica_env(spec)}
    if working_dir:
        runtime_env["working_dir"] = working_dir
    return {"name": spec.name, "route_prefix": route_prefix, "import_path": IMPORT_PATH,
            "args": {"model": spec.model, "dtype": spec.dtype, "server_args": replica_args(spec)},
            "runtime_env": runtime_env, "deployments": [deployment_config(spec)]}


def replica_args(spec: ServeSpec) -> list[str]:
    """The server options of every replica: the spec's (:meth:`ServeSpec.server_args`) less the port, which
    Serve's proxy owns, and the working directory, which Ray ships as the replica's own (``runtime_env``).

    Example:
        >>> replica_args(ServeSpec(name="a", model="m:f", working_dir="/tmp/code", max_running=8))[:4]
        ['--model', 'm:f', '--served-name', 'a']
        >>> "--port" in replica_args(ServeSpec(name="a", model="m:f"))
        False
    """
    args, given = [], spec.server_args()
    for index, arg in enumerate(given):
        if arg in ("--port", "--working-dir") or (index and given[index - 1] in ("--port", "--working-dir")):
            continue
        args.append(arg)
    return args


def at_route_root(app: Any) -> Any:
    """``app`` (ASGI), also answering at the route prefix itself: Serve hands ``/<name>`` over with the prefix
    as ``root_path`` and nothing after it, which Starlette would redirect to ``/<name>/`` (a 307 that clients
    sending a token must not follow)."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == scope.get("root_path", "") != "":
            scope = {**scope, "path": scope["path"] + "/", "raw_path": scope["path"].encode() + b"/"}
        await app(scope, receive, send)

    return asgi


def ongoing_requests(options: Any) -> int:
    """Requests a replica takes at once (Serve's ``max_ongoing_requests``): a full batch of either kind.

    Example:
        >>> from dsnb.runtime.server.server import ServerOptions
        >>> ongoing_requests(ServerOptions(model="m:f", served_name="m", max_running=64, max_batch_size=16))
        64
    """
    return max(options.max_running, options.max_batch_size)


def build(args: dict[str, Any]) -> Any:
    """The application builder Serve calls with the config's ``args``.

    Raises:
        ValueError: ``args`` lacks ``model``.
    """
    from ray import serve

    if "model" not in args:
        raise ValueError("the Serve config's args need 'model'")
    from dsnb.runtime.server.server import ServerOptions

    server_args = args.get("server_args") or ["--model", args["model"], "--dtype", args.get("dtype", "float32")]
    options = ServerOptions.parse(server_args)

    # Serve lets 5 requests at a time into a replica by default, which would cap its batches at 5:
    # let in a full batch of generations or of embeddings (the server queues the rest itself).
    @serve.deployment(name=DEPLOYMENT, max_ongoing_requests=ongoing_requests(options))
    @serve.ingress()
    class DsnbModel:
        def __init__(self, server_args: list[str]) -> None:
            from dsnb.runtime.server.server import ServerOptions, build_server, load_model, put_to_work

            options = ServerOptions.parse(server_args)
            # not ``app``: Serve's ingress owns that attribute
            self.dsnb_engine, stats, self.dsnb_app = build_server(options)
            put_to_work(self.dsnb_app, self.dsnb_engine, load_model(options), options)
            stats.ready.set(1)

        def __serve_build_asgi_app__(self) -> Any:
            return at_route_root(self.dsnb_app.starlette())

        def check_health(self) -> None:
            """Serve's health check: a replica whose engine stopped is restarted."""
            if not self.dsnb_engine.ready:
                raise RuntimeError(self.dsnb_engine.not_ready_reason)

        def __del__(self) -> None:
            if (engine := getattr(self, "dsnb_engine", None)) is not None:  # None: the constructor failed
                engine.stop(timeout=10.0)

    return DsnbModel.bind(server_args)
