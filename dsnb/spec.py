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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsnb import devices, function_job, secrets
from dsnb.ds_config import check_deepspeed_config
from dsnb.errors import InvalidSpecError
from dsnb.function_job import PackedFunction
from dsnb.spec_problems import Check, Problem, collect, field_values, raise_first

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


def _is_whole(value: Any, least: int) -> bool:
    """``value`` is an int (not a bool) of at least ``least``."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= least


# -- Resources checks ---------------------------------------------------------------------------
def _check_gpus(values: Mapping[str, Any]) -> None:
    if not _is_whole(values["gpus"], 0):
        raise InvalidSpecError("resources.gpus", f"must be a whole number >= 0, got {values['gpus']!r}",
                               "set gpus=0 for CPU, or the GPUs per node")


def _check_cpu(values: Mapping[str, Any]) -> None:
    if values["cpu"] is not None:
        _check_quantity(values["cpu"], "resources.cpu", "2")


def _check_memory(values: Mapping[str, Any]) -> None:
    memory = values["memory"]
    if memory is None:
        return
    if not isinstance(memory, str):
        raise InvalidSpecError("resources.memory", f"must be a quantity string, got {memory!r}", "write it like '4Gi'")
    _check_quantity(memory, "resources.memory", "4Gi")


_RESOURCE_CHECKS = (Check(_check_gpus), Check(_check_cpu), Check(_check_memory))


@dataclass(frozen=True)
class Resources:
    """What each node (pod, Ray worker) needs.

    Frozen: ``dataclasses.replace(resources, gpus=2)`` makes a changed copy, checked again.

    Attributes:
        cpu: CPU cores per node, a number or a Kubernetes quantity such as ``"500m"``.
        memory: memory per node as a Kubernetes quantity, e.g. ``"4Gi"``.
        gpus: GPUs per node; 0 runs on CPU (gloo, ``DS_ACCELERATOR=cpu``).

    Raises:
        InvalidSpecError: a negative GPU count or a malformed quantity.

    Example:
        >>> Resources(cpu=2, memory="4Gi")
        Resources(cpu=2, memory='4Gi')
        >>> Resources(gpus=2).dist_backend, Resources(cpu=8).threads_per_rank(procs_per_node=4)
        ('nccl', 2)
    """

    cpu: float | str | None = None
    memory: str | None = None
    gpus: int = 0

    def __post_init__(self) -> None:
        raise_first(collect(_RESOURCE_CHECKS, dataclasses.asdict(self)))

    @classmethod
    def problems(cls, **fields: Any) -> list[Problem]:
        """Every problem of ``Resources(**fields)``, without raising.

        Raises:
            TypeError: an unknown field.

        Example:
            >>> [p.field for p in Resources.problems(cpu=-1, memory="4GB")]
            ['resources.cpu', 'resources.memory']
        """
        return collect(_RESOURCE_CHECKS, field_values(cls, fields))

    @property
    def dist_backend(self) -> str:
        """The collective backend of the ranks: ``"nccl"`` with GPUs, ``"gloo"`` without."""
        return devices.collective_backend(self.gpus > 0)

    @property
    def accelerator(self) -> str:
        """``"gpu"`` or ``"cpu"``; CPU ranks get ``DS_ACCELERATOR=cpu``."""
        return devices.accelerator(self.gpus > 0)

    def threads_per_rank(self, procs_per_node: int) -> int | None:
        """OpenMP threads per rank when the node's CPUs are a number, else None (see :func:`dsnb.devices.threads_per_rank`)."""
        return devices.threads_per_rank(self.cpu, procs_per_node)

    def __repr__(self) -> str:
        return _repr_non_default(self)


# -- JobSpec checks -----------------------------------------------------------------------------
def _check_name(values: Mapping[str, Any]) -> None:
    name = values["name"]
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


_ENTRYPOINTS = ("script", "command", "function")


def _one_entrypoint(values: Mapping[str, Any]) -> bool:
    return sum(values.get(name) is not None for name in _ENTRYPOINTS) == 1


def _check_entrypoint(values: Mapping[str, Any]) -> None:
    if not _one_entrypoint(values):
        given = [name for name in _ENTRYPOINTS if values.get(name) is not None]
        raise InvalidSpecError(
            given[0] if given else "script/command/function",
            f"exactly one of script, command or function must be set, got {' and '.join(given) or 'none'}",
            "pass script='train.py', command=['python', 'train.py'] or function=train",
        )


