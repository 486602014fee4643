"""The Flask app factory: ``create_app(config)``, and what every route shares.

The routes that run at request rate are answered as plain WSGI in front of Flask (:class:`_Front`):
``POST /predict``, ``POST /models/<name>/predict`` and the Open Inference Protocol's
``POST /v2/models/<name>[/versions/<v>]/infer`` (``HOT_ROUTES`` of routes.py and v2.py). Flask's request
context, routing and response objects cost a quarter to half a millisecond per request when they run with
caches that an inference has just emptied (docs/benchmarks.md). Their URL rules stay in Flask, without a
view, so that other methods get Flask's 405 and CORS preflights their OPTIONS answer. Both kinds of route
share one error boundary (:func:`error_answer`), the API key check, CORS headers and the request metrics.

Error boundary: HTTP errors answer as JSON ``{"error": ...}``, user errors answer 4xx, anything else is
logged with its traceback and answered with a generic JSON 500 (no exception text, no paths).
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request, send_from_directory
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wrappers import Request

from deploykit.errors import DeployKitError
from deploykit.images import InvalidImageError
from deploykit.jsontext import finite
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
INTERNAL_ERROR = "Internal server error; the server log has the details."
CORS_ALLOW_HEADERS = "Authorization, X-API-Key, Content-Type, Inference-Header-Content-Length"
CORS_EXPOSE_HEADERS = "Inference-Header-Content-Length, Retry-After"
PLACEHOLDER_PAGE = (
    "<!doctype html><html><head><meta charset='utf-8'><title>deploykit</title></head>"
    "<body><h1>deploykit</h1><p>POST an image to <code>/predict</code>.</p></body></html>"
)


def json_bytes(data: Any) -> bytes:
    """Compact JSON (no pretty-printing, no sorting), as every answer of the server is written. Numbers that
    are not finite (NaN, infinities: JSON has none) are written as null."""
    try:
        return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        return json.dumps(finite(data), separators=(",", ":")).encode()


def clip(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters: an error answer never echoes a huge input back whole."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON answer without Flask's jsonify overhead."""
    return Response(json_bytes(data), status=status, headers=headers, mimetype="application/json")


def error_response(message: str, status: int, headers: Mapping[str, str] | None = None) -> Response:
    return json_response({"error": message}, status, headers)


def read_body(req: Request, *, cache: bool = False) -> bytes:
    """The request body; 413 when it is over ``--max-body-mb`` (``req.max_content_length``).

    ``req`` is Flask's request or a hot route's plain Werkzeug request. A declared Content-Length over the
    limit is refused before anything is read. Werkzeug stops a chunked body at the limit without an error; a
    body that reached the limit is refused here instead of being used cut short (so a chunked body of exactly
    the limit is refused too: what follows it cannot be told apart).
    """
    limit = req.max_content_length
    length = req.content_length
    environ = req.environ
    if length is not None and environ.get("wsgi.input_terminated"):
        # The server (gunicorn) ends the input at Content-Length: read it in one call. Werkzeug's stream
        # would read it in 64 kB steps, copying each step three times. The input is then replaced by the
        # bytes read, so that Werkzeug's own parsers (the multipart fallback) can still read the body.
        if limit is not None and length > limit:
            raise RequestEntityTooLarge()
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        return body
    body = req.get_data(cache=cache, parse_form_data=False)  # chunked: gunicorn's errors answer 400
    if limit is not None and length is None and len(body) >= limit:
        raise RequestEntityTooLarge()
    return body


def drain_body(environ: dict[str, Any], limit: int) -> None:
    """Read and drop what the app left unread of the request body, up to ``limit`` bytes, so that the client's
    kept-alive connection stays usable after an answer given before the body was read (401, 404, 503...).

    gunicorn itself drains at most 64 kB and then closes the connection, after an answer that promised
    keep-alive; V2 clients (tritonclient, KServe's) then fail on their next request. A declared body over the
    limit is not read (the 413 answer closes the connection). Only under gunicorn (``wsgi.input_terminated``):
    Werkzeug's development server closes a connection whose body was not read.
    """
    if not environ.get("wsgi.input_terminated"):
        return
    length = environ.get("CONTENT_LENGTH")
    if not length and "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return
    if length and length.isdigit() and int(length) > limit:
        return
    stream = environ["wsgi.input"]
    total = 0
    try:
        while total <= limit:
            chunk = stream.read(65536)
            if not chunk:
                return
            total += len(chunk)
    except Exception:  # noqa: BLE001 - a broken body: gunicorn closes the connection after the answer
        return


