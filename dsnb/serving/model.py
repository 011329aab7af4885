"""Load a served model, wrap it with ``deepspeed.init_inference``, and answer one request.

The request and answer are JSON: ``{"inputs": ...}`` in, ``{"outputs": ...}`` out.

- A loader model (``"module:function"``) takes ``inputs`` as a nested list of numbers (a
  batch); integers become a ``long`` tensor (token ids), other numbers the model's dtype.
  The answer is the model's output tensor as nested lists (a tuple or dict of tensors
  becomes a list or dict of them).
- A Hugging Face directory takes ``inputs`` as a string or a list of strings. A sequence
  classifier (its ``config.json`` names a ``...ForSequenceClassification`` architecture)
  answers its logits; any other model the mean of its last hidden states over the real
  tokens (a sentence embedding, as sentence-transformers pools).

Example:
    >>> predictor = Predictor("tests.serving_models:tiny_mlp")          # doctest: +SKIP
    >>> predictor.predict({"inputs": [[0.0, 1.0, 2.0, 3.0]]})           # doctest: +SKIP
    {'outputs': [[0.12, -0.4]]}
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

#: Inputs above this many numbers (or characters of text) are refused rather than run.
MAX_INPUT_ITEMS = 1_000_000


class BadRequest(ValueError):
    """The request cannot be answered as sent (a 4xx for HTTP servers); the message says why."""


def load_module(model: str, working_dir: str | None = None) -> Any:
    """The ``torch.nn.Module`` a loader returns: ``"package.module:function"``, imported from ``working_dir``.

    Raises:
        ImportError: the module cannot be imported.
        TypeError: the loader returned something that is not a ``torch.nn.Module``.
    """
    import torch

    module_name, _, function_name = model.partition(":")
    if working_dir and working_dir not in sys.path:
        sys.path.insert(0, working_dir)
    loader = getattr(importlib.import_module(module_name), function_name)
    loaded = loader()
    if not isinstance(loaded, torch.nn.Module):
        raise TypeError(f"{model} returned {type(loaded).__name__}, not a torch.nn.Module")
    return loaded


class Predictor:
    """One replica's model: loaded once, wrapped by DeepSpeed, called per request.

    Args:
        model: ``"module:function"`` or a Hugging Face model directory.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        working_dir: where a loader's module is imported from (default: the current directory).
        deepspeed: wrap with ``deepspeed.init_inference`` (False gives the plain model, for comparisons).

    Raises:
        ImportError, TypeError, OSError: the model cannot be loaded.
    """

    def __init__(self, model: str, dtype: str = "float32", working_dir: str | None = None, deepspeed: bool = True) -> None:
        import torch

        self.torch = torch
        self.dtype = getattr(torch, dtype)
        self.tokenizer = None
        self.kind = "loader" if ":" in model and not Path(model).exists() else "huggingface"
        if self.kind == "loader":
            module = load_module(model, working_dir or os.getcwd())
        else:
            module, self.tokenizer, self.kind = _load_huggingface(model)
        module = module.to(self.dtype).eval()
        if deepspeed:
            import deepspeed as ds

            module = ds.init_inference(module, dtype=self.dtype, replace_with_kernel_inject=False)
        self.model = module

    def predict(self, payload: Any) -> dict[str, Any]:
        """The answer to one request body.

        Raises:
            BadRequest: no ``inputs``, or inputs of the wrong shape or type for this model.
        """
        if not isinstance(payload, dict) or "inputs" not in payload:
            raise BadRequest('send a JSON object with "inputs", e.g. {"inputs": [[1.0, 2.0]]}')
        inputs = payload["inputs"]
        with self.torch.inference_mode():
            if self.tokenizer is not None:
                return {"outputs": self._predict_text(inputs)}
            return {"outputs": _to_json(self.model(self._tensor(inputs)))}

    def _tensor(self, inputs: Any) -> Any:
        if not isinstance(inputs, list) or not inputs:
            raise BadRequest('"inputs" must be a non-empty list (a batch), e.g. [[1.0, 2.0]]')
        flat = json.dumps(inputs)
        if len(flat) > MAX_INPUT_ITEMS:
            raise BadRequest(f'"inputs" is too large ({len(flat)} characters, at most {MAX_INPUT_ITEMS})')
        try:
            tensor = self.torch.tensor(inputs)
        except (TypeError, ValueError, RuntimeError) as e:
            raise BadRequest(f'"inputs" must be a rectangular list of numbers ({e})') from e
        if tensor.dtype in (self.torch.int64, self.torch.int32):
            return tensor.long()
        if not tensor.is_floating_point():
            raise BadRequest(f'"inputs" must hold numbers, got {tensor.dtype}')
        return tensor.to(self.dtype)

    def _predict_text(self, inputs: Any) -> Any:
        single = isinstance(inputs, str)
        texts = [inputs] if single else inputs
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest('"inputs" must be a string or a non-empty list of strings')
        if sum(len(t) for t in texts) > MAX_INPUT_ITEMS:
            raise BadRequest(f'"inputs" is too large (at most {MAX_INPUT_ITEMS} characters)')
        assert self.tokenizer is not None
        encoded = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        output = self.model(**encoded)
        if self.kind == "classifier":
            values = output.logits
        else:
            mask = encoded["attention_mask"].unsqueeze(-1).to(output.last_hidden_state.dtype)
            values = (output.last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        result = values.float().tolist()
        return result[0] if single else result


def _load_huggingface(path: str) -> tuple[Any, Any, str]:
    try:
        import transformers
    except ImportError as e:
        raise ImportError("serving a Hugging Face model directory needs transformers: pip install 'dsnb[serve]'") from e
    config = json.loads((Path(path).expanduser() / "config.json").read_text())
    architectures = config.get("architectures") or []
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    auto = transformers.AutoModelForSequenceClassification if classifier else transformers.AutoModel
    model = auto.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer, "classifier" if classifier else "embedding"


def _to_json(output: Any) -> Any:
    if hasattr(output, "detach"):
        return output.detach().float().tolist()
    if isinstance(output, dict):
        return {k: _to_json(v) for k, v in output.items()}
    if isinstance(output, (list, tuple)):
        return [_to_json(v) for v in output]
    return output
