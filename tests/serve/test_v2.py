"""The Open Inference Protocol (KServe V2): in-process, and live with real V2 clients unchanged (NVIDIA's
tritonclient and KServe's InferenceRESTClient)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from deploykit.images import load_image, preprocess
from deploykit.runtime import Predictor, softmax
from deploykit.serve.app import create_app
from deploykit.serve.config import ModelSpec, ServeConfig
from tests.conftest import LiveServer
from tests.serve.helpers import label_of

LABELS = ["circle", "square", "triangle", "star", "cross", "heart"]


@pytest.fixture(scope="module")
def app(shapes_onnx: Path) -> Flask:
    return create_app(ServeConfig(models=(ModelSpec("shapes", shapes_onnx),)))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="module")
def predictor(shapes_onnx: Path) -> Predictor:
    return Predictor.open(shapes_onnx)


@pytest.fixture(scope="module")
def batch(shapes_images: list[Path], predictor: Predictor) -> np.ndarray:
    return np.stack([preprocess(load_image(p), predictor.card.preprocess) for p in shapes_images[:3]])


def _infer(client: FlaskClient, body: dict, binary: bytes = b"", name: str = "shapes"):  # type: ignore[no-untyped-def]
    header = json.dumps(body).encode()
    headers = {"Inference-Header-Content-Length": str(len(header))} if binary else {}
    return client.post(
        f"/v2/models/{name}/infer",
        data=header + binary,
        headers=headers,
        content_type="application/octet-stream" if binary else "application/json",
    )


def test_server_and_model_metadata(client: FlaskClient) -> None:
    meta = client.get("/v2").json
    assert meta["name"] == "deploykit"
    assert {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    model = client.get("/v2/models/shapes").json
    assert model["name"] == "shapes"
    assert model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 64, 64]}]
    assert model["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 6]}]
    assert client.get("/v2/models/shapes/versions/1").json == model
    assert client.get("/v2/models/shapes/versions/2").status_code == 404
    assert client.get("/v2/models/shapes/ready").json == {"name": "shapes", "ready": True}
    assert client.get("/v2/models/shapes/versions/1/ready").status_code == 200
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200


def test_infer_json_flat_and_nested(client: FlaskClient, batch: np.ndarray, predictor: Predictor) -> None:
    expected = predictor.run(batch)[0]
    for data in (batch.reshape(-1).tolist(), batch.tolist()):
        r = _infer(
            client,
            {
                "id": "req-1",
                "inputs": [{"name": "input", "shape": list(batch.shape), "datatype": "FP32", "data": data}],
            },
        )
        assert r.status_code == 200, r.json
        body = r.json
        assert body["model_name"] == "shapes"
        assert body["id"] == "req-1"
        [out] = body["outputs"]
        assert out["name"] == "logits"
        assert out["datatype"] == "FP32"
        assert out["shape"] == [3, 6]
        np.testing.assert_allclose(np.asarray(out["data"]).reshape(3, 6), expected, rtol=1e-4, atol=1e-4)


def test_infer_binary_in_and_out(client: FlaskClient, batch: np.ndarray, predictor: Predictor) -> None:
    raw = batch.tobytes()
    r = _infer(
        client,
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(batch.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        },
        raw,
    )
    assert r.status_code == 200, r.data[:200]
    length = int(r.headers["Inference-Header-Content-Length"])
    header = json.loads(r.data[:length])
    [out] = header["outputs"]
    assert out["parameters"]["binary_data_size"] == 3 * 6 * 4
    logits = np.frombuffer(r.data[length:], dtype=np.float32).reshape(out["shape"])
    np.testing.assert_allclose(logits, predictor.run(batch)[0], rtol=1e-4, atol=1e-4)


def test_classification_extension(client: FlaskClient, batch: np.ndarray, shapes_images: list[Path]) -> None:
    r = _infer(
        client,
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(batch.shape),
                    "datatype": "FP32",
                    "data": batch.reshape(-1).tolist(),
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"classification": 2}}],
        },
    )
    assert r.status_code == 200, r.json
    [out] = r.json["outputs"]
    assert out["datatype"] == "BYTES"
    assert out["shape"] == [3, 2]
    top = [out["data"][i * 2].split(":") for i in range(3)]
    assert [t[2] for t in top] == [label_of(p) for p in shapes_images[:3]]
    assert all(LABELS[int(t[1])] == t[2] for t in top)


@pytest.mark.parametrize(
    ("tensor", "words"),
    [
        (
            {"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 3072},
            "'input' has shape [1, 3, 32, 32], but the model expects shape [-1, 3, 64, 64]",
        ),
        (
            {"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP16", "data": [0.0] * 12288},
            "'input' has datatype FP16, but the model expects FP32 [-1, 3, 64, 64]",
        ),
        (
            {"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP33", "data": [0.0] * 12288},
            "unknown datatype",
        ),
        (
            {"name": "image", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": [0.0]},
            "Unknown input tensor 'image'",
        ),
        (
            {"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": [0.0] * 5},
            "needs 12288 values",
        ),
        (
            {"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": ["a"] * 12288},
            "must be numbers",
        ),
        ({"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32"}, "has no data"),
    ],
)
def test_bad_tensors_are_400_naming_the_tensor(client: FlaskClient, tensor: dict, words: str) -> None:
    r = _infer(client, {"inputs": [tensor]})
    assert r.status_code == 400, r.json
    assert words in r.json["error"]


def test_other_bad_requests(client: FlaskClient) -> None:
    assert (
        _infer(
            client,
            {
                "inputs": [
                    {"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": [0.0] * 12288}
                ],
                "outputs": [{"name": "probs"}],
            },
        ).status_code
        == 400
    )
    bad_size = _infer(
        client,
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 3, 64, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 8},
                }
            ]
        },
        b"\x00" * 8,
    )
    assert bad_size.status_code == 400
    assert "binary_data_size" in bad_size.json["error"]
    assert (
        client.post("/v2/models/shapes/infer", data=b"{not json", content_type="application/json").status_code
        == 400
    )
    unknown = _infer(client, {"inputs": []}, name="nope")
    assert unknown.status_code == 404
    assert "'nope'" in unknown.json["error"]
    assert client.get("/v2/models/shapes/infer").status_code == 405
    assert client.get("/v2/models/shapes/versions/1/infer").status_code == 405
    assert client.get("/v2/models/nope").status_code == 404
    assert client.get("/v2/models/nope/ready").status_code == 404


GOOD_INPUT = {"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": [0.0] * 12288}


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"inputs": [GOOD_INPUT], "parameters": [1]}, 400, '"parameters" must be an object'),
        ({"inputs": [GOOD_INPUT], "parameters": "x"}, 400, '"parameters" must be an object'),
        ({"inputs": [GOOD_INPUT], "parameters": {"binary_data_output": "no"}}, 400, "true or false"),
        ({"inputs": [{**GOOD_INPUT, "parameters": "binary_data_size"}]}, 400, "parameters must be an object"),
        (
            {"inputs": [GOOD_INPUT], "outputs": [{"name": "logits", "parameters": {"binary_data": 1}}]},
            400,
            "binary_data must be true or false",
        ),
        ({"inputs": [{**GOOD_INPUT, "data": [10**400] + [0] * 12287}]}, 400, "must be numbers that fit FP32"),
        ({"inputs": [{**GOOD_INPUT, "shape": [10**400, 3, 64, 64]}]}, 400, "non-negative integers"),
        ({"inputs": [{**GOOD_INPUT, "shape": [65, 3, 64, 64]}]}, 413, "at most 64 per request"),
    ],
)
def test_malformed_parameters_and_values_are_4xx(
    client: FlaskClient, body: dict, status: int, words: str
) -> None:
    r = _infer(client, body)
    assert r.status_code == status, r.json
    assert words in r.json["error"]
    assert len(r.json["error"]) < 300  # a huge value sent is not echoed back


def test_json_beyond_python_limits_is_400(client: FlaskClient) -> None:
    # an integer literal over Python's 4300-digit limit is a ValueError, not a JSONDecodeError
    body = b'{"id": 1' + b"0" * 5000 + b', "inputs": []}'
    r = client.post("/v2/models/shapes/infer", data=body, content_type="application/json")
    assert r.status_code == 400
    assert "not valid JSON" in r.json["error"]


# --- live server, real V2 client ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton(shapes_server: LiveServer):  # type: ignore[no-untyped-def]
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(shapes_server.url.removeprefix("http://"))
    yield client
    client.close()


def test_tritonclient_health_and_metadata(triton, shapes_server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("shapes")
    assert "classification" in triton.get_server_metadata()["extensions"]
    meta = triton.get_model_metadata("shapes")
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 3, 64, 64]}
    config = triton.get_model_config("shapes")
    plan = requests.get(shapes_server.url + "/models/shapes", timeout=30).json()["inference"]
    assert config["max_batch_size"] == plan["max_batch_size"] >= 1
    assert config["instance_group"] == [{"name": "shapes", "kind": "KIND_CPU", "count": plan["instances"]}]


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infer(triton, batch: np.ndarray, predictor: Predictor, binary: bool) -> None:  # type: ignore[no-untyped-def]
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch, binary_data=binary)
    out = httpclient.InferRequestedOutput("logits", binary_data=binary)
    result = triton.infer("shapes", [inp], outputs=[out], request_id="abc")
    logits = result.as_numpy("logits")
    assert logits.shape == (3, 6)
    np.testing.assert_allclose(logits, predictor.run(batch)[0], rtol=1e-4, atol=1e-4)
    assert result.get_response()["id"] == "abc"
    default = triton.infer("shapes", [inp])  # no outputs named: all outputs, binary
    np.testing.assert_allclose(default.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)


def test_tritonclient_compressed_request(triton, batch: np.ndarray, predictor: Predictor) -> None:  # type: ignore[no-untyped-def]
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    for algorithm in ("gzip", "deflate"):
        result = triton.infer("shapes", [inp], request_compression_algorithm=algorithm)
        np.testing.assert_allclose(result.as_numpy("logits"), predictor.run(batch)[0], rtol=1e-4, atol=1e-4)


def test_tritonclient_classification(triton, batch: np.ndarray, shapes_images: list[Path]) -> None:  # type: ignore[no-untyped-def]
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    out = httpclient.InferRequestedOutput("logits", class_count=3)
    classes = triton.infer("shapes", [inp], outputs=[out]).as_numpy("logits")
    assert classes.shape == (3, 3)
    labels = [row[0].decode().split(":")[2] for row in classes]
    assert labels == [label_of(p) for p in shapes_images[:3]]
    scores = [[float(item.decode().split(":")[0]) for item in row] for row in classes]
    assert all(r == sorted(r, reverse=True) for r in scores)


def test_tritonclient_errors(triton) -> None:  # type: ignore[no-untyped-def]
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    inp = httpclient.InferInput("input", [1, 3, 32, 32], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(InferenceServerException) as info:
        triton.infer("shapes", [inp])
    assert info.value.status() == "400"
    assert "[-1, 3, 64, 64]" in info.value.message()
    assert "'input'" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("nope")
    assert info.value.status() == "404"


# --- live server, KServe's Python client (InferenceRESTClient, asynchronous) -------------------------------


def _kserve(url: str, calls):  # type: ignore[no-untyped-def]
    """Run ``calls(client, url)`` (a coroutine function) with KServe's V2 REST client, then close it."""
    import asyncio

    from kserve import InferenceRESTClient, RESTConfig

    async def main():  # type: ignore[no-untyped-def]
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
        try:
            return await calls(client, url)
        finally:
            await client.close()

    return asyncio.run(main())


