"""The deploykit REST API: ``POST /predict``, ``POST /models/<name>/predict``, ``GET /models[/<name>]``.

Images are decoded and preprocessed in the request thread (images.py, the one implementation); the tensor
goes through the model's batcher. Answers follow the contract in docs/serving.md.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
from flask import Blueprint, Response, current_app, request
from werkzeug.wrappers import Request

from deploykit.card import Preprocess
from deploykit.images import InvalidImageError, load_tensor, probe_image
from deploykit.runtime import top_k
from deploykit.serve.answers import ServeError, json_response, read_body
from deploykit.serve.budget import decode_cost
from deploykit.serve.registry import Registry, registry_of

bp = Blueprint("rest", __name__)

DEFAULT_TOP_K = 5


def _top_k_param(req: Request, num_classes: int) -> int:
    raw = req.args.get("top_k") if req.environ.get("QUERY_STRING") else None
    if raw is None:
        return min(DEFAULT_TOP_K, num_classes)
    try:
        k = int(raw)
    except ValueError:
        raise ServeError(f"top_k must be an integer, got {raw!r}.") from None
    return max(1, min(k, num_classes))


def _b64(text: Any, where: str) -> bytes:
    """Standard or URL-safe base64, with or without line breaks (``base64`` the tool wraps at 76 columns)."""
    if not isinstance(text, str):
        raise ServeError(f"{where} must be a base64 string.")
    if text.startswith("data:") and "," in text:  # a data URL, as browsers produce
        text = text.split(",", 1)[1]
    text = "".join(text.split())
    text += "=" * (-len(text) % 4)  # base64url is usually sent without its padding
    try:
        if "-" in text or "_" in text:
            return base64.b64decode(text, altchars=b"-_", validate=True)
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(f"{where} is not valid base64.") from None


def _count(n: int, limit: int) -> None:
    if n > limit:
        raise ServeError(
            f"The request has {n} images; this server takes at most {limit} per request "
            "(--max-request-images). Send the rest in further requests.",
            status=413,
        )


def read_images(req: Request, max_images: int) -> list[tuple[str | None, bytes]]:
    """The request's images as (filename, bytes): multipart files, JSON base64 or a raw body; 413 past
    ``max_images``."""
    mimetype = req.mimetype
    if mimetype == "multipart/form-data":
        files = [(f.filename or None, f.read()) for _field, f in req.files.items(multi=True)]
        if not files:
            boundary = req.mimetype_params.get("boundary", "")
            if not boundary:
                raise ServeError("The multipart Content-Type has no boundary; let the client library set it.")
            raise ServeError(
                "The multipart form has no file (or does not follow its boundary); "
                "send the image in the 'file' field."
            )
        _count(len(files), max_images)
        return files
    if mimetype == "application/json" or mimetype.endswith("+json"):
        try:
            data = json.loads(read_body(req))
        except (ValueError, RecursionError):
            raise ServeError('The body is not valid JSON; send {"image": "<base64>"}.') from None
        if isinstance(data, dict) and "image" in data:
            return [(None, _b64(data["image"], "'image'"))]
        if isinstance(data, dict) and isinstance(data.get("images"), list) and data["images"]:
            _count(len(data["images"]), max_images)
            return [(None, _b64(item, f"'images'[{i}]")) for i, item in enumerate(data["images"])]
        raise ServeError('The JSON body needs {"image": "<base64>"} or {"images": ["<base64>", ...]}.')
    body = read_body(req)
    if not body:
        raise ServeError(
            "The request has no image: send a multipart 'file', a raw image body "
            '(Content-Type: image/jpeg) or JSON {"image": "<base64>"}.'
        )
    return [(None, body)]


def _tensor(registry: Registry, data: bytes, pp: Preprocess, which: str | None) -> np.ndarray:
    """One uploaded image as an input tensor, decoded within the decode budget (the cost is read from its
    header first). ``which`` names the image of a batch in errors (None: the request's only image)."""
    config = registry.config
    try:
        header = probe_image(data)
        budget: AbstractContextManager[None] = nullcontext()
        if header.pixels <= config.max_image_pixels:  # else decoding refuses it before any pixel
            cost = decode_cost(header, pp, exact=config.exact_decode)
            budget = registry.budget.reserve(cost, config.request_timeout, which or "The image")
        with budget:
            return load_tensor(data, pp, max_pixels=config.max_image_pixels, exact=config.exact_decode)
    except InvalidImageError as exc:
        if which is None:
            raise
        raise InvalidImageError(f"{which}: {exc.message}", unsupported=exc.unsupported) from None


def _which(filename: str | None, index: int, count: int) -> str | None:
    if count == 1:
        return None
    return f"{filename!r} ({index + 1} of {count})" if filename else f"image {index + 1} of {count}"


@bp.post("/predict")
@bp.post("/models/<name>/predict")
def predict(name: str | None = None) -> Response:
    """``POST /predict`` (the default model) and ``POST /models/<name>/predict``: decode, batch, run and
    answer top-k for every image of the request."""
    registry = registry_of(current_app)
    req = request
    entry = registry.ready_entry(name)
    start = time.perf_counter()
    predictor = entry.predictor
    batcher = entry.batcher
    assert predictor is not None
    assert batcher is not None
    card = predictor.card
    config = registry.config
    k = _top_k_param(req, card.num_classes)
    with batcher.incoming() as ticket:
        uploads = read_images(req, config.max_request_images)
        tensors = [
            _tensor(registry, data, card.preprocess, _which(filename, i, len(uploads)))
            for i, (filename, data) in enumerate(uploads)
        ]
        batch = tensors[0][None] if len(tensors) == 1 else np.stack(tensors)
        decoded = time.perf_counter()
        result = batcher.submit(batch, config.request_timeout, ticket)
    registry.metrics.observe_queue(entry.label, result.queue_s)
    probabilities = predictor.to_probabilities(result.outputs[0])
    predictions = []
    for (filename, _data), row in zip(uploads, top_k(probabilities, k, card.labels), strict=True):
        best = row[0]
        predictions.append(
            {
                "filename": filename,
                "label": best.label,
                "index": best.index,
                "probability": best.probability,
                "top_k": [p.to_dict() for p in row],
            }
        )
    end = time.perf_counter()
    return json_response(
        {
            "model": entry.name,
            "predictions": predictions,
            "timings_ms": {
                "decode": round((decoded - start) * 1000, 3),
                "queue": round(result.queue_s * 1000, 3),
                "inference": round(result.inference_s * 1000, 3),
                "total": round((end - start) * 1000, 3),
            },
        }
    )


@bp.get("/models")
def models() -> Response:
    registry = registry_of(current_app)
    return json_response({"models": [e.describe() for e in registry.entries.values()]})


@bp.get("/models/<name>")
def model(name: str) -> Response:
    return json_response(registry_of(current_app).known(name).describe())