def _check_function(values: Mapping[str, Any]) -> None:
    function, kwargs = values.get("function"), values.get("kwargs")
    if function is None:
        if kwargs is not None:
            raise InvalidSpecError("kwargs", "is only for a function job", "pass function=train with kwargs, or args for a script")
        return
    if _one_entrypoint(values) and not isinstance(function, PackedFunction):
        function_job.pack(function, kwargs)
    if values["args"]:
        raise InvalidSpecError("args", "a function job takes kwargs, not command-line args",
                               f"pass kwargs={{...}} instead of args={list(values['args'])!r}")


def _check_script(values: Mapping[str, Any]) -> None:
    script = values["script"]
    if script is None or not _one_entrypoint(values):
        return
    if isinstance(script, Path):
        script = str(script)
    if not isinstance(script, str) or not script.strip():
        raise InvalidSpecError("script", f"must be a file path, got {script!r}", "pass script='train.py'")


def _check_command(values: Mapping[str, Any]) -> None:
    command = values["command"]
    if command is None or not _one_entrypoint(values):
        return
    if isinstance(command, str):
        raise InvalidSpecError("command", "must be a list of strings, got one string", f"write command={command.split()!r}")
    if not command or not all(isinstance(c, str) for c in command):
        raise InvalidSpecError("command", f"must be a non-empty list of strings, got {command!r}", "write command=['python', 'train.py']")


def _check_args(values: Mapping[str, Any]) -> None:
    args = values["args"]
    if isinstance(args, str):
        raise InvalidSpecError("args", "must be a list of strings, got one string", f"write args={args.split()!r}")
    if not isinstance(args, (list, tuple)) or not all(isinstance(a, str) for a in args):
        raise InvalidSpecError("args", f"must be a list of strings, got {args!r}", "write numbers as strings: args=['--epochs', '3']")


def _count_check(name: str) -> Check:
    """The check of ``nodes`` or ``procs_per_node``: a whole number from 1 to :data:`MAX_COUNTS`."""

    def check(values: Mapping[str, Any]) -> None:
        value = values[name]
        if not _is_whole(value, 1):
            raise InvalidSpecError(name, f"must be a whole number >= 1, got {value!r}", f"set {name}=1 or more")
        if value > MAX_COUNTS[name]:
            raise InvalidSpecError(name, f"{value} is more than dsnb runs ({MAX_COUNTS[name]} at most)",
                                   f"set {name} to at most {MAX_COUNTS[name]}")

    return Check(check)


def _check_resources(values: Mapping[str, Any]) -> list[Problem]:
    resources = values["resources"]
    if isinstance(resources, dict):
        return Resources.problems(**resources)
    if not isinstance(resources, Resources):
        raise InvalidSpecError("resources", f"must be a Resources, got {type(resources).__name__}", "pass Resources(cpu=..., memory=..., gpus=...)")
    return []


def _gpus_of(resources: Resources | dict[str, Any]) -> int:
    return resources.get("gpus", 0) if isinstance(resources, dict) else resources.gpus


def _check_ranks_fit_gpus(values: Mapping[str, Any]) -> None:
    gpus, procs = _gpus_of(values["resources"]), values["procs_per_node"]
    if gpus and procs > gpus:
        raise InvalidSpecError(
            "procs_per_node",
            f"{procs} ranks per node but only {gpus} GPUs per node",
            f"set procs_per_node={gpus} (one rank per GPU) or request more GPUs",
        )


def _check_env_entry(key: Any, value: Any) -> None:
    if not isinstance(key, str) or not _ENV_KEY.match(key):
        raise InvalidSpecError("env", f"{key!r} is not a valid variable name", "use letters, digits and '_', not starting with a digit")
    if key in RESERVED_ENV:
        raise InvalidSpecError(f"env.{key}", "is set by dsnb for every rank", f"remove {key!r} from env")
    if isinstance(value, secrets.SecretRef):
        if not _SECRET_REF_NAME.match(value.name) or len(value.name) > 253 or not _SECRET_REF_KEY.match(value.key):
            raise InvalidSpecError(f"env.{key}", f"SecretRef({value.name!r}, {value.key!r}) is not a Secret name and key",
                                   "name a Secret of the namespace (lower-case, '-', '.') and one of its keys")
        return
    if not isinstance(value, str):
        shown = "(its value is not shown)" if secrets.is_secret(key, str(value)) else f"{str(value)!r}"
        raise InvalidSpecError(f"env.{key}", f"value must be a string, got {type(value).__name__}",
                               f"write it as a string {shown}")


