"""Hostile clients against a real `deploykit serve` subprocess: gunicorn's own errors in JSON."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import requests

from tests.conftest import LiveServer

pytestmark = pytest.mark.slow


@contextmanager
def _connect(server: LiveServer, timeout: float = 30) -> Iterator[socket.socket]:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        yield sock


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
        (b"NOT HTTP\r\n\r\n", 400),
        (b"POST /predict HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: foo, chunked\r\n\r\n0\r\n\r\n", 501),
    ],
    ids=[
        "length-text",
        "length-negative",
        "length-and-chunked",
        "header-9k",
        "line-9k",
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
