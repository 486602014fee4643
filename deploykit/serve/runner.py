"""Run the app: gunicorn (gthread workers) in production, Flask's development server with ``--dev``.

Models are loaded in each worker after the fork (ONNX Runtime sessions and threads do not survive a fork),
never in the master. On SIGTERM the master closes the listening socket and tells the workers to stop; each
worker reports not-ready at once, finishes the requests it accepted (bounded by ``graceful_timeout``) and
exits, and the master exits 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from deploykit.serve.config import ServeConfig

log = logging.getLogger("deploykit.serve")

#: How long a handler thread that has just answered on a kept-alive connection waits there for the client's
#: next request (while other handler threads are free), instead of handing the connection back to the
#: worker's poller at once. A client that posts back to back then skips two thread hand-offs per request
#: (about 0.2 ms at one client; docs/benchmarks.md).
KEEPALIVE_LINGER_MS = 2.0

_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    408: "Request Timeout",
    414: "URI Too Long",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
}


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s",
    )


def run_server(config: ServeConfig, *, announce: Callable[[str], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code (0 after a graceful stop).

    ``announce`` receives the "Serving ... on http://..." line once the model files are checked.
    Raises ``ModelFileError`` before binding when a file is not an ONNX model with a card.
    """
    configure_logging(config.log_level)
    check_models(config)
    if announce is not None:
        host = f"[{config.host}]" if ":" in config.host else config.host
        names = ", ".join(m.name for m in config.models)
        announce(f"Serving {names} on http://{host}:{config.port}")
    if config.dev:
        return _run_dev(config)
    return _run_gunicorn(config)


def check_models(config: ServeConfig) -> None:
    """Fail fast, before binding, on a file that is not an ONNX model with a deploykit card, or a provider
    that this onnxruntime does not have.

    The cards are read in a short-lived forked child: parsing a large protobuf in the master would leave
    its memory in the master's heap, and every worker forked from it would carry that copy.
    """
    from deploykit.errors import DeployKitError, ExitCode, ModelFileError

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the first problem, if any, and leave without running atexit handlers
        os.close(read_fd)
        message = b""
        try:
            from deploykit.card import read_card
            from deploykit.runtime import resolve_providers

            resolve_providers(config.providers)
            for spec in config.models:
                read_card(spec.path)
        except DeployKitError as exc:
            message = f"{int(exc.exit_code)} {exc}".encode()
        except BaseException as exc:  # report, never let the child continue into the server
            message = f"1 Cannot read the model card: {type(exc).__name__}: {exc}".encode()
        os.write(write_fd, message)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    if message:
        code, _, text = message.decode(errors="replace").partition(" ")
        error = ModelFileError(text)
        error.exit_code = ExitCode(int(code))  # keep the child's exit code (2 for a usage error)
        raise error


def _run_dev(config: ServeConfig) -> int:
    from deploykit.serve.app import create_app, registry_of

    app = create_app(config.replace(load_in_background=True))

    def _stop(_sig: int, _frame: Any) -> None:
        registry_of(app).draining = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        app.run(host=config.host, port=config.port, threaded=True, use_reloader=False)
    except KeyboardInterrupt:
        pass
    finally:
        registry_of(app).close()
    return 0