def _check_env(values: Mapping[str, Any]) -> None:
    env = values["env"]
    if not isinstance(env, dict):
        raise InvalidSpecError("env", f"must be a dict of strings, got {type(env).__name__}", "pass env={'KEY': 'value'}")
    for key, value in env.items():
        _check_env_entry(key, value)


def _check_image(values: Mapping[str, Any]) -> None:
    image = values["image"]
    if image is not None and (not isinstance(image, str) or not image or re.search(r"\s", image)):
        raise InvalidSpecError("image", f"{image!r} is not an image reference", "write it like 'ghcr.io/org/train:1.0'")


def _check_max_restarts(values: Mapping[str, Any]) -> None:
    if not _is_whole(values["max_restarts"], 0):
        raise InvalidSpecError("max_restarts", f"must be a whole number >= 0, got {values['max_restarts']!r}",
                               "set max_restarts=0 for no restarts")


def _check_timeout(values: Mapping[str, Any]) -> None:
    timeout = values["timeout"]
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise InvalidSpecError("timeout", f"must be a positive number of seconds, got {timeout!r}", "set timeout=3600, or None for no limit")


def _check_hang_timeout(values: Mapping[str, Any]) -> None:
    hang = values.get("hang_timeout")
    if hang is None:
        return
    if isinstance(hang, bool) or not isinstance(hang, (int, float)) or not math.isfinite(hang) or hang <= 0:
        raise InvalidSpecError("hang_timeout", f"must be a positive number of seconds, got {hang!r}",
                               "set hang_timeout=600 (more than the longest a rank goes without writing), or None")


def _check_working_dir(values: Mapping[str, Any]) -> None:
    working_dir = values["working_dir"]
    if working_dir is not None and not isinstance(working_dir, (str, Path)):
        raise InvalidSpecError("working_dir", f"must be a path, got {working_dir!r}", "pass a directory path")


def _inline_config_file(config: Any) -> Any:
    """The content of a DeepSpeed config file; anything else (or a file that does not read as
    JSON, which :func:`_check_deepspeed` then reports) as it is."""
    if not isinstance(config, (str, Path)):
        return config
    path = Path(config).expanduser()
    if not path.is_file():
        return config
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return config


def _read_config_file(config: str | Path) -> Any:
    path = Path(config).expanduser()
    if not path.is_file():
        raise InvalidSpecError("deepspeed", f"config file {str(path)!r} not found", "pass an existing JSON file or a dict")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InvalidSpecError("deepspeed", f"{str(path)!r} is not valid JSON ({e.msg} at line {e.lineno})", "fix the JSON") from e


def _world_size(values: Mapping[str, Any]) -> int | None:
    """``nodes * procs_per_node`` when both counts are valid, else None."""
    nodes, procs = values["nodes"], values["procs_per_node"]
    counts_valid = all(_is_whole(values[n], 1) and values[n] <= MAX_COUNTS[n] for n in MAX_COUNTS)
    return nodes * procs if counts_valid else None


def _check_deepspeed(values: Mapping[str, Any]) -> None:
    config = values["deepspeed"]
    if config is None:
        return
    if isinstance(config, (str, Path)):
        config = _read_config_file(config)
    for where in secrets.credential_paths(config):
        raise InvalidSpecError(f"deepspeed.{where}", "holds a credential: the config is kept with the job, shown in its "
                                                     "plan and handed to every rank as a file",
                               "remove it and put the key in env instead (e.g. COMET_API_KEY, WANDB_API_KEY), which dsnb keeps "
                               "secret; DeepSpeed's monitors and their libraries read it from the environment")
    # Without a valid world size the batch sizes wait; every other key is checked now.
    check_deepspeed_config(config, _world_size(values))


#: The checks of a JobSpec, in the order the first problem is reported.
_JOB_CHECKS = (
    Check(_check_name),
    Check(_check_entrypoint),
    Check(_check_script),
    Check(_check_command),
    Check(_check_args),
    Check(_check_function),
    _count_check("nodes"),
    _count_check("procs_per_node"),
    Check(_check_resources),
    Check(_check_ranks_fit_gpus, needs=("procs_per_node", "resources.gpus")),
    Check(_check_env),
    Check(_check_image),
    Check(_check_max_restarts),
    Check(_check_timeout),
    Check(_check_hang_timeout),
    Check(_check_working_dir),
    Check(_check_deepspeed),
)


