"""Checks of a DeepSpeed config before anything starts.

DeepSpeed validates its config only inside the ranks, after the processes (or pods)
exist; a mistake then costs a launch and surfaces as an assertion deep in a log.
:func:`check_deepspeed_config` repeats the checks that matter up front, fills the batch
triple exactly as DeepSpeed does, and raises :class:`~dsnb.errors.InvalidSpecError`
naming the field and the fix.

Values written ``"auto"`` are the Hugging Face Trainer's and Accelerate's to fill at run time,
from the training arguments (batch sizes, accumulation, clipping, optimizer and scheduler
parameters, fp16/bf16, ZeRO bucket sizes and stage-3 thresholds). They are accepted and left as
they are; :func:`framework_filled` lists them, and the checks that do not depend on them are
still made. When any of the batch triple is ``"auto"``, the triple is the framework's and is
not filled here.

Example:
    >>> cfg = check_deepspeed_config({"train_micro_batch_size_per_gpu": 4}, world_size=2)
    >>> cfg["train_batch_size"], cfg["gradient_accumulation_steps"]
    (8, 1)
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
from pathlib import Path
from typing import Any

from dsnb.errors import InvalidSpecError

# Keys DeepSpeed 0.19 removed; used when DeepSpeed is not installed here (for example when the
# job runs in a container image on Kubernetes), otherwise the installed release's own table wins.
_KNOWN_REMOVED_TOP_LEVEL = {
    "nebula": "Nebula checkpointing has been removed",
    "compression_training": "The DeepSpeed compression library has been removed",
    "amp": "NVIDIA Apex AMP integration has been removed; use 'fp16', 'bf16' or 'torch_autocast'",
    "quantize_training": "Mixture-of-Quantization ('quantize_training') has been removed",
    "sparse_gradients": "sparse compression of embedding gradients has been removed",
    "eigenvalue": "eigenvalue-based Mixture-of-Quantization has been removed",
    "sparse_attention": "DeepSpeed Sparse Attention has been removed",
    "elasticity": "Elastic training has been removed; set the batch sizes directly",
    "graph_harvesting": "Graph harvesting has been removed",
    "curriculum_learning": "top-level 'curriculum_learning' has been removed; use "
    "'data_efficiency.data_sampling.curriculum_learning'",
    "progressive_layer_drop": "Progressive Layer Dropping has been removed",
}
_KNOWN_REMOVED_ZERO = {
    "mics_shard_size": "MiCS ZeRO-3 sharding has been removed",
    "mics_hierarchical_params_gather": "MiCS ZeRO-3 sharding has been removed",
    "zeropp_loco_param": "LoCo-Zero++ has been removed",
}

_OFFLOAD_DEVICES = ("none", "cpu", "nvme")
#: What the Hugging Face and Accelerate integrations replace with a value of their own at run time.
AUTO = "auto"
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def framework_filled(config: Any, prefix: str = "") -> list[str]:
    """The dotted keys of ``config`` left ``"auto"`` for the framework to fill at run time.

    Example:
        >>> framework_filled({"train_batch_size": "auto", "optimizer": {"params": {"lr": "auto", "eps": 1e-8}}})
        ['train_batch_size', 'optimizer.params.lr']
    """
    if not isinstance(config, dict):
        return []
    found = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if value == AUTO:
            found.append(path)
        elif isinstance(value, dict):
            found += framework_filled(value, path + ".")
    return found


def _first_sentence(node: ast.expr) -> str:
    """The literal text of a (possibly f-) string node, cut at its first sentence."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        text = node.value
    elif isinstance(node, ast.JoinedStr):
        text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
    else:
        return ""
    return text.split(". ")[0].rstrip(".")


@functools.lru_cache(maxsize=1)
def removed_keys() -> tuple[dict[str, str], dict[str, str]]:
    """Top-level and ZeRO config keys that the installed DeepSpeed removed, with the reason.

    Reads DeepSpeed's own table from its source without importing it (importing DeepSpeed
    imports torch and takes seconds); falls back to the table known for DeepSpeed 0.19.

    Example:
        >>> top, zero = removed_keys()
        >>> "elasticity" in top
        True
    """
    spec = importlib.util.find_spec("deepspeed")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        source = Path(location) / "runtime" / "config.py"
        try:
            tree = ast.parse(source.read_text())
        except (OSError, SyntaxError):
            continue
        tables: dict[str, dict[str, str]] = {}
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id in (
                        "_REMOVED_TOP_LEVEL_CONFIG_KEYS",
                        "_REMOVED_ZERO_CONFIG_KEYS",
                    ):
                        tables[target.id] = {
                            k.value: _first_sentence(v)
                            for k, v in zip(node.value.keys, node.value.values)
                            if isinstance(k, ast.Constant)
                        }
        if "_REMOVED_TOP_LEVEL_CONFIG_KEYS" in tables:
            return tables["_REMOVED_TOP_LEVEL_CONFIG_KEYS"], tables.get(
                "_REMOVED_ZERO_CONFIG_KEYS", {}
            )
    return dict(_KNOWN_REMOVED_TOP_LEVEL), dict(_KNOWN_REMOVED_ZERO)


