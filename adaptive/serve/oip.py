"""The Open Inference Protocol (KServe v2) codec: tensors in and out, JSON and binary.

Pure functions over bytes, numpy and the models' input signatures; no web framework here.

The *binary tensor extension* (what ``tritonclient.http`` sends by default): the request
body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the raw
little-endian bytes of every input whose ``parameters.binary_data_size`` is set, in the order
the inputs are listed. A response does the same for outputs asked for with
``parameters.binary_data`` (or for all outputs with the request parameter
``binary_data_output``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "DATATYPES", "HEADER_LENGTH", "InferRequest", "OIPError", "TensorSpec", "datatype_of",
    "decode_request", "encode_response",
]

#: The header that carries the length of the JSON part of a binary request or response.
HEADER_LENGTH = "Inference-Header-Content-Length"

#: OIP datatype -> numpy dtype (little-endian, as the binary extension transmits them).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_BY_DTYPE = {dt.newbyteorder("="): name for name, dt in DATATYPES.items()}


class OIPError(Exception):
    """A request the protocol rejects: ``status`` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def datatype_of(dtype: Any) -> str:
    """The OIP datatype name of a numpy dtype (``float32`` -> ``FP32``)."""
    dt = np.dtype(dtype).newbyteorder("=")
    try:
        return _BY_DTYPE[dt]
    except KeyError:
        raise OIPError(500, f"dtype {dt} has no Open Inference Protocol datatype") from None


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as metadata shows it: ``shape`` has -1 for a dynamic axis."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def from_manifest(cls, d: Mapping[str, Any]) -> TensorSpec:
        """From a manifest's input entry (``{"name", "dtype", "shape"}``, str axes dynamic)."""
        return cls(d["name"], datatype_of(d["dtype"]),
                   tuple(-1 if isinstance(s, str) else int(s) for s in d["shape"]))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request: arrays by input name, and how to answer."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: tuple[str, ...] | None = None  # None: every output
    binary_outputs: frozenset[str] = field(default_factory=frozenset)
    parameters: Mapping[str, Any] = field(default_factory=dict)


def _split(body: bytes, header_length: str | None) -> tuple[Any, bytes]:
    if header_length is None:
        head, rest = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise OIPError(400, f"{HEADER_LENGTH} {header_length!r} must be an integer between "
                                f"0 and the body's {len(body)} bytes")
        head, rest = body[:n], body[n:]
    try:
        doc = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OIPError(400, f"the request's JSON is not valid: {e}") from None
    if not isinstance(doc, dict):
        raise OIPError(400, "the request must be a JSON object with \"inputs\"")
    return doc, rest


