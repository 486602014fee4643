"""The Open Inference Protocol's (KServe V2) tensors: an inference request's body in, its answer out.

Tensors arrive as JSON (flat row-major ``data`` or nested lists) or as raw bytes after the JSON header
(Triton's binary tensor data extension: ``Inference-Header-Content-Length`` plus ``binary_data_size`` per
input), optionally gzip or deflate compressed. Outputs are JSON unless ``binary_data`` (per output) or
``binary_data_output`` (per request) asks for raw bytes; ``{"classification": k}`` on an output answers the
top k classes as a BYTES tensor of ``"score:index:label"`` strings (Triton's classification extension). No
Flask here: the views are in v2.py.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from werkzeug.wrappers import Request

from deploykit.card import ModelCard, TensorSpec
from deploykit.datatypes import NUMPY_BY_V2
from deploykit.serve.answers import ServeError, json_bytes, short

HEADER_LENGTH = "Inference-Header-Content-Length"

DATATYPES: dict[str, np.dtype[Any]] = {v2: np.dtype(name) for v2, name in NUMPY_BY_V2.items()}
KNOWN_DATATYPES = (*DATATYPES, "BYTES", "BF16")
_BY_NUMPY = {dtype: name for name, dtype in DATATYPES.items()}


@dataclass(frozen=True)
class Encoded:
    """An inference answer's body, content type and extra headers."""

    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request: the JSON header, the input tensor and the outputs asked for."""

    header: dict[str, Any]
    array: np.ndarray
    outputs: list[tuple[str, dict[str, Any]]]


def datatype_of(dtype: str | np.dtype[Any]) -> str:
    """The V2 datatype name of a NumPy/card dtype."""
    return _BY_NUMPY.get(np.dtype(dtype), "BYTES")


def shape_of(spec: TensorSpec) -> list[int]:
    """The tensor's shape as V2 writes it: -1 for a dynamic axis."""
    return [d if isinstance(d, int) else -1 for d in spec.shape]


def decode_request(req: Request, body: bytes, card: ModelCard, max_rows: int) -> InferRequest:
    """Decode an inference request's ``body`` for the model ``card`` describes; ``ServeError`` (400, 413,
    415) names what is wrong."""
    header, binary = _split_body(req, body)
    outputs = _requested_outputs(header, card)
    return InferRequest(header, _input_tensor(header, card, binary, max_rows), outputs)


def _decompressed(req: Request, body: bytes) -> bytes:
    """The body without its gzip/deflate Content-Encoding (tritonclient's request compression), bounded by the
    body limit so that a compressed bomb is refused."""
    encoding = (req.headers.get("Content-Encoding") or "identity").lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise ServeError(f"Unsupported Content-Encoding {encoding!r}; use gzip, deflate or none.", status=415)
    limit = req.max_content_length or len(body) * 1024
    decoder = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = decoder.decompress(body, limit + 1)
    except zlib.error:
        raise ServeError(f"The body is not valid {encoding} data.") from None
    if len(data) > limit:
        raise ServeError(
            "The decompressed request body is larger than the server's limit (--max-body-mb).", status=413
        )
    return data


def _split_body(req: Request, body: bytes) -> tuple[dict[str, Any], memoryview]:
    body = _decompressed(req, body)
    raw_length = req.headers.get(HEADER_LENGTH)
    if raw_length is not None:
        try:
            length = int(raw_length)
        except ValueError:
            raise ServeError(f"{HEADER_LENGTH} must be an integer, got {raw_length!r}.") from None
        if not 0 < length <= len(body):
            raise ServeError(
                f"{HEADER_LENGTH} is {length}: it must be the JSON header's length, between 1 and the "
                f"body's {len(body)} bytes."
            )
    else:
        length = len(body)
    try:
        header = json.loads(body[:length])
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ServeError(
            "The inference request is not valid JSON (with binary tensors, set "
            f"{HEADER_LENGTH} to the JSON header's length)."
        ) from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise ServeError('The inference request needs an "inputs" list.')
    parameters = header.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ServeError('The inference request\'s "parameters" must be an object.')
    _flag(parameters or {}, "binary_data_output", "The request's parameter")
    return header, memoryview(body)[length:]


def _describe(spec: TensorSpec) -> str:
    return f"{datatype_of(spec.dtype)} {shape_of(spec)}"


def _flag(parameters: dict[str, Any], key: str, where: str) -> bool:
    """A boolean parameter of the binary tensor data extension (absent: False)."""
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise ServeError(f"{where} {key} must be true or false, got {short(value)}.")
    return value


