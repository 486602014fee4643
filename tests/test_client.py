"""PredictClient against a real `deploykit serve` subprocess on loopback, over real HTTP.

Retry and fallback behaviour is checked with a tiny real HTTP server in front of the real one
(``FrontServer``): it answers scripted statuses first (an overloaded server: 503/429 with Retry-After, or a
V2 server without the classification extension) and forwards everything else to deploykit, counting
the requests it sees.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import LiveServer, free_port, run_cli

from deploykit.card import read_card
from deploykit.client import PredictClient, ServerError, _parse_retry_after
from deploykit.errors import ConnectionFailedError, ExitCode, RequestError, UsageError
from deploykit.images import load_image, preprocess
from deploykit.predict import SHRINK_MIN_BYTES, predict_images

Rule = Callable[[str, dict[str, str], bytes], "tuple[int, dict[str, str], bytes] | None"]
FORWARDED_HEADERS = ("Content-Type", "Authorization", "X-API-Key", "Inference-Header-Content-Length")


def true_label(path: Path) -> str:
    return path.name.split("_")[0]


class FrontServer:
    """A threading HTTP server on a free loopback port: ``rule`` may answer a request itself, else it is
    forwarded to ``upstream``. ``requests`` records (method, path) of everything received."""

    def __init__(self, upstream: str, rule: Rule) -> None:
        self.requests: list[tuple[str, str]] = []
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the client expects

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                front.requests.append((self.command, self.path))
                answer = rule(self.path, dict(self.headers.items()), body)
                if answer is None:
                    headers = {k: self.headers[k] for k in FORWARDED_HEADERS if self.headers.get(k)}
                    upstream_answer = requests.request(self.command, upstream + self.path, data=body,
                                                       headers=headers, timeout=30)
                    answer = (upstream_answer.status_code,
                              {k: v for k, v in upstream_answer.headers.items()
                               if k in ("Content-Type", "Retry-After", "Inference-Header-Content-Length")},
                              upstream_answer.content)
                status, headers, payload = answer
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def busy_first(times: int, status: int = 503, retry_after: str = "0") -> Rule:
    """Answer ``status`` with Retry-After to the first ``times`` prediction requests, then forward."""
    seen = {"n": 0}

    def rule(path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes] | None:
        if "predict" not in path and "infer" not in path:
            return None
        seen["n"] += 1
        if seen["n"] > times:
            return None
        return status, {"Content-Type": "application/json", "Retry-After": retry_after}, \
            json.dumps({"error": "The server is busy."}).encode()

    return rule


@pytest.fixture
def front_factory() -> Iterator[Callable[[str, Rule], FrontServer]]:
    servers: list[FrontServer] = []

    def factory(upstream: str, rule: Rule) -> FrontServer:
        servers.append(FrontServer(upstream, rule))
        return servers[-1]

    yield factory
    for server in servers:
        server.close()


def predicted(front: FrontServer) -> int:
    return sum(1 for _method, path in front.requests if "predict" in path or "infer" in path)


# ---- REST


def test_predict_bytes_top1_matches_true_label(shapes_server: LiveServer, shapes_images: list[Path]) -> None:
    with PredictClient(shapes_server.url) as client:
        for image in shapes_images:
            answer = client.predict_bytes(image.read_bytes(), image.name, top_k=3)
            assert answer.model == "shapes"
            assert answer.filename == image.name
            assert len(answer.top_k) == 3
            assert answer.top_k[0].label == true_label(image)
            probabilities = [p.probability for p in answer.top_k]
            assert probabilities == sorted(probabilities, reverse=True)
            assert 0 < probabilities[0] <= 1


def test_named_model_and_top_k_clamped(shapes_server: LiveServer, shapes_images: list[Path]) -> None:
    with PredictClient(shapes_server.url) as client:
        answer = client.predict_bytes(shapes_images[0].read_bytes(), model="shapes", top_k=50)
    assert len(answer.top_k) == 6  # clamped to the number of classes by the server
    assert abs(sum(p.probability for p in answer.top_k) - 1.0) < 1e-4


def test_model_card_from_server_equals_file_card(shapes_server: LiveServer, shapes_onnx: Path) -> None:
    with PredictClient(shapes_server.url + "/") as client:  # a trailing slash is fine
        assert client.model_card().to_dict() == read_card(shapes_onnx).to_dict()
        assert client.model_card("shapes").labels == read_card(shapes_onnx).labels
        assert [m["name"] for m in client.models()] == ["shapes"]


def test_unknown_model_is_a_request_error_with_the_servers_message(shapes_server: LiveServer,
                                                                    shapes_images: list[Path]) -> None:
    with PredictClient(shapes_server.url) as client, pytest.raises(RequestError) as info:
        client.predict_bytes(shapes_images[0].read_bytes(), model="no-such-model")
    assert info.value.status == 404
    assert "no-such-model" in info.value.message
    assert info.value.exit_code == ExitCode.ERROR


def test_4xx_is_not_retried(shapes_server: LiveServer, shapes_images: list[Path],
                            front_factory: Callable[[str, Rule], FrontServer]) -> None:
    front = front_factory(shapes_server.url, lambda path, headers, body: None)
    with PredictClient(front.url, retries=3) as client, pytest.raises(RequestError) as info:
        client.predict_bytes(b"not an image at all", "junk.jpg")
    assert info.value.status in (400, 415)
    assert "image" in info.value.message.lower()
    assert predicted(front) == 1


@pytest.mark.parametrize("status", [503, 429])
def test_busy_answers_are_retried_then_succeed(status: int, shapes_server: LiveServer,
                                               shapes_images: list[Path],
                                               front_factory: Callable[[str, Rule], FrontServer]) -> None:
    front = front_factory(shapes_server.url, busy_first(2, status))
    with PredictClient(front.url, retries=3) as client:
        answer = client.predict_bytes(shapes_images[0].read_bytes(), shapes_images[0].name)
    assert answer.top_k[0].label == true_label(shapes_images[0])
    assert predicted(front) == 3


def test_retries_exhausted_raise_server_error(shapes_server: LiveServer, shapes_images: list[Path],
                                              front_factory: Callable[[str, Rule], FrontServer]) -> None:
    front = front_factory(shapes_server.url, busy_first(100))
    with PredictClient(front.url, retries=2) as client, pytest.raises(ServerError) as info:
        client.predict_bytes(shapes_images[0].read_bytes())
    assert info.value.status == 503
    assert "busy" in info.value.message
    assert predicted(front) == 3  # the first try and two retries


def test_retry_after_parsing_and_backoff_bounds() -> None:
    assert _parse_retry_after("0") == 0
    assert _parse_retry_after("2.5") == 2.5
    assert _parse_retry_after(None) is None
    assert _parse_retry_after("soon") is None
    in_a_minute = _parse_retry_after(formatdate(time.time() + 60, usegmt=True))
    assert in_a_minute is not None
    assert 55 < in_a_minute <= 60
    assert _parse_retry_after(formatdate(time.time() - 60, usegmt=True)) == 0

    client = PredictClient("http://127.0.0.1:9", backoff=0.2, max_backoff=1.0, max_retry_after=5.0)
    for attempt in range(6):
        ceiling = min(1.0, 0.2 * 2**attempt)
        delays = [client._delay(attempt, None) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jitter
    told = requests.Response()
    told.headers["Retry-After"] = "3"
    assert all(3 <= client._delay(0, told) <= 3.1 for _ in range(20))
    told.headers["Retry-After"] = "3600"
    assert client._delay(0, told) <= 5.1  # capped: a bad header cannot stall the client for an hour


def test_unreachable_server_raises_connection_failed() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with PredictClient(url, retries=1, backoff=0.01) as client, pytest.raises(ConnectionFailedError) as info:
        client.predict_bytes(b"x")
    assert not isinstance(info.value, ServerError)
    assert info.value.exit_code == ExitCode.CONNECTION
    assert url in info.value.message
    assert "connection refused" in info.value.message
    assert "deploykit serve" in str(info.value)


def test_api_key_sent_as_bearer(shapes_onnx: Path, shapes_images: list[Path],
                                live_server_factory: Callable[..., LiveServer]) -> None:
    server = live_server_factory(str(shapes_onnx), "--api-key", "s3cret-key")
    image = shapes_images[0].read_bytes()
    with PredictClient(server.url) as client, pytest.raises(RequestError) as info:
        client.predict_bytes(image)
    assert info.value.status == 401
    assert "--api-key" in str(info.value)
    with PredictClient(server.url, api_key="wrong") as client, pytest.raises(RequestError):
        client.predict_bytes(image)
    with PredictClient(server.url, api_key="s3cret-key") as client:
        assert client.predict_bytes(image).top_k[0].label == true_label(shapes_images[0])
        assert client.model_card().name == "shapes"


# ---- Open Inference Protocol (V2)


def test_v2_matches_rest(shapes_server: LiveServer, shapes_onnx: Path, shapes_images: list[Path]) -> None:
    card = read_card(shapes_onnx)
    with PredictClient(shapes_server.url) as client:
        for image in shapes_images:
            rest = client.predict_bytes(image.read_bytes(), top_k=3).top_k
            v2 = client.predict_image_v2(image.read_bytes(), card=card, top_k=3)
            assert [p.label for p in v2] == [p.label for p in rest]
            assert [p.index for p in v2] == [p.index for p in rest]
            # The classification extension sends scores as text with 6 decimals.
            assert np.allclose([p.probability for p in v2], [p.probability for p in rest], atol=1e-4)


def test_v2_batch_json_and_raw_output_paths(shapes_server: LiveServer, shapes_onnx: Path,
                                            shapes_images: list[Path]) -> None:
    card = read_card(shapes_onnx)
    batch = np.stack([preprocess(load_image(p), card.preprocess) for p in shapes_images])
    with PredictClient(shapes_server.url) as client:
        classified = client.predict_tensor_v2(batch, card=card, top_k=2)
        as_json = client.predict_tensor_v2(batch, card=card, top_k=2, binary=False)
        client._v2_classification = False  # as for a server without the extension: raw logits, top-k here
        raw = client.predict_tensor_v2(batch, card=card, top_k=2)
        raw_json = client.predict_tensor_v2(batch, card=card, top_k=2, binary=False)
    assert [row[0].label for row in classified] == [true_label(p) for p in shapes_images]
    for other in (as_json, raw, raw_json):
        assert [[p.index for p in row] for row in other] == [[p.index for p in row] for row in classified]
        for row, reference in zip(other, classified, strict=True):
            assert np.allclose([p.probability for p in row], [p.probability for p in reference], atol=1e-4)


def test_v2_falls_back_when_the_server_lacks_classification(
        shapes_server: LiveServer, shapes_onnx: Path, shapes_images: list[Path],
        front_factory: Callable[[str, Rule], FrontServer]) -> None:
    def no_classification(path: str, headers: dict[str, str], body: bytes
                          ) -> tuple[int, dict[str, str], bytes] | None:
        if path.endswith("/infer") and b'"classification"' in body:
            return 400, {"Content-Type": "application/json"}, \
                b'{"error": "unknown output parameter: classification"}'
        return None

    front = front_factory(shapes_server.url, no_classification)
    card = read_card(shapes_onnx)
    with PredictClient(front.url) as client:
        labels = [client.predict_image_v2(p.read_bytes(), card=card, top_k=1)[0].label for p in shapes_images]
    assert labels == [true_label(p) for p in shapes_images]
    # One refused classification request, then plain requests only.
    assert predicted(front) == len(shapes_images) + 1


def test_v2_unknown_model_is_a_request_error(shapes_server: LiveServer, shapes_onnx: Path,
                                             shapes_images: list[Path]) -> None:
    card = read_card(shapes_onnx)
    with PredictClient(shapes_server.url) as client, pytest.raises(RequestError) as info:
        client.predict_image_v2(shapes_images[0].read_bytes(), card=card, model="missing")
    assert info.value.status == 404


# ---- through the CLI


def test_cli_retries_a_server_that_answers_503_first(
        shapes_server: LiveServer, shapes_images: list[Path],
        front_factory: Callable[[str, Rule], FrontServer]) -> None:
    front = front_factory(shapes_server.url, busy_first(2))
    result = run_cli("predict", str(shapes_images[0]), "--url", front.url, "--retries", "3", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["label"] == true_label(shapes_images[0])
    assert record["error"] is None
    assert predicted(front) == 3


def test_cli_v2_against_a_server_without_deploykit_routes(
        shapes_server: LiveServer, shapes_onnx: Path, shapes_images: list[Path],
        front_factory: Callable[[str, Rule], FrontServer]) -> None:
    """A plain V2 server (Triton, KServe...) has no /models: the card must come from --card."""

    def v2_only(path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes] | None:
        if path.startswith("/v2/"):
            return None
        return 404, {"Content-Type": "application/json"}, b'{"error": "Not Found"}'

    front = front_factory(shapes_server.url, v2_only)
    images = [str(p) for p in shapes_images[:3]]
    no_card = run_cli("predict", *images, "--url", front.url, "--protocol", "v2")
    assert no_card.returncode == 2
    assert "--card MODEL.onnx" in no_card.stderr
    before = len(front.requests)
    with_card = run_cli("predict", *images, "--url", front.url, "--protocol", "v2",
                        "--card", str(shapes_onnx), "--model", "shapes")
    assert with_card.returncode == 0, with_card.stderr
    got = [json.loads(line) for line in with_card.stdout.splitlines()]
    assert [r["label"] for r in got] == [true_label(Path(p)) for p in images]
    # The model and server metadata once per run, then one request per image.
    assert [path for _method, path in front.requests[before:]] == \
        ["/v2/models/shapes", "/v2"] + ["/v2/models/shapes/infer"] * 3


def server_lists(extensions: list[str], seen: list[dict[str, str]]) -> Rule:
    """A V2 server whose GET /v2 lists ``extensions``; the inference requests' headers go to ``seen``."""

    def rule(path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes] | None:
        if path == "/v2":
            return 200, {"Content-Type": "application/json"}, \
                json.dumps({"name": "other", "version": "1", "extensions": extensions}).encode()
        if path.endswith("/infer"):
            header_length = int(headers.get("Inference-Header-Content-Length", len(body)))
            seen.append({**headers, "request": body[:header_length].decode()})
        return None

    return rule


