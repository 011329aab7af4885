"""The Open Inference Protocol (KServe v2): tensors in, tensors out (no HTTP here).

Routes (served by :mod:`dsnb.runtime.server.app`): ``GET /v2``, ``GET /v2/health/live``,
``GET /v2/health/ready``, ``GET /v2/models/{name}``, ``GET /v2/models/{name}/ready`` and
``POST /v2/models/{name}/infer``. A loader model takes one input tensor (its first
dimension is the batch); a text model takes one ``BYTES`` input of strings and answers
``FP32`` embeddings (or logits).

Example:
    >>> import torch
    >>> tensor = parse_tensor({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
    ...                       torch.float32)
    >>> tensor.tolist()
    [[1.0, 2.0], [3.0, 4.0]]
    >>> output_tensors(torch.tensor([[0.5, 1.5]]))[0]
    {'name': 'output0', 'shape': [1, 2], 'datatype': 'FP32', 'data': [0.5, 1.5]}
"""

from __future__ import annotations

import math
from typing import Any

from dsnb.runtime.server.model import MAX_INPUT_ITEMS, BadRequest

#: v2 datatype -> torch dtype name
DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
             "FP16": "float16", "BF16": "bfloat16", "FP32": "float32", "FP64": "float64"}
_TORCH_TO_V2 = {v: k for k, v in DATATYPES.items()}


def _single_input(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or len(body["inputs"]) != 1:
        raise BadRequest('send {"inputs": [{"name": ..., "shape": [...], "datatype": ..., "data": [...]}]} with one input')
    tensor = body["inputs"][0]
    if not isinstance(tensor, dict) or not {"name", "shape", "datatype", "data"} <= set(tensor):
        raise BadRequest('each input needs "name", "shape", "datatype" and "data"')
    shape = tensor["shape"]
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise BadRequest(f'"shape" must be a list of positive whole numbers, got {shape!r}')
    if math.prod(shape) > MAX_INPUT_ITEMS:
        raise BadRequest(f"the input holds {math.prod(shape)} elements, at most {MAX_INPUT_ITEMS}")
    return tensor


def parse_texts(body: Any) -> list[str]:
    """The strings of a ``BYTES`` input (text models).

    Raises:
        BadRequest: not one BYTES input of strings matching its shape.
    """
    tensor = _single_input(body)
    if tensor["datatype"] != "BYTES":
        raise BadRequest(f'this model takes text: send datatype "BYTES", not {tensor["datatype"]!r}')
    data = _flatten(tensor["data"])
    if not all(isinstance(t, str) for t in data) or len(data) != math.prod(tensor["shape"]):
        raise BadRequest(f'"data" must hold {math.prod(tensor["shape"])} strings, as "shape" says')
    return data


def parse_tensor(body: Any, model_dtype: Any) -> Any:
    """The input tensor of a body (floating inputs in ``model_dtype``).

    Raises:
        BadRequest: not one input, an unknown datatype, or data that does not fill the shape.
    """
    import torch

    tensor = _single_input(body)
    name = DATATYPES.get(tensor["datatype"])
    if name is None:
        raise BadRequest(f'datatype {tensor["datatype"]!r} is not supported; use one of {", ".join(DATATYPES)}')
    data = _flatten(tensor["data"])
    if len(data) != math.prod(tensor["shape"]) or not all(isinstance(x, (int, float)) for x in data):
        raise BadRequest(f'"data" must hold {math.prod(tensor["shape"])} numbers, as "shape" says')
    try:
        value = torch.tensor(data, dtype=getattr(torch, name)).reshape(tensor["shape"])
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise BadRequest(f"the data does not fit datatype {tensor['datatype']} ({e})") from e
    return value.to(model_dtype) if value.is_floating_point() else value


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        raise BadRequest('"data" must be a list')
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def named_outputs(output: Any) -> list[tuple[str, Any, str]]:
    """A model's output (a tensor, a tuple/list or a dict of tensors) as ``(name, tensor, v2 datatype)``.

    Example:
        >>> import torch
        >>> [(name, datatype) for name, _, datatype in named_outputs((torch.zeros(1), torch.zeros(1, dtype=torch.int64)))]
        [('output0', 'FP32'), ('output1', 'INT64')]
    """
    if isinstance(output, dict):
        named = list(output.items())
    elif isinstance(output, (list, tuple)) and output and hasattr(output[0], "shape"):
        named = [(f"output{i}", value) for i, value in enumerate(output)]
    else:
        named = [("output0", output)]
    tensors = []
    for name, value in named:
        if not hasattr(value, "shape"):
            import torch

            value = torch.tensor(value)
        dtype = str(value.dtype).removeprefix("torch.")
        if dtype not in _TORCH_TO_V2:
            value, dtype = value.float(), "float32"
        tensors.append((str(name), value, _TORCH_TO_V2[dtype]))
    return tensors


def output_tensors(output: Any) -> list[dict[str, Any]]:
    """A model's output (a tensor, a tuple/list or a dict of tensors) as v2 output tensors."""
    return [json_tensor(name, value, datatype) for name, value, datatype in named_outputs(output)]


def json_tensor(name: str, value: Any, datatype: str) -> dict[str, Any]:
    """One output tensor with its elements as JSON numbers (FP16 and BF16 as the numbers they hold)."""
    data = value.float().flatten().tolist() if datatype in ("FP16", "BF16") else value.flatten().tolist()
    return {"name": name, "shape": list(value.shape), "datatype": datatype, "data": data}


def infer_response(served: str, request_id: Any, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """The body answering ``/v2/models/{name}/infer``."""
    body: dict[str, Any] = {"model_name": served, "model_version": "1", "outputs": outputs}
    if isinstance(request_id, str):
        body["id"] = request_id
    return body


def model_metadata(served: str, kind: str) -> dict[str, Any]:
    """The body of ``GET /v2/models/{name}``."""
    text = kind != "loader"
    return {"name": served, "versions": ["1"], "platform": "pytorch_deepspeed",
            "inputs": [{"name": "input0", "datatype": "BYTES" if text else "FP32", "shape": [-1] if text else [-1, -1]}],
            "outputs": [{"name": "output0", "datatype": "FP32", "shape": [-1, -1]}]}


def server_metadata(version: str) -> dict[str, Any]:
    """The body of ``GET /v2``."""
    return {"name": "dsnb", "version": version, "extensions": ["binary_tensor_data"]}
