"""The Open Inference Protocol codec against tritonclient's own encoder and decoder."""

from __future__ import annotations

import json

import numpy as np
import pytest

tritonhttp = pytest.importorskip("tritonclient.http")

from adaptive.serve.oip import (  # noqa: E402
    OIPError,
    TensorSpec,
    decode_request,
    encode_response,
)

IMAGE = (TensorSpec("input", "FP32", (-1, 3, -1, -1)),)
TEXT = (TensorSpec("input_ids", "INT64", (-1, -1)), TensorSpec("attention_mask", "INT64",
                                                                 (-1, -1)))
LOGITS = (TensorSpec("logits", "FP32", (-1, 10)),)


def _triton_body(arrays: dict, binary: bool = True, outputs=None):
    inputs = []
    for name, a in arrays.items():
        i = tritonhttp.InferInput(name, list(a.shape),
                                  {np.float32: "FP32", np.int64: "INT64", np.float64: "FP64"}
                                  [a.dtype.type])
        i.set_data_from_numpy(a, binary_data=binary)
        inputs.append(i)
    body, n = tritonhttp.InferenceServerClient.generate_request_body(inputs, outputs=outputs,
                                                                     request_id="7")
    return body, None if n is None else str(n)


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_requests_decode_to_the_same_arrays(binary):
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    req = decode_request(*_triton_body({"input": x}, binary), IMAGE, LOGITS, 8)
    np.testing.assert_array_equal(req.inputs["input"], x)
    assert req.id == "7" and req.inputs["input"].dtype == np.float32
    assert req.binary_outputs == {"logits"}  # tritonclient asks for binary when none named
    ids = np.arange(12, dtype=np.int64).reshape(2, 6)
    req = decode_request(*_triton_body({"input_ids": ids, "attention_mask": ids * 0 + 1},
                                       binary), TEXT, LOGITS, 8)
    np.testing.assert_array_equal(req.inputs["input_ids"], ids)


@pytest.mark.parametrize("binary", [True, False])
def test_responses_decode_in_tritonclient(binary):
    x = np.zeros((1, 3, 4, 4), np.float32)
    outputs = [tritonhttp.InferRequestedOutput("logits", binary_data=binary)]
    req = decode_request(*_triton_body({"input": x}, outputs=outputs), IMAGE, LOGITS, 8)
    logits = np.random.default_rng(1).standard_normal((1, 10)).astype(np.float32)
    body, head = encode_response("resnet10", "resnet10+int8", req, {"logits": logits},
                                 {"memadapt_variant": "resnet10+int8"})
    assert (head is not None) == binary
    res = tritonhttp.InferResult.from_response_body(body, header_length=head)
    np.testing.assert_array_equal(res.as_numpy("logits"), logits)
    assert res.get_response()["model_version"] == "resnet10+int8"
    assert res.get_response()["parameters"] == {"memadapt_variant": "resnet10+int8"}


def test_json_data_may_be_nested():
    doc = {"inputs": [{"name": "input", "shape": [1, 3, 1, 2], "datatype": "FP32",
                       "data": [[[[1, 2]], [[3, 4]], [[5, 6]]]]}]}
    req = decode_request(json.dumps(doc).encode(), None, IMAGE, LOGITS, 8)
    assert req.inputs["input"].tolist() == [[[[1, 2]], [[3, 4]], [[5, 6]]]]
    assert req.outputs is None and not req.binary_outputs


def _doc(**tensor):
    t = {"name": "input", "shape": [1, 3, 1, 1], "datatype": "FP32", "data": [0, 0, 0]}
    t.update(tensor)
    return json.dumps({"inputs": [t]}).encode()


@pytest.mark.parametrize("body,header,needle", [
    (b"{nope", None, "JSON"),
    (b"[]", None, "JSON object"),
    (b'{"inputs": 3}', None, '"inputs"'),
    (_doc(name="image"), None, "unknown input 'image'"),
    (_doc(datatype="INT64"), None, "input 'input' has datatype 'INT64'"),
    (_doc(shape=[1, 3, 1]), None, "input 'input' has shape"),
    (_doc(shape=[1, 4, 1, 1]), None, "input 'input' has shape"),
    (_doc(shape=[9, 3, 1, 1]), None, "input 'input': batch size 9"),
    (_doc(shape=[1, 3, "x", 1]), None, "input 'input'"),
    (_doc(data=[0, 0]), None, "input 'input': \"data\" has 2 elements"),
    (_doc(data="abc"), None, "input 'input'"),
    (_doc(data=[[0, 0], [0]]), None, "input 'input'"),
    (_doc(data=[1e300, 0, 0]), None, "out of range"),
    (_doc(data=None), None, "input 'input'"),
    (_doc(parameters={"binary_data_size": 11}), None, "input 'input': binary_data_size"),
    (_doc(parameters={"binary_data_size": 12}), None, "bytes short"),
    (_doc(), "999", "Inference-Header-Content-Length"),
    (_doc(), "x", "Inference-Header-Content-Length"),
])
def test_bad_requests_are_400_and_say_what(body, header, needle):
    with pytest.raises(OIPError) as e:
        decode_request(body, header, IMAGE, LOGITS, 8)
    assert e.value.status == 400 and needle in str(e.value)


def test_integer_inputs_refuse_floats_and_overflow():
    spec = (TensorSpec("ids", "INT8", (-1,)),)
    for data, needle in (([1.5], "integers"), ([300], "out of range")):
        body = json.dumps({"inputs": [{"name": "ids", "shape": [1], "datatype": "INT8",
                                       "data": data}]}).encode()
        with pytest.raises(OIPError, match=needle):
            decode_request(body, None, spec, LOGITS, 8)


def test_missing_duplicate_and_trailing_bytes():
    ids = {"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]}
    with pytest.raises(OIPError, match="missing inputs \\['attention_mask'\\]"):
        decode_request(json.dumps({"inputs": [ids]}).encode(), None, TEXT, LOGITS, 8)
    with pytest.raises(OIPError, match="'input_ids' is given twice"):
        decode_request(json.dumps({"inputs": [ids, ids]}).encode(), None, TEXT, LOGITS, 8)
    head = _doc()
    with pytest.raises(OIPError, match="no input claims"):
        decode_request(head + b"\0" * 4, str(len(head)), IMAGE, LOGITS, 8)
    with pytest.raises(OIPError, match="unknown output 'probs'"):
        decode_request(json.dumps({"inputs": json.loads(_doc())["inputs"],
                                   "outputs": [{"name": "probs"}]}).encode(), None, IMAGE,
                       LOGITS, 8)
