"""The Ray Serve application dsnb deploys: one deployment whose replicas each hold a :class:`Predictor`.

``dsnb.runtime.ray_serve_app:build`` is the application builder named in the Serve config
(:func:`serve_config`), for a local Ray, an existing Ray cluster (through the Serve REST API)
and a KubeRay RayService alike. A replica loads the model once and answers ``POST`` requests
``{"inputs": ...}`` with ``{"outputs": ...}``; a malformed request gets a 400 with the reason,
an oversized one a 413.

Example:
    >>> from dsnb.serving import ServeSpec
    >>> spec = ServeSpec(name="tiny-x7k2", model="models:build", min_replicas=1, max_replicas=3)
    >>> app = serve_config(spec, route_prefix="/tiny-x7k2")
    >>> app["deployments"][0]["autoscaling_config"]
    {'min_replicas': 1, 'max_replicas': 3, 'initial_replicas': 1}
"""

from __future__ import annotations

import json
from typing import Any

from dsnb.serving.spec import ServeSpec

DEPLOYMENT = "DsnbModel"
IMPORT_PATH = "dsnb.runtime.ray_serve_app:build"
#: Request bodies above this many bytes get a 413.
MAX_BODY_BYTES = 16 * 1024 * 1024


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
    """Refuse what Ray Serve replicas do not offer: a token, one model over several ranks, or LoRA adapters.

    Raises:
        InvalidSpecError: ``token`` is set, ``nodes``/``procs_per_node`` are above 1, or adapters are asked for.
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
    if spec.lora_adapters or spec.allow_lora_loading:
        raise InvalidSpecError("lora_adapters" if spec.lora_adapters else "allow_lora_loading",
                               "a Ray Serve replica does not load LoRA adapters",
                               "serve on Cluster('local') or a Kubernetes backend, whose server takes them", spec="ServeSpec")


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
            "args": {"model": spec.model, "dtype": spec.dtype}, "runtime_env": runtime_env,
            "deployments": [deployment_config(spec)]}


def build(args: dict[str, Any]) -> Any:
    """The application builder Serve calls with the config's ``args``.

    Raises:
        ValueError: ``args`` lacks ``model``.
    """
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    if "model" not in args:
        raise ValueError("the Serve config's args need 'model'")

    @serve.deployment(name=DEPLOYMENT)
    class DsnbModel:
        def __init__(self, model: str, dtype: str) -> None:
            from dsnb.runtime.server.model import Predictor

            self.predictor = Predictor(model, dtype=dtype)

        async def __call__(self, request: Request) -> JSONResponse:
            from dsnb.runtime.server.model import BadRequest

            body = await request.body()
            if len(body) > MAX_BODY_BYTES:
                return JSONResponse({"error": f"request body over {MAX_BODY_BYTES} bytes"}, status_code=413)
            try:
                return JSONResponse(self.predictor.predict(json.loads(body or b"null")))
            except (BadRequest, ValueError) as e:
                return JSONResponse({"error": str(e)}, status_code=400)
            except RuntimeError as e:  # e.g. a shape the model does not take
                return JSONResponse({"error": f"the model could not run these inputs: {e}"}, status_code=400)

    return DsnbModel.bind(args["model"], args.get("dtype", "float32"))
