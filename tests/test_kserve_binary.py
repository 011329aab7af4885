"""The KServe v2 binary tensor extension: what tritonclient sends is decoded, what it reads is encoded.

The requests are built and the answers parsed by tritonclient 2.73.0's own code
(``InferInput``, ``_get_inference_request``, ``InferResult.from_response_body``), so the
format is the client's, not a copy of it; the server runs it end to end in test_serving_server.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
triton = pytest.importorskip("tritonclient.http")
from tritonclient.http._utils import _get_inference_request  # noqa: E402  (the body the client sends)

from dsnb.runtime.server import kserve, kserve_binary  # noqa: E402
from dsnb.runtime.server.model import BadRequest  # noqa: E402


def client_request(*arrays: tuple[str, np.ndarray, str], outputs=None) -> tuple[bytes, int | None]:
    inputs = []
    for name, array, datatype in arrays:
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)  # binary_data=True, the client's default
        inputs.append(tensor)
    return _get_inference_request(inputs, "", outputs, 0, False, False, 0, None, None)


@pytest.mark.parametrize(("array", "datatype"), [
    (np.array([[1.5, -2.25], [3.0, 4.5]], dtype=np.float32), "FP32"),
    (np.array([0.5, 65504.0], dtype=np.float16), "FP16"),
    (np.array([1.0, 2.0], dtype=np.float64), "FP64"),
    (np.array([[-(2**40), 7]], dtype=np.int64), "INT64"),
    (np.array([True, False, True]), "BOOL"),
    (np.array([0, 255], dtype=np.uint8), "UINT8"),
])
def test_a_binary_input_from_tritonclient_becomes_the_same_tensor(array: np.ndarray, datatype: str) -> None:
    raw, length = client_request(("x", array, datatype))
    assert length is not None  # the client used the extension
    body = kserve_binary.decode_request(raw, length)
    tensor = kserve.parse_tensor(body, torch.float64)
    assert tensor.tolist() == array.astype(np.float64 if array.dtype.kind == "f" else array.dtype).tolist()


def test_bf16_travels_as_the_upper_half_of_float32() -> None:
    values = torch.tensor([1.5, -3.0, 0.099609375], dtype=torch.bfloat16)
    data = kserve_binary.tensor_bytes(values, "BF16")
    header = {"inputs": [{"name": "x", "shape": [3], "datatype": "BF16", "parameters": {"binary_data_size": len(data)}}]}
    head = json.dumps(header).encode()
    assert kserve_binary.decode_request(head + data, len(head))["inputs"][0]["data"] == values.float().tolist()


def test_texts_from_tritonclient_are_read_and_outputs_it_asked_for_in_binary_are_what_it_reads() -> None:
    texts = np.array(["hello", "wörld", ""], dtype=object)
    raw, length = client_request(("text", texts, "BYTES"))
    body = kserve_binary.decode_request(raw, length)
    assert kserve.parse_texts(body) == ["hello", "wörld", ""]
    assert kserve_binary.chosen_outputs(body, ["output0"]) == [("output0", True)]  # no outputs named: all in binary

    vectors = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    name, value, datatype = kserve.named_outputs(vectors)[0]
    response = kserve.infer_response("m", None, [{"name": name, "shape": list(value.shape), "datatype": datatype}])
    content, header_length = kserve_binary.encode_response(response, {name: kserve_binary.tensor_bytes(value, datatype)})
    result = triton.InferResult.from_response_body(content, header_length=header_length)
    assert result.as_numpy("output0").tolist() == vectors.tolist()


def test_a_named_output_comes_as_asked_and_an_unknown_one_is_refused() -> None:
    asked = [triton.InferRequestedOutput("output1", binary_data=False)]
    raw, length = client_request(("x", np.zeros((1, 2), np.float32), "FP32"), outputs=asked)
    body = kserve_binary.decode_request(raw, length)
    assert kserve_binary.chosen_outputs(body, ["output0", "output1"]) == [("output1", False)]
    with pytest.raises(BadRequest, match="'output7' is not one of this model's outputs: output0"):
        kserve_binary.chosen_outputs({"outputs": [{"name": "output7"}]}, ["output0"])


@pytest.mark.parametrize(("header", "tail", "words"), [
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}, b"\0" * 4,
     "does not fit the 4 bytes"),
    ({"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}, b"\0" * 8,
     "needs 12"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}, b"\0" * 9,
     "1 bytes after the JSON belong to no input"),
    ({"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]},
     b"\x09\0\0\0ab", "runs past the data"),
    ({"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]},
     b"\x02\0\0\0\xff\xfe", "not UTF-8"),
    ({"inputs": [{"name": "t", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 5}}]},
     b"\x01\0\0\0a", "holds 1 elements, the shape says 2"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP8", "parameters": {"binary_data_size": 1}}]}, b"\0",
     "'FP8' is not supported"),
])
def test_binary_data_that_does_not_add_up_is_a_clear_400(header: dict, tail: bytes, words: str) -> None:
    head = json.dumps(header).encode()
    with pytest.raises(BadRequest, match=words):
        kserve_binary.decode_request(head + tail, len(head))


def test_the_header_must_be_the_json_part_length() -> None:
    assert kserve_binary.header_length(None, 10) is None and kserve_binary.header_length("4", 10) == 4
    for value in ("-1", "x", "11"):
        with pytest.raises(BadRequest, match="byte length of the JSON part"):
            kserve_binary.header_length(value, 10)
