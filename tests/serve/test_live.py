"""End to end: a real `deploykit serve` subprocess on a free loopback port, real HTTP."""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from deploykit.runtime import available_providers
from tests.conftest import LiveServer, free_port, run_cli, start_server
from tests.serve.gate import InferenceGate
from tests.serve.helpers import encode, exif_rotated, label_of, png_bomb, variants

pytestmark = pytest.mark.slow


def _predict(server: LiveServer, **kwargs: object) -> requests.Response:
    return requests.post(server.url + "/predict", timeout=60, **kwargs)  # type: ignore[arg-type]


def _metric(server: LiveServer, name: str, **labels: str) -> float:
    """The value of the series ``name`` with exactly ``labels`` in /metrics (0 before its first sample)."""
    for line in requests.get(server.url + "/metrics", timeout=30).text.splitlines():
        series, _, value = line.rpartition(" ")
        metric, _, rest = series.partition("{")
        if metric == name and dict(re.findall(r'(\w+)="([^"]*)"', rest)) == labels:
            return float(value)
    return 0.0


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[InferenceGate]:
    """ONNX Runtime calls of a server started with ``env=gate.env`` wait at this gate while it is closed."""
    held = InferenceGate(tmp_path / "gate.sock")
    yield held
    held.shut()


def test_tutorial_client(shapes_server: LiveServer, shapes_images: list[Path]) -> None:
    for path in shapes_images:
        r = requests.post(shapes_server.url + "/predict", files={"file": open(path, "rb")})  # noqa: SIM115
        assert r.status_code == 200, r.text
        pred = r.json()["predictions"][0]
        assert pred["label"] == label_of(path), (path.name, pred)
        assert pred["filename"] == path.name


def test_raw_body_json_batch_and_top_k(shapes_server: LiveServer, shapes_images: list[Path]) -> None:
    path = shapes_images[2]
    data = path.read_bytes()
    raw = _predict(shapes_server, data=data, headers={"Content-Type": "image/jpeg"})
    b64 = _predict(shapes_server, json={"image": base64.b64encode(data).decode()})
    for r in (raw, b64):
        assert r.status_code == 200
        assert r.json()["predictions"][0]["label"] == label_of(path)
    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in shapes_images]
    batch = requests.post(shapes_server.url + "/models/shapes/predict?top_k=2", files=files, timeout=60)
    assert batch.status_code == 200
    preds = batch.json()["predictions"]
    assert [p["label"] for p in preds] == [label_of(p) for p in shapes_images]
    assert all(len(p["top_k"]) == 2 for p in preds)


def _http_request(
    server: LiveServer,
    method: str,
    path: str,
    body: bytes = b"",
    content_type: str = "",
    headers: dict[str, str] | None = None,
) -> bytes:
    host_port = server.url.removeprefix("http://")
    head = f"{method} {path} HTTP/1.1\r\nHost: {host_port}\r\nContent-Length: {len(body)}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return (head + "\r\n").encode() + body


