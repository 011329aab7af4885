"""What to run: :class:`JobSpec` and :class:`Resources`, validated on construction.

The same spec runs on every backend. Construction checks everything that can be
checked without a cluster (names, counts, quantities, the DeepSpeed config for the
world size), so a mistake surfaces as one :class:`~dsnb.errors.InvalidSpecError`
before anything is started or created.

Example:
    >>> spec = JobSpec(name="tiny-gpt", script="train.py", procs_per_node=2,
    ...                deepspeed={"train_micro_batch_size_per_gpu": 8,
    ...                           "zero_optimization": {"stage": 2}})
    >>> spec.world_size, spec.deepspeed_config["train_batch_size"]
    (2, 16)
    >>> spec
    JobSpec(name='tiny-gpt', script='train.py', procs_per_node=2, deepspeed={...})
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import secrets as randomness
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsnb import secrets
from dsnb.ds_config import check_deepspeed_config
from dsnb.errors import InvalidSpecError

# A DNS-1035 label, as Kubernetes requires for Service and many resource names.
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?\Z")
_SUFFIX_LEN = 4
MAX_NAME_LEN = 63 - 1 - _SUFFIX_LEN  # room for "-xxxx" added on submit
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?\Z")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_SECRET_REF_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_SECRET_REF_KEY = re.compile(r"^[-._a-zA-Z0-9]+\Z")

#: The most nodes and ranks per node a job may ask for (a typo of 10**5 ranks would otherwise fork them all).
MAX_COUNTS = {"nodes": 4096, "procs_per_node": 256}

#: Environment variables dsnb sets for every rank; a spec may not set them.
RESERVED_ENV = frozenset(
    {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "NODE_RANK",
     "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "DSNB_JOB_NAME", "DSNB_JOB_DIR"}
)


def redact_env(env: dict[str, Any]) -> dict[str, Any]:
    """Copy of ``env`` with secret values replaced by ``***`` (see :mod:`dsnb.secrets`).

    Example:
        >>> redact_env({"HF_TOKEN": "hf_abc", "NCCL_DEBUG": "WARN", "DB_URL": "postgres://u:pw@db/x"})
        {'HF_TOKEN': '***', 'NCCL_DEBUG': 'WARN', 'DB_URL': '***'}
    """
    return secrets.redact_env(env)


def suggest_name(name: str) -> str:
    """A valid DNS-1035 label close to ``name``.

    Example:
        >>> suggest_name("My_Run 2")
        'my-run-2'
    """
    candidate = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    candidate = re.sub(r"^[^a-z]+", "", candidate)[:MAX_NAME_LEN].rstrip("-")
    return candidate or "job"


def _check_quantity(value: Any, field_name: str, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidSpecError(field_name, f"must be a number or a quantity string, got {value!r}", f"write it like {example!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidSpecError(field_name, f"must be a finite number, got {value!r}", f"write it like {example!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise InvalidSpecError(field_name, f"must be positive, got {value!r}", f"write it like {example!r}")
        return
    if not _QUANTITY.match(value) or float(re.match(r"[0-9.]+", value).group()) <= 0:  # type: ignore[union-attr]
        hint = f"write it like {example!r}"
        if re.match(r"^[0-9.]+\s*[KMGTPE]B$", value, re.IGNORECASE):
            hint = f"Kubernetes quantities use binary suffixes: write {value.upper().replace('B', 'i').replace(' ', '')!r}"
        raise InvalidSpecError(field_name, f"{value!r} is not a Kubernetes quantity", hint)


@dataclass
class Resources:
    """What each node (pod, Ray worker) needs.

    Attributes:
        cpu: CPU cores per node, a number or a Kubernetes quantity such as ``"500m"``.
        memory: memory per node as a Kubernetes quantity, e.g. ``"4Gi"``.
        gpus: GPUs per node; 0 runs on CPU (gloo, ``DS_ACCELERATOR=cpu``).

    Raises:
        InvalidSpecError: a negative GPU count or a malformed quantity.

    Example:
        >>> Resources(cpu=2, memory="4Gi")
        Resources(cpu=2, memory='4Gi')
    """

    cpu: float | str | None = None
    memory: str | None = None
    gpus: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 0:
            raise InvalidSpecError("resources.gpus", f"must be a whole number >= 0, got {self.gpus!r}", "set gpus=0 for CPU, or the GPUs per node")
        if self.cpu is not None:
            _check_quantity(self.cpu, "resources.cpu", "2")
        if self.memory is not None:
            if not isinstance(self.memory, str):
                raise InvalidSpecError("resources.memory", f"must be a quantity string, got {self.memory!r}", "write it like '4Gi'")
            _check_quantity(self.memory, "resources.memory", "4Gi")

    def __repr__(self) -> str:
        return _repr_non_default(self)


@dataclass
class JobSpec:
    """A distributed DeepSpeed job, the same on every backend.

    Attributes:
        name: a DNS-1035 label (lower-case letters, digits, '-'); a unique suffix is added on submit.
        script: a Python file to run on every rank (relative to ``working_dir``), or
        command: a full command line as a list, instead of ``script``.
        args: extra arguments for the script or command.
        working_dir: where the ranks start (local: defaults to the current directory).
        nodes: number of nodes (pods, Ray worker groups); the local backend runs them all here.
        procs_per_node: ranks per node; world size is ``nodes * procs_per_node``.
        resources: per node, see :class:`Resources`.
        image: container image for Kubernetes and KubeRay backends.
        env: extra environment variables for every rank.
        deepspeed: a DeepSpeed config dict, or a path to its JSON file.
        max_restarts: how many times the whole job is restarted after a failure.
        timeout: seconds after which a running job is stopped and marked FAILED.

    Raises:
        InvalidSpecError: any invalid field; the message names it and the fix.

    Example:
        >>> JobSpec(name="demo", command=["python", "-c", "print(1)"], nodes=2).world_size
        2
    """

    name: str
    script: str | None = None
    command: list[str] | None = None
    args: list[str] = field(default_factory=list)
    working_dir: str | None = None
    nodes: int = 1
    procs_per_node: int = 1
    resources: Resources = field(default_factory=Resources)
    image: str | None = None
    env: dict[str, str | secrets.SecretRef] = field(default_factory=dict)
    deepspeed: dict[str, Any] | str | Path | None = None
    max_restarts: int = 0
    timeout: float | None = None

    def __post_init__(self) -> None:
        self._check_name()
        self._check_entrypoint()
        for name in ("nodes", "procs_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidSpecError(name, f"must be a whole number >= 1, got {value!r}", f"set {name}=1 or more")
            if value > MAX_COUNTS[name]:
                raise InvalidSpecError(name, f"{value} is more than dsnb runs ({MAX_COUNTS[name]} at most)",
                                       f"set {name} to at most {MAX_COUNTS[name]}")
        if isinstance(self.resources, dict):
            self.resources = Resources(**self.resources)
        if not isinstance(self.resources, Resources):
            raise InvalidSpecError("resources", f"must be a Resources, got {type(self.resources).__name__}", "pass Resources(cpu=..., memory=..., gpus=...)")
        if self.resources.gpus and self.procs_per_node > self.resources.gpus:
            raise InvalidSpecError(
                "procs_per_node",
                f"{self.procs_per_node} ranks per node but only {self.resources.gpus} GPUs per node",
                f"set procs_per_node={self.resources.gpus} (one rank per GPU) or request more GPUs",
            )
        self._check_env()
        if self.image is not None and (not isinstance(self.image, str) or not self.image or re.search(r"\s", self.image)):
            raise InvalidSpecError("image", f"{self.image!r} is not an image reference", "write it like 'ghcr.io/org/train:1.0'")
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise InvalidSpecError("max_restarts", f"must be a whole number >= 0, got {self.max_restarts!r}", "set max_restarts=0 for no restarts")
        if self.timeout is not None and (isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float))
                                         or not math.isfinite(self.timeout) or self.timeout <= 0):
            raise InvalidSpecError("timeout", f"must be a positive number of seconds, got {self.timeout!r}", "set timeout=3600, or None for no limit")
        if self.working_dir is not None and not isinstance(self.working_dir, (str, Path)):
            raise InvalidSpecError("working_dir", f"must be a path, got {self.working_dir!r}", "pass a directory path")
        if isinstance(self.working_dir, Path):
            self.working_dir = str(self.working_dir)
        self._deepspeed_config = self._load_deepspeed()

    def _check_name(self) -> None:
        name = self.name
        if not isinstance(name, str) or not name:
            raise InvalidSpecError("name", f"must be a non-empty string, got {name!r}", "set name='my-job'")
        if len(name) > MAX_NAME_LEN:
            raise InvalidSpecError("name", f"{len(name)} characters, at most {MAX_NAME_LEN} fit (a 5-character suffix is added)", f"use {suggest_name(name)!r}")
        if not _DNS1035.match(name):
            raise InvalidSpecError(
                "name",
                f"{name!r} is not a DNS-1035 label (lower-case letters, digits and '-', starting with a letter)",
                f"use {suggest_name(name)!r}",
            )

    def _check_entrypoint(self) -> None:
        if (self.script is None) == (self.command is None):
            raise InvalidSpecError(
                "script" if self.script is not None else "script/command",
                "exactly one of script or command must be set",
                "pass script='train.py' or command=['python', 'train.py']",
            )
        if self.script is not None:
            if isinstance(self.script, Path):
                self.script = str(self.script)
            if not isinstance(self.script, str) or not self.script.strip():
                raise InvalidSpecError("script", f"must be a file path, got {self.script!r}", "pass script='train.py'")
        if self.command is not None:
            if isinstance(self.command, str):
                raise InvalidSpecError("command", "must be a list of strings, got one string", f"write command={self.command.split()!r}")
            if not self.command or not all(isinstance(c, str) for c in self.command):
                raise InvalidSpecError("command", f"must be a non-empty list of strings, got {self.command!r}", "write command=['python', 'train.py']")
            self.command = list(self.command)
        if isinstance(self.args, str):
            raise InvalidSpecError("args", "must be a list of strings, got one string", f"write args={self.args.split()!r}")
        if not isinstance(self.args, (list, tuple)) or not all(isinstance(a, str) for a in self.args):
            raise InvalidSpecError("args", f"must be a list of strings, got {self.args!r}", "write numbers as strings: args=['--epochs', '3']")
        self.args = list(self.args)

    def _check_env(self) -> None:
        if not isinstance(self.env, dict):
            raise InvalidSpecError("env", f"must be a dict of strings, got {type(self.env).__name__}", "pass env={'KEY': 'value'}")
        for key, value in self.env.items():
            if not isinstance(key, str) or not _ENV_KEY.match(key):
                raise InvalidSpecError("env", f"{key!r} is not a valid variable name", "use letters, digits and '_', not starting with a digit")
            if key in RESERVED_ENV:
                raise InvalidSpecError(f"env.{key}", "is set by dsnb for every rank", f"remove {key!r} from env")
            if isinstance(value, secrets.SecretRef):
                if not _SECRET_REF_NAME.match(value.name) or len(value.name) > 253 or not _SECRET_REF_KEY.match(value.key):
                    raise InvalidSpecError(f"env.{key}", f"SecretRef({value.name!r}, {value.key!r}) is not a Secret name and key",
                                           "name a Secret of the namespace (lower-case, '-', '.') and one of its keys")
                continue
            if not isinstance(value, str):
                shown = "(its value is not shown)" if secrets.is_secret(key, str(value)) else f"{str(value)!r}"
                raise InvalidSpecError(f"env.{key}", f"value must be a string, got {type(value).__name__}",
                                       f"write it as a string {shown}")

    def _load_deepspeed(self) -> dict[str, Any] | None:
        config = self.deepspeed
        if config is None:
            return None
        if isinstance(config, (str, Path)):
            path = Path(config).expanduser()
            if not path.is_file():
                raise InvalidSpecError("deepspeed", f"config file {str(path)!r} not found", "pass an existing JSON file or a dict")
            try:
                config = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise InvalidSpecError("deepspeed", f"{str(path)!r} is not valid JSON ({e.msg} at line {e.lineno})", "fix the JSON") from e
            # Keep the content, not the path: the job must run with what was checked.
            self.deepspeed = config
        for where in secrets.credential_paths(config):
            raise InvalidSpecError(f"deepspeed.{where}", "holds a credential: the config is kept with the job, shown in its "
                                                         "plan and handed to every rank as a file",
                                   "remove it and put the key in env instead (e.g. COMET_API_KEY, WANDB_API_KEY), which dsnb keeps "
                                   "secret; DeepSpeed's monitors and their libraries read it from the environment")
        return check_deepspeed_config(config, self.world_size)

    @property
    def world_size(self) -> int:
        """Total ranks: ``nodes * procs_per_node``."""
        return self.nodes * self.procs_per_node

    @property
    def deepspeed_config(self) -> dict[str, Any] | None:
        """The checked DeepSpeed config with the batch triple filled, or None."""
        return self._deepspeed_config

    def with_unique_name(self) -> JobSpec:
        """A copy named ``<name>-<4 random characters>``, as every submit does.

        Example:
            >>> len(JobSpec(name="a", script="t.py").with_unique_name().name)
            6
        """
        unique = copy.deepcopy(self)  # not replace(): the suffixed name may exceed MAX_NAME_LEN
        unique.name = unique_name(self.name)
        return unique

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_dict` turns back into an equal spec (secret values included:
        what stores it redacts them, see :func:`redact_env`)."""
        data = dataclasses.asdict(self)
        data["env"] = {k: (v.to_dict() if isinstance(v, secrets.SecretRef) else v) for k, v in self.env.items()}  # a Secret stays one
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        """Build a spec from :meth:`to_dict` output (or hand-written JSON/YAML).

        Raises:
            InvalidSpecError: unknown keys, or any invalid field.
        """
        check_known_fields(cls, data)
        data = dict(data)
        if isinstance(data.get("resources"), dict):
            data["resources"] = Resources(**data["resources"])
        if isinstance(data.get("env"), dict):
            data["env"] = {k: (secrets.SecretRef.from_dict(v) if isinstance(v, dict) and "secretKeyRef" in v else v)
                           for k, v in data["env"].items()}
        return cls(**data)

    def __repr__(self) -> str:
        return _repr_non_default(self)


