"""What to serve: :class:`ServeSpec`, validated on construction.

A served model is always on: replicas load it once and answer HTTP requests. The model is a
loader function of the user's code (``"package.module:function"``, returning a
``torch.nn.Module``), or a Hugging Face model directory (``from_pretrained`` on a local path
or a mounted volume). Every replica wraps it with ``deepspeed.init_inference``.

Example:
    >>> spec = ServeSpec(name="tiny", model="models:build", replicas=2)
    >>> spec.model_kind
    'loader'
    >>> ServeSpec(name="auto", model="models:build", min_replicas=1, max_replicas=4).autoscaling
    True
    >>> tp = ServeSpec(name="llm", model="models:build", procs_per_node=2)
    >>> tp.world_size, tp.to_job_spec().command[:3]
    (2, ['python', '-m', 'dsnb.runtime.server'])
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsnb.errors import InvalidSpecError
from dsnb.spec import JobSpec, Resources, _repr_non_default, build_stored, check_known_fields, job_problems, unique_name
from dsnb.spec_problems import Check, Problem, collect, field_values, raise_first

_LOADER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # as dsnb.runtime.server.lora takes it
DTYPES = ("float32", "float16", "bfloat16")
_SPEC = "ServeSpec"
#: Whole-number fields and their least value; None means "not set" for the autoscaling bounds.
_COUNTS = {"replicas": 1, "min_replicas": 0, "max_replicas": 1, "max_batch_size": 1, "max_queue": 1, "max_running": 1,
           "max_cache_tokens": 1, "prefill_tokens": 1}
#: How a server generates text: continuous batching, or each request alone (for comparisons).
GENERATION_MODES = ("continuous", "one-at-a-time")


def _check_job_fields(values: Mapping[str, Any]) -> list[Problem]:
    """The name, resources, env, image, working_dir and rank counts follow the JobSpec rules."""
    shared = ("name", "working_dir", "nodes", "procs_per_node", "resources", "image", "env")
    job = field_values(JobSpec, {"command": ["serve"], **{name: values[name] for name in shared}})
    return job_problems(job, _SPEC)


def _check_model(values: Mapping[str, Any]) -> None:
    model = str(values["model"]) if isinstance(values["model"], Path) else values["model"]
    if not isinstance(model, str) or not model.strip():
        raise InvalidSpecError("model", f"must be a loader or a model directory, got {model!r}",
                               "pass model='my_models:build' or model='/models/my-bert'", spec=_SPEC)
    if not _LOADER.match(model) and not (Path(model).expanduser() / "config.json").is_file():
        raise InvalidSpecError("model", f"{model!r} is neither 'module:function' nor a model directory with config.json",
                               "pass a loader like 'my_models:build', or the directory from save_pretrained()", spec=_SPEC)


def _count_check(name: str) -> Check:
    least = _COUNTS[name]

    def check(values: Mapping[str, Any]) -> None:
        value = values[name]
        if value is None and name != "replicas":
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InvalidSpecError(name, f"must be a whole number >= {least}, got {value!r}", f"set {name}=1", spec=_SPEC)

    return Check(check)


def _check_both_bounds(values: Mapping[str, Any]) -> None:
    if (values["min_replicas"] is None) != (values["max_replicas"] is None):
        raise InvalidSpecError("min_replicas" if values["min_replicas"] is None else "max_replicas",
                               "autoscaling needs both bounds", "set both min_replicas and max_replicas, or neither", spec=_SPEC)


def _check_bounds_order(values: Mapping[str, Any]) -> None:
    low, high, replicas = values["min_replicas"], values["max_replicas"], values["replicas"]
    if low is None:
        return
    if low > high:
        raise InvalidSpecError("min_replicas", f"{low} is above max_replicas={high}", "set min_replicas <= max_replicas", spec=_SPEC)
    if not low <= replicas <= high:
        raise InvalidSpecError("replicas", f"{replicas} is outside the autoscaling bounds {low}..{high}",
                               f"set replicas between {low} and {high}", spec=_SPEC)


def _check_dtype(values: Mapping[str, Any]) -> None:
    if values["dtype"] not in DTYPES:
        raise InvalidSpecError("dtype", f"{values['dtype']!r} is not supported", f"use one of {', '.join(DTYPES)}", spec=_SPEC)


def _check_port(values: Mapping[str, Any]) -> None:
    port = values["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 1024 <= port <= 65535:
        raise InvalidSpecError("port", f"must be a whole number in 1024..65535, got {port!r}", "set port=8000", spec=_SPEC)


def _check_max_wait_ms(values: Mapping[str, Any]) -> None:
    wait = values["max_wait_ms"]
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 10_000:
        raise InvalidSpecError("max_wait_ms", f"must be a number of milliseconds in 0..10000, got {wait!r}",
                               "set max_wait_ms=5", spec=_SPEC)


def _check_generation(values: Mapping[str, Any]) -> None:
    if values["generation"] not in GENERATION_MODES:
        raise InvalidSpecError("generation", f"{values['generation']!r} is not a way to generate",
                               f"use one of {', '.join(GENERATION_MODES)}", spec=_SPEC)


def _check_lora_adapters(values: Mapping[str, Any]) -> None:
    adapters = values["lora_adapters"]
    if not isinstance(adapters, Mapping):
        raise InvalidSpecError("lora_adapters", f"must be a dict of name -> adapter directory, got {type(adapters).__name__}",
                               "pass lora_adapters={'sql': '/adapters/sql'}", spec=_SPEC)
    for name, path in adapters.items():
        if not isinstance(name, str) or not _ADAPTER_NAME.match(name) or name == values["name"]:
            raise InvalidSpecError(f"lora_adapters.{name}", "must be 1 to 64 letters, digits, '.', '_' or '-', other than "
                                   "the served model's name", "name the adapter like 'sql-expert'", spec=_SPEC)
        if not isinstance(path, str) or not path:
            raise InvalidSpecError(f"lora_adapters.{name}", f"must be the adapter's directory on the server, got {path!r}",
                                   f"pass lora_adapters={{'{name}': '/adapters/{name}'}}", spec=_SPEC)


def _check_token(values: Mapping[str, Any]) -> None:
    token = values["token"]
    if token is not None and (not isinstance(token, str) or len(token) < 8 or any(c.isspace() for c in token)):
        raise InvalidSpecError("token", "must be a string of at least 8 characters without spaces",
                               "pass a random token, e.g. secrets.token_urlsafe(24)", spec=_SPEC)


def _check_token_not_in_env(values: Mapping[str, Any]) -> None:
    if "DSNB_SERVE_TOKEN" in values["env"]:
        raise InvalidSpecError("env.DSNB_SERVE_TOKEN", "is set by dsnb from ServeSpec.token", "pass token=... instead", spec=_SPEC)


#: The checks of a ServeSpec, in the order the first problem is reported.
_SERVE_CHECKS = (
    Check(_check_job_fields),
    Check(_check_model),
    *(_count_check(name) for name in _COUNTS),
    Check(_check_both_bounds, needs=("min_replicas", "max_replicas")),
    Check(_check_bounds_order, needs=("replicas", "min_replicas", "max_replicas")),
    Check(_check_dtype),
    Check(_check_port),
    Check(_check_max_wait_ms),
    Check(_check_generation),
    Check(_check_lora_adapters, needs=("name",)),
    Check(_check_token),
    Check(_check_token_not_in_env, needs=("env",)),
)


@dataclass(frozen=True)
class ServeSpec:
    """A model served over HTTP by one or more replicas.

    Frozen: change a spec with ``dataclasses.replace(spec, replicas=3)``, which checks it again.

    Attributes:
        name: a DNS-1035 label; a unique suffix is added when deployed.
        model: ``"module:function"`` (a loader in ``working_dir`` returning a ``torch.nn.Module``),
            or the path of a Hugging Face model directory (it holds ``config.json``).
        working_dir: where the loader's module lives; shipped to the replicas (Ray) or baked
            into the image (Kubernetes). Default: the current directory.
        replicas: replicas to start with (the fixed count without autoscaling).
        min_replicas: with ``max_replicas``: autoscaling bounds.
        max_replicas: with ``min_replicas``: autoscaling bounds.
        resources: per replica (CPU, memory, GPUs).
        image: container image (KubeRay, Kubernetes).
        env: extra environment variables of every replica.
        dtype: the inference dtype, ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        nodes: nodes of one server (``local``, Kubernetes): the model is split over
            ``nodes × procs_per_node`` ranks (tensor parallel) and rank 0 answers HTTP.
        procs_per_node: ranks per node of one server.
        port: the HTTP port of rank 0 (``local`` picks a free one).
        max_batch_size: requests the server gathers into one forward pass at most.
        max_wait_ms: how long a batch waits for more requests once it is formed (under load; a lone
            request does not wait).
        max_queue: requests waiting at most; more are answered 503 with ``Retry-After``.
        generation: ``"continuous"`` (generations join and leave one running batch between decode
            steps) or ``"one-at-a-time"`` (each runs alone; for comparisons).
        max_running: sequences generated at once (continuous batching).
        max_cache_tokens: tokens in flight (continuous batching): every running sequence's prompt
            and all it may still generate; a request that could never fit is a 400.
        prefill_tokens: prompt tokens prefilled per step (continuous batching); a longer prompt
            is prefilled in chunks while the running sequences go on.
        lora_adapters: LoRA adapters (PEFT directories in safetensors, on the server: in the image or a
            volume on Kubernetes) loaded at start, ``{name: directory}``; a request whose ``model`` is
            the name generates with that adapter. A server of one rank only.
        allow_lora_loading: take ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` at run time.
        token: when set, every request but the health probes needs
            ``Authorization: Bearer <token>``; it travels as the secret variable
            ``DSNB_SERVE_TOKEN`` and is never printed.

    Raises:
        InvalidSpecError: any invalid field; the message names it and the fix.
    """

    name: str
    model: str
    working_dir: str | None = None
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    resources: Resources = field(default_factory=Resources)
    image: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    dtype: str = "float32"
    nodes: int = 1
    procs_per_node: int = 1
    port: int = 8000
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256
    generation: str = "continuous"
    max_running: int = 64
    max_cache_tokens: int = 32768
    prefill_tokens: int = 512
    lora_adapters: dict[str, str] = field(default_factory=dict)
    allow_lora_loading: bool = False
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        raise_first(collect(_SERVE_CHECKS, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, _SPEC))
        for name in ("model", "working_dir"):
            if isinstance(getattr(self, name), Path):
                object.__setattr__(self, name, str(getattr(self, name)))  # frozen: the stored form is set once, here
        if isinstance(self.resources, dict):
            object.__setattr__(self, "resources", Resources(**self.resources))

    @classmethod
    def problems(cls, **fields: Any) -> list[Problem]:
        """Every problem of ``ServeSpec(**fields)``, in field order, without raising.

        Raises:
            TypeError: an unknown field.

        Example:
            >>> [p.message for p in ServeSpec.problems(name="m", model="m:f", replicas=0, port=80)][1]
            'ServeSpec.port: must be a whole number in 1024..65535, got 80. Fix: set port=8000'
        """
        return collect(_SERVE_CHECKS, field_values(cls, fields), _SPEC)

    @property
    def model_kind(self) -> str:
        """``"loader"`` (a function of the user's code) or ``"huggingface"`` (a model directory)."""
        return "loader" if _LOADER.match(self.model) else "huggingface"

    @property
    def autoscaling(self) -> bool:
        """Whether replicas scale between ``min_replicas`` and ``max_replicas``."""
        return self.min_replicas is not None

    @property
    def world_size(self) -> int:
        """Ranks of one server: ``nodes × procs_per_node`` (the tensor-parallel degree)."""
        return self.nodes * self.procs_per_node

    def server_args(self) -> list[str]:
        """The command-line options of ``python -m dsnb.runtime.server`` for this spec (no secrets)."""
        args = ["--model", self.model, "--served-name", self.name, "--dtype", self.dtype, "--port", str(self.port),
                "--max-batch-size", str(self.max_batch_size), "--max-wait-ms", f"{self.max_wait_ms:g}",
                "--max-queue", str(self.max_queue), "--generation", self.generation,
                "--max-running", str(self.max_running), "--max-cache-tokens", str(self.max_cache_tokens),
                "--prefill-tokens", str(self.prefill_tokens)]
        if self.working_dir:
            args += ["--working-dir", self.working_dir]
        for name, path in self.lora_adapters.items():
            args += ["--lora", f"{name}={path}"]
        if self.allow_lora_loading:
            args.append("--allow-lora-loading")
        return args

    def to_job_spec(self) -> JobSpec:
        """The always-on job that runs this server on job backends (local, Kubernetes).

        Every rank runs ``python -m dsnb.runtime.server``; the token, when set, is the secret
        variable ``DSNB_SERVE_TOKEN``.

        Raises:
            InvalidSpecError: ``replicas``/autoscaling other than one server, which only Ray Serve offers.
        """
        if self.replicas != 1 or self.autoscaling:
            raise InvalidSpecError("replicas", f"{self.replicas} replicas (or autoscaling) need Ray Serve; this backend runs one "
                                   "server spread over nodes x procs_per_node ranks",
                                   "set replicas=1 (and no min/max_replicas), or serve with Cluster('ray')", spec=_SPEC)
        env = dict(self.env)
        if self.token:
            env["DSNB_SERVE_TOKEN"] = self.token
        return JobSpec(name=self.name, command=["python", "-m", "dsnb.runtime.server"], args=self.server_args(),
                       working_dir=self.working_dir, nodes=self.nodes, procs_per_node=self.procs_per_node,
                       resources=self.resources, image=self.image, env=env)

    def with_unique_name(self) -> ServeSpec:
        """A copy named ``<name>-<4 random characters>``, as every deploy does."""
        unique = copy.deepcopy(self)  # not replace(): the suffixed name may exceed MAX_NAME_LEN
        object.__setattr__(unique, "name", unique_name(self.name))
        return unique

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_dict` turns back into an equal spec, less the token.

        The token is a secret: it is left out (``None``), so that no record holds it.
        """
        data = dataclasses.asdict(self)
        data["token"] = None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeSpec:
        """Build a spec from :meth:`to_dict` output.

        Raises:
            InvalidSpecError: unknown keys, or any invalid field.
        """
        check_known_fields(cls, data)
        return build_stored(cls, data)

    def __repr__(self) -> str:
        return _repr_non_default(self)
