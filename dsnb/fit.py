"""Will a model fit: the memory a DeepSpeed training job needs per GPU and per node, before it starts.

The model states (parameters, gradients, optimizer states) come from DeepSpeed's own estimators,
``estimate_zero2_model_states_mem_needs`` (ZeRO stages 1 and 2) and
``estimate_zero3_model_states_mem_needs`` (stage 3), called with the spec's stage, offload
settings and world size; DeepSpeed has none for stage 0, whose states are counted in the same
units (fp16 parameters and gradients, fp32 gradients, master parameters, momentum and variance:
2 + 18 bytes a parameter, none of it partitioned). Stage 1 is stage 2's estimate plus the fp16
gradients it does not partition (2 bytes a parameter). All assume mixed precision, as DeepSpeed's
estimators do.

Activations depend on the sequence length, the micro-batch and on whether they are recomputed,
so they are given as a range for the transformer layers (Korthikanti et al., "Reducing Activation
Recomputation in Large Transformer Models", 2022): from ``2·s·b·h`` bytes a layer when every layer's
activations are recomputed, to ``s·b·h·(34 + 5·a·s/h)`` when none are (fp16, no sequence or tensor
parallelism; the embeddings and the logits are not counted).

Example:
    >>> size = ModelSize(params=1_300_000_000, largest_layer=100_000_000, layers=24, hidden=2048, heads=16)
    >>> fit = estimate(size, zero_stage=2, gpus_per_node=8, sequence_length=1024, micro_batch=4,
    ...                gpu_memory=24 * 2**30)
    >>> f"{fit.gpu_model_states / 2**30:.1f} GiB", fit.verdict
    ('5.1 GiB', 'fits')
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsnb.errors import InvalidSpecError

#: What DeepSpeed's estimators add for buffers on the CPU side (their default).
BUFFER_FACTOR = 1.5
GIB = 2**30


@dataclass(frozen=True)
class ModelSize:
    """How big a model is, as the estimates need it.

    Attributes:
        params: parameters, a shared one counted once.
        largest_layer: parameters of the largest single module (ZeRO-3 gathers one at a time), when known.
        layers, hidden, heads: the transformer's shape, when known (for the activations).
        source: where the numbers came from, for the report.
    """

    params: int
    largest_layer: int | None = None
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    source: str = "a parameter count"


@dataclass(frozen=True)
class FitEstimate:
    """The memory a job needs, against the memory there is.

    Attributes:
        gpu_model_states: bytes per GPU for parameters, gradients and optimizer states.
        cpu_model_states: bytes per node (DeepSpeed's estimate, buffers included).
        activations: bytes per GPU, (all recomputed, none recomputed); None when the shape or the
            sequence length is unknown.
        gpu_memory: bytes per GPU there are, when known.
        cpu_memory: bytes of CPU memory per node there are, when known.
    """

    model: ModelSize
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    gpus_per_node: int
    nodes: int
    gpu_model_states: int
    cpu_model_states: int
    activations: tuple[int, int] | None
    gpu_memory: int | None
    notes: tuple[str, ...] = ()
    cpu_memory: int | None = None

    @property
    def gpu_needed(self) -> tuple[int, int]:
        """Bytes per GPU at least and at most: the model states plus the activations' range."""
        low, high = self.activations or (0, 0)
        return self.gpu_model_states + low, self.gpu_model_states + high

    @property
    def verdict(self) -> str:
        """``"fits"``, ``"fits with activation checkpointing"``, ``"does not fit"``, or ``"unknown"``
        (no GPU memory to compare with). Too little CPU memory per node for DeepSpeed's estimate
        does not fit either."""
        if self.cpu_memory is not None and self.cpu_model_states > self.cpu_memory:
            return "does not fit"
        if self.gpu_memory is None:
            return "unknown"
        low, high = self.gpu_needed
        if high <= self.gpu_memory:
            return "fits"
        if low <= self.gpu_memory:
            return "fits with activation checkpointing"
        return "does not fit"

    def __str__(self) -> str:
        offload = [what for what, on in (("optimizer", self.offload_optimizer), ("parameters", self.offload_params)) if on]
        lines = [f"model: {self.model.params / 1e6:,.1f} M parameters ({self.model.source})",
                 f"ZeRO stage {self.zero_stage}, offload: {', '.join(offload) or 'none'}, "
                 f"{self.nodes} node(s) x {self.gpus_per_node} GPU(s)",
                 f"per GPU, model states: {_gib(self.gpu_model_states)}"]
        if self.activations is not None:
            low, high = self.activations
            lines.append(f"per GPU, activations: {_gib(low)} (all recomputed) to {_gib(high)} (none recomputed)")
        cpu_there = "" if self.cpu_memory is None else f" (there is {_gib(self.cpu_memory)})"
        lines.append(f"per node, CPU memory: {_gib(self.cpu_model_states)}{cpu_there}")
        there = "unknown" if self.gpu_memory is None else _gib(self.gpu_memory)
        lines.append(f"per GPU there is: {there} -> {self.verdict}")
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


def _gib(size: int) -> str:
    return f"{size / GIB:.2f} GiB"


# -- how big -----------------------------------------------------------------------------------
def model_size(model: Any) -> ModelSize:
    """The size of ``model``: a parameter count, a Hugging Face model directory or config (read without its
    weights, on torch's meta device), a ``torch.nn.Module``, or a loader (a callable returning one).

    Raises:
        InvalidSpecError: ``model`` is none of these, or its config cannot be read.
    """
    if isinstance(model, bool) or (isinstance(model, (int, float)) and not 0 < model < math.inf):
        raise InvalidSpecError("model", f"{model!r} is not a parameter count", "give a positive number of parameters", spec="estimate")
    if isinstance(model, (int, float)):
        return ModelSize(params=int(model))
    if isinstance(model, (str, Path)) and Path(model).is_dir():
        return _from_config(_read_config(Path(model)), f"the config in {model}")
    if isinstance(model, dict):
        return _from_config(model, "a config")
    if hasattr(model, "parameters") and hasattr(model, "modules"):
        return _from_module(model, type(model).__name__)
    if callable(model):
        return _from_module(model(), f"{getattr(model, '__name__', 'the loader')}()")
    raise InvalidSpecError("model", f"{model!r} is not a parameter count, a model directory, a config, a module or a loader",
                           "pass e.g. 7e9, '/models/llama', a config dict, or a function returning a torch.nn.Module", spec="estimate")


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidSpecError("model", f"{str(path)!r} cannot be read as a Hugging Face config ({e})",
                               "point at a model directory with a config.json", spec="estimate") from e


def _from_config(config: dict[str, Any], source: str) -> ModelSize:
    """Build the model on the meta device (no memory, no weights) and count it."""
    import torch
    import transformers

    fields = dict(config)
    try:
        made = transformers.AutoConfig.for_model(fields.pop("model_type", None), **fields)
    except (KeyError, ValueError) as e:
        raise InvalidSpecError("model", f"{source} has no model_type transformers knows ({e})",
                               "give a Hugging Face config with its model_type, or a parameter count", spec="estimate") from e
    with torch.device("meta"):
        try:
            module = transformers.AutoModelForCausalLM.from_config(made)
        except ValueError:  # not a causal language model: its base model
            module = transformers.AutoModel.from_config(made)
    return _from_module(module, source)


def _from_module(module: Any, source: str) -> ModelSize:
    """Counted as DeepSpeed's ``model_to_params`` counts: a shared parameter once, the largest module by its own
    parameters."""
    params = sum({p.data_ptr() if p.device.type != "meta" else id(p): p.numel() for p in module.parameters()}.values())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)
    config = getattr(module, "config", None)

    def shape(*names: str) -> int | None:
        return next((int(v) for n in names if isinstance(v := getattr(config, n, None), int)), None)

    return ModelSize(params=params, largest_layer=largest, layers=shape("num_hidden_layers", "n_layer"),
                     hidden=shape("hidden_size", "n_embd"), heads=shape("num_attention_heads", "n_head"), source=source)


