"""The deploykit REST API in-process, with create_app(...).test_client() and real ONNX Runtime sessions."""

from __future__ import annotations

import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient

from deploykit.errors import ModelNotFoundError, UsageError
from deploykit.serve.app import create_app
from deploykit.serve.config import ModelSpec, ServeConfig, parse_model_specs
from deploykit.serve.registry import (
    InferencePlan,
    cgroup_cpu_quota,
    inference_plan,
    registry_of,
    usable_cores,
)
from tests.serve.helpers import label_of, png_bomb, variants


def make_app(*specs: tuple[str, Path], **options: object) -> Flask:
    return create_app(ServeConfig(models=tuple(ModelSpec(n, p) for n, p in specs), **options))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def app(shapes_onnx: Path, resnet18_onnx: Path) -> Flask:
    return make_app(("shapes", shapes_onnx), ("resnet18", resnet18_onnx), max_body_mb=2)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="module")
def image_bytes(shapes_images: list[Path]) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in shapes_images}


def test_multipart_single_file_predicts_the_label(client: FlaskClient, shapes_images: list[Path]) -> None:
    for path in shapes_images:
        with path.open("rb") as fh:
            r = client.post("/predict", data={"file": (fh, path.name)}, content_type="multipart/form-data")
        assert r.status_code == 200, r.json
        body = r.json
        assert body["model"] == "shapes"
        [pred] = body["predictions"]
        assert pred["filename"] == path.name
        assert pred["label"] == label_of(path), (path.name, pred)
        assert pred["top_k"][0] == {
            "label": pred["label"],
            "index": pred["index"],
            "probability": pred["probability"],
        }
        assert len(pred["top_k"]) == 5
        assert set(body["timings_ms"]) == {"decode", "queue", "inference", "total"}


def test_several_files_are_one_batch_in_order(client: FlaskClient, shapes_images: list[Path]) -> None:
    data = {
        "file": [(io.BytesIO(p.read_bytes()), p.name) for p in shapes_images[:3]],
        "other_field": (io.BytesIO(shapes_images[3].read_bytes()), shapes_images[3].name),
    }
    r = client.post("/models/shapes/predict", data=data, content_type="multipart/form-data")
    assert r.status_code == 200, r.json
    names = [p["filename"] for p in r.json["predictions"]]
    assert names == [p.name for p in shapes_images[:4]]
    assert [p["label"] for p in r.json["predictions"]] == [label_of(p) for p in shapes_images[:4]]


def test_raw_body_and_json_base64(client: FlaskClient, shapes_images: list[Path]) -> None:
    path = shapes_images[0]
    data = path.read_bytes()
    raw = client.post("/predict", data=data, content_type="image/jpeg")
    octet = client.post("/predict", data=data, content_type="application/octet-stream")
    single = client.post("/predict", json={"image": base64.b64encode(data).decode()})
    url = client.post("/predict", json={"image": "data:image/jpeg;base64," + base64.b64encode(data).decode()})
    many = client.post(
        "/predict", json={"images": [base64.b64encode(p.read_bytes()).decode() for p in shapes_images[:2]]}
    )
    for r in (raw, octet, single, url, many):
        assert r.status_code == 200, r.json
        assert r.json["predictions"][0]["label"] == label_of(path)
        assert r.json["predictions"][0]["filename"] is None
    assert raw.json["predictions"][0]["probability"] == pytest.approx(
        single.json["predictions"][0]["probability"]
    )
    assert [p["label"] for p in many.json["predictions"]] == [label_of(p) for p in shapes_images[:2]]


def test_top_k_is_clamped_and_probabilities_sum_to_one(
    client: FlaskClient, shapes_images: list[Path]
) -> None:
    data = shapes_images[0].read_bytes()
    every = client.post("/predict?top_k=100", data=data, content_type="image/jpeg").json["predictions"][0][
        "top_k"
    ]
    assert len(every) == 6
    assert sum(p["probability"] for p in every) == pytest.approx(1.0, abs=1e-5)
    assert [p["probability"] for p in every] == sorted((p["probability"] for p in every), reverse=True)
    one = client.post("/predict?top_k=0", data=data, content_type="image/jpeg").json["predictions"][0][
        "top_k"
    ]
    assert len(one) == 1
    bad = client.post("/predict?top_k=abc", data=data, content_type="image/jpeg")
    assert bad.status_code == 400
    assert "top_k" in bad.json["error"]


