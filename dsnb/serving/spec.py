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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsnb.errors import InvalidSpecError as _InvalidSpecError
from dsnb.spec import JobSpec, Resources, _repr_non_default, check_known_fields, unique_name

_LOADER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")
DTYPES = ("float32", "float16", "bfloat16")


def InvalidSpecError(field: str, problem: str, fix: str) -> _InvalidSpecError:  # noqa: N802 - reads as the class
    return _InvalidSpecError(field, problem, fix, spec="ServeSpec")


@dataclass
class ServeSpec:
    """A model served over HTTP by one or more replicas.

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
        max_wait_ms: how long a batch waits for more requests once the first arrived.
        max_queue: requests waiting at most; more are answered 503 with ``Retry-After``.
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
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # The name, resources, env and image follow the JobSpec rules; reuse its checks.
        try:
            if isinstance(self.resources, dict):
                self.resources = Resources(**self.resources)
            JobSpec(name=self.name, command=["serve"], resources=self.resources, env=self.env, image=self.image,
                    working_dir=self.working_dir, nodes=self.nodes, procs_per_node=self.procs_per_node)
        except _InvalidSpecError as e:
            raise InvalidSpecError(e.field, e.problem, e.fix) from None
        if isinstance(self.working_dir, Path):
            self.working_dir = str(self.working_dir)
        if isinstance(self.model, Path):
            self.model = str(self.model)
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidSpecError("model", f"must be a loader or a model directory, got {self.model!r}",
                                   "pass model='my_models:build' or model='/models/my-bert'")
        if not _LOADER.match(self.model) and not (Path(self.model).expanduser() / "config.json").is_file():
            raise InvalidSpecError("model", f"{self.model!r} is neither 'module:function' nor a model directory with config.json",
                                   "pass a loader like 'my_models:build', or the directory from save_pretrained()")
        for name in ("replicas", "min_replicas", "max_replicas", "max_batch_size", "max_queue"):
            value = getattr(self, name)
            if value is None and name != "replicas":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name != "min_replicas" else 0):
                raise InvalidSpecError(name, f"must be a whole number >= {1 if name != 'min_replicas' else 0}, got {value!r}", f"set {name}=1")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise InvalidSpecError("min_replicas" if self.min_replicas is None else "max_replicas",
                                   "autoscaling needs both bounds", "set both min_replicas and max_replicas, or neither")
        if self.autoscaling:
            assert self.min_replicas is not None and self.max_replicas is not None
            if self.min_replicas > self.max_replicas:
                raise InvalidSpecError("min_replicas", f"{self.min_replicas} is above max_replicas={self.max_replicas}",
                                       "set min_replicas <= max_replicas")
            if not self.min_replicas <= self.replicas <= self.max_replicas:
                raise InvalidSpecError("replicas", f"{self.replicas} is outside the autoscaling bounds {self.min_replicas}..{self.max_replicas}",
                                       f"set replicas between {self.min_replicas} and {self.max_replicas}")
        if self.dtype not in DTYPES:
            raise InvalidSpecError("dtype", f"{self.dtype!r} is not supported", f"use one of {', '.join(DTYPES)}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1024 <= self.port <= 65535:
            raise InvalidSpecError("port", f"must be a whole number in 1024..65535, got {self.port!r}", "set port=8000")
        if isinstance(self.max_wait_ms, bool) or not isinstance(self.max_wait_ms, (int, float)) or not 0 <= self.max_wait_ms <= 10_000:
            raise InvalidSpecError("max_wait_ms", f"must be a number of milliseconds in 0..10000, got {self.max_wait_ms!r}",
                                   "set max_wait_ms=5")
        if self.token is not None and (not isinstance(self.token, str) or len(self.token) < 8 or any(c.isspace() for c in self.token)):
            raise InvalidSpecError("token", "must be a string of at least 8 characters without spaces",
                                   "pass a random token, e.g. secrets.token_urlsafe(24)")
        if "DSNB_SERVE_TOKEN" in self.env:
            raise InvalidSpecError("env.DSNB_SERVE_TOKEN", "is set by dsnb from ServeSpec.token", "pass token=... instead")

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
                "--max-queue", str(self.max_queue)]
        if self.working_dir:
            args += ["--working-dir", self.working_dir]
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
                                   "set replicas=1 (and no min/max_replicas), or serve with Cluster('ray')")
        env = dict(self.env)
        if self.token:
            env["DSNB_SERVE_TOKEN"] = self.token
        return JobSpec(name=self.name, command=["python", "-m", "dsnb.runtime.server"], args=self.server_args(),
                       working_dir=self.working_dir, nodes=self.nodes, procs_per_node=self.procs_per_node,
                       resources=self.resources, image=self.image, env=env)

    def with_unique_name(self) -> ServeSpec:
        """A copy named ``<name>-<4 random characters>``, as every deploy does."""
        unique = copy.deepcopy(self)
        unique.name = unique_name(self.name)
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
        return cls(**data)

    def __repr__(self) -> str:
        return _repr_non_default(self)
