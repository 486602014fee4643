"""Hostile and stalled clients against a real `deploykit serve` subprocess: slow heads and trickling bodies
that hold no thread, silent connections closed after ``--client-timeout``, ``--max-connections``, the HTTP
server's own errors, and SIGTERM with requests half sent."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import requests

from tests.conftest import LiveServer, run_cli
from tests.serve.helpers import label_of

pytestmark = pytest.mark.slow


@contextmanager
def _connect(server: LiveServer, timeout: float = 30) -> Iterator[socket.socket]:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        yield sock


def _predict_request(image: bytes, *, close: bool = False) -> bytes:
    head = (
        "POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(image)}\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n"
    )
    return head.encode() + image


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP answer with a Content-Length (every answer of the server has one)."""
    stream = sock.makefile("rb")
    status = int(stream.readline().split()[1])
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, stream.read(int(headers["content-length"]))


def _closed(sock: socket.socket, within: float = 30) -> bool:
    """Whether the server closes the connection (after any answer still unread) within ``within`` s."""
    deadline = time.monotonic() + within
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        pass
    return False


def _read_by_server(server: LiveServer, sock: socket.socket, within: float = 30) -> None:
    """Wait until the server has read everything ``sock`` sent: the server's end of the connection has
    nothing left in its receive queue (``/proc/net/tcp``, whose queues are hex ``tx:rx``)."""
    port = int(server.url.rsplit(":", 1)[1])
    client_port = sock.getsockname()[1]
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1].split(":")[1], fields[2].split(":")[1]
            if int(local, 16) == port and int(remote, 16) == client_port:
                if int(fields[4].split(":")[1], 16) == 0:
                    return
                break
        time.sleep(0.01)
    pytest.fail("the server did not read what the client sent")


def _wait_for_log(server: LiveServer, text: str, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while text not in server.log():
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} never appeared in the server log:\n{server.log()}")
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "--client-timeout must be between 1 and 86400 seconds"),
        ("-1", "--client-timeout must be between 1 and 86400 seconds"),
        ("90000", "--client-timeout must be between 1 and 86400 seconds"),
        ("1.5", "Invalid value for '--client-timeout'"),
        ("nan", "Invalid value for '--client-timeout'"),
    ],
)
def test_client_timeout_is_whole_seconds_in_range(shapes_onnx: Path, value: str, message: str) -> None:
    result = run_cli("serve", str(shapes_onnx), "--client-timeout", value, "--port", "0")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_max_connections_must_be_in_range(shapes_onnx: Path) -> None:
    result = run_cli("serve", str(shapes_onnx), "--max-connections", "0", "--port", "0")
    assert result.returncode == 2
    assert "--max-connections must be between 1 and 100000, got 0." in result.stderr


def test_slow_heads_and_trickling_bodies_hold_no_thread(
    live_server_factory,  # type: ignore[no-untyped-def]
    shapes_onnx: Path,
    shapes_images: list[Path],
) -> None:
    """200 clients stalled in their request heads and 200 trickling their bodies a byte at a time, on a
    server with two handler threads: health probes and predictions are answered meanwhile, at once (the slow
    clients never time out here: --client-timeout is a minute)."""
    server = live_server_factory(str(shapes_onnx), "--threads", "2", "--client-timeout", "60")
    image = shapes_images[0].read_bytes()
    stop = threading.Event()
    with ExitStack() as stack:
        heads = [stack.enter_context(_connect(server)) for _ in range(200)]
        for sock in heads:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-")
        bodies = [stack.enter_context(_connect(server)) for _ in range(200)]
        for sock in bodies:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
                         b"Content-Length: 100000\r\n\r\n\xff")

        def trickle() -> None:
            while not stop.wait(0.5):
                for sock in bodies:
                    sock.send(b"\xd8")

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        try:
            _read_by_server(server, bodies[-1])
            for _ in range(5):
                started = time.monotonic()
                ready = requests.get(server.url + "/v2/health/ready", timeout=5)
                answer = requests.post(
                    server.url + "/predict", files={"file": (shapes_images[0].name, image)}, timeout=5
                )
                assert ready.status_code == 200
                assert answer.status_code == 200, answer.text
                assert answer.json()["predictions"][0]["label"] == label_of(shapes_images[0])
                print(f"probe and prediction beside 400 slow clients: {time.monotonic() - started:.3f} s")
        finally:
            stop.set()
            trickler.join()
    assert "Traceback" not in server.log()