def unique_name(name: str) -> str:
    """``<name>-<4 random lower-case letters or digits>``, the name every submit or deploy uses.

    Example:
        >>> len(unique_name("tiny-gpt"))
        13
    """
    alphabet = string.ascii_lowercase + string.digits
    return f"{name}-{''.join(randomness.choice(alphabet) for _ in range(_SUFFIX_LEN))}"


def check_known_fields(cls: type, data: dict[str, Any]) -> None:
    """Refuse keys of ``data`` that are not fields of the dataclass ``cls``.

    Raises:
        InvalidSpecError: the first unknown key, with the known ones.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidSpecError(unknown[0], f"is not a {cls.__name__} field", f"use one of: {', '.join(sorted(known))}",
                               spec=cls.__name__)


def _repr_non_default(obj: Any) -> str:
    """``Class(field=value, ...)`` with only the fields that differ from their defaults."""
    parts = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if value == default:
            continue
        if f.name == "env":
            value = redact_env(value)
        if not f.repr:  # a secret such as a token: say that it is set, never what it is
            parts.append(f"{f.name}='***'")
            continue
        shown = "{...}" if f.name == "deepspeed" and isinstance(value, dict) else repr(value)
        parts.append(f"{f.name}={shown}")
    return f"{type(obj).__name__}({', '.join(parts)})"