@pytest.mark.parametrize(("extensions", "flags", "binary", "classification"), [
    ([], [], False, False),
    ([], ["--binary"], True, False),
    (["binary_tensor_data"], [], True, False),
    (["binary_tensor_data"], ["--no-binary"], False, False),
    (["classification"], [], False, True),
    (["binary_tensor_data", "classification"], [], True, True),
])
def test_cli_v2_speaks_the_extensions_the_server_lists(
        extensions: list[str], flags: list[str], binary: bool, classification: bool,
        shapes_server: LiveServer, shapes_onnx: Path, shapes_images: list[Path],
        front_factory: Callable[[str, Rule], FrontServer]) -> None:
    seen: list[dict[str, str]] = []
    front = front_factory(shapes_server.url, server_lists(extensions, seen))
    images = [str(p) for p in shapes_images[:2]]
    result = run_cli("predict", *images, "--url", front.url, "--protocol", "v2", "--card", str(shapes_onnx),
                     "--model", "shapes", "--concurrency", "1", *flags)
    assert result.returncode == 0, result.stderr
    assert [r["label"] for r in strict_records(result.stdout)] == [true_label(Path(p)) for p in images]
    assert [("Inference-Header-Content-Length" in h) for h in seen] == [binary] * len(images)
    assert [('"classification"' in h["request"]) for h in seen] == [classification] * len(images)
    assert sum(1 for _method, path in front.requests if path == "/v2") == 1  # once per run