def worker_class() -> type:
    from gunicorn.workers.gthread import ThreadWorker

    class DeployKitWorker(ThreadWorker):
        """gthread worker that reports not-ready as soon as it is told to stop, answers a client's next
        request on a kept-alive connection in the same thread when it comes at once (see
        ``KEEPALIVE_LINGER_MS``), and answers its own errors in JSON."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._handling = 0
            self._handling_lock = threading.Lock()

        def handle(self, conn: Any) -> Any:
            with self._handling_lock:
                self._handling += 1
            try:
                result = super().handle(conn)
                while result is True and self._next_request_here(conn):
                    result = super().handle(conn)
                return result
            finally:
                with self._handling_lock:
                    self._handling -= 1

        def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
            """Answer an error that gunicorn met outside the app (a malformed request line or header, headers
            over its limits...) in JSON with gunicorn's status, instead of gunicorn's HTML page."""
            status, message = _error_answer(exc, self.cfg)
            ip = addr[0] if addr else ""
            if status == 500:  # 501 (an unknown transfer coding) is the client's
                self.log.exception("Error handling request from %s", ip)
            else:
                self.log.warning("Invalid request from ip=%s: %s", ip, message)
            _write_json_error(client, status, message)

        def _next_request_here(self, conn: Any) -> bool:
            """Whether the next request on this kept-alive connection is already here or arrives within
            ``KEEPALIVE_LINGER_MS``, and this thread may answer it. It never lingers while stopping, on TLS or
            HTTP/2, or when no other handler thread is free (the connection then goes back to the poller)."""
            if not self.alive or conn.is_http2 or self.cfg.is_ssl or self._handling >= self.cfg.threads:
                return False
            if conn.parser.unreader.buf.getvalue():  # pipelined: the next request was read with this one
                return True
            poller = select.poll()
            poller.register(conn.sock, select.POLLIN)
            return bool(poller.poll(KEEPALIVE_LINGER_MS))

        def handle_exit(self, sig: int, frame: Any) -> None:
            registry = getattr(self.wsgi, "extensions", {}).get("deploykit")
            if registry is not None:
                registry.draining = True
            super().handle_exit(sig, frame)

        def set_accept_enabled(self, enabled: bool) -> None:
            super().set_accept_enabled(enabled)
            if not enabled and not self.alive:
                # Stopping: close our copies of the listening sockets now (the master closed its own), so
                # that new connections are refused at once instead of waiting in the backlog until we exit.
                for listener in self.sockets:
                    listener.close()

    return DeployKitWorker


def _write_json_error(sock: socket.socket, status: int, message: str) -> None:
    body = json.dumps({"error": message}, separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with contextlib.suppress(OSError):  # the client is gone or reads nothing: the connection closes anyway
        sock.sendall(head.encode("latin-1") + body, socket.MSG_DONTWAIT)


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_answer(exc: BaseException, cfg: Any) -> tuple[int, str]:
    """The status (gunicorn's) and a one-line message for an error that gunicorn met outside the app."""
    from gunicorn.http import errors

    if isinstance(
        exc, errors.InvalidResponseHeader | errors.InvalidResponseHeaderName | errors.ConfigurationProblem
    ):
        return 500, "Internal server error; the server log has the details."
    if isinstance(exc, errors.LimitRequestLine):
        return (
            414,
            f"The request line (method, path and query) is longer than {cfg.limit_request_line} bytes.",
        )
    if isinstance(exc, errors.LimitRequestHeaders):
        return 431, (
            f"The request headers are too large: at most {cfg.limit_request_fields} headers of up to "
            f"{cfg.limit_request_field_size} bytes each."
        )
    if isinstance(exc, errors.UnsupportedTransferCoding):
        return 501, f"{_clip(str(exc))}; only 'chunked' is supported."
    if isinstance(exc, errors.ExpectationFailed):
        return 417, f"{_clip(str(exc))}; only 'Expect: 100-continue' is supported."
    if isinstance(exc, errors.ForbiddenProxyRequest):
        return 403, "Proxy requests from this address are not allowed."
    if isinstance(
        exc, errors.InvalidChunkSize | errors.ChunkMissingTerminator | errors.InvalidChunkExtension
    ):
        return 400, f"The chunked request body is malformed: {_clip(str(exc))}."
    if isinstance(exc, errors.ParseException):
        return 400, f"The request is not valid HTTP/1.1: {_clip(str(exc))}."
    return 500, "Internal server error; the server log has the details."


def _run_gunicorn(config: ServeConfig) -> int:
    from gunicorn.app.base import BaseApplication

    multiproc_dir: str | None = None
    if config.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # must be set before any worker imports prometheus_client
        multiproc_dir = tempfile.mkdtemp(prefix="deploykit-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir

    def child_exit(_server: Any, worker: Any) -> None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.pid)

    def worker_exit(_server: Any, worker: Any) -> None:
        registry = getattr(worker.wsgi, "extensions", {}).get("deploykit")
        if registry is not None:
            registry.close()

    options: dict[str, Any] = {
        "bind": f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}",
        "workers": config.workers,
        "threads": config.threads,
        "worker_class": worker_class(),
        "graceful_timeout": math.ceil(config.graceful_timeout),
        # the heartbeat timeout must outlast model loading and the longest request
        "timeout": max(120, int(config.request_timeout * 2)),
        "keepalive": 5,
        "loglevel": config.log_level,
        "accesslog": None,
        "errorlog": "-",
        "preload_app": False,
        "proc_name": "deploykit-serve",
        "child_exit": child_exit,
        "worker_exit": worker_exit,
        "limit_request_line": 8190,
        "control_socket_disable": True,  # gunicorn 23+ would share one socket in $HOME between servers
    }

    class Application(BaseApplication):
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            # runs in each worker after the fork: models load here, never in the master
            from deploykit.serve.app import create_app

            configure_logging(config.log_level)
            # One worker loads in the background, so that liveness answers during a long load. With several,
            # each loads before it accepts a connection: the others keep serving, and no request or
            # readiness probe lands on a worker that is still loading (at start-up or after a restart).
            return create_app(config.replace(load_in_background=config.workers == 1))

    try:
        Application().run()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        if multiproc_dir:
            shutil.rmtree(multiproc_dir, ignore_errors=True)
    return 0