def check_api_key(req: Request, keys: list[bytes]) -> None:
    """Raise a 401 ``ServeError`` unless ``req`` presents one of ``keys`` (compared in constant time in the
    key's content: ``compare_digest`` on every configured key)."""
    auth = req.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        given: str | None = auth[7:].strip()
    else:
        key = req.headers.get("X-API-Key")
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


def error_answer(exc: Exception, req: Request) -> tuple[int, str, dict[str, str]]:
    """The status, message and headers that answer ``exc``: the one error boundary of every route.

    An unexpected exception is logged with its traceback and answered with a generic 500.
    """
    if isinstance(exc, ServeError):
        return exc.status, exc.message, dict(exc.headers)
    if isinstance(exc, InvalidImageError):
        return (415 if exc.unsupported else 400), exc.message, {}
    if isinstance(exc, DeployKitError):
        return 400, str(exc), {}
    if isinstance(exc, TimeoutError):  # --dev: Werkzeug's socket timeout (gunicorn's worker raises a 408)
        return 408, "The request body stalled past the server's --client-timeout.", {}
    if _malformed_http(exc):
        return 400, f"The request is malformed: {clip(str(exc))}.", {}
    if isinstance(exc, HTTPException):
        status = exc.code or 500
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}  # e.g. 405's Allow
        return status, _http_message(exc, status, req), headers
    log.exception("internal error on %s %s", req.method, req.path)
    return 500, INTERNAL_ERROR, {}


def _malformed_http(exc: Exception) -> bool:
    """Whether ``exc`` is gunicorn's error for a malformed request, raised while the app reads the body (a bad
    chunk size, a bad trailer). Looked up without importing gunicorn: the dev server has no such errors."""
    errors = sys.modules.get("gunicorn.http.errors")
    return errors is not None and isinstance(exc, errors.ParseException)


def _http_message(exc: HTTPException, status: int, req: Request) -> str:
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
    return _HTTP_MESSAGES.get(status) or (exc.description or exc.name or "Error").strip().splitlines()[0]


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
    app.extensions[EXTENSION] = registry  # the registry holds the config and the metrics too

    from deploykit.serve import routes, v2

    app.register_blueprint(routes.bp)
    app.register_blueprint(v2.bp)
    api_keys = [config.api_key.encode()] if config.api_key else []
    cors = frozenset(config.cors_origins)
    _install_hooks(app, registry, api_keys, cors)
    _install_error_handlers(app)
    hot = [*routes.HOT_ROUTES, *v2.HOT_ROUTES]
    front = _Front(app.wsgi_app, registry, hot, api_keys=api_keys, cors=cors, limit=config.max_body_bytes)
    app.wsgi_app = front  # type: ignore[method-assign]

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


@dataclass(frozen=True)
class Answer:
    """A hot route's 200 answer."""

    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


#: A hot route's handler: ``handler(request, registry, **path_parameters)`` -> its 200 answer. It raises for
#: anything else; :func:`error_answer` answers that.
HotHandler = Callable[..., Answer]
#: (path pattern, whose named groups are the path parameters, ``name`` for a model; the rule as Flask
#: writes it, for the metrics; handler)
HotRoute = tuple["re.Pattern[str]", str, HotHandler]


def hot_route(bp: Blueprint, rule: str, endpoint: str, handler: HotHandler) -> HotRoute:
    """Make ``rule`` (Flask's syntax, ``<param>`` segments) of ``bp`` a hot route answered by ``handler``.

    Its POSTs are answered by :class:`_Front` in front of Flask. The rule is registered in Flask too, so that
    Flask answers its other methods (405, and ``OPTIONS`` for CORS preflights), with a view that runs the same
    handler: a path that Flask matches and the hot route does not (``//predict``, Flask merges slashes) gets
    the same answer, through Flask's hooks and error boundary.
    """
    _HOT_HANDLERS[f"{bp.name}.{endpoint}"] = handler
    bp.add_url_rule(rule, endpoint=endpoint, view_func=_hot_view, methods=["POST"])
    full = (bp.url_prefix or "") + rule
    parts = re.split(r"<(\w+)>", full)  # literal, parameter, literal, ...
    pattern = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)" for i, p in enumerate(parts))
    return re.compile(pattern), full, handler