def answer_with(status: int, body: bytes, content_type: str) -> Rule:
    def rule(path: str, headers: dict[str, str], _body: bytes) -> tuple[int, dict[str, str], bytes] | None:
        return (status, {"Content-Type": content_type}, body) if path.endswith("/infer") else None

    return rule


TRACEBACK_BODY = (b"Traceback (most recent call last):\n  File \"/srv/app.py\", line 9, in infer\n"
                  b"    run(model)\nValueError: Required inputs (['input']) are missing from input feed.\n")
ERROR_BODIES = {
    "error": (500, b'{"error": "ValidationError : 1 validation error\\nid\\n  Input should be a string"}',
              "application/json", "ValidationError : 1 validation error id Input should be a string"),
    "detail": (422, b'{"detail": [{"loc": ["body", "inputs", 0, "shape"], "msg": "Field required"}, '
                    b'{"loc": ["body", "inputs", 0, "data"], "msg": "Field required"}]}', "application/json",
               "body.inputs.0.shape: Field required; body.inputs.0.data: Field required"),
    "traceback": (500, TRACEBACK_BODY, "text/plain",
                  "ValueError: Required inputs (['input']) are missing from input feed."),
    "long": (500, b"x" * 1000, "text/plain", "x" * 197 + "..."),
    "html": (502, b"<html>\n<head><title>502 Bad Gateway</title></head>\n</html>\n", "text/html",
             "HTTP 502: Bad Gateway."),
}