def test_second_model_by_name(client: FlaskClient, shapes_images: list[Path]) -> None:
    r = client.post(
        "/models/resnet18/predict?top_k=3", data=shapes_images[0].read_bytes(), content_type="image/jpeg"
    )
    assert r.status_code == 200
    assert r.json["model"] == "resnet18"
    assert len(r.json["predictions"][0]["top_k"]) == 3


def test_image_variants_are_handled(client: FlaskClient, shapes_images: list[Path]) -> None:
    from PIL import Image

    path = next(p for p in shapes_images if label_of(p) == "heart")
    for name, data in variants(Image.open(path)).items():
        r = client.post(
            "/predict", data={"file": (io.BytesIO(data), name)}, content_type="multipart/form-data"
        )
        assert r.status_code == 200, (name, r.json)
        if name in ("rgba.png", "cmyk.jpg", "palette.png"):  # colour kept: the shape is still recognised
            assert r.json["predictions"][0]["label"] == "heart", name


@pytest.mark.parametrize(
    ("body", "content_type", "status", "words"),
    [
        (b"", "image/jpeg", 400, "no image"),
        (b"hello, this is text", "image/jpeg", 415, "not an image"),
        (png_bomb(), "image/png", 400, "decompression bomb"),
        (png_bomb(8000, 8000), "image/png", 400, "decompression bomb"),
        (b'{"img": 1}', "application/json", 400, '{"image"'),
        (b'{"image": "***"}', "application/json", 400, "base64"),
        (b"x" * (3 * 1024 * 1024), "image/jpeg", 413, "--max-body-mb"),
    ],
)
def test_bad_input_is_a_4xx_with_a_reason(
    client: FlaskClient, body: bytes, content_type: str, status: int, words: str
) -> None:
    r = client.post("/predict", data=body, content_type=content_type)
    assert r.status_code == status, r.json
    assert words in r.json["error"]
    assert r.content_type == "application/json"


def test_json_and_base64_forms(client: FlaskClient, shapes_images: list[Path]) -> None:
    data = shapes_images[0].read_bytes()
    wrapped = base64.encodebytes(data).decode()  # 76 columns with line breaks, as the base64 tool writes
    urlsafe = base64.urlsafe_b64encode(data).decode()
    assert "\n" in wrapped
    assert "-" in urlsafe or "_" in urlsafe
    padded_out = data + b"\0" * ((2 - len(data)) % 3)  # bytes after the JPEG's end: so that "=" is cut
    unpadded = base64.urlsafe_b64encode(padded_out).decode().rstrip("=")  # base64url as usually sent
    assert len(unpadded) % 4
    for text in (wrapped, urlsafe, unpadded):
        r = client.post("/predict", json={"image": text})
        assert r.status_code == 200, r.json
        assert r.json["predictions"][0]["label"] == label_of(shapes_images[0])
    broken = client.post("/predict", data=b'{"image": ', content_type="application/json")
    assert broken.status_code == 400
    assert "not valid JSON" in broken.json["error"]


def test_too_many_images_in_one_request_is_413(shapes_onnx: Path, shapes_images: list[Path]) -> None:
    client = make_app(("shapes", shapes_onnx), max_request_images=2).test_client()
    data = shapes_images[0].read_bytes()
    files = [("file", (io.BytesIO(data), f"{i}.jpg")) for i in range(3)]
    many = client.post("/predict", data={"file": [f[1] for f in files]}, content_type="multipart/form-data")
    as_json = client.post("/predict", json={"images": [base64.b64encode(data).decode()] * 3})
    for r in (many, as_json):
        assert r.status_code == 413, r.json
        assert "at most 2 per request (--max-request-images)" in r.json["error"]
    two = client.post("/predict", json={"images": [base64.b64encode(data).decode()] * 2})
    assert two.status_code == 200
    assert len(two.json["predictions"]) == 2