def _kserve_infer(url: str, request):  # type: ignore[no-untyped-def]
    """KServe's client's answer to ``request`` (an ``InferRequest``) for the shapes model."""

    async def calls(client, url):  # type: ignore[no-untyped-def]
        return await client.infer(url, request, model_name="shapes")

    return _kserve(url, calls)


def test_kserve_client_health(shapes_server: LiveServer) -> None:
    async def calls(client, url):  # type: ignore[no-untyped-def]
        return (
            await client.is_server_live(url),
            await client.is_server_ready(url),
            await client.is_model_ready(url, "shapes"),
            await client.is_model_ready(url, "nope"),
        )

    assert _kserve(shapes_server.url, calls) == (True, True, True, False)


@pytest.mark.parametrize("binary", [False, True])
def test_kserve_client_infer(
    shapes_server: LiveServer, batch: np.ndarray, predictor: Predictor, binary: bool
) -> None:
    from kserve import InferInput, InferRequest
    from kserve.protocol.infer_type import RequestedOutput

    inp = InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch, binary_data=binary)
    # binary: the request goes out as application/octet-stream with Inference-Header-Content-Length, and the
    # output is asked for as binary data too
    outputs = [RequestedOutput("logits", parameters={"binary_data": True})] if binary else None
    request = InferRequest(model_name="shapes", infer_inputs=[inp], request_id="k1", request_outputs=outputs)

    response = _kserve_infer(shapes_server.url, request)
    assert response.id == "k1"
    assert [o.name for o in response.outputs] == ["logits"]
    logits = response.outputs[0].as_numpy()
    assert logits.shape == (3, 6)
    np.testing.assert_allclose(logits, predictor.run(batch)[0], rtol=1e-4, atol=1e-4)


