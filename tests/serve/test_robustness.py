"""Hostile and stalled clients against a real `deploykit serve` subprocess: slow heads and bodies
(``--client-timeout``), gunicorn's own errors in JSON, and SIGTERM with requests half sent."""

from __future__ import annotations

import json
import select
import signal
import socket
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


def _json_error(answer: tuple[int, dict[str, str], bytes]) -> str:
    _status, headers, body = answer
    assert headers["content-type"] == "application/json", answer
    message = json.loads(body)["error"]
    assert isinstance(message, str), answer
    assert message, answer
    return message


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


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_client_timeout_must_be_a_positive_number(shapes_onnx: Path, value: str) -> None:
    result = run_cli("serve", str(shapes_onnx), "--client-timeout", value, "--port", "0")
    assert result.returncode == 2
    assert "--client-timeout must be between 0.001 and 86400 seconds" in result.stderr
    assert "Traceback" not in result.stderr


def test_slow_heads_hold_no_thread_and_get_408(
    live_server_factory,  # type: ignore[no-untyped-def]
    shapes_onnx: Path,
    shapes_images: list[Path],
) -> None:
    """Eight clients that send part of a request head, or trickle it, on a server with two threads: health
    probes and predictions are answered meanwhile, and each slow client gets a 408 once overdue."""
    server = live_server_factory(str(shapes_onnx), "--threads", "2", "--client-timeout", "3")
    image = shapes_images[0].read_bytes()
    with ExitStack() as stack:
        slow = [stack.enter_context(_connect(server)) for _ in range(8)]
        for sock in slow:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n")
        start = time.monotonic()
        for _ in range(8):  # for longer than --client-timeout
            assert requests.get(server.url + "/v2/health/live", timeout=5).status_code == 200
            answer = requests.post(
                server.url + "/predict", files={"file": (shapes_images[0].name, image)}, timeout=5
            )
            assert answer.status_code == 200
            assert answer.json()["predictions"][0]["label"] == label_of(shapes_images[0])
            for sock in slow[:4]:  # these keep sending, one header line at a time, until answered
                if not select.select([sock], [], [], 0)[0]:
                    sock.sendall(b"X-Slow: 1\r\n")
            time.sleep(0.5)
        for sock in slow:
            answer = _read_answer(sock)
            assert answer[0] == 408, answer
            assert "--client-timeout" in _json_error(answer)
            assert _closed(sock)
        # bounded: 3 s for the head, and the worker checks overdue heads about once a second
        assert time.monotonic() - start < 15


def test_stalled_body_times_out_with_408(
    live_server_factory,  # type: ignore[no-untyped-def]
    shapes_onnx: Path,
    shapes_images: list[Path],
) -> None:
    """A client that sends its head and part of its body, then nothing: its thread is freed after
    ``--client-timeout`` with a 408, so that a probe queued behind it is answered."""
    server = live_server_factory(str(shapes_onnx), "--threads", "2", "--client-timeout", "2")
    request = _predict_request(shapes_images[0].read_bytes())
    with ExitStack() as stack:
        slow = [stack.enter_context(_connect(server)) for _ in range(8)]
        for sock in slow:
            sock.sendall(request[: len(request) - 100])
        # 8 stalled bodies on 2 threads free a thread each --client-timeout: the probe waits about 8 s at
        # most (without the timeout it would wait forever)
        assert requests.get(server.url + "/v2/health/live", timeout=30).status_code == 200
        for sock in slow:
            answer = _read_answer(sock)
            assert answer[0] == 408, answer
            assert answer[1].get("connection", "").lower() == "close", answer
            assert "--client-timeout" in _json_error(answer)
            assert _closed(sock)
    assert "Traceback" not in server.log()


def test_slow_but_steady_clients_are_served(
    live_server_factory,  # type: ignore[no-untyped-def]
    shapes_onnx: Path,
    shapes_images: list[Path],
) -> None:
    """A head and a body that arrive in pieces with pauses shorter than ``--client-timeout``, and requests
    pipelined on one kept-alive connection, are answered."""
    server = live_server_factory(str(shapes_onnx), "--threads", "1", "--client-timeout", "2")
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


def test_clients_that_never_hang_up_do_not_stall_the_worker(shapes_server: LiveServer) -> None:
    """Clients that ask for ``Connection: close`` and then keep their end open: the server closes its end and
    goes on serving others meanwhile (gunicorn lingered up to 2 s per such connection in the thread that
    accepts and dispatches every connection)."""
    with ExitStack() as stack:
        lingering = [stack.enter_context(_connect(shapes_server)) for _ in range(8)]
        for sock in lingering:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        for sock in lingering:
            assert _read_answer(sock)[0] == 200
        start = time.monotonic()
        for _ in range(3):
            assert requests.get(shapes_server.url + "/v2/health/live", timeout=5).status_code == 200
        for sock in lingering:  # at once: not one after the other, 2 s apart
            assert _closed(sock, within=5 - (time.monotonic() - start))


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Length: abc\r\n\r\n", 400),
        (b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Length: -5\r\n\r\n", 400),
        (
            b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\n",
            400,
        ),
        (b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: test\r\n\r\n", 414),
        (b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 70000, 431),
        (b"NOT HTTP\r\n\r\n", 400),
        (b"POST /predict HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: foo, chunked\r\n\r\n0\r\n\r\n", 501),
    ],
    ids=[
        "length-text",
        "length-negative",
        "length-and-chunked",
        "header-9k",
        "line-9k",
        "head-70k",
        "garbage",
        "unknown-coding",
    ],
)
def test_protocol_errors_are_json(shapes_server: LiveServer, raw: bytes, status: int) -> None:
    """Errors that gunicorn meets before the app runs are answered in JSON with gunicorn's status."""
    with _connect(shapes_server) as sock:
        sock.sendall(raw)
        answer = _read_answer(sock)
        assert answer[0] == status, answer
        _json_error(answer)
        assert answer[1]["connection"] == "close"
        assert _closed(sock)
    assert requests.get(shapes_server.url + "/v2/health/live", timeout=30).status_code == 200


@pytest.mark.parametrize("dev", [False, True], ids=["gunicorn", "dev"])
def test_sigterm_finishes_a_request_still_arriving(
    live_server_factory,  # type: ignore[no-untyped-def]
    shapes_onnx: Path,
    shapes_images: list[Path],
    dev: bool,
) -> None:
    """SIGTERM while a client is still sending its head, or its body: both requests are answered, new
    connections are refused, and the server exits 0 (with ``--dev`` too)."""
    server = live_server_factory(str(shapes_onnx), *(["--dev"] if dev else []), "--client-timeout", "20")
    path = shapes_images[2]
    request = _predict_request(path.read_bytes(), close=True)
    head_end = request.index(b"\r\n\r\n")
    with _connect(server) as in_head, _connect(server) as in_body:
        in_head.sendall(request[: head_end // 2])
        in_body.sendall(request[: head_end + 100])
        time.sleep(0.5)  # both are accepted and read as far as they go
        server.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        with pytest.raises(requests.ConnectionError):
            requests.get(server.url + "/v2/health/live", timeout=5)
        in_head.sendall(request[head_end // 2 :])
        in_body.sendall(request[head_end + 100 :])
        for sock in (in_head, in_body):
            answer = _read_answer(sock)
            assert answer[0] == 200, answer
            assert json.loads(answer[2])["predictions"][0]["label"] == label_of(path)
    assert server.process.wait(timeout=30) == 0