def _positive_int(config: dict[str, Any], key: str, field: str) -> int | None:
    value = config.get(key)
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidSpecError(
            f"{field}.{key}", f"must be a positive integer, got {value!r}", f"set {key} to 1 or more"
        )
    return value


def _divide(train: int, known: int, known_name: str, world_size: int, field: str) -> int:
    """The missing member of the batch triple: ``train / (known x world size)``, exactly."""
    if train % (known * world_size):
        raise InvalidSpecError(
            f"{field}.train_batch_size",
            f"{train} is not divisible by {known_name} {known} x world size {world_size}",
            f"use a multiple of {known * world_size}",
        )
    return train // (known * world_size)


def _fill_batch_sizes(config: dict[str, Any], world_size: int, field: str) -> None:
    """Fill the batch triple the way DeepSpeed's ``_set_batch_related_parameters`` does.

    A triple with an ``"auto"`` member is the framework's (the Trainer sets all three from its
    arguments before DeepSpeed sees them): its explicit members are checked, nothing is filled.
    """
    train = _positive_int(config, "train_batch_size", field)
    micro = _positive_int(config, "train_micro_batch_size_per_gpu", field)
    accum = _positive_int(config, "gradient_accumulation_steps", field)
    if any(config.get(key) == AUTO for key in BATCH_KEYS):
        return

    if train is None and micro is None:
        raise InvalidSpecError(
            field,
            "neither train_batch_size nor train_micro_batch_size_per_gpu is set",
            'set "train_micro_batch_size_per_gpu" (e.g. 8), and DeepSpeed derives the rest',
        )
    micro, accum = _micro_and_accumulation(train, micro, accum, world_size, field)
    config["train_batch_size"] = micro * accum * world_size  # type: ignore[operator]
    config["train_micro_batch_size_per_gpu"] = micro
    config["gradient_accumulation_steps"] = accum


def _micro_and_accumulation(train: int | None, micro: int | None, accum: int | None, world_size: int,
                            field: str) -> tuple[int, int]:
    """The micro batch and accumulation steps DeepSpeed derives from the members of the triple given.

    Raises:
        InvalidSpecError: the three disagree, or the batch does not divide by what it must.
    """
    if train is not None and micro is not None and accum is not None:
        if train != micro * accum * world_size:
            raise InvalidSpecError(
                f"{field}.train_batch_size",
                f"{train} != train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps "
                f"{accum} x world size {world_size} (= {micro * accum * world_size})",
                f"set train_batch_size to {micro * accum * world_size}, or drop it and DeepSpeed "
                "derives it",
            )
    elif train is not None and micro is not None:
        accum = _divide(train, micro, "train_micro_batch_size_per_gpu", world_size, field)
    elif train is not None and accum is not None:
        micro = _divide(train, accum, "gradient_accumulation_steps", world_size, field)
    elif train is not None:
        if train % world_size:
            raise InvalidSpecError(
                f"{field}.train_batch_size",
                f"{train} is not divisible by the world size {world_size}",
                f"use a multiple of {world_size}, or set train_micro_batch_size_per_gpu instead",
            )
        accum, micro = 1, train // world_size
    else:
        accum = accum or 1
    return micro, accum  # type: ignore[return-value]


def _zero_block(config: dict[str, Any], field: str) -> dict[str, Any] | None:
    zero = config.get("zero_optimization")
    if zero is not None and not isinstance(zero, dict):
        raise InvalidSpecError(
            f"{field}.zero_optimization",
            f"must be a dict, got {type(zero).__name__}",
            'write it as {"stage": 2}',
        )
    return zero


def _zero_stage(zero: dict[str, Any], zfield: str) -> int:
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
        raise InvalidSpecError(
            f"{zfield}.stage", f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}", "pick a stage from 0 to 3"
        )
    return stage


def _offload_device(offload: Any, ofield: str) -> str:
    if not isinstance(offload, dict):
        raise InvalidSpecError(ofield, "must be a dict", 'write it as {"device": "cpu"}')
    device = offload.get("device", "none")
    if device not in _OFFLOAD_DEVICES:
        raise InvalidSpecError(
            f"{ofield}.device", f"unknown offload device {device!r}", f"use one of {', '.join(_OFFLOAD_DEVICES)}"
        )
    return device