def test_kserve_client_classification(
    shapes_server: LiveServer, batch: np.ndarray, shapes_images: list[Path]
) -> None:
    from kserve import InferInput, InferRequest
    from kserve.protocol.infer_type import RequestedOutput

    inp = InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch, binary_data=True)
    outputs = [RequestedOutput("logits", parameters={"classification": 2})]
    request = InferRequest(model_name="shapes", infer_inputs=[inp], request_outputs=outputs)

    classes = _kserve_infer(shapes_server.url, request).outputs[0].as_numpy()
    assert classes.shape == (3, 2)
    entries = [[str(item).split(":") for item in row] for row in classes]
    assert [row[0][2] for row in entries] == [label_of(p) for p in shapes_images[:3]]
    assert all(float(row[0][0]) >= float(row[1][0]) for row in entries)


def test_kserve_client_error(shapes_server: LiveServer) -> None:
    import httpx
    from kserve import InferInput, InferRequest

    inp = InferInput("input", [1, 3, 32, 32], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    request = InferRequest(model_name="shapes", infer_inputs=[inp])

    with pytest.raises(httpx.HTTPStatusError) as info:
        _kserve_infer(shapes_server.url, request)
    assert info.value.response.status_code == 400
    message = info.value.response.json()["error"]
    assert "'input'" in message
    assert "[-1, 3, 64, 64]" in message


def test_v2_and_rest_agree(
    shapes_server: LiveServer,
    triton,
    shapes_images: list[Path],  # type: ignore[no-untyped-def]
    predictor: Predictor,
) -> None:
    import requests
    import tritonclient.http as httpclient

    path = shapes_images[0]
    rest = requests.post(
        shapes_server.url + "/predict?top_k=6", files={"file": path.open("rb")}, timeout=30
    ).json()
    tensor = preprocess(load_image(path), predictor.card.preprocess)[None]
    inp = httpclient.InferInput("input", list(tensor.shape), "FP32")
    inp.set_data_from_numpy(tensor)
    probabilities = softmax(triton.infer("shapes", [inp]).as_numpy("logits"))[0]
    by_index = {p["index"]: p["probability"] for p in rest["predictions"][0]["top_k"]}
    np.testing.assert_allclose([by_index[i] for i in range(6)], probabilities, rtol=1e-4, atol=1e-5)


def test_compressed_bodies_are_bounded(client: FlaskClient) -> None:
    import gzip

    bomb = gzip.compress(b" " * (25 * 1024 * 1024))  # 25 MB of JSON whitespace in about 25 kB
    r = client.post(
        "/v2/models/shapes/infer",
        data=bomb,
        headers={"Content-Encoding": "gzip"},
        content_type="application/json",
    )
    assert r.status_code == 413
    assert "--max-body-mb" in r.json["error"]
    brotli = client.post(
        "/v2/models/shapes/infer",
        data=b"x",
        headers={"Content-Encoding": "br"},
        content_type="application/json",
    )
    assert brotli.status_code == 415


def test_infer_on_a_versioned_path(client: FlaskClient, batch: np.ndarray, predictor: Predictor) -> None:
    """``/v2/models/<name>/versions/1/infer`` infers like the plain path; another version is unknown."""
    body = {
        "inputs": [
            {
                "name": predictor.input_name,
                "shape": list(batch.shape[:1]) + list(batch.shape[1:]),
                "datatype": "FP32",
                "data": batch.reshape(-1).tolist(),
            }
        ]
    }
    plain = client.post("/v2/models/shapes/infer", json=body)
    versioned = client.post("/v2/models/shapes/versions/1/infer", json=body)
    assert versioned.status_code == 200, versioned.json
    assert versioned.json == plain.json
    other = client.post("/v2/models/shapes/versions/2/infer", json=body)
    assert other.status_code == 404
    assert "no version '2'" in other.json["error"]
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'route="/v2/models/<name>/versions/<version>/infer",status="200"' in metrics
