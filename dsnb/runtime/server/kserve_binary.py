"""The binary tensor data extension of the Open Inference Protocol, as Triton defines it.

A request with the header ``Inference-Header-Content-Length: N`` is N bytes of JSON followed by
the raw data of each input whose ``parameters.binary_data_size`` is set, in input order; an
output is answered in binary when the request asks (``parameters.binary_data_output`` for all,
or ``outputs[i].parameters.binary_data`` for one), the same way. Numbers are little-endian in
row-major order; a ``BYTES`` element is a 4-byte little-endian length and its bytes. This is
what ``tritonclient.http`` sends and expects with its defaults (``binary_data=True``, and
``binary_data_output`` when no outputs are named): see Triton's
``docs/protocol/extension_binary_data.md`` (server r24.x) and tritonclient 2.73.0's
``tritonclient/http/_utils.py`` and ``_infer_result.py``.

Example:
    >>> import numpy as np
    >>> header = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}
    >>> raw = json.dumps(header).encode()
    >>> body = decode_request(raw + np.array([1.5, 2.5], "<f4").tobytes(), len(raw))
    >>> body["inputs"][0]["data"]
    [1.5, 2.5]
    >>> encode_bytes(["hi", "there"]), decode_bytes(encode_bytes(["hi", "there"]), 2)
    (b'\\x02\\x00\\x00\\x00hi\\x05\\x00\\x00\\x00there', ['hi', 'there'])
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from dsnb.runtime.server.model import BadRequest

HEADER = "Inference-Header-Content-Length"
#: v2 datatype -> numpy's little-endian dtype (BF16 travels as the upper 16 bits of a float32).
NUMPY_TYPES = {"BOOL": "?", "UINT8": "u1", "INT8": "i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
               "FP16": "<f2", "BF16": "<u2", "FP32": "<f4", "FP64": "<f8"}


def header_length(value: str | None, body_size: int) -> int | None:
    """The JSON part's length from the header's value; None without the header.

    Raises:
        BadRequest: not a whole number within the body.
    """
    if value is None:
        return None
    if not value.strip().isdigit() or int(value) > body_size:
        raise BadRequest(f"{HEADER} must be the byte length of the JSON part (at most {body_size}), got {value!r}")
    return int(value)


def decode_request(raw: bytes, json_length: int) -> dict[str, Any]:
    """The request's JSON with each binary input's ``data`` filled in from the bytes after it.

    Raises:
        BadRequest: bad JSON, sizes that do not add up to the body, or data that does not fill its shape.
    """
    from dsnb.runtime.server.app import parse_json

    body = parse_json(raw[:json_length])
    rest = memoryview(raw)[json_length:]
    offset = 0
    inputs = body.get("inputs") if isinstance(body, dict) else None
    for tensor in inputs if isinstance(inputs, list) else []:
        size = (tensor.get("parameters") or {}).get("binary_data_size") if isinstance(tensor, dict) else None
        if size is None:
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(rest):
            raise BadRequest(f"input {tensor.get('name')!r}: binary_data_size {size!r} does not fit the "
                             f"{len(rest) - offset} bytes left after the JSON")
        tensor["data"] = _decoded(tensor, bytes(rest[offset:offset + size]))
        offset += size
    if offset != len(rest):
        raise BadRequest(f"{len(rest) - offset} bytes after the JSON belong to no input's binary_data_size")
    return body


def _decoded(tensor: dict[str, Any], data: bytes) -> list[Any]:
    import numpy as np

    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    count = math.prod(shape) if isinstance(shape, list) and all(isinstance(d, int) for d in shape) else -1
    if datatype == "BYTES":
        return decode_bytes(data, count)
    if datatype not in NUMPY_TYPES:
        raise BadRequest(f"datatype {datatype!r} is not supported; use one of {', '.join(NUMPY_TYPES)} or BYTES")
    dtype = np.dtype(NUMPY_TYPES[datatype])
    if len(data) != count * dtype.itemsize:
        raise BadRequest(f"input {tensor.get('name')!r}: {len(data)} bytes, but shape {shape} of {datatype} needs "
                         f"{max(count, 0) * dtype.itemsize}")
    values = np.frombuffer(data, dtype=dtype)
    if datatype == "BF16":
        values = (values.astype("<u4") << 16).view("<f4")
    return values.tolist()


def decode_bytes(data: bytes, count: int) -> list[str]:
    """``count`` length-prefixed UTF-8 strings.

    Raises:
        BadRequest: lengths that run past the data, other than ``count`` elements, or text that is not UTF-8.
    """
    texts, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise BadRequest("a BYTES element's 4-byte length runs past the data")
        (length,) = struct.unpack_from("<I", data, offset)
        if offset + 4 + length > len(data):
            raise BadRequest(f"a BYTES element of {length} bytes runs past the data")
        try:
            texts.append(data[offset + 4:offset + 4 + length].decode("utf-8"))
        except UnicodeDecodeError as e:
            raise BadRequest(f"a BYTES element is not UTF-8 text ({e.reason})") from None
        offset += 4 + length
    if len(texts) != count:
        raise BadRequest(f"the BYTES data holds {len(texts)} elements, the shape says {count}")
    return texts


def encode_bytes(texts: list[str]) -> bytes:
    """Strings as length-prefixed UTF-8, as a ``BYTES`` tensor travels."""
    return b"".join(struct.pack("<I", len(encoded)) + encoded for encoded in (t.encode("utf-8") for t in texts))


def chosen_outputs(body: dict[str, Any], available: list[str]) -> list[tuple[str, bool]]:
    """The outputs to answer, in order, and whether each goes in binary.

    Without ``outputs`` every output is answered, in binary when ``parameters.binary_data_output``
    is true; with ``outputs`` only those named, each in binary when its ``parameters.binary_data`` is.

    Raises:
        BadRequest: an output the model does not have.

    Example:
        >>> chosen_outputs({"parameters": {"binary_data_output": True}}, ["output0"])
        [('output0', True)]
        >>> chosen_outputs({"outputs": [{"name": "output0"}]}, ["output0", "output1"])
        [('output0', False)]
    """
    requested = body.get("outputs")
    if not requested:
        binary = bool((body.get("parameters") or {}).get("binary_data_output"))
        return [(name, binary) for name in available]
    chosen = []
    for item in requested:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in available:
            raise BadRequest(f"output {name!r} is not one of this model's outputs: {', '.join(available)}")
        chosen.append((name, bool((item.get("parameters") or {}).get("binary_data"))))
    return chosen


def encode_response(body: dict[str, Any], raw_outputs: dict[str, bytes]) -> tuple[bytes, int]:
    """The response's bytes and its JSON part's length: each output named in ``raw_outputs``
    gets ``parameters.binary_data_size`` instead of ``data``, its bytes after the JSON in order."""
    tail = []
    for tensor in body["outputs"]:
        data = raw_outputs.get(tensor["name"])
        if data is not None:
            tensor.pop("data", None)
            tensor["parameters"] = {**tensor.get("parameters", {}), "binary_data_size": len(data)}
            tail.append(data)
    head = json.dumps(body, separators=(",", ":")).encode()
    return head + b"".join(tail), len(head)


def tensor_bytes(value: Any, datatype: str) -> bytes:
    """A torch tensor's elements as the binary extension carries ``datatype``."""
    import torch

    flat = value.detach().cpu().contiguous().flatten()
    if datatype == "BF16":
        return flat.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    return flat.numpy().astype(NUMPY_TYPES[datatype]).tobytes()