#: (offload kind, the stages that allow it, the problem, the fix) when a device other than "none" is set.
_OFFLOAD_STAGES = (
    ("offload_param", (3,), "parameter offload needs ZeRO stage 3, the config has stage {stage}",
     'set "stage": 3, or remove offload_param'),
    ("offload_optimizer", (1, 2, 3), "optimizer offload needs ZeRO stage 1, 2 or 3, the config has stage 0",
     'set "stage": 2 (or 1 or 3), or remove offload_optimizer'),
)


def _check_offload(kind: str, offload: dict[str, Any], stage: int, ofield: str) -> None:
    """An offload block with a device: the stage allows it, NVMe has a path, a partial optimizer offload has stage 3."""
    for name, stages, problem, fix in _OFFLOAD_STAGES:
        if kind == name and stage not in stages:
            raise InvalidSpecError(ofield, problem.format(stage=stage), fix)
    if offload.get("device") == "nvme" and not offload.get("nvme_path"):
        raise InvalidSpecError(
            f"{ofield}.nvme_path", "NVMe offload needs a path", 'set "nvme_path" to a fast local directory'
        )
    ratio = offload.get("ratio", 1.0)
    if kind == "offload_optimizer" and isinstance(ratio, (int, float)) and ratio < 1.0 and stage != 3:
        raise InvalidSpecError(
            f"{ofield}.ratio", "partial optimizer offload (ratio < 1) needs ZeRO stage 3", "set ratio to 1.0 or use stage 3"
        )


def _check_zero(config: dict[str, Any], field: str, removed_zero: dict[str, str]) -> None:
    zero = _zero_block(config, field)
    if zero is None:
        return
    zfield = f"{field}.zero_optimization"
    stage = _zero_stage(zero, zfield)
    for key in zero:
        if key in removed_zero:
            raise InvalidSpecError(
                f"{zfield}.{key}", f"removed from the installed DeepSpeed ({removed_zero[key]})", f"delete {key!r}"
            )
    for kind in ("offload_optimizer", "offload_param"):
        offload = zero.get(kind)
        if offload is not None and _offload_device(offload, f"{zfield}.{kind}") != "none":
            _check_offload(kind, offload, stage, f"{zfield}.{kind}")


def _enabled(config: dict[str, Any], key: str) -> bool:
    """Whether ``config[key]`` is explicitly enabled (``"auto"`` is the framework's choice, not yet made)."""
    block = config.get(key)
    if isinstance(block, dict):
        enabled = block.get("enabled", False)
        return enabled != AUTO and bool(enabled)
    return False


def check_deepspeed_config(config: dict[str, Any], world_size: int | None, field: str = "deepspeed") -> dict[str, Any]:
    """Validate a DeepSpeed config for a given world size and return a filled copy.

    Args:
        config: the DeepSpeed config (the same dict ``deepspeed.initialize`` takes).
        world_size: total number of ranks; None (not known yet) checks every key but the
            batch sizes, and fills nothing.
        field: name used for the config in error messages.

    Returns:
        A deep copy with ``train_batch_size``, ``train_micro_batch_size_per_gpu`` and
        ``gradient_accumulation_steps`` all filled (when ``world_size`` is given and none of
        them is ``"auto"``); ``"auto"`` values are left for the framework.

    Raises:
        InvalidSpecError: removed keys, an inconsistent or missing batch triple, a ZeRO stage
            outside 0–3, offload where DeepSpeed does not allow it, or fp16 with bf16.

    Example:
        >>> check_deepspeed_config({"train_batch_size": 32, "gradient_accumulation_steps": 2},
        ...                        world_size=4)["train_micro_batch_size_per_gpu"]
        4
    """
    if not isinstance(config, dict):
        raise InvalidSpecError(
            field, f"must be a dict or a path to a JSON file, got {type(config).__name__}", "pass a dict"
        )
    removed_top, removed_zero = removed_keys()
    for key in config:
        if key in removed_top:
            raise InvalidSpecError(
                f"{field}.{key}", f"removed from the installed DeepSpeed ({removed_top[key]})", f"delete {key!r}"
            )
    filled = copy.deepcopy(config)
    if world_size is not None:
        _fill_batch_sizes(filled, world_size, field)
    _check_zero(filled, field, removed_zero)
    bf16 = _enabled(filled, "bf16") or _enabled(filled, "bfloat16")
    if _enabled(filled, "fp16") and bf16:
        raise InvalidSpecError(
            f"{field}.fp16", "fp16 and bf16 are both enabled", "enable one of them (bf16 where the hardware has it)"
        )
    return filled
