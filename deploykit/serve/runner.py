"""Run the app: gunicorn (gthread workers) in production, Flask's development server with ``--dev``.

Models are loaded in each worker after the fork (ONNX Runtime sessions and threads do not survive a fork),
never in the master. On SIGTERM the master closes the listening socket and tells the workers to stop; each
worker reports not-ready at once, finishes the requests it accepted (bounded by ``graceful_timeout``) and
exits, and the master exits 0.

A slow client cannot hold a handler thread for long (``--client-timeout``): a request head (request line and
headers) is gathered without a thread, on the worker's poller, and must be complete within the timeout (else
408, or the connection is closed if it goes quiet); every blocking read or write in a handler thread (the
body, the answer) fails after the timeout without progress (408 while reading the body).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import select
import selectors
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from deploykit.serve.config import DEFAULT_CLIENT_TIMEOUT, ServeConfig

log = logging.getLogger("deploykit.serve")

#: How long a handler thread that has just answered on a kept-alive connection waits there for the client's
#: next request (while other handler threads are free), instead of handing the connection back to the
#: worker's poller at once. A client that posts back to back then skips two thread hand-offs per request
#: (about 0.2 ms at one client; docs/benchmarks.md).
KEEPALIVE_LINGER_MS = 2.0

#: Most bytes of an unfinished request head held for a connection while the rest arrives (a head that
#: has not ended by then is answered 431). Heads are gathered off-thread, so this bounds their memory.
MAX_PENDING_HEAD = 64 * 1024

#: How long a handler thread waits for the first bytes of a new connection's request before it hands the
#: connection to the worker's poller (gunicorn waits 5 s, so idle connections could hold every thread).
NEW_CONNECTION_WAIT_MS = 10.0

#: How long, and for how many bytes at most, a connection being closed reads what the client still sends
#: (as gunicorn's ``close_graceful``, but on the poller instead of blocking it).
LINGER_SECONDS = 2.0
LINGER_BYTES = 64 * 1024

#: Bytes asked for by each read of a request head (gunicorn's parser reads 8 KiB at a time too).
HEAD_READ = 8192


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
    check_address(config)
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


def check_address(config: ServeConfig) -> None:
    """Fail fast, before announcing the server, when its address cannot be listened on: the port is taken
    (gunicorn would retry for 5 s and exit without saying what to do) or the host is not this machine's."""
    from deploykit.errors import DeployKitError

    if config.port == 0:
        return
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            probe.bind((config.host, config.port))
        except OSError as exc:
            where = f"{config.host}:{config.port}"
            if exc.errno == errno.EADDRINUSE:
                raise DeployKitError(
                    f"Port {config.port} is already in use on {config.host}.",
                    hint="Stop the other server or choose another --port.",
                ) from None
            raise DeployKitError(
                f"Cannot listen on {where}: {exc.strerror or exc}.",
                hint="Give --host an address of this machine (127.0.0.1, or 0.0.0.0 for every interface).",
            ) from None


