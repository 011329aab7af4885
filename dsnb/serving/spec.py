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

_LOADER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
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

    def __post_init__(self) -> None:
        # The name, resources, env and image follow the JobSpec rules; reuse its checks.
        try:
            if isinstance(self.resources, dict):
                self.resources = Resources(**self.resources)
            JobSpec(name=self.name, command=["serve"], resources=self.resources, env=self.env, image=self.image,
                    working_dir=self.working_dir)
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
        for name in ("replicas", "min_replicas", "max_replicas"):
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

    @property
    def model_kind(self) -> str:
        """``"loader"`` (a function of the user's code) or ``"huggingface"`` (a model directory)."""
        return "loader" if _LOADER.match(self.model) else "huggingface"

    @property
    def autoscaling(self) -> bool:
        """Whether replicas scale between ``min_replicas`` and ``max_replicas``."""
        return self.min_replicas is not None

    def with_unique_name(self) -> ServeSpec:
        """A copy named ``<name>-<4 random characters>``, as every deploy does."""
        unique = copy.deepcopy(self)
        unique.name = unique_name(self.name)
        return unique

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_dict` turns back into an equal spec."""
        return dataclasses.asdict(self)

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
