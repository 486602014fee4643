"""HTTP errors and JSON answers: what every route of the server raises and returns.

``ServeError`` (and its 503 and 504 kinds) carries an HTTP status; :func:`error_answer` is the one error
boundary that turns any exception into a status and a one-line message. Every answer is compact, strict JSON
(NaN and infinities written as null); an error answer is ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from flask import Response
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.wrappers import Request

from deploykit.errors import DeployKitError
from deploykit.images import InvalidImageError
from deploykit.jsontext import finite

log = logging.getLogger("deploykit.serve")

INTERNAL_ERROR = "Internal server error; the server log has the details."


class ServeError(DeployKitError):
    """An error answered with an HTTP status (400 unless given) and optional headers."""

    status = 400

    def __init__(
        self, message: str, *, status: int | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        self.headers = headers or {}


class QueueFull(ServeError):
    """The model's queue is full, or the server is stopping; the client should retry later (503)."""

    status = 503

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class RequestTimeout(ServeError):
    """The request waited longer than ``--request-timeout`` (504)."""

    status = 504


def json_bytes(data: Any) -> bytes:
    """Compact JSON (no pretty-printing, no sorting), as every answer of the server is written. Numbers that
    are not finite (JSON has none) are written as null."""
    try:
        return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        return json.dumps(finite(data), separators=(",", ":")).encode()


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON answer."""
    return Response(json_bytes(data), status=status, headers=headers, mimetype="application/json")


def error_response(message: str, status: int, headers: Mapping[str, str] | None = None) -> Response:
    return json_response({"error": message}, status, headers)


def read_body(req: Request) -> bytes:
    """The request body; 413 when it is over ``--max-body-mb`` (``req.max_content_length``).

    A declared Content-Length over the limit is refused before anything is read (Werkzeug). A body without
    one (chunked, where the server does not count it) is cut at the limit by Werkzeug without an error: one
    that reached the limit is refused here rather than used cut short.
    """
    body = req.get_data()
    limit = req.max_content_length
    if req.content_length is None and limit is not None and len(body) >= limit:
        raise RequestEntityTooLarge()
    return body


def clip(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters: an error answer never echoes a huge input back whole."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(value: Any) -> str:
    """A client's value for an error message, cut short."""
    return clip(repr(value), 60)


def error_answer(exc: Exception, req: Request) -> tuple[int, str, dict[str, str]]:
    """The status, message and headers that answer ``exc``: the one error boundary of every route.

    An unexpected exception is logged with its traceback and answered with a generic 500 (no exception
    text, no paths).
    """
    if isinstance(exc, ServeError):
        return exc.status, exc.message, dict(exc.headers)
    if isinstance(exc, InvalidImageError):
        return (415 if exc.unsupported else 400), exc.message, {}
    if isinstance(exc, DeployKitError):
        return 400, str(exc), {}
    if isinstance(exc, HTTPException):
        status = exc.code or 500
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}  # e.g. 405's Allow
        return status, _http_message(exc, status, req), headers
    log.exception("internal error on %s %s", req.method, req.path)
    return 500, INTERNAL_ERROR, {}


def _http_message(exc: HTTPException, status: int, req: Request) -> str:
    if status == 404:
        return "Not found: see GET /models for the models and /v2 for the Open Inference Protocol."
    if status == 405:
        allowed = ", ".join(sorted(m for m in (getattr(exc, "valid_methods", None) or []) if m != "OPTIONS"))
        return f"Method {req.method} is not allowed on {req.path}; use {allowed or 'another method'}."
    if status == 413:
        limit = req.max_content_length or 0
        length = req.content_length
        if length is not None and length <= limit and req.mimetype == "multipart/form-data":
            return f"The multipart form has more than {req.max_form_parts} parts."
        mb = f"{limit / 1048576:g}"
        return f"The request body is larger than the server's limit of {mb} MB (--max-body-mb)."
    return (exc.description or exc.name or "Error").strip().splitlines()[0]