def _run_dev(config: ServeConfig) -> int:
    """Flask's development server, threaded. SIGTERM stops accepting, waits for the requests already accepted
    (bounded by ``graceful_timeout``) and returns 0; SIGINT (Ctrl-C) stops at once."""
    from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

    from deploykit.serve.app import create_app, registry_of

    app = create_app(config.replace(load_in_background=True))

    class Server(ThreadedWSGIServer):
        """Counts the connections that are busy: accepted and not yet answered, or with a request being
        read or answered. An idle kept-alive connection is not busy and does not delay a stop."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.busy = 0
            self.settled = threading.Condition()

        def count(self, delta: int) -> None:
            with self.settled:
                self.busy += delta
                if not self.busy:
                    self.settled.notify_all()

        def process_request(self, request: Any, client_address: Any) -> None:
            self.count(1)  # here, in the accepting thread: a stop cannot miss a connection just accepted
            super().process_request(request, client_address)

    class Handler(WSGIRequestHandler):
        timeout = config.client_timeout  # a client that stalls is dropped, not waited for at a stop
        server: Server
        busy = True  # counted by Server.process_request

        def parse_request(self) -> bool:  # a request line arrived on a kept-alive connection
            if not self.busy:
                self.busy = True
                self.server.count(1)
            return bool(super().parse_request())

        def handle_one_request(self) -> None:
            try:
                super().handle_one_request()
            finally:
                self._idle()

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                self._idle()

        def _idle(self) -> None:
            if self.busy:
                self.busy = False
                self.server.count(-1)

    server = Server(config.host, config.port, app, handler=Handler)
    stop = threading.Event()

    def _stop(_sig: int, _frame: Any) -> None:
        registry_of(app).draining = True
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    serving = threading.Thread(target=server.serve_forever, name="deploykit-dev-server", daemon=True)
    serving.start()
    try:
        stop.wait()
        server.shutdown()  # no new connections; the handler threads go on
        deadline = time.monotonic() + config.graceful_timeout
        with server.settled:
            while server.busy and (remaining := deadline - time.monotonic()) > 0:
                server.settled.wait(remaining)
    except KeyboardInterrupt:
        server.shutdown()
    finally:
        server.server_close()
        registry_of(app).close()
    return 0


def worker_class(client_timeout: float = DEFAULT_CLIENT_TIMEOUT) -> type:
    """The gunicorn worker class; ``client_timeout`` is ``ServeConfig.client_timeout``."""
    timeout = client_timeout  # a class body cannot read a name of the enclosing function that it assigns
    from gunicorn.http.unreader import SocketUnreader
    from gunicorn.workers.gthread import _DEFER, ThreadWorker
    from werkzeug.exceptions import RequestTimeout

    class DeployKitUnreader(SocketUnreader):
        """Reads a connection whose socket has ``SO_RCVTIMEO`` set: a read that times out (``EAGAIN`` on a
        blocking socket) becomes a 408 that the app answers like its other HTTP errors. After that the client
        counts as gone: later reads (the app draining the body before its answer) fail at once instead of
        waiting once more."""

        client_timeout = timeout
        timed_out = False

        def chunk(self, size_hint: int | None = None) -> bytes:
            if not self.timed_out:
                try:
                    data: bytes = super().chunk(size_hint)
                except BlockingIOError:
                    self.timed_out = True
                else:
                    return data
            raise RequestTimeout(
                f"The request body stalled: nothing arrived for {self.client_timeout:g} s "
                "(the server's --client-timeout)."
            )

    class DeployKitWorker(ThreadWorker):
        """gthread worker that reports not-ready as soon as it is told to stop, answers a client's next
        request on a kept-alive connection in the same thread when it comes at once (see
        ``KEEPALIVE_LINGER_MS``), gathers request heads without holding a thread and times out stalled
        clients (``--client-timeout``), and answers its own errors in JSON."""

        client_timeout = timeout

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._handling = 0
            self._handling_lock = threading.Lock()
            self._lingering: dict[socket.socket, tuple[float, int]] = {}  # socket: (deadline, bytes left)
            seconds = int(self.client_timeout)
            self._timeval = struct.pack("ll", seconds, int((self.client_timeout - seconds) * 1e6))
            self._plain = not self.cfg.is_ssl  # deploykit configures no TLS; checked once, not per request

        def handle(self, conn: Any) -> Any:
            with self._handling_lock:
                self._handling += 1
            try:
                result = self._serve(conn)
                while result is True and self._next_request_here(conn):
                    result = self._serve(conn)
                return result
            finally:
                with self._handling_lock:
                    self._handling -= 1

        def _serve(self, conn: Any) -> Any:
            if not self._plain or conn.is_http2:  # never configured by deploykit: gunicorn's own path
                return super().handle(conn)
            if not conn.initialized:
                try:
                    self._init_connection(conn)
                except OSError:  # the client is already gone
                    return False
            ready = self._read_head(conn)
            if ready is not True:
                return ready
            return super().handle(conn)

        def _init_connection(self, conn: Any) -> None:
            """Set up a new plain HTTP/1 connection: its parser reads through ``DeployKitUnreader``, and
            every blocking read or write on its socket gives up after ``client_timeout`` without progress
            (kernel timeouts: set once here, they cost nothing per request, and gunicorn's
            ``setblocking(True)`` before each request does not clear them as it clears ``settimeout``)."""
            conn.init()
            conn.parser.unreader = DeployKitUnreader(conn.sock)
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._timeval)
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._timeval)
            conn.head_deadline = None

        def _read_head(self, conn: Any) -> Any:
            """Gather the next request's head (request line and headers) into the parser's buffer.

            True when it is complete (or over gunicorn's limits, which the parser then reports) and the
            request can be parsed without waiting for the client; ``_DEFER`` to give the connection back to
            the poller until more arrives (no thread waits on a slow client); False when the connection is
            to be closed (the client left, or a 408 or 431 was answered). On a kept-alive connection the
            usual cost is the one ``recv`` that the parser would otherwise have made.
            """
            buffer = conn.parser.unreader.buf
            held = buffer.getvalue()
            if _head_complete(held):  # pipelined behind the previous request
                conn.head_deadline = None
                return True
            waited = conn.parser.req_count > 0  # only a new connection waits briefly for its first bytes
            while True:
                try:
                    data = conn.sock.recv(HEAD_READ, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    data = None
                except OSError:
                    return False
                if data == b"":  # the client closed the connection
                    return False
                if data:
                    buffer.seek(0, os.SEEK_END)
                    buffer.write(data)
                    held += data
                    if _head_complete(held):
                        conn.head_deadline = None
                        return True
                    if len(held) > MAX_PENDING_HEAD:
                        message = (
                            f"The request line and headers are over {MAX_PENDING_HEAD // 1024} KiB in all."
                        )
                        self._refuse(conn, 431, message)
                        return False
                    continue
                now = time.monotonic()
                if conn.head_deadline is None:
                    conn.head_deadline = now + self.client_timeout
                remaining = conn.head_deadline - now
                if remaining <= 0:
                    if held:
                        self._refuse(conn, 408, self._late_head_message())
                    return False
                if not waited:
                    waited = True
                    if _readable(conn.sock, NEW_CONNECTION_WAIT_MS):
                        continue
                if self.alive:
                    return _DEFER
                # stopping: the poller no longer takes connections back; wait here, bounded by the deadline
                _readable(conn.sock, remaining * 1000)

        def murder_pending(self) -> None:
            """Close the connections waiting on the poller for the rest of a request head that is overdue
            (``client_timeout``), or that went quiet for the keep-alive time (as gunicorn does); a client
            that sent part of a head is answered 408."""
            now = time.monotonic()
            for conn in [c for c in self.pending_conns if c.timeout <= now or _overdue(c, now)]:
                self.pending_conns.remove(conn)
                with contextlib.suppress(OSError, KeyError, ValueError):
                    self.poller.unregister(conn.sock)
                self.nr_conns -= 1
                if conn.parser is not None and conn.parser.unreader.buf.getvalue():
                    if _overdue(conn, now):
                        self._refuse(conn, 408, self._late_head_message())
                    else:
                        quiet = f"nothing more arrived for {self.cfg.keepalive:g} s"
                        self._refuse(conn, 408, f"The request line and headers stalled: {quiet}.")
                self._close_lingering(conn.sock)

        def finish_request(self, conn: Any, fs: Any) -> None:
            """As gunicorn's, except that a connection to close lingers on the poller (see
            ``_close_lingering``): gunicorn lingers in this thread, the worker's only poller, for up to 2 s
            per connection, during which no other connection is accepted or served, so that a few clients
            that never close their end after a ``Connection: close`` answer stalled the whole worker."""
            if not fs.cancelled() and fs.exception() is None and fs.result() is False:
                self.nr_conns -= 1
                self._close_lingering(conn.sock)
                return
            super().finish_request(conn, fs)

        def _close_lingering(self, sock: socket.socket) -> None:
            """Close ``sock`` after its answer as RFC 9112 section 9.6 asks, without blocking: send FIN, then
            discard what the client still sends until it closes too, ``LINGER_BYTES`` have come or
            ``LINGER_SECONDS`` have passed (closing with unread data would send a reset, which can destroy
            the answer before the client reads it)."""
            try:
                sock.shutdown(socket.SHUT_WR)
                sock.setblocking(False)
                self.poller.register(sock, selectors.EVENT_READ, self._drain_lingering)
            except (OSError, ValueError, KeyError):
                sock.close()
                return
            self._lingering[sock] = (time.monotonic() + LINGER_SECONDS, LINGER_BYTES)

        def _drain_lingering(self, sock: socket.socket) -> None:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:  # reset by the client
                data = b""
            left = self._lingering[sock][1] - len(data)
            if data and left > 0:
                self._lingering[sock] = (self._lingering[sock][0], left)
            else:
                self._end_lingering(sock)

        def _end_lingering(self, sock: socket.socket) -> None:
            del self._lingering[sock]
            with contextlib.suppress(OSError, KeyError, ValueError):
                self.poller.unregister(sock)
            sock.close()

        def murder_keepalived(self, force: bool = False) -> None:
            super().murder_keepalived(force)
            if self._lingering:
                now = time.monotonic()
                for sock in [
                    s for s, (deadline, _left) in self._lingering.items() if force or deadline <= now
                ]:
                    self._end_lingering(sock)

        def _late_head_message(self) -> str:
            return (
                f"The request line and headers did not arrive within {self.client_timeout:g} s "
                "(the server's --client-timeout)."
            )

        def _refuse(self, conn: Any, status: int, message: str) -> None:
            self.log.info("Closing the connection from %s: %s %s", conn.client[0], status, message)
            _write_json_error(conn.sock, status, message)

        def handle_request(self, req: Any, conn: Any) -> Any:
            _close_if_body_fails(req)
            try:
                return super().handle_request(req, conn)
            except BlockingIOError:  # SO_SNDTIMEO: the client has read nothing of the answer for that long
                self.log.info(
                    "Closing the connection from %s: it read nothing of the answer for %g s",
                    conn.client[0],
                    self.client_timeout,
                )
                return False

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
            if not self.alive or conn.is_http2 or not self._plain or self._handling >= self.cfg.threads:
                return False
            if conn.parser.unreader.buf.getvalue():  # pipelined: the next request was read with this one
                return True
            return _readable(conn.sock, KEEPALIVE_LINGER_MS)

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


def _close_if_body_fails(req: Any) -> None:
    """Make a failed read of ``req``'s body (a stall past ``--client-timeout``, a malformed chunk) close the
    connection in the answer's own head: gunicorn would otherwise write ``Connection: keep-alive`` and then
    close, since where the next request starts is unknown (``Body.failed``), which clients report as an
    error on their next request."""
    body = req.body
    if body is None:
        return
    read = body._read_reader

    def guarded(size: Any) -> Any:
        try:
            return read(size)
        except Exception:
            req.must_close = True
            raise

    body._read_reader = guarded


def _overdue(conn: Any, now: float) -> bool:
    deadline = getattr(conn, "head_deadline", None)
    return deadline is not None and deadline <= now


def _readable(sock: socket.socket, timeout_ms: float) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout_ms))


def _head_complete(data: bytes) -> bool:
    """Whether ``data`` holds a whole request head, or so much that gunicorn's parser refuses it without
    reading more (a bare LF, which it rejects, counts as an end)."""
    return b"\r\n\r\n" in data or b"\n\n" in data


def _write_json_error(sock: socket.socket, status: int, message: str) -> None:
    from werkzeug.http import HTTP_STATUS_CODES

    from deploykit.serve.app import json_bytes

    body = json_bytes({"error": message})
    head = (
        f"HTTP/1.1 {status} {HTTP_STATUS_CODES.get(status, 'Error')}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with contextlib.suppress(OSError):  # the client is gone or reads nothing: the connection closes anyway
        sock.sendall(head.encode("latin-1") + body, socket.MSG_DONTWAIT)


def _error_answer(exc: BaseException, cfg: Any) -> tuple[int, str]:
    """The status (gunicorn's) and a one-line message for an error that gunicorn met outside the app."""
    from gunicorn.http import errors
    from werkzeug.exceptions import HTTPException

    from deploykit.serve.app import clip

    if isinstance(exc, HTTPException):  # a 408 from DeployKitUnreader
        return exc.code or 400, exc.description or "Bad request."
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
        return 501, f"{clip(str(exc))}; only 'chunked' is supported."
    if isinstance(exc, errors.ExpectationFailed):
        return 417, f"{clip(str(exc))}; only 'Expect: 100-continue' is supported."
    if isinstance(exc, errors.ForbiddenProxyRequest):
        return 403, "Proxy requests from this address are not allowed."
    if isinstance(
        exc, errors.InvalidChunkSize | errors.ChunkMissingTerminator | errors.InvalidChunkExtension
    ):
        return 400, f"The chunked request body is malformed: {clip(str(exc))}."
    if isinstance(exc, errors.ParseException):
        return 400, f"The request is not valid HTTP/1.1: {clip(str(exc))}."
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
        "worker_class": worker_class(config.client_timeout),
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