@pytest.mark.parametrize("case", list(ERROR_BODIES))
def test_v2_errors_carry_the_servers_message_on_one_line(
        case: str, shapes_server: LiveServer, shapes_onnx: Path,
        front_factory: Callable[[str, Rule], FrontServer]) -> None:
    status, body, content_type, message = ERROR_BODIES[case]
    front = front_factory(shapes_server.url, answer_with(status, body, content_type))
    tensor = np.zeros((1, 3, 64, 64), dtype=np.float32)
    with PredictClient(front.url, retries=0) as client, pytest.raises((RequestError, ServerError)) as info:
        client.predict_tensor_v2(tensor, card=read_card(shapes_onnx), model="shapes")
    assert info.value.status == status
    assert message in info.value.message
    assert "\n" not in str(info.value)
    assert "Traceback" not in str(info.value)
    assert info.value.hint is None or "--no-binary" not in info.value.hint  # the server lists binary data


def test_v2_card_that_does_not_fit_the_served_model_is_refused(shapes_server: LiveServer,
                                                               shapes_onnx: Path) -> None:
    card = read_card(shapes_onnx)
    smaller = card.replace(preprocess=dataclasses.replace(card.preprocess, height=32, width=32, resize=None))
    with PredictClient(shapes_server.url) as client, pytest.raises(UsageError) as info:
        client.v2_plan("shapes", smaller)
    assert "takes 'input' of shape [-1, 3, 64, 64], but the card's preprocessing makes [-1, 3, 32, 32]" in \
        info.value.message
    assert "--card" in str(info.value)