def test_a_bad_image_in_a_batch_is_named(client: FlaskClient, shapes_images: list[Path]) -> None:
    good = shapes_images[0].read_bytes()
    files = [(io.BytesIO(good), "a.jpg"), (io.BytesIO(b"not an image"), "b.txt"), (io.BytesIO(good), "c.jpg")]
    r = client.post("/predict", data={"file": files}, content_type="multipart/form-data")
    assert r.status_code == 415
    assert r.json["error"].startswith("'b.txt' (2 of 3): ")
    r = client.post(
        "/predict", json={"images": [base64.b64encode(good).decode(), base64.b64encode(b"xx").decode()]}
    )
    assert r.status_code == 415  # two bytes that are no image format: "not an image"
    assert r.json["error"].startswith("image 2 of 2: The data is not an image")


def test_paths_with_doubled_slashes_are_the_same_routes(
    client: FlaskClient, shapes_images: list[Path]
) -> None:
    # Flask merges "//" into "/": the same route answers
    data = shapes_images[0].read_bytes()
    for path in ("//predict", "//models/shapes/predict"):
        r = client.post(
            "/predict", data=data, content_type="image/jpeg", environ_overrides={"PATH_INFO": path}
        )
        assert r.status_code == 200, (path, r.json)
        assert r.json["predictions"][0]["label"] == label_of(shapes_images[0])
    r = client.post(
        "/predict",
        data=data,
        content_type="image/jpeg",
        environ_overrides={"PATH_INFO": "//models/nope/predict"},
    )
    assert r.status_code == 404
    assert "'nope'" in r.json["error"]


