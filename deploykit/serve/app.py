"""The Flask app factory, ``create_app(config)``: every request goes through Flask.

Routing, the hooks (API key, metrics, CORS) and the one error boundary (:func:`~deploykit.serve.answers.
error_answer`) serve every route alike: the deploykit REST API (routes.py), the Open Inference Protocol
(v2.py), ``/metrics`` and the web page.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask, Response, current_app, g, request, send_from_directory
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.wrappers import Request

from deploykit.serve.answers import ServeError, error_answer, error_response
from deploykit.serve.config import ServeConfig
from deploykit.serve.metrics import CONTENT_TYPE, Metrics
from deploykit.serve.registry import EXTENSION, Registry

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Open without an API key: health for load balancers, metrics for Prometheus, the web page.
OPEN_ENDPOINTS = frozenset({"v2.live", "v2.ready", "metrics", "index", "static"})
CORS_ALLOW_HEADERS = "Authorization, X-API-Key, Content-Type, Inference-Header-Content-Length"
CORS_EXPOSE_HEADERS = "Inference-Header-Content-Length, Retry-After"
PLACEHOLDER_PAGE = (
    "<!doctype html><html><head><meta charset='utf-8'><title>deploykit</title></head>"
    "<body><h1>deploykit</h1><p>POST an image to <code>/predict</code>.</p></body></html>"
)


def create_app(config: ServeConfig) -> Flask:
    """Build the server app for ``config``: load the models (in the background when
    ``config.load_in_background``), register the deploykit REST API, the Open Inference Protocol, ``/metrics``
    and the web page."""
    from deploykit.serve import routes, v2

    app = Flask("deploykit.serve", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.config["MAX_FORM_MEMORY_SIZE"] = config.max_body_bytes
    metrics = Metrics()
    registry = Registry(config, metrics)
    app.extensions[EXTENSION] = registry  # the registry holds the config and the metrics too
    app.register_blueprint(routes.bp)
    app.register_blueprint(v2.bp)
    api_keys = [config.api_key.encode()] if config.api_key else []
    _install_hooks(app, registry, api_keys, frozenset(config.cors_origins))

    @app.errorhandler(Exception)
    def _error(exc: Exception) -> Response:
        status, message, headers = error_answer(exc, request)
        return error_response(message, status, headers)

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
        return Response(metrics.render(), mimetype=None, content_type=CONTENT_TYPE)

    registry.load(background=config.load_in_background)
    return app


def check_api_key(req: Request, keys: list[bytes]) -> None:
    """Raise a 401 ``ServeError`` unless ``req`` presents one of ``keys`` (compared in constant time:
    ``compare_digest`` on every configured key)."""
    headers = req.headers
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        given: str | None = auth[7:].strip()
    else:
        key = headers.get("X-API-Key")
        given = key.strip() if key is not None else None
    if given is None or not any(hmac.compare_digest(given.encode(), key) for key in keys):
        what = "Missing" if given is None else "Invalid"
        raise ServeError(
            f"{what} API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.",
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="deploykit"'},
        )


def cors_headers(origin: str | None, allowed: frozenset[str]) -> dict[str, str]:
    """The CORS headers of an answer to ``origin`` (none unless ``--cors-origin`` allows it)."""
    if not origin or not allowed or ("*" not in allowed and origin not in allowed):
        return {}
    return {
        "Access-Control-Allow-Origin": "*" if "*" in allowed else origin,
        "Vary": "Origin",
        "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Expose-Headers": CORS_EXPOSE_HEADERS,
    }


def _install_hooks(app: Flask, registry: Registry, api_keys: list[bytes], cors: frozenset[str]) -> None:
    metrics = registry.metrics

    @app.before_request
    def _start() -> None:
        g.start = time.perf_counter()
        metrics.in_flight.inc()
        if api_keys and request.endpoint not in OPEN_ENDPOINTS and request.method != "OPTIONS":
            check_api_key(request, api_keys)

    @app.after_request
    def _finish(response: Response) -> Response:
        url_rule: Any = request.url_rule
        view_args: Mapping[str, Any] | None = request.view_args
        if url_rule is None and isinstance(request.routing_exception, MethodNotAllowed):
            url_rule, view_args = _rule_of_any_method(request.routing_exception)
        rule = url_rule.rule if url_rule is not None else "unmatched"
        name = (view_args or {}).get("name")
        if name is None and url_rule is not None and url_rule.endpoint == "rest.predict":
            name = registry.default.name
        model = name if name in registry.entries else ""
        start = g.get("start")
        elapsed = time.perf_counter() - start if start is not None else None
        metrics.observe_request(model, rule, request.method, response.status_code, elapsed)
        if cors:
            response.headers.update(cors_headers(request.headers.get("Origin"), cors))
        return response

    @app.teardown_request
    def _end(_exc: BaseException | None) -> None:
        if g.get("start") is not None:
            metrics.in_flight.dec()


def _rule_of_any_method(exc: MethodNotAllowed) -> tuple[Any, Mapping[str, Any] | None]:
    """The rule (and its path parameters) that the request's path matches with another method, for a 405's
    metrics: the route it was sent to, not "unmatched"."""
    adapter = current_app.url_map.bind_to_environ(request.environ)
    for method in exc.valid_methods or ():
        try:
            return adapter.match(method=method, return_rule=True)
        except HTTPException:
            continue
    return None, None
