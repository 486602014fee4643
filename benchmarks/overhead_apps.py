"""The smallest servers that do deploykit's work, for ``bench_overhead.py``: each answers ``POST /predict``
with a raw JPEG body by decoding, preprocessing and predicting it exactly as deploykit does
(``deploykit.images``, ``Predictor`` with the server's session settings) and returns the top-5 as JSON, with
nothing else around it.

- ``raw_app``: a bare WSGI callable (the WSGI server's own cost);
- ``flask_app``: one Flask view (what Flask adds).

The model is loaded on import from ``$OVERHEAD_MODEL`` (in the server's worker process, after any fork).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flask import Flask, Response, request

from deploykit.images import decode_image, preprocess
from deploykit.runtime import Predictor
from deploykit.serve.config import ModelSpec, ServeConfig
from deploykit.serve.registry import inference_plan, open_predictors

_MODEL = Path(os.environ["OVERHEAD_MODEL"])
_CONFIG = ServeConfig(models=(ModelSpec("m", _MODEL),))
# one client at a time: the session the server gives a call that runs alone
_SHARED, _SOLO = open_predictors(_MODEL, _CONFIG, inference_plan(_CONFIG))
_PREDICTOR: Predictor = _SOLO or _SHARED


def answer(data: bytes) -> bytes:
    """The top-5 of one image, as JSON."""
    batch = preprocess(decode_image(data), _PREDICTOR.card.preprocess)[None]
    top = _PREDICTOR.predict(batch, 5)[0]
    return json.dumps({"predictions": [p.to_dict() for p in top]}).encode()


def raw_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = answer(environ["wsgi.input"].read(length))
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


flask_app = Flask("overhead")


@flask_app.post("/predict")
def predict() -> Response:
    return Response(answer(request.get_data()), mimetype="application/json")
