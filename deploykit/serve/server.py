"""Run the app under waitress, through its documented interface (``create_server`` with its adjustments).

Waitress receives each request whole, head and body, on its event loop before a handler thread sees it, and
sends answers from that loop too: a client that is slow to send or to read holds no thread. A connection that
stays silent for ``--client-timeout`` is closed (waitress's ``channel_timeout``), and at most
``--max-connections`` are open at once (``connection_limit``).

The listening socket is deploykit's own :class:`Listener`, handed to waitress with its ``sockets`` argument,
so that a SIGTERM (or Ctrl-C) can drain: readiness answers 503 at once; the listener stops listening, so new
connections are refused; the requests already received, or still arriving on connections already accepted,
are answered, for at most ``--graceful-timeout``; the batchers finish and :func:`run_server` returns 0.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from deploykit.serve.config import ServeConfig
from deploykit.serve.memory import tune_heap

log = logging.getLogger("deploykit.serve")

#: A drain ends once no connection is busy and none has moved a byte for this long (an answer that a handler
#: thread has just started to send is then on its way whole).
QUIET_SECONDS = 0.05
#: Bytes waitress asks of one recv() (its ``recv_bytes`` adjustment).
RECV_BYTES = 65536
#: Pending connections the kernel holds while every handler is busy (waitress's default).
BACKLOG = 1024


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s",
    )
    if level.lower() != "debug":
        # "Task queue depth is N" at every request that waits for a handler thread: normal under load
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)


def run_server(config: ServeConfig, *, announce: Callable[[str], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain; returns the exit code (0 after a graceful stop).

    ``announce`` receives the "Serving ... on http://..." line once the model files are checked and the port
    is bound. Raises ``ModelFileError`` when a file is not an ONNX model with a card, and ``DeployKitError``
    when the address cannot be listened on, both before anything is served.
    """
    import waitress

    from deploykit.serve.app import create_app
    from deploykit.serve.registry import registry_of

    configure_logging(config.log_level)
    tune_heap()  # before the first large allocation: models, images
    check_models(config)
    listener = Listener.open(config.host, config.port)
    try:
        app = create_app(config.replace(load_in_background=True))
        server = waitress.create_server(
            app,
            sockets=[listener],
            threads=config.threads,
            connection_limit=config.max_connections,
            channel_timeout=config.client_timeout,
            cleanup_interval=1,  # how often silent connections are looked for
            # bodies up to twice --max-body-mb reach the app, which refuses those over it in JSON
            max_request_body_size=2 * config.max_body_bytes,
            backlog=BACKLOG,
            asyncore_use_poll=True,  # select() stops at file descriptor 1024
            # one recv() per turn of the event loop: 64 kB (default 8 kB) takes a photo's upload in fewer
            # turns (measured in docs/decisions/0001-wsgi-server.md)
            recv_bytes=RECV_BYTES,
            ident="deploykit",
        )
        if announce is not None:
            host = f"[{config.host}]" if ":" in config.host else config.host
            names = ", ".join(m.name for m in config.models)
            announce(f"Serving {names} on http://{host}:{listener.getsockname()[1]}")
        registry = registry_of(app)
        stop = _serve_until_signalled(server.run)
        registry.draining = True
        listener.stop_listening()
        # logged once new connections are refused, so that the line means it
        log.info("stopping: not ready; finishing the requests already accepted")
        if not listener.wait_idle(time.monotonic() + config.graceful_timeout, stop):
            log.warning(
                "%d connections still had a request in progress after --graceful-timeout %g s",
                listener.busy,
                config.graceful_timeout,
            )
        registry.close()
        return 0
    finally:
        listener.close()


def _serve_until_signalled(run: Callable[[], Any]) -> threading.Event:
    """Run ``run`` (the server's loop) in a daemon thread until SIGTERM or SIGINT. Returns an event that a
    second signal sets (stop at once instead of draining). Signal handlers can only be installed from the
    main thread: called from another, it serves until the process ends."""
    first, second = threading.Event(), threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        (second if first.is_set() else first).set()

    signals = (signal.SIGTERM, signal.SIGINT)
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, on_signal) for sig in signals} if in_main else {}
    loop = threading.Thread(target=run, name="deploykit-http", daemon=True)
    loop.start()
    try:
        while not first.wait(0.5):
            if not loop.is_alive():
                raise RuntimeError("the HTTP server's loop stopped; see the log above")
    except BaseException:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raise
    # the handlers stay until the process ends: a second signal cuts the drain short
    return second


