"""Open Inference Protocol (KServe V2) REST views, with Triton's binary tensor data and classification
extensions, so that tritonclient and KServe clients work unchanged. The tensor codec is v2codec.py.

Model names are the deploykit model names. A model file is version ``"1"``; a model repository
(``<name>/<version>/model.onnx``) serves every version, the highest where a route names none.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, request

from deploykit import __version__
from deploykit.card import ModelCard, TensorSpec
from deploykit.runtime import provider_name
from deploykit.serve.answers import ServeError, error_response, json_response, read_body
from deploykit.serve.registry import ModelEntry, Registry, registry_of, version_key
from deploykit.serve.v2codec import datatype_of, decode_request, encode_answer, shape_of

bp = Blueprint("v2", __name__, url_prefix="/v2")

EXTENSIONS = ["binary_tensor_data", "classification"]
PLATFORM = "onnxruntime_onnx"


def _card(registry: Registry, entry: ModelEntry) -> ModelCard:
    if entry.card is None:
        registry.wait_loaded()
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
    entry = registry.version_of(name, version)
    card = _card(registry, entry)
    tensors = lambda specs: [  # noqa: E731
        {"name": t.name, "datatype": datatype_of(t.dtype), "shape": shape_of(t)} for t in specs
    ]
    return json_response(
        {
            "name": entry.name,
            "versions": sorted(registry.versions[entry.name], key=version_key),
            "platform": PLATFORM,
            "inputs": tensors(card.inputs),
            "outputs": tensors(card.outputs),
        }
    )


@bp.get("/models/<name>/ready")
@bp.get("/models/<name>/versions/<version>/ready")
def model_ready(name: str, version: str | None = None) -> Response:
    registry = registry_of(current_app)
    entry = registry.version_of(name, version)
    if entry.ready and not registry.draining:
        return json_response({"name": entry.name, "ready": True})
    reason = entry.error or ("the server is shutting down" if registry.draining else "it is still loading")
    return error_response(f"Model {entry.name!r} is not ready: {reason}.", 503, {"Retry-After": "5"})


@bp.get("/models/<name>/config")
@bp.get("/models/<name>/versions/<version>/config")
def model_config(name: str, version: str | None = None) -> Response:
    """Triton's model configuration, for clients that ask for it (batch dimension left out of dims)."""
    registry = registry_of(current_app)
    entry = registry.version_of(name, version)
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
                "dims": shape_of(t)[1:] if dynamic else shape_of(t),
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


@bp.post("/models/<name>/infer")
@bp.post("/models/<name>/versions/<version>/infer")
def infer(name: str, version: str | None = None) -> Response:
    registry = registry_of(current_app)
    entry = registry.ready_entry(name, version)
    predictor = entry.predictor
    batcher = entry.batcher
    assert predictor is not None
    assert batcher is not None
    card = predictor.card
    with batcher.incoming() as ticket:
        decoded = decode_request(request, read_body(request), card, registry.config.max_request_images)
        result = batcher.submit(decoded.array, registry.config.request_timeout, ticket)
    registry.metrics.observe_queue(entry.label, result.queue_s)
    outputs = dict(zip(predictor.output_names, result.outputs, strict=True))
    answer = encode_answer(entry.name, entry.version, decoded, outputs, card)
    return Response(answer.body, headers=answer.headers, content_type=answer.content_type)