def _params(obj: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    p = obj.get("parameters", {})
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise OIPError(400, f"{where}: \"parameters\" must be an object")
    return p


def _check_shape(name: str, shape: Any, spec: TensorSpec, max_batch: int) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise OIPError(400, f"input {name!r}: \"shape\" must be a list of integers >= 0")
    if len(shape) != len(spec.shape) or any(w != -1 and g != w for g, w in zip(shape, spec.shape)):
        raise OIPError(400, f"input {name!r} has shape {shape}; the model takes "
                            f"{list(spec.shape)} (-1: any size)")
    if spec.shape and spec.shape[0] == -1 and not 1 <= shape[0] <= max_batch:
        raise OIPError(400, f"input {name!r}: batch size {shape[0]} must be between 1 and "
                            f"{max_batch} (the server's --max-batch)")
    return tuple(shape)


def _json_data(name: str, data: Any, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(data, (str, bytes, dict)) or data is None:
        raise OIPError(400, f"input {name!r}: \"data\" must be a list of numbers")
    try:
        arr = np.asarray(data)
    except ValueError:
        raise OIPError(400, f"input {name!r}: \"data\" is not a rectangular list") from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise OIPError(400, f"input {name!r}: \"data\" must hold only numbers")
    if arr.size != math.prod(shape):
        raise OIPError(400, f"input {name!r}: \"data\" has {arr.size} elements, shape "
                            f"{list(shape)} needs {math.prod(shape)}")
    if dtype.kind in "iub" and arr.dtype.kind == "f":
        raise OIPError(400, f"input {name!r} is {datatype_of(dtype)}: \"data\" must hold "
                            f"integers, not floats")
    try:
        with np.errstate(over="raise", invalid="raise"):
            out = arr.astype(dtype, casting="unsafe")
        if dtype.kind in "iu" and not np.array_equal(out, arr):
            raise OverflowError
    except (OverflowError, FloatingPointError):
        raise OIPError(400, f"input {name!r}: a value is out of range for "
                            f"{datatype_of(dtype)}") from None
    return out.reshape(shape)


def decode_request(body: bytes, header_length: str | None, signature: Sequence[TensorSpec],
                   outputs: Sequence[TensorSpec], max_batch: int) -> InferRequest:
    """Parse and validate a ``/infer`` body against a model's inputs and outputs.

    Raises :class:`OIPError` (400) naming the input at fault: unknown or missing inputs, a
    datatype other than the model's, a shape the model cannot take, too few or too many
    elements, binary data that does not add up.
    """
    doc, binary = _split(body, header_length)
    params = _params(doc, "the request")
    raw = doc.get("inputs")
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise OIPError(400, "the request must have \"inputs\": a list of tensors "
                            "{\"name\", \"shape\", \"datatype\", \"data\"}")
    specs = {s.name: s for s in signature}
    got: dict[str, np.ndarray] = {}
    offset = 0
    for t in raw:
        name = t.get("name")
        if not isinstance(name, str) or name not in specs:
            raise OIPError(400, f"unknown input {name!r}; the model takes {list(specs)}")
        if name in got:
            raise OIPError(400, f"input {name!r} is given twice")
        spec = specs[name]
        if t.get("datatype") != spec.datatype:
            raise OIPError(400, f"input {name!r} has datatype {t.get('datatype')!r}; the model "
                                f"takes {spec.datatype}")
        shape = _check_shape(name, t.get("shape"), spec, max_batch)
        dtype = DATATYPES[spec.datatype]
        size = _params(t, f"input {name!r}").get("binary_data_size")
        if size is not None:
            want = math.prod(shape) * dtype.itemsize
            if isinstance(size, bool) or not isinstance(size, int) or size != want:
                raise OIPError(400, f"input {name!r}: binary_data_size {size!r} does not match "
                                    f"shape {list(shape)} of {spec.datatype} ({want} bytes)")
            if offset + size > len(binary):
                raise OIPError(400, f"input {name!r}: the body ends {offset + size - len(binary)}"
                                    f" bytes short of its binary data")
            got[name] = np.frombuffer(binary, dtype, math.prod(shape), offset).reshape(shape)
            offset += size
        elif "data" in t:
            got[name] = _json_data(name, t["data"], dtype, shape)
        else:
            raise OIPError(400, f"input {name!r} has neither \"data\" nor binary data")
    if offset != len(binary):
        raise OIPError(400, f"the body has {len(binary) - offset} bytes of binary data that no "
                            f"input claims (binary_data_size)")
    missing = [n for n in specs if n not in got]
    if missing:
        raise OIPError(400, f"missing inputs {missing}; the model takes {list(specs)}")
    batches = {a.shape[0] for a, s in zip(got.values(), signature) if s.shape[:1] == (-1,)}
    if len(batches) > 1:
        raise OIPError(400, f"inputs {list(got)} have different batch sizes {sorted(batches)}")
    known = [o.name for o in outputs]
    req_out = doc.get("outputs")
    wanted: tuple[str, ...] | None = None
    binary_all = params.get("binary_data_output") is True
    binary_out: set[str] = set(known) if binary_all else set()
    if req_out is not None:
        if not isinstance(req_out, list) or not all(isinstance(o, dict) for o in req_out):
            raise OIPError(400, "\"outputs\" must be a list of {\"name\": ...}")
        names = []
        for o in req_out:
            n = o.get("name")
            if n not in known:
                raise OIPError(400, f"unknown output {n!r}; the model has {known}")
            names.append(n)
            b = _params(o, f"output {n!r}").get("binary_data")
            if b is True:
                binary_out.add(n)
            elif b is False:
                binary_out.discard(n)
        wanted = tuple(names)
    rid = doc.get("id")
    return InferRequest(got, id=rid if isinstance(rid, str) else None, outputs=wanted,
                        binary_outputs=frozenset(binary_out), parameters=params)


def encode_response(model: str, version: str, request: InferRequest,
                    outputs: Mapping[str, np.ndarray],
                    parameters: Mapping[str, Any]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it."""
    names = request.outputs if request.outputs is not None else tuple(outputs)
    tensors, blobs = [], []
    for n in names:
        arr = np.ascontiguousarray(outputs[n])
        t: dict[str, Any] = {"name": n, "datatype": datatype_of(arr.dtype),
                             "shape": list(arr.shape)}
        if n in request.binary_outputs:
            raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            t["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            t["data"] = arr.reshape(-1).tolist()
        tensors.append(t)
    doc: dict[str, Any] = {"model_name": model, "model_version": version,
                           "parameters": dict(parameters), "outputs": tensors}
    if request.id is not None:
        doc["id"] = request.id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