def check_models(config: ServeConfig) -> None:
    """Fail fast, before binding, on a file that is not an ONNX model with a deploykit card, or a provider
    that this onnxruntime does not have."""
    from deploykit.card import read_card
    from deploykit.runtime import resolve_providers

    resolve_providers(config.providers)
    for spec in config.models:
        read_card(spec.path)


class Listener(socket.socket):
    """The listening socket, handed to waitress; its connections report when they are busy (bytes received
    and no answer sent since), so that a drain knows which requests are still to be answered."""

    busy: int
    last_activity: float
    lock: threading.Lock
    stopped = False

    @classmethod
    def open(cls, host: str, port: int) -> Listener:
        """A socket listening on ``host``:``port``; ``DeployKitError`` (one line) when that is impossible."""
        from deploykit.errors import DeployKitError

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = cls(family, socket.SOCK_STREAM)  # no IPv6 on this machine: one line, like the others
        except OSError as exc:
            raise DeployKitError(
                f"Cannot listen on {host}:{port}: {exc.strerror or exc}.",
                hint="Give --host an address of this machine (127.0.0.1, or 0.0.0.0 for every interface).",
            ) from None
        sock.busy = 0
        sock.last_activity = time.monotonic()
        sock.lock = threading.Lock()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise DeployKitError(
                    f"Port {port} is already in use on {host}.",
                    hint="Stop the other server or choose another --port.",
                ) from None
            raise DeployKitError(
                f"Cannot listen on {host}:{port}: {exc.strerror or exc}.",
                hint="Give --host an address of this machine (127.0.0.1, or 0.0.0.0 for every interface).",
            ) from None
        return sock

    def accept(self) -> tuple[socket.socket, Any]:
        if self.stopped:  # the server's loop may still poll the old socket once: nothing to accept
            raise BlockingIOError(errno.EAGAIN, "not listening")
        conn, address = super().accept()
        tracked = Connection(conn.family, conn.type, conn.proto, fileno=conn.detach())
        tracked.listener = self
        return tracked, address

    def activity(self, conn: Connection, busy: bool) -> None:
        self.last_activity = time.monotonic()
        if conn.busy != busy:
            with self.lock:
                if conn.busy != busy and not conn.closed:
                    conn.busy = busy
                    self.busy += 1 if busy else -1

    def forget(self, conn: Connection) -> None:
        with self.lock:
            if conn.busy:
                self.busy -= 1
            conn.busy = False
            conn.closed = True

    def stop_listening(self) -> None:
        """Stop listening, so that new connections are refused, without closing the descriptor that the
        server's loop polls: an unconnected UDP socket, which is never readable, takes its number."""
        self.stopped = True
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as inert:
            os.dup2(inert.fileno(), self.fileno())

    def wait_idle(self, deadline: float, cut_short: threading.Event) -> bool:
        """Wait until no connection is busy and none has moved a byte for ``QUIET_SECONDS``; False when
        ``deadline`` (a ``time.monotonic()``) came first or ``cut_short`` was set."""
        while not cut_short.is_set():
            now = time.monotonic()
            if self.busy == 0 and now - self.last_activity >= QUIET_SECONDS:
                return True
            if now >= deadline:
                return False
            time.sleep(min(0.01, deadline - now))
        return self.busy == 0


class Connection(socket.socket):
    """An accepted connection: busy from the first bytes of a request until the first bytes of its answer."""

    listener: Listener
    busy = False
    closed = False

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        if data:
            self.listener.activity(self, True)
        return data

    def send(self, data: Any, flags: int = 0) -> int:
        sent = super().send(data, flags)
        if sent:
            self.listener.activity(self, False)
        return sent

    def close(self) -> None:
        self.listener.forget(self)
        super().close()