def test_cli_v2_unknown_model_on_deploykit(shapes_server: LiveServer, shapes_images: list[Path]) -> None:
    result = run_cli("predict", str(shapes_images[0]), "--url", shapes_server.url, "--protocol", "v2",
                     "--model", "nope")
    assert result.returncode == 1
    assert "Unknown model 'nope'" in result.stderr


def answer_after(good: int, status: int, body: bytes,
                 content_type: str = "application/json") -> Rule:
    """Forward the first ``good`` prediction requests, then answer every one with ``status`` and ``body``."""
    seen = {"n": 0}

    def rule(path: str, headers: dict[str, str], _body: bytes) -> tuple[int, dict[str, str], bytes] | None:
        if "predict" not in path and "infer" not in path:
            return None
        seen["n"] += 1
        return None if seen["n"] <= good else (status, {"Content-Type": content_type}, body)

    return rule


def strict_records(stdout: str) -> list[dict]:
    """JSON Lines parsed as strict JSON parsers (JavaScript, Go) do: NaN and Infinity are errors."""
    return [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the output"))
            for line in stdout.splitlines()]


@pytest.mark.parametrize(("protocol", "status"), [("rest", 500), ("v2", 500), ("rest", 503), ("v2", 502)])
def test_cli_server_failing_with_5xx_stops_with_exit_4_keeping_earlier_records(
        protocol: str, status: int, shapes_server: LiveServer, shapes_images: list[Path],
        front_factory: Callable[[str, Rule], FrontServer]) -> None:
    front = front_factory(shapes_server.url, answer_after(1, status, b'{"error": "internal boom"}'))
    images = [str(p) for p in shapes_images[:4]]
    result = run_cli("predict", *images, "--url", front.url, "--protocol", protocol, "--concurrency", "1",
                     "--retries", "0")
    assert result.returncode == ExitCode.CONNECTION, result.stderr
    (first,) = strict_records(result.stdout)  # the record written before the server failed is kept
    assert first["path"] == images[0]
    assert first["label"] == true_label(shapes_images[0])
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"Error: The server answered HTTP {status}: internal boom. "
        + ("The server is busy or not ready; try again later or raise --retries." if status == 503
           else "Check the server's logs.")]
    assert predicted(front) == 2  # stopped at the first failure, not one failure per image