# -- how much ----------------------------------------------------------------------------------
def estimate(model: Any, spec: Any = None, *, zero_stage: int | None = None, offload_optimizer: bool | None = None,
             offload_params: bool | None = None, gpus_per_node: int | None = None, nodes: int | None = None,
             sequence_length: int | None = None, micro_batch: int | None = None,
             gpu_memory: int | None | Callable[[], int | None] = None,
             cpu_memory: int | None = None) -> FitEstimate:
    """Estimate the memory ``model`` needs trained under ``spec`` (a :class:`~dsnb.spec.JobSpec`: its ZeRO stage,
    offload settings, micro-batch, ``nodes`` and ``procs_per_node``); keywords override the spec.

    Args:
        model: what :func:`model_size` takes, or a :class:`ModelSize`.
        sequence_length: tokens per sample, for the activations (none estimated without it).
        gpu_memory: bytes per GPU to compare with, or a function giving them (default: this machine's
            smallest GPU, None without one).
        cpu_memory: bytes of CPU memory per node to compare with (default: not compared).

    Raises:
        InvalidSpecError: the model cannot be sized, or a setting is out of range.
    """
    size = model if isinstance(model, ModelSize) else model_size(model)
    config = getattr(spec, "deepspeed_config", None) or {}  # checked afresh on each read: read it once
    zero = config.get("zero_optimization") if isinstance(config.get("zero_optimization"), dict) else {}
    stage = zero_stage if zero_stage is not None else int(zero.get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise InvalidSpecError("zero_stage", f"{stage} is not a ZeRO stage", "use 0, 1, 2 or 3", spec="estimate")
    off_opt = offload_optimizer if offload_optimizer is not None else _offloaded(zero, "offload_optimizer")
    off_par = offload_params if offload_params is not None else _offloaded(zero, "offload_param")
    per_node = gpus_per_node or (spec.procs_per_node if spec is not None else 1)
    node_count = nodes or (spec.nodes if spec is not None else 1)
    micro = micro_batch or _micro_batch(config)
    notes = []
    gpu, cpu = _model_states(size, stage, off_opt, off_par, per_node, node_count, notes)
    activations = _activations(size, sequence_length, micro, notes)
    there = gpu_memory() if callable(gpu_memory) else gpu_memory if gpu_memory is not None else local_gpu_memory()
    return FitEstimate(size, stage, off_opt, off_par, per_node, node_count, gpu, cpu, activations, there, tuple(notes),
                       cpu_memory)


def _offloaded(zero: dict[str, Any], key: str) -> bool:
    block = zero.get(key)
    return isinstance(block, dict) and block.get("device") in ("cpu", "nvme")


def _micro_batch(config: dict[str, Any]) -> int:
    micro = config.get("train_micro_batch_size_per_gpu")
    return micro if isinstance(micro, int) and micro > 0 else 1


def _model_states(size: ModelSize, stage: int, offload_optimizer: bool, offload_params: bool, gpus_per_node: int,
                  nodes: int, notes: list[str]) -> tuple[int, int]:
    """(bytes per GPU, bytes per node) of the model states, from DeepSpeed's estimators where it has one."""
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        largest = size.largest_layer
        if largest is None:
            largest = 0
            notes.append("the largest layer is unknown (a parameter count was given): ZeRO-3 also gathers the "
                         "largest layer's fp32 copy on each GPU, not counted here")
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            size.params, largest, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=offload_optimizer,
            cpu_offload_params=offload_params, zero_init=True, additional_buffer_factor=BUFFER_FACTOR)
        return gpu, cpu
    if offload_params:
        notes.append("offload_param applies to ZeRO stage 3 only; DeepSpeed ignores it at this stage")
    if stage == 0:
        return 2 * size.params + 18 * size.params, int(size.params * 4 * gpus_per_node * BUFFER_FACTOR)
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cpu, gpu = estimate_zero2_model_states_mem_needs(size.params, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
                                                     cpu_offload=offload_optimizer, additional_buffer_factor=BUFFER_FACTOR)
    if stage == 1:
        gpu += 2 * size.params  # stage 1 does not partition the fp16 gradients
    return gpu, cpu