def _read_response(stream: object) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (status, lower-case headers, body by Content-Length) from a socket file."""
    status_line = stream.readline()  # type: ignore[attr-defined]
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers = {}
    while (line := stream.readline().strip()) != b"":  # type: ignore[attr-defined]
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers["content-length"]))  # type: ignore[attr-defined]
    return int(status_line.split()[1]), headers, body


def test_keep_alive_pipelining_and_vanishing_clients(
    shapes_server: LiveServer, shapes_images: list[Path]
) -> None:
    """Back-to-back and pipelined requests on one kept-alive connection, and clients that hang up, with or
    without reading the answer."""
    path = shapes_images[1]
    predict = _http_request(shapes_server, "POST", "/predict", path.read_bytes(), "image/jpeg")
    address = shapes_server.url.removeprefix("http://").split(":")
    with socket.create_connection((address[0], int(address[1])), timeout=30) as sock:
        stream = sock.makefile("rb")
        # three requests in one write: answered in order on the same connection
        sock.sendall(
            _http_request(shapes_server, "GET", "/v2/health/live")
            + predict
            + _http_request(shapes_server, "GET", "/v2/health/ready")
        )
        answers = [_read_response(stream) for _ in range(3)]
        assert [status for status, _h, _b in answers] == [200, 200, 200]
        assert json.loads(answers[1][2])["predictions"][0]["label"] == label_of(path)
        for _ in range(20):  # back to back, as a closed-loop client posts
            sock.sendall(predict)
            status, headers, body = _read_response(stream)
            assert status == 200
            assert headers.get("connection", "").lower() != "close"
            assert json.loads(body)["predictions"][0]["label"] == label_of(path)
    for read_answer in (True, False) * 5:
        with socket.create_connection((address[0], int(address[1])), timeout=30) as sock:
            sock.sendall(predict)
            if read_answer:
                assert _read_response(sock.makefile("rb"))[0] == 200
    half_sent = predict[: len(predict) // 2]
    with socket.create_connection((address[0], int(address[1])), timeout=30) as sock:
        sock.sendall(half_sent)  # hangs up in the middle of the body
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = requests.get(shapes_server.url + "/metrics", timeout=30).text
        gauge = next(
            line for line in metrics.splitlines() if line.startswith("deploykit_requests_in_flight ")
        )
        if float(gauge.split()[1]) == 1:  # only this scrape: every hung-up request was finished
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"requests still in flight: {gauge}")
    assert _predict(shapes_server, files={"file": (path.name, path.read_bytes())}).status_code == 200


def test_an_answer_before_the_body_is_read_keeps_the_connection(
    shapes_server: LiveServer, shapes_images: list[Path]
) -> None:
    """A 404/405 answered without reading a large body: the same connection serves the next request, as
    V2 clients expect."""
    big = b"\x00" * 1_000_000
    predict = _http_request(shapes_server, "POST", "/predict", shapes_images[0].read_bytes(), "image/jpeg")
    address = shapes_server.url.removeprefix("http://").split(":")
    with socket.create_connection((address[0], int(address[1])), timeout=30) as sock:
        stream = sock.makefile("rb")
        for method, path, status in (
            ("POST", "/models/nope/predict", 404),
            ("POST", "/v2/models/nope/infer", 404),
            ("POST", "/v2/health/live", 405),
            ("PUT", "/models", 405),
        ):
            sock.sendall(_http_request(shapes_server, method, path, big, "application/octet-stream"))
            answer, headers, body = _read_response(stream)
            assert answer == status, (path, body)
            assert "error" in json.loads(body)
            assert headers.get("connection", "").lower() != "close"
            sock.sendall(predict)
            assert _read_response(stream)[0] == 200, path


@pytest.fixture(scope="module")
def fingerprint_mismatch_onnx(shapes_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example model with its card's fingerprint values shifted: the weights are intact, the self-test
    must fail."""
    import onnx

    from deploykit.card import card_from_metadata, write_card

    model = onnx.load(str(shapes_onnx))
    card = card_from_metadata({p.key: p.value for p in model.metadata_props})
    assert card.fingerprint is not None
    shifted = replace(card.fingerprint, values=tuple(v + 1.0 for v in card.fingerprint.values))
    write_card(model, card.replace(fingerprint=shifted))
    target = tmp_path_factory.mktemp("mismatch") / "mismatch.onnx"
    onnx.save(model, str(target))
    return target


def test_an_early_401_or_503_keeps_the_connection(
    shapes_onnx: Path, fingerprint_mismatch_onnx: Path, shapes_images: list[Path], tmp_path: Path
) -> None:
    """A 401 (no API key) and a 503 (a model that failed its self-test), both answered without reading a
    large body: the same kept-alive connection then serves a prediction."""
    server = start_server(
        [str(shapes_onnx), f"broken={fingerprint_mismatch_onnx}"],
        tmp_path / "server.log",
        env={"DEPLOYKIT_API_KEY": "k3y"},
        ready_path="/v2/health/live",  # never ready: one of its models failed the self-test
    )
    try:
        big = b"\x00" * 1_000_000
        key = {"X-API-Key": "k3y"}
        path = shapes_images[0]
        address = server.url.removeprefix("http://").split(":")
        with socket.create_connection((address[0], int(address[1])), timeout=60) as sock:
            stream = sock.makefile("rb")
            sock.sendall(_http_request(server, "POST", "/predict", big, "image/jpeg"))
            status, headers, body = _read_response(stream)
            assert status == 401
            assert json.loads(body) == {
                "error": "Missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'."
            }
            assert headers["www-authenticate"] == 'Bearer realm="deploykit"'
            assert headers.get("connection", "").lower() != "close"
            # a prediction that arrives while the models load waits for them: then the broken one is a 503
            sock.sendall(_http_request(server, "POST", "/models/broken/predict", big, "image/jpeg", key))
            status, headers, body = _read_response(stream)
            assert status == 503
            error = json.loads(body)["error"]
            assert error.startswith("Model 'broken' is not ready: fingerprint self-test failed"), error
            assert headers["retry-after"] == "5"
            assert headers.get("connection", "").lower() != "close"
            sock.sendall(_http_request(server, "POST", "/predict", path.read_bytes(), "image/jpeg", key))
            status, _headers, body = _read_response(stream)
            assert status == 200, body
            assert json.loads(body)["predictions"][0]["label"] == label_of(path)
        assert requests.get(server.url + "/v2/health/ready", timeout=30).status_code == 503
        assert "Traceback" not in server.log()
    finally:
        server.terminate()


