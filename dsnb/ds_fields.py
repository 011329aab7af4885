"""The DeepSpeed config as the launch form shows it: a few fields, plus the rest as extra JSON.

:func:`structured_deepspeed` turns the fields (micro-batch, accumulation, ZeRO stage,
precision, offload) into a config, :func:`split_deepspeed` splits a config back into those
fields and the rest, and :func:`merge_config` merges the rest in. None of it needs a widget.

Example:
    >>> fields, extra = split_deepspeed({"train_micro_batch_size_per_gpu": 8, "steps_per_print": 5})
    >>> merge_config(extra, structured_deepspeed(**fields))
    {'steps_per_print': 5, 'train_micro_batch_size_per_gpu': 8}
"""

from __future__ import annotations

import copy
from typing import Any

PRECISIONS = ("fp32", "fp16", "bf16")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def merge_config(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, nested dicts key by key; ``extra`` wins. Neither is changed.

    Example:
        >>> merge_config({"zero_optimization": {"stage": 2}}, {"zero_optimization": {"stage": 3, "overlap_comm": True}})
        {'zero_optimization': {'stage': 3, 'overlap_comm': True}}
    """
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_config(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _difference(full: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """What ``extra`` must hold so that ``merge_config(extra, base) == full`` (when base is a part of full)."""
    diff: dict[str, Any] = {}
    for key, value in full.items():
        if key not in base:
            diff[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(base[key], dict):
            inner = _difference(value, base[key])
            if inner:
                diff[key] = inner
        elif value != base[key] or type(value) is not type(base[key]):
            diff[key] = copy.deepcopy(value)
    return diff


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def structured_deepspeed(
    micro_batch: int, grad_accum: int, zero_stage: int, precision: str, offload_optimizer: str, offload_param: str
) -> dict[str, Any]:
    """The DeepSpeed config the form's DeepSpeed fields stand for (before the extra JSON).

    Only what differs from DeepSpeed's defaults is written: micro-batch 0 means "not set here"
    (e.g. ``train_batch_size`` comes from the extra JSON), accumulation 1, stage 0, fp32 and
    no offload are left out.

    Example:
        >>> structured_deepspeed(4, 1, 2, "bf16", "cpu", "none")
        {'train_micro_batch_size_per_gpu': 4, 'zero_optimization': {'stage': 2, 'offload_optimizer': {'device': 'cpu'}}, 'bf16': {'enabled': True}}
    """
    config: dict[str, Any] = {}
    if micro_batch != 0:
        config["train_micro_batch_size_per_gpu"] = micro_batch
    if grad_accum != 1:
        config["gradient_accumulation_steps"] = grad_accum
    zero: dict[str, Any] = {}
    if zero_stage != 0:
        zero["stage"] = zero_stage
    if offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": offload_optimizer}
    if offload_param != "none":
        zero["offload_param"] = {"device": offload_param}
    if zero:
        config["zero_optimization"] = zero
    if precision in ("fp16", "bf16"):
        config[precision] = {"enabled": True}
    return config


def split_deepspeed(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a DeepSpeed config into the form's field values and the rest (the extra JSON).

    ``merge_config(extra, structured_deepspeed(**fields)) == config`` always holds. Keys the fields
    manage appear in the extra part only with values the fields leave out (an explicit
    ``"gradient_accumulation_steps": 1``, say), and the fields win over the extra part, so
    editing a field always takes effect.

    Example:
        >>> split_deepspeed({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}, "steps_per_print": 5})
        ({'micro_batch': 8, 'grad_accum': 1, 'zero_stage': 2, 'precision': 'fp32', 'offload_optimizer': 'none', 'offload_param': 'none'}, {'steps_per_print': 5})
    """
    fields: dict[str, Any] = {
        "micro_batch": 0, "grad_accum": 1, "zero_stage": 0, "precision": "fp32",
        "offload_optimizer": "none", "offload_param": "none",
    }
    micro = config.get("train_micro_batch_size_per_gpu")
    if _is_int(micro) and micro != 0:
        fields["micro_batch"] = micro
    accum = config.get("gradient_accumulation_steps")
    if _is_int(accum):
        fields["grad_accum"] = accum
    zero = config.get("zero_optimization")
    if isinstance(zero, dict):
        stage = zero.get("stage")
        if _is_int(stage) and 0 <= stage <= 3:
            fields["zero_stage"] = stage
        for kind in ("offload_optimizer", "offload_param"):
            block = zero.get(kind)
            if isinstance(block, dict) and block.get("device") in ("cpu", "nvme"):
                fields[kind] = block["device"]
    for precision in ("fp16", "bf16"):
        block = config.get(precision)
        if isinstance(block, dict) and block.get("enabled") is True:
            fields["precision"] = precision
            break
    base = structured_deepspeed(**fields)
    extra = _difference(config, base)
    if merge_config(extra, base) != config:  # base holds something config lacks: keep it all as extra
        neutral = {"micro_batch": 0, "grad_accum": 1, "zero_stage": 0, "precision": "fp32",
                   "offload_optimizer": "none", "offload_param": "none"}
        return neutral, copy.deepcopy(config)
    return fields, extra
