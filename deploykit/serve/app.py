"""The Flask app factory: ``create_app(config)``.

Error boundary: known HTTP errors are re-raised as JSON ``{"error": ...}``, user errors answer 4xx, anything
else is logged with its traceback and answered with a generic JSON 500 (no exception text, no paths).
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flask import Flask, Response, current_app, request, send_from_directory
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.wrappers import Response as WerkzeugResponse

from deploykit.errors import DeployKitError
from deploykit.images import InvalidImageError
from deploykit.serve.batching import ServeError
from deploykit.serve.config import ServeConfig
from deploykit.serve.metrics import Metrics
from deploykit.serve.registry import Registry

log = logging.getLogger("deploykit.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
EXTENSION = "deploykit"
START_KEY = "deploykit.start"  # WSGI environ key: perf_counter() when the request reached the app
# Open without an API key: health for load balancers, metrics for Prometheus, the web page.
OPEN_ENDPOINTS = frozenset({"v2.live", "v2.ready", "metrics", "index", "static"})
PLACEHOLDER_PAGE = (
    "<!doctype html><html><head><meta charset='utf-8'><title>deploykit</title></head>"
    "<body><h1>deploykit</h1><p>POST an image to <code>/predict</code>.</p></body></html>"
)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer without Flask's jsonify overhead (no pretty-printing, no sorting)."""
    return Response(
        json.dumps(data, separators=(",", ":")), status=status, headers=headers, mimetype="application/json"
    )


def error_response(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message}, status, headers)


def read_body(*, cache: bool = False) -> bytes:
    """The request body; 413 when it is over ``--max-body-mb``.

    A declared Content-Length over the limit is refused before anything is read. Werkzeug stops a chunked
    body at the limit without an error; a body that reached the limit is refused here instead of being used
    cut short (so a chunked body of exactly the limit is refused too: what follows it cannot be told apart).
    """
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    length = request.content_length
    environ = request.environ
    if length is not None and environ.get("wsgi.input_terminated"):
        # The server (gunicorn) ends the input at Content-Length: read it in one call. Werkzeug's stream
        # would read it in 64 kB steps, copying each step three times. The input is then replaced by the
        # bytes read, so that Werkzeug's own parsers (the multipart fallback) can still read the body.
        if limit is not None and length > limit:
            raise RequestEntityTooLarge()
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        return body
    body = request.get_data(cache=cache, parse_form_data=False)
    if limit is not None and length is None and len(body) >= limit:
        raise RequestEntityTooLarge()
    return body


def registry_of(app: Flask) -> Registry:
    registry: Registry = app.extensions[EXTENSION]
    return registry