_HOT_HANDLERS: dict[str, HotHandler] = {}  # Flask endpoint -> hot handler


def _hot_view(**params: str) -> Response:
    """The Flask view of every hot route (see :func:`hot_route`)."""
    handler = _HOT_HANDLERS[request.endpoint or ""]
    answer = handler(request, registry_of(current_app), **params)
    return Response(answer.body, headers=dict(answer.headers), content_type=answer.content_type)


class _Front:
    """WSGI middleware around the Flask app: stamps each request with its start time (``START_KEY`` in the
    environ, for the latency histogram), counts the requests in flight, and answers a POST to a hot route
    itself, with the same API key check, error boundary, CORS headers and metrics as the Flask routes."""

    def __init__(
        self,
        wsgi_app: Callable[..., Iterable[bytes]],
        registry: Registry,
        routes: list[HotRoute],
        *,
        api_keys: list[bytes],
        cors: frozenset[str],
        limit: int,
    ) -> None:
        self.wsgi_app = wsgi_app
        self.metrics = registry.metrics
        self.registry = registry
        self.routes = routes
        self.api_keys = api_keys
        self.cors = cors
        self.limit = limit

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ[START_KEY] = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            if environ["REQUEST_METHOD"] == "POST":
                path = environ.get("PATH_INFO", "")
                for pattern, rule, handler in self.routes:
                    match = pattern.fullmatch(path)
                    if match is not None:
                        # WSGI's latin-1 text of the path's UTF-8 bytes, decoded as Werkzeug does
                        params = {
                            k: v.encode("latin-1").decode(errors="replace")
                            for k, v in match.groupdict().items()
                            if v is not None
                        }
                        return self._answer(environ, start_response, rule, handler, params)
            if environ.get("CONTENT_LENGTH") or environ.get("HTTP_TRANSFER_ENCODING"):
                start_response = self._draining(environ, start_response)
            return self.wsgi_app(environ, start_response)
        finally:
            self.metrics.in_flight.dec()

    def _answer(
        self,
        environ: dict[str, Any],
        start_response: Callable[..., Any],
        rule: str,
        handler: HotHandler,
        params: dict[str, str],
    ) -> list[bytes]:
        req = Request(environ)
        req.max_content_length = req.max_form_memory_size = self.limit
        try:
            if self.api_keys:
                check_api_key(req, self.api_keys)
            answer = handler(req, self.registry, **params)
            status = 200
        except Exception as exc:
            status, message, headers = error_answer(exc, req)
            answer = Answer(json_bytes({"error": message}), headers=headers)
            drain_body(environ, self.limit)
        registry = self.registry
        name = params.get("name")
        model = registry.default.name if name is None else name if name in registry.entries else ""
        self.metrics.observe_request(model, rule, "POST", status, time.perf_counter() - environ[START_KEY])
        body = answer.body
        start_response(
            f"{status} {HTTP_STATUS_CODES.get(status, 'Unknown')}",
            [
                ("Content-Type", answer.content_type),
                ("Content-Length", str(len(body))),
                *answer.headers.items(),
                *cors_headers(environ.get("HTTP_ORIGIN"), self.cors).items(),
            ],
        )
        return [body]

    def _draining(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Callable[..., Any]:
        """``start_response`` that first drains what the Flask route left of the body (:func:`drain_body`)."""

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            drain_body(environ, self.limit)
            return start_response(status, headers, exc_info)

        return start


def _install_hooks(app: Flask, registry: Registry, api_keys: list[bytes], cors: frozenset[str]) -> None:
    metrics = registry.metrics
    if api_keys:

        @app.before_request
        def _authorize() -> None:
            if request.endpoint not in OPEN_ENDPOINTS and request.method != "OPTIONS":
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
        start = request.environ.get(START_KEY)
        elapsed = time.perf_counter() - start if start is not None else None
        metrics.observe_request(model, rule, request.method, response.status_code, elapsed)
        if cors:
            response.headers.update(cors_headers(request.headers.get("Origin"), cors))
        return response


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


def _install_error_handlers(app: Flask) -> None:
    @app.errorhandler(Exception)
    def _error(exc: Exception) -> Response:
        status, message, headers = error_answer(exc, request)
        return error_response(message, status, headers)


_HTTP_MESSAGES = {
    404: "Not found: see GET /models for the models and /v2 for the Open Inference Protocol.",
}