def _input_tensor(header: dict[str, Any], card: ModelCard, binary: memoryview, max_rows: int) -> np.ndarray:
    spec = card.input
    expected_dtype = np.dtype(spec.dtype)
    inputs = header["inputs"]
    names = [t.get("name") if isinstance(t, dict) else None for t in inputs]
    for given in names:
        if given != spec.name:
            raise ServeError(
                f"Unknown input tensor {short(given)}; "
                f"the model expects input {spec.name!r} {_describe(spec)}."
            )
    if len(inputs) != 1:
        raise ServeError(
            f"Expected exactly one input tensor {spec.name!r} {_describe(spec)}, got {len(inputs)}."
        )
    tensor = inputs[0]
    datatype = tensor.get("datatype")
    if datatype not in KNOWN_DATATYPES:
        raise ServeError(f"Input tensor {spec.name!r}: unknown datatype {short(datatype)}.")
    if datatype != datatype_of(expected_dtype):
        raise ServeError(
            f"Input tensor {spec.name!r} has datatype {datatype}, but the model expects {_describe(spec)}."
        )
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape
    ):
        raise ServeError(
            f"Input tensor {spec.name!r}: shape must be a list of non-negative integers, "
            f"expected {shape_of(spec)}, got {short(shape)}."
        )
    expected = shape_of(spec)
    if (
        len(shape) != len(expected)
        or any(e != -1 and e != s for e, s in zip(expected, shape, strict=True))
        or (shape and shape[0] == 0)
    ):
        raise ServeError(
            f"Input tensor {spec.name!r} has shape {shape}, but the model expects shape {expected} "
            f"({datatype_of(expected_dtype)})."
        )
    if shape and expected[0] == -1 and shape[0] > max_rows:
        raise ServeError(
            f"Input tensor {spec.name!r} has a batch of {shape[0]}; this server takes at most {max_rows} "
            "per request (--max-request-images). Send the rest in further requests.",
            status=413,
        )
    count = int(np.prod(shape))
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise ServeError(f"Input tensor {spec.name!r}: parameters must be an object.")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size != count * expected_dtype.itemsize:
            raise ServeError(
                f"Input tensor {spec.name!r}: binary_data_size {size!r} does not match shape {shape} "
                f"of {datatype} ({count * expected_dtype.itemsize} bytes)."
            )
        if size > len(binary):
            raise ServeError(
                f"Input tensor {spec.name!r}: the body has {len(binary)} bytes of binary data, "
                f"{size} expected."
            )
        return np.frombuffer(binary[:size], dtype=expected_dtype).reshape(shape)
    data = tensor.get("data")
    if data is None:
        raise ServeError(f'Input tensor {spec.name!r} has no data (give "data" or binary_data_size).')
    try:
        array = np.asarray(data, dtype=expected_dtype)
    except (ValueError, TypeError, OverflowError):
        raise ServeError(f"Input tensor {spec.name!r}: data must be numbers that fit {datatype}.") from None
    if array.size != count:
        raise ServeError(
            f"Input tensor {spec.name!r}: shape {shape} needs {count} values, data has {array.size}."
        )
    return array.reshape(shape)


def _requested_outputs(header: dict[str, Any], card: ModelCard) -> list[tuple[str, dict[str, Any]]]:
    names = [o.name for o in card.outputs]
    requested = header.get("outputs")
    if requested is None:
        return [(n, {}) for n in names]
    if not isinstance(requested, list):
        raise ServeError('"outputs" must be a list.')
    result = []
    for item in requested:
        if not isinstance(item, dict) or item.get("name") not in names:
            given = item.get("name") if isinstance(item, dict) else item
            raise ServeError(f"Unknown output tensor {short(given)}; the model has {', '.join(names)}.")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise ServeError(f"Output {item['name']!r}: parameters must be an object.")
        _flag(params, "binary_data", f"Output {item['name']!r}: parameter")
        k = params.get("classification")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ServeError(
                f"Output {item['name']!r}: classification must be a positive integer, got {short(k)}."
            )
        result.append((item["name"], params))
    return result


def classify(output: np.ndarray, k: int, labels: tuple[str, ...]) -> np.ndarray:
    """Triton's classification extension: the top k of each row as ``b"score:index:label"``, shape (N, k)."""
    rows = output.reshape(output.shape[0], -1)
    k = min(k, rows.shape[1])
    order = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    result = np.empty((rows.shape[0], k), dtype=object)
    for r, (row, idx) in enumerate(zip(rows, order, strict=True)):
        for c, i in enumerate(idx):
            label = labels[int(i)] if int(i) < len(labels) else None
            text = f"{float(row[int(i)]):f}:{int(i)}" + (f":{label}" if label is not None else "")
            result[r, c] = text.encode()
    return result


def _bytes_payload(array: np.ndarray) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in array.reshape(-1))


def encode_answer(
    model: str, version: str, request: InferRequest, outputs: dict[str, np.ndarray], card: ModelCard
) -> Encoded:
    """The answer to ``request`` with the model's ``outputs`` (by name)."""
    header = request.header
    requested = request.outputs
    binary_default = (header.get("parameters") or {}).get("binary_data_output", False)  # checked: a bool
    described: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, params in requested:
        array = outputs[name]
        k = params.get("classification")
        if k is not None:
            array = classify(array, int(k), card.labels)
            datatype = "BYTES"
        else:
            datatype = datatype_of(array.dtype)
        item: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if params.get("binary_data", binary_default):
            payload = _bytes_payload(array) if datatype == "BYTES" else np.ascontiguousarray(array).tobytes()
            item["parameters"] = {"binary_data_size": len(payload)}
            chunks.append(payload)
        elif datatype == "BYTES":
            item["data"] = [b.decode() for b in array.reshape(-1)]
        else:
            item["data"] = array.reshape(-1).tolist()
        described.append(item)
    body: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": described}
    if "id" in header:
        body["id"] = header["id"]
    text = json_bytes(body)
    if not chunks:
        return Encoded(text)
    return Encoded(b"".join([text, *chunks]), "application/octet-stream", {HEADER_LENGTH: str(len(text))})
