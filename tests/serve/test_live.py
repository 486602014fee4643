"""End to end: a real `deploykit serve` subprocess on a free loopback port, real HTTP."""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import LiveServer, run_cli
from tests.serve.helpers import encode, exif_rotated, label_of, png_bomb, variants

pytestmark = pytest.mark.slow


def _predict(server: LiveServer, **kwargs: object) -> requests.Response:
    return requests.post(server.url + "/predict", timeout=60, **kwargs)  # type: ignore[arg-type]


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
    server: LiveServer, method: str, path: str, body: bytes = b"", content_type: str = ""
) -> bytes:
    host_port = server.url.removeprefix("http://")
    head = f"{method} {path} HTTP/1.1\r\nHost: {host_port}\r\nContent-Length: {len(body)}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
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
        assert 400 <= refused.status_code < 500
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
    pp = Preprocess(crop=64, resize=72, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
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


def test_overload_answers_503_with_retry_after(live_server_factory, resnet18_onnx: Path) -> None:  # type: ignore[no-untyped-def]
    server = live_server_factory(
        str(resnet18_onnx), "--max-queue", "1", "--max-batch-size", "1", "--threads", "16"
    )
    photo = encode(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)), "JPEG"
    )
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda _i: _predict(server, files={"file": ("p.jpg", photo)}), range(24)))
    statuses = [r.status_code for r in answers]
    assert set(statuses) == {200, 503}, statuses
    for r in answers:
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1
            assert "overloaded" in r.json()["error"]
    assert _predict(server, files={"file": ("p.jpg", photo)}).status_code == 200


def test_request_timeout_answers_504(live_server_factory, resnet18_onnx: Path) -> None:  # type: ignore[no-untyped-def]
    server = live_server_factory(str(resnet18_onnx), "--request-timeout", "0.001", "--instances", "1")
    photo = encode(Image.new("RGB", (256, 256), (10, 200, 30)), "JPEG")
    r = _predict(server, files={"file": ("p.jpg", photo)})
    assert r.status_code == 504
    assert "waited" in r.json()["error"]
    # requests sent together: those queued behind another time out too, each taken out of a queue that
    # still holds the others (a 500 before queue entries compared by identity)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: _predict(server, files={"file": ("p.jpg", photo)}), range(6)))
    assert [a.status_code for a in answers] == [504] * 6, [a.text for a in answers]
    assert requests.get(server.url + "/v2/health/ready", timeout=30).status_code == 200


def test_sigterm_finishes_accepted_requests(live_server_factory, resnet18_onnx: Path) -> None:  # type: ignore[no-untyped-def]
    server = live_server_factory(
        str(resnet18_onnx), "--max-batch-size", "1", "--threads", "8", "--graceful-timeout", "60"
    )
    photo = encode(
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (240, 320, 3), dtype=np.uint8)), "JPEG"
    )
    files = [("file", (f"{i}.jpg", photo)) for i in range(16)]
    session = requests.Session()  # a kept-alive connection, to ask for readiness while draining
    assert session.get(server.url + "/v2/health/ready", timeout=30).status_code == 200
    in_flight = 6
    with ThreadPoolExecutor(in_flight) as pool:
        futures = [
            pool.submit(requests.post, server.url + "/predict", files=files, timeout=120)
            for _ in range(in_flight)
        ]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until the server has accepted every request
            gauge = [
                line
                for line in requests.get(server.url + "/metrics", timeout=30).text.splitlines()
                if line.startswith("deploykit_requests_in_flight ")
            ]
            if gauge and float(gauge[0].split()[1]) >= in_flight + 1:
                break
        else:
            pytest.fail("the requests were not all accepted")
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
        answers = [f.result() for f in futures]
    assert readiness[-1] == 503, readiness
    assert [r.status_code for r in answers] == [200] * in_flight
    assert all(len(r.json()["predictions"]) == 16 for r in answers)
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
    live_server_factory, resnet18_onnx: Path
) -> None:
    server = live_server_factory(str(resnet18_onnx))
    model = requests.get(server.url + "/models/resnet18", timeout=30).json()
    plan = model["inference"]
    assert plan["instances"] >= 1
    assert plan["threads"] <= plan["solo_threads"]
    triton = requests.get(server.url + "/v2/models/resnet18/config", timeout=30).json()
    assert triton["max_batch_size"] == plan["max_batch_size"]
    assert triton["instance_group"][0]["count"] == plan["instances"]
    photo = encode(Image.new("RGB", (256, 256), (10, 200, 30)), "JPEG")

    def calls() -> dict[str, float]:
        text = requests.get(server.url + "/metrics", timeout=30).text
        counts = {"solo": 0.0, "shared": 0.0}
        for line in text.splitlines():
            if line.startswith("deploykit_inference_calls_total{"):
                counts[line.split('session="')[1].split('"')[0]] = float(line.split()[-1])
        return counts

    for _ in range(5):  # one at a time: each call has the worker to itself
        assert _predict(server, files={"file": ("p.jpg", photo)}).status_code == 200
    has_solo = plan["solo_threads"] != plan["threads"]
    assert calls() == ({"solo": 5.0, "shared": 0.0} if has_solo else {"solo": 0.0, "shared": 5.0})
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _predict(server, files={"file": ("p.jpg", photo)}), range(24)))
    assert [r.status_code for r in answers] == [200] * 24
    after = calls()
    assert after["shared"] >= 1  # side by side (or batched): never every one of them alone
    assert after["solo"] + after["shared"] <= 5 + 24


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