def test_no_self_test_serves_a_model_whose_fingerprint_differs(  # type: ignore[no-untyped-def]
    live_server_factory, fingerprint_mismatch_onnx: Path, shapes_images: list[Path]
) -> None:
    """--no-self-test: ready as soon as the model loads, even with a fingerprint this machine does not
    reproduce (without it the same file is never ready: the test above)."""
    server = live_server_factory(str(fingerprint_mismatch_onnx), "--no-self-test")
    assert requests.get(server.url + "/models/mismatch", timeout=30).json()["ready"] is True
    path = shapes_images[3]
    r = _predict(server, data=path.read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200
    assert r.json()["predictions"][0]["label"] == label_of(path)
    assert "self-test skipped" in server.log()
    assert "self-test failed" not in server.log()


def test_serve_options_reach_the_running_server(  # type: ignore[no-untyped-def]
    live_server_factory, shapes_onnx: Path, shapes_images: list[Path], shapes_server: LiveServer
) -> None:
    """The options that the help lists, passed to a running server: each has the effect serving.md gives."""
    origin = "https://app.example"
    server = live_server_factory(
        str(shapes_onnx),
        "--cors-origin", origin,
        "--max-request-images", "2",
        "--instances", "1",
        "--intra-op-threads", "1",
        "--max-batch-delay-ms", "600000",
        "--provider", "cpu",
        "--log-level", "warning",
    )
    images = [(p.name, p.read_bytes()) for p in shapes_images[:3]]
    # --intra-op-threads: every call on that many threads, one session (no solo one); --instances 1: batches
    # of up to 8; --provider cpu
    model = requests.get(server.url + "/models/shapes", timeout=30).json()
    assert model["inference"] == {"instances": 1, "threads": 1, "solo_threads": 1, "max_batch_size": 8}
    config = requests.get(server.url + "/v2/models/shapes/config", timeout=30).json()
    assert config["instance_group"] == [{"name": "shapes", "kind": "KIND_CPU", "count": 1}]
    # --max-request-images 2, on the REST and the V2 routes
    two = _predict(server, files=[("file", image) for image in images[:2]], headers={"Origin": origin})
    assert two.status_code == 200, two.text
    assert [p["label"] for p in two.json()["predictions"]] == [label_of(p) for p in shapes_images[:2]]
    three = _predict(server, files=[("file", image) for image in images])
    assert three.status_code == 413
    assert three.json()["error"] == (
        "The request has 3 images; this server takes at most 2 per request (--max-request-images). "
        "Send the rest in further requests."
    )
    three_rows = {"name": "input", "shape": [3, 3, 64, 64], "datatype": "FP32", "data": [0.0] * 3 * 12288}
    rows = requests.post(server.url + "/v2/models/shapes/infer", json={"inputs": [three_rows]}, timeout=30)
    assert rows.status_code == 413
    assert "--max-request-images" in rows.json()["error"]
    # --max-batch-delay-ms: a lone request never waits for others (here it would wait ten minutes)
    assert two.json()["timings_ms"]["queue"] < 600_000
    assert _metric(server, "deploykit_inference_calls_total", model="shapes", session="solo") == 0
    assert _metric(server, "deploykit_inference_calls_total", model="shapes", session="shared") == 1
    # --cors-origin: that origin is allowed, on answers and preflights; no other
    assert two.headers["Access-Control-Allow-Origin"] == origin
    assert two.headers["Vary"] == "Origin"
    assert "Retry-After" in two.headers["Access-Control-Expose-Headers"]
    preflight = requests.options(
        server.url + "/predict",
        headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
        timeout=30,
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == origin
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "X-API-Key" in preflight.headers["Access-Control-Allow-Headers"]
    other = requests.get(server.url + "/models", headers={"Origin": "https://other.example"}, timeout=30)
    assert other.status_code == 200
    assert "Access-Control-Allow-Origin" not in other.headers
    plain = requests.get(shapes_server.url + "/models", headers={"Origin": origin}, timeout=30)
    assert "Access-Control-Allow-Origin" not in plain.headers  # no --cors-origin, no CORS headers
    # --log-level warning: the announcement, none of the info lines a default server writes
    assert f"Serving shapes on {server.url}" in server.log()
    assert "[INFO]" not in server.log()
    assert "[INFO] deploykit.serve: model 'shapes' loaded" in shapes_server.log()


def test_the_default_bind_is_loopback_only(shapes_onnx: Path, tmp_path: Path) -> None:
    """serving.md: "The server binds to 127.0.0.1 unless --host 0.0.0.0". Another address of this machine
    (127.0.0.2, on the loopback interface too) reaches a server bound to every interface, and is refused by
    the default one."""
    port = free_port()
    with _serving([str(shapes_onnx), "--port", str(port)], tmp_path / "default.log") as url:
        assert url == f"http://127.0.0.1:{port}"
        assert requests.get(url + "/v2/health/live", timeout=30).status_code == 200
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", port), timeout=30)
    port = free_port()
    with _serving([str(shapes_onnx), "--port", str(port), "--host", "0.0.0.0"], tmp_path / "all.log") as url:
        assert url == f"http://0.0.0.0:{port}"
        assert requests.get(f"http://127.0.0.2:{port}/v2/health/live", timeout=30).status_code == 200


@contextmanager
def _serving(args: list[str], log_path: Path) -> Iterator[str]:
    """`deploykit serve ARGS` exactly as given, until its "Serving ... on URL" line; yields URL, then stops
    it with SIGTERM."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "deploykit", "serve", *args], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        while not (found := re.search(r"Serving \S+ on (http://\S+)", log_path.read_text(errors="replace"))):
            assert process.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")
            time.sleep(0.01)
        ready = found.group(1).replace("0.0.0.0", "127.0.0.1") + "/v2/health/ready"
        while requests.get(ready, timeout=30).status_code != 200:  # the models are still loading
            assert process.poll() is None, log_path.read_text(errors="replace")
            time.sleep(0.05)
        yield found.group(1)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text(errors="replace")


def test_start_up_errors_are_one_line(shapes_onnx: Path, absent_provider: tuple[str, str]) -> None:
    """A --host that is not an address of this machine (exit 1), a --provider this onnxruntime lacks and
    values out of range (exit 2): one line, before anything is served."""
    short, full = absent_provider
    for args, code, line in (
        (
            ["--host", "192.0.2.1"],  # TEST-NET-1: documentation only, never an address of a real machine
            1,
            "Error: Cannot listen on 192.0.2.1:0: Cannot assign requested address. Give --host an address of "
            "this machine (127.0.0.1, or 0.0.0.0 for every interface).",
        ),
        (
            ["--provider", short],
            2,
            f"Error: Requested provider {short!r} ({full}) is not available; available providers are "
            f"{', '.join(available_providers())}. Install the matching onnxruntime package (e.g. "
            "onnxruntime-gpu) or choose another --provider.",
        ),
        (["--max-batch-delay-ms", "-1"], 2, "Error: --max-batch-delay-ms must be >= 0, got -1.0."),
        (["--intra-op-threads", "0"], 2, "Error: --intra-op-threads must be at least 1, got 0."),
        (["--max-request-images", "0"], 2, "Error: --max-request-images must be at least 1, got 0."),
    ):
        result = run_cli("serve", str(shapes_onnx), "--port", "0", *args, env={"COLUMNS": "250"})
        assert result.returncode == code, (args, result.stderr)
        assert result.stderr.strip() == line
        assert result.stdout == ""
    log_level = run_cli("serve", str(shapes_onnx), "--port", "0", "--log-level", "loud")
    assert log_level.returncode == 2
    assert "Invalid value for --log-level: unknown log level 'loud'" in log_level.stderr


def test_a_malformed_chunked_body_is_a_400_that_closes_the_connection(shapes_server: LiveServer) -> None:
    """The HTTP server refuses it before the app sees it, in its own plain text, and says it closes."""
    address = shapes_server.url.removeprefix("http://").split(":")
    for path in ("/predict", "/v2/models/shapes/infer"):
        with socket.create_connection((address[0], int(address[1])), timeout=30) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                "Transfer-Encoding: chunked\r\n\r\nzz\r\n".encode()
            )
            status, headers, body = _read_response(sock.makefile("rb"))
        assert status == 400, body
        assert headers["connection"].lower() == "close"
        assert headers["content-type"].startswith("text/plain")
        assert b"Invalid chunk size" in body
    assert requests.get(shapes_server.url + "/v2/health/ready", timeout=30).status_code == 200
    assert "Traceback" not in shapes_server.log()


def test_idle_kept_alive_connection_does_not_hold_the_only_thread(
    live_server_factory,
    shapes_onnx: Path,
    shapes_images: list[Path],  # type: ignore[no-untyped-def]
) -> None:
    server = live_server_factory(str(shapes_onnx), "--threads", "1")
    predict = _http_request(server, "POST", "/predict", shapes_images[0].read_bytes(), "image/jpeg")
    address = server.url.removeprefix("http://").split(":")
    with (
        socket.create_connection((address[0], int(address[1])), timeout=10) as first,
        socket.create_connection((address[0], int(address[1])), timeout=10) as second,
    ):
        first_stream, second_stream = first.makefile("rb"), second.makefile("rb")
        for _ in range(3):  # each answered while the other connection sits idle but open
            first.sendall(predict)
            assert _read_response(first_stream)[0] == 200
            second.sendall(predict)
            assert _read_response(second_stream)[0] == 200


def test_bad_input_never_breaks_the_server(shapes_server: LiveServer, shapes_images: list[Path]) -> None:
    url = shapes_server.url
    jpeg = shapes_images[0].read_bytes()
    too_big = _predict(
        shapes_server, data=b"\xff" * (21 * 1024 * 1024), headers={"Content-Type": "image/jpeg"}
    )
    assert too_big.status_code == 413
    assert "--max-body-mb" in too_big.json()["error"]
    text = _predict(shapes_server, files={"file": ("notes.txt", b"just some text")})
    assert text.status_code == 415
    assert "not an image" in text.json()["error"]
    truncated = _predict(shapes_server, files={"file": ("cut.jpg", jpeg[: len(jpeg) // 2])})
    assert truncated.status_code == 400
    assert "truncated" in truncated.json()["error"]
    for bomb in (png_bomb(), png_bomb(8000, 8000)):
        refused = _predict(shapes_server, data=bomb, headers={"Content-Type": "image/png"})
        assert refused.status_code == 400
        assert "decompression bomb" in refused.json()["error"]
    heart = next(p for p in shapes_images if label_of(p) == "heart")
    for name, data in variants(Image.open(heart)).items():
        r = _predict(shapes_server, files={"file": (name, data)})
        assert r.status_code == 200, (name, r.text)
    shape = requests.post(
        url + "/v2/models/shapes/infer",
        timeout=30,
        json={"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}]},
    )
    assert shape.status_code == 400
    assert "'input'" in shape.json()["error"]
    assert "[-1, 3, 64, 64]" in shape.json()["error"]
    dtype = requests.post(
        url + "/v2/models/shapes/infer",
        timeout=30,
        json={
            "inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "INT64", "data": [0] * 12288}]
        },
    )
    assert dtype.status_code == 400
    assert "'input'" in dtype.json()["error"]
    assert "FP32" in dtype.json()["error"]
    assert requests.post(url + "/models/nope/predict", data=jpeg, timeout=30).status_code == 404
    assert requests.get(url + "/v2/models/nope", timeout=30).status_code == 404
    wrong = requests.delete(url + "/predict", timeout=30)
    assert wrong.status_code == 405
    assert wrong.json()["error"]
    # still alive and serving
    assert shapes_server.process.poll() is None
    assert requests.get(url + "/v2/health/ready", timeout=30).status_code == 200
    assert _predict(shapes_server, files={"file": ("ok.jpg", jpeg)}).status_code == 200
    assert "Traceback" not in shapes_server.log()


def test_exif_orientation_is_honoured(shapes_server: LiveServer, shapes_images: list[Path]) -> None:
    from deploykit.card import Preprocess
    from deploykit.images import decode_image, preprocess

    # no shape class depends on orientation, so check that the EXIF-rotated file gives exactly the upright
    # image's tensor and probabilities, while the same pixels without the EXIF tag give different ones
    upright = Image.open(next(p for p in shapes_images if label_of(p) == "triangle")).convert("RGB")
    assert upright.width != upright.height  # rotation changes the resize/crop, so a missed EXIF tag shows
    plain = encode(upright, "PNG")
    tagged = exif_rotated(upright)
    untagged = encode(upright.transpose(Image.Transpose.ROTATE_90), "PNG")
    pp = Preprocess(height=64, width=64, resize=72, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    np.testing.assert_array_equal(preprocess(decode_image(tagged), pp), preprocess(decode_image(plain), pp))

    def probabilities(data: bytes) -> list[float]:
        r = _predict(shapes_server, params={"top_k": 6}, data=data, headers={"Content-Type": "image/png"})
        assert r.status_code == 200
        return [
            p["probability"] for p in sorted(r.json()["predictions"][0]["top_k"], key=lambda p: p["index"])
        ]

    reference = probabilities(plain)
    np.testing.assert_allclose(probabilities(tagged), reference, atol=1e-5)
    assert np.abs(np.asarray(probabilities(untagged)) - reference).max() > 1e-3


def test_models_and_metrics(shapes_server: LiveServer, shapes_images: list[Path]) -> None:
    _predict(shapes_server, files={"file": shapes_images[0].open("rb")})
    models = requests.get(shapes_server.url + "/models", timeout=30).json()["models"]
    assert models[0]["name"] == "shapes"
    assert models[0]["default"]
    assert models[0]["ready"]
    assert models[0]["card"]["labels"][0] == "circle"
    text = requests.get(shapes_server.url + "/metrics", timeout=30).text
    for series in (
        "deploykit_requests_total{",
        "deploykit_request_duration_seconds_bucket{",
        "deploykit_queue_duration_seconds_bucket{",
        "deploykit_batch_size_bucket{",
        "deploykit_inference_duration_seconds_bucket{",
        "deploykit_requests_in_flight",
    ):
        assert series in text, series
    assert 'model="shapes",route="/predict",status="200"' in text


def test_overload_answers_503_with_retry_after(  # type: ignore[no-untyped-def]
    live_server_factory, shapes_onnx: Path, shapes_images: list[Path], gate: InferenceGate
) -> None:
    """One instance, batches of one, a queue of one: while the instance's call is held at the gate and one
    request waits in the queue, a further request is answered 503 at once, with Retry-After; the other two
    are answered once the call may finish."""
    server = live_server_factory(
        str(shapes_onnx), "--max-queue", "1", "--instances", "1", "--max-batch-size", "1", "--threads", "4",
        env=gate.env,
    )
    image = shapes_images[0].read_bytes()

    def post() -> requests.Response:
        return _predict(server, data=image, headers={"Content-Type": "image/jpeg"})

    gate.close()
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(post)
        gate.wait_reached(1)  # the one instance is busy with it
        others = [pool.submit(post) for _ in range(2)]
        # one of the two is queued, and cannot be answered while the call is held: the other is refused
        done, _ = wait(others, timeout=60, return_when=FIRST_COMPLETED)
        [refused] = done
        assert not running.done()
        [queued] = [f for f in others if f is not refused]
        assert not queued.done()
        gate.open()
        answered = [running.result(), queued.result()]
    r = refused.result()
    assert r.status_code == 503
    assert r.headers["Retry-After"] == "1"
    assert r.json() == {"error": "Model 'shapes' is overloaded (1 requests queued); retry later."}
    assert [a.status_code for a in answered] == [200, 200]
    assert all(a.json()["predictions"][0]["label"] == label_of(shapes_images[0]) for a in answered)
    assert gate.reached == 2  # the refused request never ran
    refusals = _metric(
        server, "deploykit_requests_total", model="shapes", route="/predict", method="POST", status="503"
    )
    assert refusals == 1
    assert post().status_code == 200


def test_requests_queued_behind_busy_instances_run_as_one_batch(  # type: ignore[no-untyped-def]
    live_server_factory, shapes_onnx: Path, shapes_images: list[Path], gate: InferenceGate
) -> None:
    """Batching once every instance is busy: two requests that queued behind the one held call run as one
    ONNX Runtime call of two rows (a queue of two, and a third request refused, show that both waited)."""
    server = live_server_factory(
        str(shapes_onnx), "--max-queue", "2", "--instances", "1", "--max-batch-size", "8", "--threads", "4",
        env=gate.env,
    )
    images = {label_of(p): p.read_bytes() for p in shapes_images}
    labels = list(images)[:4]

    def post(label: str) -> requests.Response:
        return _predict(server, data=images[label], headers={"Content-Type": "image/jpeg"})

    gate.close()
    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(post, labels[0])
        gate.wait_reached(1)
        others = {pool.submit(post, label): label for label in labels[1:]}
        done, _ = wait(others, timeout=60, return_when=FIRST_COMPLETED)
        [refused] = done
        assert refused.result().status_code == 503
        gate.open()
        answers = {others[f]: f.result() for f in others if f is not refused}
        answers[labels[0]] = running.result()
    for label, answer in answers.items():
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"][0]["label"] == label
    assert gate.reached == 2  # the held call, then one call for both queued requests
    assert _metric(server, "deploykit_batch_size_count", model="shapes") == 2
    assert _metric(server, "deploykit_batch_size_sum", model="shapes") == 3


def test_request_timeout_answers_504(  # type: ignore[no-untyped-def]
    live_server_factory, shapes_onnx: Path, shapes_images: list[Path], gate: InferenceGate
) -> None:
    """A request whose call is held past --request-timeout gets 504; requests queued behind it time out too,
    each taken out of a queue that still holds the others (a 500 before queue entries compared by
    identity)."""
    server = live_server_factory(
        str(shapes_onnx), "--request-timeout", "0.5", "--instances", "1", env=gate.env
    )
    image = shapes_images[0].read_bytes()

    def post() -> requests.Response:
        return _predict(server, data=image, headers={"Content-Type": "image/jpeg"})

    gate.close()
    started = time.monotonic()
    r = post()
    assert time.monotonic() - started >= 0.5
    assert r.status_code == 504
    assert r.json() == {"error": "The request waited more than 0.5 s for model 'shapes'."}
    with ThreadPoolExecutor(6) as pool:  # the one instance is still held: these can only wait in the queue
        answers = list(pool.map(lambda _: post(), range(6)))
    assert [a.status_code for a in answers] == [504] * 6, [a.text for a in answers]
    assert gate.reached == 1
    gate.open()
    assert requests.get(server.url + "/v2/health/ready", timeout=30).status_code == 200
    assert "Traceback" not in server.log()


def test_sigterm_finishes_accepted_requests(  # type: ignore[no-untyped-def]
    live_server_factory, shapes_onnx: Path, shapes_images: list[Path], gate: InferenceGate
) -> None:
    """SIGTERM while six requests are in the app (one call held at the gate, five queued behind it):
    readiness turns 503 at once on a kept-alive connection, every request is answered in full once the call
    may finish, and the server exits 0."""
    server = live_server_factory(
        str(shapes_onnx), "--instances", "1", "--max-batch-size", "1", "--threads", "8",
        "--graceful-timeout", "60", env=gate.env,
    )
    files = [("file", (f"{i}.jpg", shapes_images[i % len(shapes_images)].read_bytes())) for i in range(16)]
    session = requests.Session()  # a kept-alive connection, to ask for readiness while draining
    assert session.get(server.url + "/v2/health/ready", timeout=30).status_code == 200
    in_flight = 6
    gate.close()
    with ThreadPoolExecutor(in_flight) as pool:
        futures = [
            pool.submit(requests.post, server.url + "/predict", files=files, timeout=120)
            for _ in range(in_flight)
        ]
        gate.wait_reached(1)
        # none can be answered while the call is held: wait until the app has them all (and this scrape)
        while _metric(server, "deploykit_requests_in_flight") < in_flight + 1:
            assert not any(f.done() for f in futures), [f.result().text for f in futures if f.done()]
            time.sleep(0.01)
        # touch the kept-alive connection again so that the server cannot have closed it as idle
        assert session.get(server.url + "/v2/health/ready", timeout=30).status_code == 200
        server.process.send_signal(signal.SIGTERM)
        readiness = []
        while True:
            try:
                readiness.append(session.get(server.url + "/v2/health/ready", timeout=30).status_code)
            except requests.ConnectionError:
                break
            if readiness[-1] == 503:
                break
            time.sleep(0.01)
        assert readiness[-1] == 503, readiness
        assert not any(f.done() for f in futures)
        gate.open()
        answers = [f.result() for f in futures]
    assert [r.status_code for r in answers] == [200] * in_flight
    expected = [label_of(shapes_images[i % len(shapes_images)]) for i in range(16)]
    assert all([p["label"] for p in r.json()["predictions"]] == expected for r in answers)
    assert server.process.wait(timeout=60) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/v2/health/live", timeout=5)


def test_api_key_and_several_models(
    live_server_factory,
    shapes_onnx: Path,  # type: ignore[no-untyped-def]
    shapes_images: list[Path],
) -> None:
    server = live_server_factory(
        str(shapes_onnx),
        f"renamed={shapes_onnx}",
        "--instances",
        "2",
        env={"DEPLOYKIT_API_KEY": "k3y"},
    )
    image = shapes_images[0].read_bytes()
    assert _predict(server, data=image, headers={"Content-Type": "image/jpeg"}).status_code == 401
    wrong = _predict(server, data=image, headers={"Content-Type": "image/jpeg", "X-API-Key": "nope"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]
    assert requests.get(server.url + "/models", timeout=30).status_code == 401
    auth = {"Authorization": "Bearer k3y"}
    for _ in range(6):
        r = requests.post(
            server.url + "/models/renamed/predict", files={"file": ("a.jpg", image)}, headers=auth, timeout=30
        )
        assert r.status_code == 200
        assert r.json()["model"] == "renamed"
    config = requests.get(server.url + "/v2/models/renamed/config", headers=auth, timeout=30).json()
    assert config["instance_group"] == [{"name": "renamed", "kind": "KIND_CPU", "count": 2}]
    models = requests.get(server.url + "/models", headers={"X-API-Key": "k3y"}, timeout=30).json()["models"]
    assert [m["name"] for m in models] == ["shapes", "renamed"]
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics", "/"):
        assert requests.get(server.url + path, timeout=30).status_code == 200, path
    text = requests.get(server.url + "/metrics", timeout=30).text
    line = next(
        x
        for x in text.splitlines()
        if x.startswith("deploykit_requests_total{") and 'model="renamed"' in x and 'status="200"' in x
    )
    assert float(line.split()[-1]) == 6.0


def test_a_lone_request_runs_solo_and_concurrent_ones_share(  # type: ignore[no-untyped-def]
    live_server_factory, shapes_onnx: Path, shapes_images: list[Path], gate: InferenceGate
) -> None:
    """The default plan on this machine's cores (serving.md): one instance per core, one thread per call side
    by side, every core for a call alone (a solo session, when there are two cores or more). A lone request
    runs solo; one that arrives while another call runs (held at the gate) runs beside it, shared."""
    from deploykit.serve.registry import usable_cores

    server = live_server_factory(str(shapes_onnx), env=gate.env)
    cores = usable_cores()
    plan = requests.get(server.url + "/models/shapes", timeout=30).json()["inference"]
    assert plan == {
        "instances": cores, "threads": 1, "solo_threads": cores, "max_batch_size": 2 if cores > 1 else 8
    }
    triton = requests.get(server.url + "/v2/models/shapes/config", timeout=30).json()
    assert triton["max_batch_size"] == plan["max_batch_size"]
    assert triton["instance_group"][0]["count"] == cores
    image = shapes_images[0].read_bytes()

    def post() -> requests.Response:
        return _predict(server, data=image, headers={"Content-Type": "image/jpeg"})

    def calls() -> dict[str, float]:
        return {
            session: _metric(server, "deploykit_inference_calls_total", model="shapes", session=session)
            for session in ("solo", "shared")
        }

    for _ in range(5):  # one at a time: each call has the cores to itself
        assert post().status_code == 200
    has_solo = cores > 1
    assert calls() == ({"solo": 5.0, "shared": 0.0} if has_solo else {"solo": 0.0, "shared": 5.0})
    gate.close()
    with ThreadPoolExecutor(2) as pool:
        alone = pool.submit(post)
        gate.wait_reached(1)
        beside = pool.submit(post)
        if has_solo:
            gate.wait_reached(2)  # a second instance was free: it runs now, beside the held call
        gate.open()
        assert [alone.result().status_code, beside.result().status_code] == [200, 200]
    assert calls() == ({"solo": 6.0, "shared": 1.0} if has_solo else {"solo": 0.0, "shared": 7.0})


def test_cli_errors_and_help(tmp_path: Path, shapes_onnx: Path) -> None:
    none = run_cli("serve", "--port", "0", cwd=tmp_path)
    assert none.returncode == 2
    assert "No .onnx files" in none.stderr
    assert "Traceback" not in none.stderr
    missing = run_cli("serve", str(tmp_path / "missing.onnx"))
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a model")
    bad_file = run_cli("serve", str(corrupt), "--port", "0")
    assert bad_file.returncode == 1
    assert "not a readable ONNX file" in bad_file.stderr
    assert "Traceback" not in bad_file.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        in_use = run_cli("serve", str(shapes_onnx), "--port", port, timeout=60)
    assert in_use.returncode == 1
    assert f"Port {port} is already in use on 127.0.0.1" in in_use.stderr
    assert "Serving" not in in_use.stdout + in_use.stderr
    assert "Traceback" not in in_use.stderr
    help_text = run_cli("serve", "--help", env={"COLUMNS": "200"}).stdout
    for option in (
        "--host",
        "--port",
        "--threads",
        "--max-connections",
        "--max-batch-size",
        "--instances",
        "--max-batch-delay-ms",
        "--max-queue",
        "--request-timeout",
        "--max-body-mb",
        "--max-request-images",
        "--client-timeout",
        "--graceful-timeout",
        "--api-key",
        "DEPLOYKIT_API_KEY",
        "--cors-origin",
        "--intra-op-threads",
        "--provider",
        "--no-self-test",
        "--log-level",
    ):
        assert option in help_text, option


def test_server_never_imports_torch(shapes_onnx: Path) -> None:
    code = (
        "import sys\n"
        "from deploykit.serve.app import create_app\n"
        "from deploykit.serve.config import ServeConfig, parse_model_specs\n"
        f"app = create_app(ServeConfig(models=parse_model_specs([{str(shapes_onnx)!r}])))\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "r = app.test_client().post('/predict', data=data, content_type='image/jpeg')\n"
        "assert r.status_code == 200, r.json\n"
        "print('torch' in sys.modules, 'torchvision' in sys.modules)\n"
    )
    image = sorted(Path(__file__).resolve().parents[2].glob("examples/shapes/images/*.jpg"))[0]
    out = subprocess.run(
        [sys.executable, "-c", code, str(image)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