def job_problems(values: Mapping[str, Any], spec: str = "JobSpec") -> list[Problem]:
    """Every problem of a JobSpec with these field values (all fields, defaults included).

    :class:`~dsnb.serving.ServeSpec` runs it on the fields it shares with a job.
    """
    values = {**values, "deepspeed": _inline_config_file(values["deepspeed"])}
    return collect(_JOB_CHECKS, values, spec)


def _normalized(values: Mapping[str, Any]) -> dict[str, Any]:
    """Checked values in their stored form: paths as strings, lists as lists, resources as
    :class:`Resources`, a DeepSpeed config file as its content (the job runs with what was checked)."""
    normal = dict(values)
    for name in ("script", "working_dir"):
        if isinstance(normal[name], Path):
            normal[name] = str(normal[name])
    if normal["command"] is not None:
        normal["command"] = list(normal["command"])
    normal["args"] = list(normal["args"])
    if isinstance(normal["resources"], dict):
        normal["resources"] = Resources(**normal["resources"])
    normal["deepspeed"] = _inline_config_file(normal["deepspeed"])
    if normal.get("function") is not None and not isinstance(normal["function"], PackedFunction):
        normal["function"] = function_job.pack(normal["function"], normal["kwargs"])
    return normal


@dataclass(frozen=True)
class JobSpec:
    """A distributed DeepSpeed job, the same on every backend.

    Frozen: change a spec with ``dataclasses.replace(spec, procs_per_node=8)``, which checks
    the new spec again and derives its DeepSpeed batch sizes for the new world size.
    The ``env``, ``args`` and ``deepspeed`` containers are the spec's own; nothing derived
    from them is kept, so :attr:`deepspeed_config` always agrees with them.

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
        deepspeed: a DeepSpeed config dict, or a path to its JSON file (kept as its content).
        max_restarts: how many times the whole job is restarted after a failure.
        timeout: seconds after which a running job is stopped and marked FAILED.
        hang_timeout: seconds a rank may write nothing while the others go on (or the whole job may
            write nothing) before the job fails as hung, naming the rank and, on ``local``, showing its
            Python stack; long before the collective timeout. None: not watched (see ``docs/stragglers.md``).
        function: a function to call on every rank instead of ``script`` or ``command``, e.g.
            one defined in a notebook cell; packed when the spec is made (it then holds a
            :class:`~dsnb.function_job.PackedFunction`), see :mod:`dsnb.function_job`.
            :meth:`dsnb.job.Job.result` returns rank 0's return value.
        kwargs: the keyword arguments of ``function``, packed with it (kept here to show; a
            stored spec no longer has them, and they take no part in comparing specs).

    Raises:
        InvalidSpecError: any invalid field (the first, see :meth:`problems` for all); the message names it and the fix.

    Example:
        >>> spec = JobSpec(name="demo", command=["python", "-c", "print(1)"], nodes=2)
        >>> spec.world_size, spec.dist_backend
        (2, 'gloo')
        >>> dataclasses.replace(spec, nodes=4).world_size
        4
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
    hang_timeout: float | None = None
    function: Callable[..., Any] | PackedFunction | None = None
    kwargs: dict[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        raise_first(job_problems(values))
        for name, value in _normalized(values).items():
            if value is not values[name]:
                object.__setattr__(self, name, value)  # frozen: the stored form is set once, here

    @classmethod
    def problems(cls, **fields: Any) -> list[Problem]:
        """Every problem of ``JobSpec(**fields)``, in field order, without raising.

        Checks that need a valid field wait for it (the batch sizes for valid counts, the
        GPU count against the ranks for both), so each problem is reported once, at its cause.

        Raises:
            TypeError: an unknown field.

        Example:
            >>> [p.field for p in JobSpec.problems(name="Bad_Name", script="t.py", nodes=0, env={"RANK": "1"})]
            ['name', 'nodes', 'env.RANK']
        """
        return job_problems(field_values(cls, fields))

    @property
    def world_size(self) -> int:
        """Total ranks: ``nodes * procs_per_node``."""
        return self.nodes * self.procs_per_node

    @property
    def deepspeed_config(self) -> dict[str, Any] | None:
        """The checked DeepSpeed config with the batch triple filled for :attr:`world_size`, or None.

        Computed from :attr:`deepspeed` on every read, never cached: a spec changed with
        ``dataclasses.replace`` gets batch sizes for its own world size, and a caller that
        edits the returned dict changes nothing in the spec.
        """
        if self.deepspeed is None:
            return None
        return check_deepspeed_config(self.deepspeed, self.world_size)  # type: ignore[arg-type]

    @property
    def dist_backend(self) -> str:
        """The collective backend of the ranks: ``"nccl"`` with GPUs, ``"gloo"`` on CPU."""
        return self.resources.dist_backend

    @property
    def accelerator(self) -> str:
        """``"gpu"`` or ``"cpu"``; CPU ranks get ``DS_ACCELERATOR=cpu``."""
        return self.resources.accelerator

    @property
    def threads_per_rank(self) -> int | None:
        """``OMP_NUM_THREADS`` of each rank: the node's CPUs over its ranks, at least 1; None
        when ``resources.cpu`` is not a plain number (a backend then decides, or leaves it unset)."""
        return self.resources.threads_per_rank(self.procs_per_node)

    def rank_argv(self, python: str = "python3") -> list[str]:
        """The command line of one rank, for a backend that starts ranks as plain processes:
        ``[python, script, *args]``, ``[*command, *args]``, or the function runner's
        (:meth:`~dsnb.function_job.PackedFunction.argv`).

        Args:
            python: the interpreter that runs a script or a function on the ranks.

        Example:
            >>> JobSpec(name="a", script="train.py", args=["--lr", "0.1"]).rank_argv()
            ['python3', 'train.py', '--lr', '0.1']
            >>> JobSpec(name="a", function=len, kwargs={"obj": []}).rank_argv("python")[:2]
            ['python', '-c']
        """
        if self.function is not None:
            return self.function.argv(python)  # type: ignore[union-attr]
        if self.script is not None:
            return [python, self.script, *self.args]
        return [*self.command, *self.args]  # type: ignore[misc]

    def with_unique_name(self) -> JobSpec:
        """A copy named ``<name>-<4 random characters>``, as every submit does.

        Example:
            >>> len(JobSpec(name="a", script="t.py").with_unique_name().name)
            6
        """
        # not replace(): the suffixed name may exceed MAX_NAME_LEN; kwargs (packed already) are shared, not copied
        unique = copy.deepcopy(self, memo={id(self.kwargs): self.kwargs})
        object.__setattr__(unique, "name", unique_name(self.name))
        return unique

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_dict` turns back into an equal spec (secret values included:
        what stores it redacts them, see :func:`redact_env`)."""
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "kwargs"}
        data["resources"] = dataclasses.asdict(self.resources)
        data["kwargs"] = None  # packed in data["function"]
        if self.function is not None:
            data["function"] = self.function.to_dict()  # type: ignore[union-attr]
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
        if isinstance(data.get("function"), dict):
            data["function"] = PackedFunction.from_dict(data["function"])
        if isinstance(data.get("env"), dict):
            data["env"] = {k: (secrets.SecretRef.from_dict(v) if isinstance(v, dict) and "secretKeyRef" in v else v)
                           for k, v in data["env"].items()}
        return build_stored(cls, data)

    def __repr__(self) -> str:
        return _repr_non_default(self)


_UNIQUE_SUFFIX = re.compile(rf"-[a-z0-9]{{{_SUFFIX_LEN}}}\Z")


def build_stored(cls: Any, data: dict[str, Any]) -> Any:
    """``cls(**data)`` for a stored spec, whose name may be a unique name (with its suffix) past
    ``MAX_NAME_LEN``, as :meth:`JobSpec.with_unique_name` makes it; every other check is made.

    Example:
        >>> spec = JobSpec(name="a" * MAX_NAME_LEN, script="t.py").with_unique_name()
        >>> build_stored(JobSpec, spec.to_dict()) == spec
        True
    """
    name = data.get("name")
    if isinstance(name, str) and len(name) > MAX_NAME_LEN and _UNIQUE_SUFFIX.search(name):
        built = cls(**{**data, "name": name[:-(_SUFFIX_LEN + 1)]})
        object.__setattr__(built, "name", name)  # as with_unique_name: only the suffix goes past MAX_NAME_LEN
        return built
    return cls(**data)


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
