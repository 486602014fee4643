"""Uploads: multipart bodies in every shape Werkzeug reads, broken ones, and bodies over ``--max-body-mb``,
declared or chunked (in-process and over real HTTP)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import EnvironBuilder, TestResponse
from werkzeug.wrappers import Request

from deploykit.serve.app import create_app
from deploykit.serve.config import ModelSpec, ServeConfig
from tests.conftest import LiveServer
from tests.serve.helpers import label_of

Files = list[tuple[str, str | None, bytes]]

BOUNDARY = "deploykit0boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
MB = 1024 * 1024
# not an image, but bytes with the shape of one: markers, every byte value, CR and LF among them
BLOB = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9"


def by_hand(
    *parts: tuple[bytes, bytes], boundary: str = BOUNDARY, newline: bytes = b"\r\n", close: bool = True
) -> bytes:
    """A multipart body from (header block, data) pairs, with the given line end."""
    delimiter = b"--" + boundary.encode()
    body = b"".join(
        delimiter + newline + headers + newline + newline + data + newline for headers, data in parts
    )
    return body + (delimiter + b"--" + newline if close else b"")


def disposition(name: str | None = "file", filename: str | None = "a.jpg") -> bytes:
    value = "Content-Disposition: form-data"
    if name is not None:
        value += f'; name="{name}"'
    if filename is not None:
        value += f'; filename="{filename}"'
    return value.encode()


GOOD = by_hand((disposition(), BLOB))


# --- the server, in-process ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(shapes_onnx: Path) -> Flask:
    return create_app(ServeConfig(models=(ModelSpec("shapes", shapes_onnx),), max_body_mb=2))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


Build = Callable[[bytes, bytes], bytes]


def _unusual_bodies() -> Iterator[Any]:
    """Body builders from (header block, image bytes), each in a legal shape that few clients send."""

    def preamble(h: bytes, d: bytes) -> bytes:
        return b"A preamble, which clients never send.\r\n" + by_hand((h, d))

    def lf_only(h: bytes, d: bytes) -> bytes:
        return by_hand((h.replace(b"\r\n", b"\n"), d), newline=b"\n")

    def folded(h: bytes, d: bytes) -> bytes:
        return by_hand((h.replace(b"; filename", b";\r\n filename"), d))

    def padded(h: bytes, d: bytes) -> bytes:
        return by_hand((h, d)).replace(b"\r\n", b" \t\r\n", 1)

    for build in (preamble, lf_only, folded, padded):
        yield pytest.param(build, id=build.__name__)


class RecordedInput(io.BytesIO):
    """A request body that records the size of each read asked of it."""

    def __init__(self, body: bytes) -> None:
        super().__init__(body)
        self.reads: list[int | None] = []

    def read(self, size: int | None = -1) -> bytes:
        self.reads.append(size)
        return super().read(size)

    def readinto(self, buffer: Any) -> int:
        self.reads.append(len(buffer))
        return super().readinto(buffer)


def post_terminated(client: FlaskClient, path: str, body: bytes, content_type: str) -> TestResponse:
    """POST ``body`` the way waitress hands it over: received whole, its Content-Length and
    ``wsgi.input_terminated`` set. A body declared over the limit is refused before anything is read."""
    environ = EnvironBuilder(path=path, method="POST", data=body, content_type=content_type).get_environ()
    environ["CONTENT_LENGTH"] = str(len(body))  # EnvironBuilder leaves it out for an empty body
    environ["wsgi.input_terminated"] = True
    environ["wsgi.input"] = stream = RecordedInput(body)
    response = client.open(Request(environ))
    if len(body) > 2 * MB:
        assert stream.reads == []
    return response


def post_werkzeug(client: FlaskClient, path: str, body: bytes, content_type: str) -> TestResponse:
    """POST ``body`` as the Flask test client does (no ``wsgi.input_terminated``): Werkzeug reads it."""
    return client.post(path, data=body, content_type=content_type)


POSTS = [pytest.param(post_werkzeug, id="werkzeug-stream"), pytest.param(post_terminated, id="terminated")]


@pytest.mark.parametrize("post", POSTS)
@pytest.mark.parametrize("build", list(_unusual_bodies()))
def test_unusual_multipart_bodies_are_served(
    client: FlaskClient, shapes_images: list[Path], build: Build, post: Callable[..., TestResponse]
) -> None:
    for path in shapes_images[::3]:
        headers = disposition(filename=path.name) + b"\r\nContent-Type: image/jpeg"
        body = build(headers, path.read_bytes())
        r = post(client, "/predict", body, MULTIPART)
        assert r.status_code == 200, r.json
        [pred] = r.json["predictions"]
        assert (pred["filename"], pred["label"]) == (path.name, label_of(path))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(by_hand((disposition(), BLOB), close=False), id="no-closing-delimiter"),
        pytest.param(GOOD[: len(GOOD) // 2], id="truncated"),
        pytest.param(by_hand((b"Content-Type: image/jpeg", BLOB)), id="no-content-disposition"),
    ],
)
def test_broken_bodies_are_a_400_not_a_crash(client: FlaskClient, body: bytes) -> None:
    r = client.post("/predict", data=body, content_type=MULTIPART)
    assert r.status_code == 400
    assert r.json == {
        "error": "The multipart form has no file (or does not follow its boundary); "
        "send the image in the 'file' field."
    }


def test_more_than_1000_parts_is_413(client: FlaskClient, shapes_images: list[Path]) -> None:
    path = shapes_images[0]
    fields = [(disposition(f"f{i}", None), b"v") for i in range(999)]
    image = (disposition(filename=path.name), path.read_bytes())
    ok = client.post("/predict", data=by_hand(*fields, image), content_type=MULTIPART)  # 1000 parts
    assert ok.status_code == 200, ok.json
    assert ok.json["predictions"][0]["label"] == label_of(path)
    body = by_hand(*fields, (disposition("f999", None), b"v"), image)
    assert len(body) < MB  # refused for its parts, not its size
    r = client.post("/predict", data=body, content_type=MULTIPART)
    assert r.status_code == 413
    assert r.mimetype == "application/json"
    assert r.json["error"] == "The multipart form has more than 1000 parts."


def post_chunked(client: FlaskClient, path: str, body: bytes, content_type: str) -> TestResponse:
    """POST ``body`` the way a WSGI server hands over ``Transfer-Encoding: chunked``: no CONTENT_LENGTH and
    ``wsgi.input_terminated`` set. (EnvironBuilder derives a length from any ``input_stream`` it is given,
    so the environ is built without one and the stream is put in afterwards.)"""
    environ = EnvironBuilder(
        path=path, method="POST", headers=[("Transfer-Encoding", "chunked")]
    ).get_environ()
    assert "CONTENT_LENGTH" not in environ
    environ["CONTENT_TYPE"] = content_type
    environ["wsgi.input"] = io.BytesIO(body)
    environ["wsgi.input_terminated"] = True
    response = client.open(Request(environ))
    assert "CONTENT_LENGTH" not in response.request.environ
    assert response.request.content_length is None
    return response


def _over_limit() -> Iterator[Any]:
    big = b"\xff\xd8" + b"\xff" * (3 * MB)
    yield pytest.param("/predict", "image/jpeg", big, id="raw-image")
    yield pytest.param("/predict", MULTIPART, by_hand((disposition(), big)), id="multipart")
    lf_only = by_hand((disposition(), big), newline=b"\n")
    yield pytest.param("/predict", MULTIPART, lf_only, id="multipart-lf-only")
    b64 = json.dumps({"image": base64.b64encode(big).decode()}).encode()
    yield pytest.param("/predict", "application/json", b64, id="json")
    tensor = {"name": "input", "shape": [1, 3 * MB], "datatype": "UINT8", "data": [0] * (3 * MB // 2)}
    infer = json.dumps({"inputs": [tensor]}).encode()
    yield pytest.param("/v2/models/shapes/infer", "application/json", infer, id="v2-infer")


@pytest.mark.parametrize(("path", "content_type", "body"), list(_over_limit()))
def test_chunked_body_over_the_limit_is_413(
    client: FlaskClient, path: str, content_type: str, body: bytes
) -> None:
    assert len(body) > 3 * MB
    r = post_chunked(client, path, body, content_type)
    assert r.status_code == 413, r.get_data()
    assert r.mimetype == "application/json"
    assert r.json == {"error": "The request body is larger than the server's limit of 2 MB (--max-body-mb)."}


@pytest.mark.parametrize("post", POSTS)
def test_declared_length_over_the_limit_is_413(
    client: FlaskClient, post: Callable[..., TestResponse]
) -> None:
    r = post(client, "/predict", b"\xff\xd8" + b"\xff" * (3 * MB), "image/jpeg")
    assert r.status_code == 413, r.get_data()
    assert r.json == {"error": "The request body is larger than the server's limit of 2 MB (--max-body-mb)."}


@pytest.mark.parametrize("post", [*POSTS, pytest.param(post_chunked, id="chunked")])
def test_every_body_shape_under_the_limit_is_served(
    client: FlaskClient, shapes_images: list[Path], post: Callable[..., TestResponse]
) -> None:
    for path in shapes_images[:4]:
        data = path.read_bytes()
        bodies = [
            ("image/jpeg", data),
            (MULTIPART, by_hand((disposition(filename=path.name), data))),
            (MULTIPART, by_hand((disposition(filename=path.name), data), newline=b"\n")),
            ("application/json", json.dumps({"image": base64.b64encode(data).decode()}).encode()),
        ]
        for content_type, body in bodies:
            r = post(client, "/predict", body, content_type)
            assert r.status_code == 200, (content_type, r.json)
            assert r.json["predictions"][0]["label"] == label_of(path), content_type
    empty = post(client, "/predict", b"", "image/jpeg")
    assert empty.status_code == 400
    assert "no image" in empty.json["error"]


# --- the server, over real HTTP --------------------------------------------------------------------------


def _chunks(size: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    yield b"\xff\xd8"
    for start in range(2, size, chunk):
        yield b"\xff" * min(chunk, size - start)


def _post_chunked_over_limit(server: LiveServer, size: int) -> requests.Response:
    return requests.post(
        server.url + "/predict", data=_chunks(size), headers={"Content-Type": "image/jpeg"}, timeout=60
    )


def test_chunked_upload_over_http(
    live_server_factory: Callable[..., LiveServer], shapes_onnx: Path, shapes_images: list[Path]
) -> None:
    server = live_server_factory(str(shapes_onnx), "--max-body-mb", "1")
    r = _post_chunked_over_limit(server, MB + MB // 2)
    assert r.request.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in r.request.headers
    assert r.status_code == 413, r.text
    limit = "The request body is larger than the server's limit of 1 MB (--max-body-mb)."
    assert r.json() == {"error": limit}
    # past twice the limit the HTTP server refuses the body itself, in plain text, before the app sees it
    huge = _post_chunked_over_limit(server, 3 * MB)
    assert huge.status_code == 413, huge.text
    assert huge.headers["Content-Type"].startswith("text/plain")
    assert "Request Entity Too Large" in huge.text

    path = shapes_images[1]
    after = requests.post(server.url + "/predict", files={"file": (path.name, path.read_bytes())}, timeout=60)
    assert after.status_code == 200, after.text
    [pred] = after.json()["predictions"]
    assert (pred["filename"], pred["label"]) == (path.name, label_of(path))

    path = shapes_images[4]
    small = requests.post(
        server.url + "/predict",
        data=iter([path.read_bytes()]),
        headers={"Content-Type": "image/jpeg"},
        timeout=60,
    )
    assert small.request.headers["Transfer-Encoding"] == "chunked"
    assert small.status_code == 200, small.text
    assert small.json()["predictions"][0]["label"] == label_of(path)