V2_ANSWERS = {
    "no outputs": (b'{"model_name": "shapes", "outputs": []}', "the answer has no outputs"),
    "too few values": (b'{"model_name": "shapes", "outputs": [{"name": "logits", "shape": [1, 6], '
                       b'"datatype": "FP32", "data": [1, 2, 3]}]}', "has 3 values for shape [1, 6]"),
    "NaN": (b'{"model_name": "shapes", "outputs": [{"name": "logits", "shape": [1, 6], "datatype": "FP32", '
            b'"data": [NaN, 1, 2, 3, 4, 5]}]}', "not a finite number (NaN or infinity)"),
}


@pytest.mark.parametrize("case", list(V2_ANSWERS))
def test_cli_v2_answers_that_give_no_prediction_are_per_image_errors(
        case: str, shapes_server: LiveServer, shapes_images: list[Path],
        front_factory: Callable[[str, Rule], FrontServer]) -> None:
    body, message = V2_ANSWERS[case]
    front = front_factory(shapes_server.url, answer_after(1, 200, body))
    images = [str(p) for p in shapes_images[:2]]
    result = run_cli("predict", *images, "--url", front.url, "--protocol", "v2", "--concurrency", "1")
    assert result.returncode == ExitCode.PARTIAL, result.stderr
    assert "Traceback" not in result.stderr
    good, bad = strict_records(result.stdout)
    assert good["label"] == true_label(shapes_images[0])
    assert bad["label"] is None
    assert bad["probability"] is None
    assert message in bad["error"]


@pytest.mark.parametrize("value", [b"NaN", b"null"])  # null: what deploykit serve writes for a NaN
def test_cli_rest_answer_with_nan_is_an_error_not_a_prediction(
        shapes_server: LiveServer, shapes_images: list[Path],
        front_factory: Callable[[str, Rule], FrontServer], value: bytes) -> None:
    nan = (b'{"model": "shapes", "predictions": '
           b'[{"top_k": [{"index": 0, "label": "circle", "probability": ' + value + b'}]}]}')
    front = front_factory(shapes_server.url, answer_after(0, 200, nan))
    result = run_cli("predict", str(shapes_images[0]), "--url", front.url)
    assert result.returncode == ExitCode.PARTIAL, result.stderr
    (record,) = strict_records(result.stdout)
    assert record["label"] is None
    assert record["probability"] is None
    assert "not a finite number" in record["error"]


@pytest.mark.parametrize(("url", "reason"), [
    ("ftp://127.0.0.1:5000", "the scheme 'ftp' is not http or https"),
    ("http://127.0.0.1:99999", "Port out of range"),
    ("http://[bad", "Invalid IPv6 URL"),
    ("http://:5000", "it names no host"),
])
def test_invalid_url_is_a_usage_error(url: str, reason: str) -> None:
    with pytest.raises(UsageError, match="Invalid --url") as info:
        PredictClient(url)
    assert reason in str(info.value)


# ---- shrinking large photos before the upload (predict --shrink, the REST default)