def create_app(config: ServeConfig) -> Flask:
    """Build the server app for ``config``: load the models (in the background when
    ``config.load_in_background``), register the deploykit REST API, the Open Inference Protocol, ``/metrics``
    and the web page."""
    app = Flask("deploykit.serve", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.config["MAX_FORM_MEMORY_SIZE"] = config.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    metrics = Metrics()
    registry = Registry(config, metrics)
    app.extensions[EXTENSION] = registry
    app.extensions["deploykit.config"] = config
    app.extensions["deploykit.metrics"] = metrics

    from deploykit.serve.routes import bp as rest
    from deploykit.serve.v2 import bp as v2

    app.register_blueprint(rest)
    app.register_blueprint(v2)
    _install_hooks(app, config, metrics, registry)
    _install_error_handlers(app)

    @app.get("/")
    def index() -> Response:
        if (STATIC_DIR / "index.html").is_file():
            return send_from_directory(STATIC_DIR, "index.html", max_age=0)
        return Response(PLACEHOLDER_PAGE, mimetype="text/html")

    @app.get("/static/<path:filename>")
    def static(filename: str) -> Response:
        return send_from_directory(STATIC_DIR, filename)

    @app.get("/metrics", endpoint="metrics")
    def metrics_view() -> Response:
        from deploykit.serve.metrics import CONTENT_TYPE

        return Response(metrics.render(), mimetype=None, content_type=CONTENT_TYPE)

    registry.load(background=config.load_in_background)
    return app


class _InFlight:
    """WSGI middleware around the Flask app: counts the requests in flight and stamps each with its start
    time (``START_KEY`` in the environ) for the latency histogram. Cheaper than a pair of Flask hooks."""

    def __init__(self, wsgi_app: Callable[..., Iterable[bytes]], metrics: Metrics) -> None:
        self.wsgi_app = wsgi_app
        self.metrics = metrics

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ[START_KEY] = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            return self.wsgi_app(environ, start_response)
        finally:
            self.metrics.in_flight.dec()


def _install_hooks(app: Flask, config: ServeConfig, metrics: Metrics, registry: Registry) -> None:
    api_keys = [config.api_key.encode()] if config.api_key else []
    cors = set(config.cors_origins)
    app.wsgi_app = _InFlight(app.wsgi_app, metrics)  # type: ignore[method-assign]

    if api_keys:

        @app.before_request
        def _authorize() -> Response | None:
            if request.endpoint in OPEN_ENDPOINTS or request.method == "OPTIONS":
                return None
            given = _presented_key()
            # compare_digest on every configured key: constant time in the key's content
            if given is None or not any(hmac.compare_digest(given.encode(), key) for key in api_keys):
                what = "Missing" if given is None else "Invalid"
                return error_response(
                    f"{what} API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.",
                    401,
                    {"WWW-Authenticate": 'Bearer realm="deploykit"'},
                )
            return None

    @app.after_request
    def _finish(response: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        name = (request.view_args or {}).get("name")
        if name is None and request.endpoint == "rest.predict":
            name = registry.default.name
        model = name if name in registry.entries else ""
        start = request.environ.get(START_KEY)
        elapsed = time.perf_counter() - start if start is not None else None
        metrics.observe_request(model, rule, request.method, response.status_code, elapsed)
        if cors:
            origin = request.headers.get("Origin")
            if origin and ("*" in cors or origin in cors):
                response.headers["Access-Control-Allow-Origin"] = "*" if "*" in cors else origin
                response.headers["Vary"] = "Origin"
                response.headers["Access-Control-Allow-Headers"] = (
                    "Authorization, X-API-Key, Content-Type, Inference-Header-Content-Length"
                )
                response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
                response.headers["Access-Control-Expose-Headers"] = (
                    "Inference-Header-Content-Length, Retry-After"
                )
        return response


def _presented_key() -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    key = request.headers.get("X-API-Key")
    return key.strip() if key is not None else None


def _install_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> WerkzeugResponse:
        response = exc.get_response()
        status = exc.code or 500
        message = (
            _HTTP_MESSAGES.get(status) or (exc.description or exc.name or "Error").strip().splitlines()[0]
        )
        if status == 405:
            allowed = ", ".join(
                sorted(m for m in (getattr(exc, "valid_methods", None) or []) if m != "OPTIONS")
            )
            use = allowed or "another method"
            message = f"Method {request.method} is not allowed on {request.path}; use {use}."
        if status == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH") or 0
            length = request.content_length
            if length is not None and length <= limit and request.mimetype == "multipart/form-data":
                message = f"The multipart form has more than {request.max_form_parts} parts."
            else:
                message = (
                    f"The request body is larger than the server's limit of {limit / 1048576:g} MB "
                    "(--max-body-mb)."
                )
        response.set_data(json.dumps({"error": message}))
        response.content_type = "application/json"
        return response

    @app.errorhandler(ServeError)
    def _serve(exc: ServeError) -> Response:
        return error_response(exc.message, exc.status, exc.headers)

    @app.errorhandler(InvalidImageError)
    def _image(exc: InvalidImageError) -> Response:
        return error_response(exc.message, 415 if exc.unsupported else 400)

    @app.errorhandler(DeployKitError)
    def _user(exc: DeployKitError) -> Response:
        return error_response(str(exc), 400)

    @app.errorhandler(Exception)
    def _bug(exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response("Internal server error; the server log has the details.", 500)


_HTTP_MESSAGES = {
    404: "Not found: see GET /models for the models and /v2 for the Open Inference Protocol.",
}