def test_truncated_jpeg(client: FlaskClient, shapes_images: list[Path]) -> None:
    data = shapes_images[0].read_bytes()
    r = client.post("/predict", data=data[: len(data) // 2], content_type="image/jpeg")
    assert r.status_code == 400
    assert "truncated" in r.json["error"]


def test_multipart_without_file(client: FlaskClient) -> None:
    r = client.post("/predict", data={"text": "no file"}, content_type="multipart/form-data")
    assert r.status_code == 400
    assert "'file'" in r.json["error"]


def test_unknown_model_wrong_method_and_path(client: FlaskClient) -> None:
    r = client.post("/models/nope/predict", data=b"x", content_type="image/jpeg")
    assert r.status_code == 404
    assert "'nope'" in r.json["error"]
    assert "shapes" in r.json["error"]
    r = client.get("/predict")
    assert r.status_code == 405
    assert "POST" in r.json["error"]
    assert "POST" in r.headers["Allow"]
    r = client.get("/no/such/path")
    assert r.status_code == 404
    assert r.json["error"]


def test_models_and_model_cards(client: FlaskClient) -> None:
    r = client.get("/models")
    assert r.status_code == 200
    models = r.json["models"]
    assert [m["name"] for m in models] == ["shapes", "resnet18"]
    assert [m["default"] for m in models] == [True, False]
    assert all(m["ready"] for m in models)
    assert models[0]["card"]["labels"] == ["circle", "square", "triangle", "star", "cross", "heart"]
    one = client.get("/models/resnet18").json
    assert one["name"] == "resnet18"
    assert one["default"] is False
    assert one["card"]["preprocess"]["height"] == 224
    assert client.get("/models/nope").status_code == 404


def test_index_page_and_health(client: FlaskClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.content_type.startswith("text/html")
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200


def test_internal_error_is_a_generic_json_500(shapes_onnx: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(("shapes", shapes_onnx))

    def boom() -> str:
        raise RuntimeError("secret detail in /home/user/private.py")

    app.add_url_rule("/boom", "boom", boom)
    r = app.test_client().get("/boom")
    assert r.status_code == 500
    assert r.json == {"error": "Internal server error; the server log has the details."}
    assert "secret" not in r.get_data(as_text=True)
    assert "secret detail" in caplog.text


def test_api_key(shapes_onnx: Path, shapes_images: list[Path]) -> None:
    client = make_app(("shapes", shapes_onnx), api_key="s3cret").test_client()
    data = shapes_images[0].read_bytes()
    missing = client.post("/predict", data=data, content_type="image/jpeg")
    assert missing.status_code == 401
    assert "API key" in missing.json["error"]
    wrong = client.post("/predict", data=data, content_type="image/jpeg", headers={"X-API-Key": "nope"})
    assert wrong.status_code == 401
    assert client.get("/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v2/models/shapes").status_code == 401
    ok = client.post(
        "/predict", data=data, content_type="image/jpeg", headers={"Authorization": "Bearer s3cret"}
    )
    assert ok.status_code == 200
    assert client.get("/models", headers={"X-API-Key": "s3cret"}).status_code == 200
    for open_path in ("/v2/health/live", "/v2/health/ready", "/metrics", "/"):
        assert client.get(open_path).status_code == 200, open_path


def test_cors_only_when_configured(shapes_onnx: Path) -> None:
    plain = make_app(("shapes", shapes_onnx)).test_client()
    assert (
        "Access-Control-Allow-Origin"
        not in plain.get("/models", headers={"Origin": "https://a.example"}).headers
    )
    cors = make_app(("shapes", shapes_onnx), cors_origins=("https://a.example",)).test_client()
    allowed = cors.get("/models", headers={"Origin": "https://a.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://a.example"
    other = cors.get("/models", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    preflight = cors.options(
        "/predict", headers={"Origin": "https://a.example", "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status_code == 200
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]


def test_cors_on_predict_answers_and_errors(shapes_onnx: Path, shapes_images: list[Path]) -> None:
    """The predict routes' answers, errors included, carry the CORS headers."""
    cors = make_app(("shapes", shapes_onnx), cors_origins=("https://a.example",)).test_client()
    origin = {"Origin": "https://a.example"}
    ok = cors.post("/predict", data=shapes_images[0].read_bytes(), content_type="image/jpeg", headers=origin)
    assert ok.status_code == 200
    assert ok.headers["Access-Control-Allow-Origin"] == "https://a.example"
    assert "Retry-After" in ok.headers["Access-Control-Expose-Headers"]
    bad = cors.post("/models/shapes/predict", data=b"not an image", content_type="image/jpeg", headers=origin)
    assert bad.status_code == 415
    assert bad.headers["Access-Control-Allow-Origin"] == "https://a.example"
    other = cors.post(
        "/predict", data=b"x", content_type="image/jpeg", headers={"Origin": "https://evil.example"}
    )
    assert "Access-Control-Allow-Origin" not in other.headers


def test_internal_error_in_a_predict_route_is_a_generic_json_500(
    shapes_onnx: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in a route meets the one error boundary: logged, answered with a generic JSON 500."""
    app = make_app(("shapes", shapes_onnx))

    def boom() -> bytes:
        raise RuntimeError("secret detail in /home/user/private.py")

    app.add_url_rule("/boom", "boom", boom, methods=["POST"])
    client = app.test_client()
    r = client.post("/boom", data=b"x")
    assert r.status_code == 500
    assert r.json == {"error": "Internal server error; the server log has the details."}
    assert "secret" not in r.get_data(as_text=True)
    assert "secret detail" in caplog.text
    assert client.get("/v2/health/live").status_code == 200  # still serving
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'deploykit_requests_total{method="POST",model="",route="/boom",status="500"} 1.0' in metrics


def test_model_name_outside_ascii_in_the_path(shapes_onnx: Path, shapes_images: list[Path]) -> None:
    """WSGI hands the path over as latin-1 text of its UTF-8 bytes; the name is decoded as Flask would."""
    client = make_app(("formes-été", shapes_onnx)).test_client()
    data = shapes_images[0].read_bytes()
    r = client.post("/models/formes-%C3%A9t%C3%A9/predict", data=data, content_type="image/jpeg")
    assert r.status_code == 200, r.json
    assert r.json["model"] == "formes-été"
    assert client.get("/models/formes-%C3%A9t%C3%A9").json["name"] == "formes-été"
    unknown = client.post("/models/%C3%A9t%C3%A9/predict", data=data, content_type="image/jpeg")
    assert unknown.status_code == 404
    assert "'été'" in unknown.json["error"]


def _tampered_copy(source: Path, target: Path) -> Path:
    """The model with its card's fingerprint values shifted, so the self-test must fail."""
    import onnx

    from deploykit.card import card_from_metadata, write_card

    model = onnx.load(str(source))
    card = card_from_metadata({p.key: p.value for p in model.metadata_props})
    assert card.fingerprint is not None
    fp = card.fingerprint
    bad = card.replace(fingerprint=type(fp)(**{**fp.__dict__, "values": tuple(v + 1.0 for v in fp.values)}))
    write_card(model, bad)
    onnx.save(model, str(target))
    return target


def test_failed_self_test_is_not_ready(
    shapes_onnx: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, shapes_images: list[Path]
) -> None:
    bad = _tampered_copy(shapes_onnx, tmp_path / "bad.onnx")
    client = make_app(("bad", bad)).test_client()
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 503
    assert "fingerprint self-test failed" in ready.json["error"]
    assert "fingerprint self-test failed" in caplog.text
    assert client.get("/models/bad").json["ready"] is False
    refused = client.post("/predict", data=shapes_images[0].read_bytes(), content_type="image/jpeg")
    assert refused.status_code == 503
    assert "Retry-After" in refused.headers
    assert 'deploykit_model_ready{model="bad"} 0.0' in client.get("/metrics").get_data(as_text=True)
    skipped = make_app(("bad", bad), self_test=False).test_client()
    assert skipped.get("/v2/health/ready").status_code == 200


def test_metrics_after_traffic(client: FlaskClient, shapes_images: list[Path]) -> None:
    def count(series: str) -> float:
        for line in client.get("/metrics").get_data(as_text=True).splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    ok = 'deploykit_requests_total{method="POST",model="shapes",route="/predict",status="200"}'
    before = count(ok)
    for _ in range(2):
        client.post("/predict", data=shapes_images[0].read_bytes(), content_type="image/jpeg")
    assert count(ok) == before + 2
    # in flight: only the /metrics request that reads it (every earlier request was counted out again)
    assert count("deploykit_requests_in_flight") == 1.0
    # a method token of the client's choosing is counted as "other", not as a new series
    assert client.open("/predict", method="BREW").status_code == 405
    # a 405 is counted under the route it was sent to
    assert count('deploykit_requests_total{method="other",model="shapes",route="/predict",status="405"}') >= 1
    assert client.get("/models/resnet18/predict").status_code == 405
    assert (
        count(
            'deploykit_requests_total{method="GET",model="resnet18",route="/models/<name>/predict",status="405"}'
        )
        == 1
    )
    assert client.get("/no/such/path").status_code == 404
    assert count('deploykit_requests_total{method="GET",model="",route="unmatched",status="404"}') >= 1
    text = client.get("/metrics").get_data(as_text=True)
    assert "BREW" not in text
    for series in (
        "deploykit_requests_total",
        "deploykit_request_duration_seconds_bucket",
        "deploykit_queue_duration_seconds_bucket",
        "deploykit_batch_size_bucket",
        "deploykit_inference_duration_seconds_bucket",
        "deploykit_requests_in_flight",
    ):
        assert series in text, series
    assert ok in text


def test_draining_reports_not_ready(app: Flask, client: FlaskClient) -> None:
    registry = registry_of(app)
    registry.draining = True
    try:
        r = client.get("/v2/health/ready")
        assert r.status_code == 503
        assert "shutting down" in r.json["error"]
    finally:
        registry.draining = False
    assert client.get("/v2/health/ready").status_code == 200


# --- configuration ---------------------------------------------------------------------------------------


def test_model_specs(tmp_path: Path, shapes_onnx: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="No .onnx files"):
        parse_model_specs([], cwd=tmp_path)
    (tmp_path / "a.onnx").write_bytes(shapes_onnx.read_bytes())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.onnx").write_bytes(shapes_onnx.read_bytes())
    assert [s.name for s in parse_model_specs([], cwd=tmp_path)] == ["a"]
    specs = parse_model_specs(["a.onnx", "other=a.onnx", "sub"], cwd=tmp_path)
    assert [(s.name, s.path.name) for s in specs] == [("a", "a.onnx"), ("other", "a.onnx"), ("b", "b.onnx")]
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        parse_model_specs(["missing.onnx"], cwd=tmp_path)
    with pytest.raises(UsageError, match="Two models are named a"):
        ServeConfig(models=parse_model_specs(["a.onnx", "a.onnx"], cwd=tmp_path))
    with pytest.raises(UsageError, match="max-queue"):
        ServeConfig(models=specs, max_queue=0)
    with pytest.raises(UsageError, match="--instances must be at least 1"):
        ServeConfig(models=specs, instances=0)


def test_inference_plan_splits_the_cores() -> None:
    specs = (ModelSpec("m", Path("m.onnx")),)

    def plan(cores: int, **options: object) -> tuple[int, int, int, int]:
        p = inference_plan(ServeConfig(models=specs, **options), cores=cores)  # type: ignore[arg-type]
        return p.instances, p.threads, p.solo_threads, p.max_batch_size

    # (instances, threads per call side by side, threads of a call alone, most rows per call)
    assert plan(2) == (2, 1, 2, 2)  # side by side one core each; a call alone gets both
    assert plan(8) == (8, 1, 8, 2)
    assert plan(8, instances=3) == (3, 2, 8, 2)
    assert plan(2, instances=1) == (1, 2, 2, 8)  # one call at a time on every core: batching is the lever
    assert plan(8, intra_op_threads=3) == (8, 3, 3, 2)  # fixed threads: no solo session
    assert plan(1) == (1, 1, 1, 8)
    assert plan(4, providers=("cuda",)) == (1, 4, 4, 8)  # one call at a time on a GPU unless asked
    assert plan(2, max_batch_size=16) == (2, 1, 2, 16)
    with pytest.raises(UsageError, match="--max-batch-size must be at least 1"):
        ServeConfig(models=specs, max_batch_size=0)


def test_cpu_quota_caps_the_cores(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # a Kubernetes limit of 1500m
    assert cgroup_cpu_quota(v2) == 1.5
    assert usable_cores(v2) == 1
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000000\n")  # 1000 cores: the affinity is smaller
    assert cgroup_cpu_quota(v1) == 1000.0
    assert usable_cores(v1) == usable_cores(tmp_path / "none")  # no quota files: the affinity alone
    assert cgroup_cpu_quota(tmp_path / "none") is None


def test_sessions_follow_the_plan(app: Flask, shapes_onnx: Path) -> None:
    registry = registry_of(app)
    plan = registry.plan
    assert plan == inference_plan(registry.config)
    for entry in registry.entries.values():
        assert entry.predictor is not None
        assert entry.predictor.session.get_session_options().intra_op_num_threads == plan.threads
        if plan.solo_threads == plan.threads:
            assert entry.solo is None
        else:
            assert entry.solo is not None
            solo = entry.solo.session.get_session_options()
            assert solo.intra_op_num_threads == plan.solo_threads
            # a solo call may spin between its parallel sections, and stops when it returns
            assert solo.get_session_config_entry("session.force_spinning_stop") == "1"
            shared = entry.predictor.session.get_session_options()
            assert shared.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    fixed = registry_of(make_app(("shapes", shapes_onnx), intra_op_threads=1, instances=2))
    assert fixed.plan == InferencePlan(2, 1, 1, 2)
    assert fixed.entries["shapes"].solo is None


def test_several_models_share_nothing_but_the_app(app: Flask) -> None:
    registry = registry_of(app)
    shapes, resnet = registry.entries["shapes"], registry.entries["resnet18"]
    assert shapes.batcher is not resnet.batcher
    assert np.asarray(shapes.card.labels if shapes.card else []).size == 6


def test_static_batch_model(tmp_path: Path, shapes_images: list[Path]) -> None:
    from deploykit.export import export_model
    from tests.conftest import SHAPES_FACTORY

    path = export_model(SHAPES_FACTORY, output=tmp_path / "static.onnx", static_batch=2).path
    client = make_app(("static", path)).test_client()
    assert client.get("/v2/models/static").json["inputs"][0]["shape"] == [2, 3, 64, 64]
    files = {"file": [(io.BytesIO(p.read_bytes()), p.name) for p in shapes_images[:3]]}
    r = client.post("/predict", data=files, content_type="multipart/form-data")
    assert r.status_code == 200, r.json
    assert [p["label"] for p in r.json["predictions"]] == [label_of(p) for p in shapes_images[:3]]
    one = client.post(
        "/v2/models/static/infer",
        json={
            "inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": [0.0] * 12288}]
        },
    )
    assert one.status_code == 400
    assert "[2, 3, 64, 64]" in one.json["error"]


def test_background_loading_not_ready_then_requests_wait(
    resnet18_onnx: Path, shapes_images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the models load (held at a gate until the test opens it), liveness answers, readiness is a 503
    that says so, and a prediction that arrives meanwhile waits for the model instead of failing."""
    from deploykit.serve import registry as registry_module

    loading_started, gate = threading.Event(), threading.Event()
    open_predictors = registry_module.open_predictors

    def held_open(*args: Any, **kwargs: Any) -> Any:
        loading_started.set()
        assert gate.wait(60), "the test never let the model load"
        return open_predictors(*args, **kwargs)

    monkeypatch.setattr(registry_module, "open_predictors", held_open)
    app = make_app(("resnet18", resnet18_onnx), load_in_background=True)
    client = app.test_client()
    try:
        assert loading_started.wait(60)
        assert not registry_of(app).loaded.is_set()
        assert client.get("/v2/health/live").status_code == 200
        loading = client.get("/v2/health/ready")
        assert loading.status_code == 503
        assert loading.json["error"] == "The models are still loading."
        image = shapes_images[0].read_bytes()
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(app.test_client().post, "/predict", data=image, content_type="image/jpeg")
            # the prediction is in the app (in flight beside the scrape that reads the gauge), and cannot be
            # answered while the model is held
            while _in_flight(client) < 2:
                assert not waiting.done(), waiting.result().json
                threading.Event().wait(0.01)
            assert not waiting.done()
            gate.set()
            r = waiting.result(timeout=60)
        assert r.status_code == 200, r.json
        assert r.json["model"] == "resnet18"
        assert client.get("/v2/health/ready").status_code == 200
    finally:
        gate.set()
        registry_of(app).close()


def _in_flight(client: FlaskClient) -> float:
    for line in client.get("/metrics").get_data(as_text=True).splitlines():
        if line.startswith("deploykit_requests_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no deploykit_requests_in_flight in /metrics")


def test_answers_are_strict_json_and_options_finite(shapes_onnx: Path) -> None:
    from deploykit.serve.answers import json_bytes

    # JSON has no NaN or infinity: they are written as null
    assert (
        json_bytes({"a": float("nan"), "b": [1.5, float("-inf")], "c": "x"})
        == b'{"a":null,"b":[1.5,null],"c":"x"}'
    )
    for option in ("request_timeout", "max_body_mb", "graceful_timeout", "max_batch_delay_ms"):
        with pytest.raises(UsageError, match="must be a finite number"):
            ServeConfig(models=(ModelSpec("shapes", shapes_onnx),), **{option: float("nan")})  # type: ignore[arg-type]