def recording(bodies: dict[str, list[int]], *, no_models: bool = False) -> Rule:
    """Record the body size of every request by path (without the query), then forward it; with
    ``no_models`` answer 404 to deploykit's /models routes, as a server that gives no card."""

    def rule(path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes] | None:
        bodies.setdefault(path.split("?")[0], []).append(len(body))
        if no_models and path.startswith("/models") and not path.split("?")[0].endswith("/predict"):
            return 404, {"Content-Type": "application/json"}, b'{"error": "Not Found"}'
        return None

    return rule


def test_shrink_sends_a_phone_photo_as_kilobytes_with_the_same_answer(
        shapes_server: LiveServer, phone_jpeg_file: Path,
        front_factory: Callable[[str, Rule], FrontServer]) -> None:
    bodies: dict[str, list[int]] = {}
    front = front_factory(shapes_server.url, recording(bodies))
    images = [str(phone_jpeg_file)] * 3
    shrunk = predict_images(images, url=front.url, top_k=6, concurrency=2)  # the default
    assert bodies.pop("/models") == [0], "the card is read once, from the server"
    sent_shrunk = bodies.pop("/predict")
    untouched = predict_images(images, url=front.url, top_k=6, shrink=False)
    sent_untouched = bodies.pop("/predict")
    assert bodies == {}
    assert len(sent_shrunk) == len(sent_untouched) == 3
    assert max(sent_shrunk) < 20_000, sent_shrunk  # the shapes model resizes to 72 pixels: 96x72
    assert min(sent_untouched) > phone_jpeg_file.stat().st_size > 2_000_000
    for a, b in zip(shrunk.results, untouched.results, strict=True):
        assert a.best is not None, a.error
        assert b.best is not None, b.error
        assert a.best.label == b.best.label
        assert a.best.probability == pytest.approx(b.best.probability, abs=0.02)


def test_small_images_and_exact_decode_go_untouched_without_reading_the_card(
        shapes_server: LiveServer, shapes_images: list[Path], phone_jpeg_file: Path,
        front_factory: Callable[[str, Rule], FrontServer]) -> None:
    bodies: dict[str, list[int]] = {}
    front = front_factory(shapes_server.url, recording(bodies))
    run = predict_images([str(p) for p in shapes_images], url=front.url, shrink=True, top_k=1, concurrency=1)
    assert [r.best.label for r in run.results if r.best] == [true_label(p) for p in shapes_images]
    assert all(p.stat().st_size < SHRINK_MIN_BYTES for p in shapes_images)
    assert list(bodies) == ["/predict"], "small files need no card"
    assert all(b > p.stat().st_size for b, p in zip(bodies.pop("/predict"), shapes_images, strict=True))
    predict_images([str(phone_jpeg_file)], url=front.url, exact_decode=True)
    assert list(bodies) == ["/predict"]
    assert bodies["/predict"][0] > phone_jpeg_file.stat().st_size


def test_a_server_without_cards_gets_the_photo_untouched(
        shapes_server: LiveServer, phone_jpeg_file: Path,
        front_factory: Callable[[str, Rule], FrontServer]) -> None:
    bodies: dict[str, list[int]] = {}
    front = front_factory(shapes_server.url, recording(bodies, no_models=True))
    run = predict_images([str(phone_jpeg_file)] * 2, url=front.url, model="shapes")
    assert run.succeeded == 2
    assert bodies["/models/shapes"] == [0], "asked once"
    assert min(bodies["/models/shapes/predict"]) > phone_jpeg_file.stat().st_size


def test_cli_shrinks_by_default_and_not_with_no_shrink(
        shapes_server: LiveServer, phone_jpeg_file: Path,
        front_factory: Callable[[str, Rule], FrontServer]) -> None:
    bodies: dict[str, list[int]] = {}
    front = front_factory(shapes_server.url, recording(bodies))
    labels = []
    for extra in ([], ["--no-shrink"]):
        result = run_cli("predict", str(phone_jpeg_file), "--url", front.url, "--json", *extra)
        assert result.returncode == 0, result.stderr
        labels.append(json.loads(result.stdout)["label"])
    small, large = bodies["/predict"]
    assert small < 20_000 < 2_000_000 < large
    assert labels[0] == labels[1]
