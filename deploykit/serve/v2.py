"""Open Inference Protocol (KServe V2) REST API, with Triton's binary tensor data and classification
extensions, so that tritonclient and KServe clients work unchanged.

Model names are the deploykit model names; each model has one version, ``"1"``. Tensors arrive as JSON (flat
row-major ``data`` or nested lists) or as raw bytes after the JSON header (``Inference-Header-Content-Length``
plus ``binary_data_size`` per input). Outputs are JSON unless ``binary_data`` (per output) or
``binary_data_output`` (per request) asks for raw bytes. ``{"classification": k}`` on an output answers the
top k classes as a BYTES tensor of ``"score:index:label"`` strings, as Triton does.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import numpy as np
from flask import Blueprint, Response, current_app
from werkzeug.wrappers import Request

from deploykit import __version__
from deploykit.card import ModelCard, TensorSpec
from deploykit.datatypes import NUMPY_BY_V2
from deploykit.runtime import provider_name
from deploykit.serve.app import (
    Answer,
    HotRoute,
    clip,
    error_response,
    hot_route,
    json_bytes,
    json_response,
    read_body,
    registry_of,
)
from deploykit.serve.batching import ServeError
from deploykit.serve.registry import ModelEntry, Registry
from deploykit.serve.routes import ready_entry

bp = Blueprint("v2", __name__, url_prefix="/v2")

VERSION = "1"
EXTENSIONS = ["binary_tensor_data", "classification"]
PLATFORM = "onnxruntime_onnx"
HEADER_LENGTH = "Inference-Header-Content-Length"

DATATYPES: dict[str, np.dtype[Any]] = {v2: np.dtype(name) for v2, name in NUMPY_BY_V2.items()}
KNOWN_DATATYPES = (*DATATYPES, "BYTES", "BF16")
_BY_NUMPY = {dtype: name for name, dtype in DATATYPES.items()}


def datatype_of(dtype: str | np.dtype[Any]) -> str:
    """The V2 datatype name of a NumPy/card dtype."""
    return _BY_NUMPY.get(np.dtype(dtype), "BYTES")


def _shape(spec: TensorSpec) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in spec.shape]


def _entry(registry: Registry, name: str, version: str | None) -> ModelEntry:
    entry = registry.get(name)
    if entry is None:
        raise ServeError(
            f"Unknown model {name!r}; this server has {', '.join(registry.entries)}.", status=404
        )
    if version is not None and version != VERSION:
        raise ServeError(
            f"Model {name!r} has no version {version!r}; the only version is {VERSION!r}.", status=404
        )
    return entry


def _card(registry: Registry, entry: ModelEntry) -> ModelCard:
    if entry.card is None and not registry.loaded.is_set():
        registry.loaded.wait(registry.config.request_timeout)
    if entry.card is None:
        raise ServeError(
            f"Model {entry.name!r} is not loaded yet: {entry.error or 'still loading'}.",
            status=503,
            headers={"Retry-After": "5"},
        )
    return entry.card


@bp.get("")
@bp.get("/")
def server_metadata() -> Response:
    return json_response({"name": "deploykit", "version": __version__, "extensions": EXTENSIONS})


@bp.get("/health/live")
def live() -> Response:
    return json_response({"live": True})


@bp.get("/health/ready")
def ready() -> Response:
    registry = registry_of(current_app)
    if registry.ready:
        return json_response({"ready": True})
    return error_response(registry.not_ready_reason(), 503, {"Retry-After": "5"})


@bp.get("/models/<name>")
@bp.get("/models/<name>/versions/<version>")
def model_metadata(name: str, version: str | None = None) -> Response:
    registry = registry_of(current_app)
    entry = _entry(registry, name, version)
    card = _card(registry, entry)
    tensors = lambda specs: [  # noqa: E731
        {"name": t.name, "datatype": datatype_of(t.dtype), "shape": _shape(t)} for t in specs
    ]
    return json_response(
        {
            "name": entry.name,
            "versions": [VERSION],
            "platform": PLATFORM,
            "inputs": tensors(card.inputs),
            "outputs": tensors(card.outputs),
        }
    )


@bp.get("/models/<name>/ready")
@bp.get("/models/<name>/versions/<version>/ready")
def model_ready(name: str, version: str | None = None) -> Response:
    registry = registry_of(current_app)
    entry = _entry(registry, name, version)
    if entry.ready and not registry.draining:
        return json_response({"name": entry.name, "ready": True})
    reason = entry.error or ("the server is shutting down" if registry.draining else "it is still loading")
    return error_response(f"Model {entry.name!r} is not ready: {reason}.", 503, {"Retry-After": "5"})


@bp.get("/models/<name>/config")
@bp.get("/models/<name>/versions/<version>/config")
def model_config(name: str, version: str | None = None) -> Response:
    """Triton's model configuration, for clients that ask for it (batch dimension left out of dims)."""
    registry = registry_of(current_app)
    entry = _entry(registry, name, version)
    card = _card(registry, entry)
    dynamic = card.dynamic_batch
    config = registry.config
    gpu = any(
        provider_name(p) in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in config.providers
    )

    def tensors(specs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
        return [
            {
                "name": t.name,
                "data_type": "TYPE_" + datatype_of(t.dtype).replace("BYTES", "STRING"),
                "dims": _shape(t)[1:] if dynamic else _shape(t),
            }
            for t in specs
        ]

    return json_response(
        {
            "name": entry.name,
            "platform": PLATFORM,
            "backend": "onnxruntime",
            "max_batch_size": registry.plan.max_batch_size if dynamic else 0,
            "input": tensors(card.inputs),
            "output": tensors(card.outputs),
            "instance_group": [
                {
                    "name": entry.name,
                    "kind": "KIND_GPU" if gpu else "KIND_CPU",
                    "count": registry.plan.instances,
                }
            ],
        }
    )


def infer_answer(req: Request, registry: Registry, name: str, version: str | None = None) -> Answer:
    """``POST /v2/models/<name>[/versions/<version>]/infer``, a hot route (see app.py)."""
    entry = ready_entry(registry, _entry(registry, name, version).name)
    predictor = entry.predictor
    batcher = entry.batcher
    assert predictor is not None
    assert batcher is not None
    card = predictor.card
    with batcher.incoming() as ticket:
        header, binary = _split_body(req)
        requested = _requested_outputs(header, card)
        array = _input_tensor(header, card, binary, registry.config.max_request_images)
        result = batcher.submit(array, registry.config.request_timeout, ticket)
    registry.metrics.observe_queue(entry.name, result.queue_s)
    outputs = dict(zip(predictor.output_names, result.outputs, strict=True))
    return _infer_answer(entry, header, requested, outputs, card)


HOT_ROUTES: list[HotRoute] = [
    hot_route(bp, "/models/<name>/infer", "infer", infer_answer),
    hot_route(bp, "/models/<name>/versions/<version>/infer", "infer", infer_answer),
]


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


def _split_body(req: Request) -> tuple[dict[str, Any], memoryview]:
    body = _decompressed(req, read_body(req))
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
    return f"{datatype_of(spec.dtype)} {_shape(spec)}"


def _flag(parameters: dict[str, Any], key: str, where: str) -> bool:
    """A boolean parameter of the binary tensor data extension (absent: False)."""
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise ServeError(f"{where} {key} must be true or false, got {_short(value)}.")
    return value


def _short(value: Any) -> str:
    """A client's value for an error message, cut short."""
    return clip(repr(value), 60)


def _input_tensor(header: dict[str, Any], card: ModelCard, binary: memoryview, max_rows: int) -> np.ndarray:
    spec = card.input
    expected_dtype = np.dtype(spec.dtype)
    inputs = header["inputs"]
    names = [t.get("name") if isinstance(t, dict) else None for t in inputs]
    for given in names:
        if given != spec.name:
            raise ServeError(
                f"Unknown input tensor {_short(given)}; "
                f"the model expects input {spec.name!r} {_describe(spec)}."
            )
    if len(inputs) != 1:
        raise ServeError(
            f"Expected exactly one input tensor {spec.name!r} {_describe(spec)}, got {len(inputs)}."
        )
    tensor = inputs[0]
    datatype = tensor.get("datatype")
    if datatype not in KNOWN_DATATYPES:
        raise ServeError(f"Input tensor {spec.name!r}: unknown datatype {_short(datatype)}.")
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
            f"expected {_shape(spec)}, got {_short(shape)}."
        )
    expected = _shape(spec)
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
            raise ServeError(f"Unknown output tensor {_short(given)}; the model has {', '.join(names)}.")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise ServeError(f"Output {item['name']!r}: parameters must be an object.")
        _flag(params, "binary_data", f"Output {item['name']!r}: parameter")
        k = params.get("classification")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ServeError(
                f"Output {item['name']!r}: classification must be a positive integer, got {_short(k)}."
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


def _infer_answer(
    entry: ModelEntry,
    header: dict[str, Any],
    requested: list[tuple[str, dict[str, Any]]],
    outputs: dict[str, np.ndarray],
    card: ModelCard,
) -> Answer:
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
    body: dict[str, Any] = {"model_name": entry.name, "model_version": VERSION, "outputs": described}
    if "id" in header:
        body["id"] = header["id"]
    text = json_bytes(body)
    if not chunks:
        return Answer(text)
    return Answer(b"".join([text, *chunks]), "application/octet-stream", {HEADER_LENGTH: str(len(text))})