def _activations(size: ModelSize, sequence_length: int | None, micro_batch: int,
                 notes: list[str]) -> tuple[int, int] | None:
    if sequence_length is None:
        notes.append("activations not estimated: give sequence_length")
        return None
    if not (size.layers and size.hidden and size.heads):
        notes.append("activations not estimated: the model's layers, hidden size and heads are unknown "
                     "(give a model directory, a config or a module)")
        return None
    s, b, h, a = sequence_length, micro_batch, size.hidden, size.heads
    recomputed = 2 * s * b * h * size.layers
    kept = int(s * b * h * (34 + 5 * a * s / h)) * size.layers
    return recomputed, kept


def local_gpu_memory() -> int | None:
    """Bytes of this machine's smallest GPU, or None without one (or without torch)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


# -- against a cluster -------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryThere:
    """The memory a backend offers a job, as far as it can tell.

    Attributes:
        gpu: bytes per GPU (the smallest of the GPUs the job may land on), None when unknown.
        cpu: bytes of CPU memory each node (pod) of the job gets, None when unknown.
        source: where the numbers came from, for the report.

    Example:
        >>> MemoryThere(gpu=80 * GIB, cpu=None, source="node labels").gpu // GIB
        80
    """

    gpu: int | None = None
    cpu: int | None = None
    source: str = "unknown"


def fit_check(model: Any, spec: Any, there: MemoryThere, sequence_length: int | None = None) -> tuple[Any, FitEstimate | None]:
    """The ``memory fit`` line of a preflight report: ``model`` trained under ``spec`` against ``there``.

    Returns:
        (the :class:`~dsnb.preflight.CheckResult`, the estimate; None when the model could not be sized).

    Raises:
        Nothing on purpose: a model that cannot be sized is a failed line naming ``model``.

    Example:
        >>> line, fit = fit_check(7e9, None, MemoryThere(gpu=24 * GIB, cpu=None, source="given"))
        >>> line.ok, fit.verdict
        (False, 'does not fit')
    """
    from dsnb.preflight import CheckResult

    name = "memory fit"
    try:
        fit = estimate(model, spec, sequence_length=sequence_length, gpu_memory=there.gpu, cpu_memory=there.cpu)
    except InvalidSpecError as e:
        return CheckResult(name, False, f"{e.field}: {e.problem}", e.fix), None
    except ImportError as e:  # DeepSpeed's estimators, or transformers for a model directory
        return CheckResult(name, True, f"cannot estimate here: {e}", "pip install deepspeed transformers",
                           warning=True), None
    low, high = fit.gpu_needed
    need = _gib(high) if low == high else f"{_gib(low)} to {_gib(high)}"
    detail = f"{need} per GPU, {_gib(fit.cpu_model_states)} CPU per node (ZeRO {fit.zero_stage})"
    verdict = fit.verdict
    if verdict == "unknown":
        cpu = "" if there.cpu is None else f"; CPU per node there is {_gib(there.cpu)}"
        return CheckResult(name, True, f"{detail}; GPU memory there is unknown ({there.source}){cpu}",
                           "compare with your GPUs' memory: dsnb estimate ... --gpu-gib G", warning=True), fit
    there_text = f"there is {_gib(fit.gpu_memory)} per GPU" if fit.gpu_memory is not None else ""
    if fit.cpu_memory is not None:
        there_text += f"{', ' if there_text else 'there is '}{_gib(fit.cpu_memory)} CPU per node"
    detail = f"{detail}; {there_text} ({there.source}): {verdict}"
    if verdict == "fits":
        return CheckResult(name, True, detail), fit
    if verdict == "fits with activation checkpointing":
        return CheckResult(name, True, detail, "turn on activation checkpointing (gradient_checkpointing=True in "
                                               "the Trainer), or lower the micro-batch", warning=True), fit
    return CheckResult(name, False, detail, _fit_fix(fit)), fit


def _fit_fix(fit: FitEstimate) -> str:
    """What would make ``fit`` fit: for the GPUs the cheapest first, then for the CPU memory."""
    fixes = []
    if fit.gpu_memory is not None and fit.gpu_needed[0] > fit.gpu_memory:
        if fit.zero_stage < 3:
            stages = "3" if fit.zero_stage == 2 else "2 or 3"
            fixes.append(f"use ZeRO stage {stages} (zero_optimization.stage), or more GPUs to partition over")
        elif not (fit.offload_optimizer and fit.offload_params):
            fixes.append("offload the optimizer and the parameters to the CPU (offload_optimizer, offload_param), "
                         "or add GPUs")
        else:
            fixes.append("add GPUs (nodes) to partition over, or use GPUs with more memory")
    if fit.cpu_memory is not None and fit.cpu_model_states > fit.cpu_memory:
        fixes.append("give each node more memory (resources.memory), or offload less to the CPU")
    return "; ".join(fixes)