def test_silent_connections_are_closed_after_the_client_timeout(
    live_server_factory,  # type: ignore[no-untyped-def]
    shapes_onnx: Path,
    shapes_images: list[Path],
) -> None:
    """An idle kept-alive connection, a head stalled half way and a body stalled half way are closed once
    they have been silent for --client-timeout (checked about once a second), without an answer."""
    server = live_server_factory(str(shapes_onnx), "--client-timeout", "2")
    request = _predict_request(shapes_images[0].read_bytes())
    head_end = request.index(b"\r\n\r\n")
    with _connect(server) as idle, _connect(server) as in_head, _connect(server) as in_body:
        idle.sendall(request)
        assert _read_answer(idle)[0] == 200
        in_head.sendall(request[: head_end // 2])
        in_body.sendall(request[: head_end + 100])
        started = time.monotonic()
        for sock in (idle, in_head, in_body):
            assert _closed(sock, within=30)
        assert time.monotonic() - started >= 1.5  # not before the timeout (2 s, from the last byte)
    assert requests.get(server.url + "/v2/health/ready", timeout=30).status_code == 200


def test_slow_but_steady_clients_are_served(
    live_server_factory,  # type: ignore[no-untyped-def]
    shapes_onnx: Path,
    shapes_images: list[Path],
) -> None:
    """A head and a body that arrive in pieces with pauses shorter than ``--client-timeout``, and requests
    pipelined on one kept-alive connection, are answered."""
    server = live_server_factory(str(shapes_onnx), "--threads", "1", "--client-timeout", "3")
    path = shapes_images[1]
    request = _predict_request(path.read_bytes())
    head_end = request.index(b"\r\n\r\n")
    with _connect(server) as sock:
        for piece in (
            request[:10],
            request[10:head_end],
            request[head_end : head_end + 50],
            request[head_end + 50 :],
        ):
            sock.sendall(piece)
            time.sleep(0.5)
        answer = _read_answer(sock)
        assert answer[0] == 200, answer
        assert json.loads(answer[2])["predictions"][0]["label"] == label_of(path)
        sock.sendall(request + request)
        assert [_read_answer(sock)[0] for _ in range(2)] == [200, 200]


def test_clients_that_never_hang_up_do_not_stall_the_server(shapes_server: LiveServer) -> None:
    """Clients that ask for ``Connection: close`` and then keep their end open: the server closes its end and
    goes on serving others."""
    with ExitStack() as stack:
        lingering = [stack.enter_context(_connect(shapes_server)) for _ in range(8)]
        for sock in lingering:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        for sock in lingering:
            assert _read_answer(sock)[0] == 200
        for _ in range(3):
            assert requests.get(shapes_server.url + "/v2/health/live", timeout=5).status_code == 200
        for sock in lingering:
            assert _closed(sock, within=5)


def test_connections_past_the_limit_wait_for_a_free_one(
    live_server_factory,  # type: ignore[no-untyped-def]
    shapes_onnx: Path,
) -> None:
    """With --max-connections 20, 40 idle connections leave a further client unanswered (its connection
    waits in the kernel's backlog) until some of them close; then it is served."""
    server = live_server_factory(str(shapes_onnx), "--max-connections", "20", "--client-timeout", "60")
    with ExitStack() as stack:
        idle = [stack.enter_context(_connect(server)) for _ in range(40)]
        with _connect(server, timeout=2) as waiting:
            waiting.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n\r\n")
            with pytest.raises(TimeoutError):
                waiting.recv(1)
            for sock in idle:
                sock.close()
            waiting.settimeout(30)
            assert _read_answer(waiting)[0] == 200
    _wait_for_log(server, "no longer accepting new connections")


@pytest.mark.parametrize(
    ("raw", "status", "says"),
    [
        (b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Length: abc\r\n\r\n", 400, b"Content-Length"),
        (b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Length: -5\r\n\r\n", 400, b"Content-Length"),
        (b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 300_000, 431, b"max_header"),
        (
            b"POST /predict HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: foo, chunked\r\n\r\n0\r\n\r\n",
            501,
            b"Transfer-Encoding",
        ),
        (
            b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Length: 99999999\r\n\r\n",
            413,
            b"Request Entity Too Large",
        ),
    ],
    ids=["length-text", "length-negative", "head-300k", "unknown-coding", "body-declared-huge"],
)
def test_protocol_errors_are_answered_and_closed(
    shapes_server: LiveServer, raw: bytes, status: int, says: bytes
) -> None:
    """Errors that the HTTP server meets before the app runs: its status, a plain-text reason, and the
    connection closed; the server goes on serving."""
    with _connect(shapes_server) as sock:
        sock.sendall(raw)
        answer = _read_answer(sock)
        assert answer[0] == status, answer
        assert answer[1]["connection"] == "close"
        assert answer[1]["content-type"].startswith("text/plain")
        assert says in answer[2]
        assert _closed(sock)
    assert requests.get(shapes_server.url + "/v2/health/live", timeout=30).status_code == 200


def test_sigterm_finishes_a_request_still_arriving(
    live_server_factory,  # type: ignore[no-untyped-def]
    shapes_onnx: Path,
    shapes_images: list[Path],
) -> None:
    """SIGTERM while a client is still sending its head, or its body: both requests are answered, new
    connections are refused, and the server exits 0."""
    server = live_server_factory(str(shapes_onnx), "--client-timeout", "20")
    path = shapes_images[2]
    request = _predict_request(path.read_bytes(), close=True)
    head_end = request.index(b"\r\n\r\n")
    with _connect(server) as in_head, _connect(server) as in_body:
        in_head.sendall(request[: head_end // 2])
        in_body.sendall(request[: head_end + 100])
        _read_by_server(server, in_head)
        _read_by_server(server, in_body)
        server.process.send_signal(signal.SIGTERM)
        _wait_for_log(server, "stopping: not ready")
        with pytest.raises(requests.ConnectionError):
            requests.get(server.url + "/v2/health/live", timeout=5)
        in_head.sendall(request[head_end // 2 :])
        in_body.sendall(request[head_end + 100 :])
        for sock in (in_head, in_body):
            answer = _read_answer(sock)
            assert answer[0] == 200, answer
            assert json.loads(answer[2])["predictions"][0]["label"] == label_of(path)
    assert server.process.wait(timeout=30) == 0
    assert "Traceback" not in server.log()


def test_sigterm_gives_up_on_a_stalled_request_after_the_graceful_timeout(
    live_server_factory,  # type: ignore[no-untyped-def]
    shapes_onnx: Path,
) -> None:
    """A request that stops arriving does not hold the stop past --graceful-timeout: the server exits 0
    and says how many connections it left."""
    server = live_server_factory(str(shapes_onnx), "--client-timeout", "600", "--graceful-timeout", "2")
    with _connect(server) as stalled:
        stalled.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\nabc")
        _read_by_server(server, stalled)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
        assert time.monotonic() - started >= 1.5
    assert "1 connections still had a request in progress after --graceful-timeout 2 s" in server.log()
