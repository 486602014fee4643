"""`deploykit serve DIR` on a model repository (``<name>/<version>/model.onnx``, as Triton and KServe load
it): every version served, the highest where a route names none."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from flask.testing import FlaskClient
from onnx import numpy_helper

from deploykit.card import ModelCard
from deploykit.errors import ModelNotFoundError
from deploykit.images import load_image, preprocess
from deploykit.package import package_model
from deploykit.serve.app import create_app
from deploykit.serve.config import ModelSpec, ServeConfig, parse_model_specs
from tests.conftest import LiveServer, run_cli
from tests.serve.helpers import label_of


@pytest.fixture(scope="module")
def always_heart(shapes_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example model with its last bias pushed towards 'heart' (class 5): another model to tell
    versions apart by their answers (its card's fingerprint no longer matches: no self-test)."""
    model = onnx.load(str(shapes_onnx))
    gemm = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    bias = next(i for i in model.graph.initializer if i.name == gemm.input[2])
    values = numpy_helper.to_array(bias).copy()
    values[5] += 1000.0
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    path = tmp_path_factory.mktemp("heart") / "heart.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def repository(shapes_onnx: Path, always_heart: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploykit's own Triton repository of the example model (version 1, with config.pbtxt), plus version 2
    (the 'heart' model, no config.pbtxt), a folder that is no version, and a second model."""
    root = tmp_path_factory.mktemp("repo") / "repo"
    package_model(shapes_onnx, format="triton", output_dir=root)
    (root / "shapes" / "2").mkdir()
    shutil.copy(always_heart, root / "shapes" / "2" / "model.onnx")
    (root / "shapes" / "latest").mkdir()  # not a number: not a version
    (root / "other" / "1").mkdir(parents=True)
    shutil.copy(shapes_onnx, root / "other" / "1" / "model.onnx")
    return root


def test_a_repository_folder_becomes_named_versions(repository: Path, tmp_path: Path) -> None:
    specs = parse_model_specs([str(repository)])
    assert [(s.name, s.version, s.path.relative_to(repository).as_posix()) for s in specs] == [
        ("other", "1", "other/1/model.onnx"),
        ("shapes", "1", "shapes/1/model.onnx"),
        ("shapes", "2", "shapes/2/model.onnx"),
    ]
    (tmp_path / "empty" / "m" / "x").mkdir(parents=True)
    with pytest.raises(ModelNotFoundError, match=r"no model repository in it \(<name>/<version>/"):
        parse_model_specs([str(tmp_path / "empty")])


def test_versions_sort_as_numbers(shapes_onnx: Path, tmp_path: Path) -> None:
    for version in ("1", "2", "10"):
        (tmp_path / "m" / version).mkdir(parents=True)
        shutil.copy(shapes_onnx, tmp_path / "m" / version / "model.onnx")
    assert [s.version for s in parse_model_specs([str(tmp_path)])] == ["1", "2", "10"]
    app = create_app(ServeConfig(models=parse_model_specs([str(tmp_path)]), self_test=False))
    assert app.test_client().get("/v2/models/m").json["versions"] == ["1", "2", "10"]
    assert app.test_client().get("/models/m").json["version"] == "10"


@pytest.fixture(scope="module")
def client(shapes_onnx: Path, always_heart: Path) -> FlaskClient:
    specs = (ModelSpec("shapes", shapes_onnx, "1"), ModelSpec("shapes", always_heart, "2"))
    return create_app(ServeConfig(models=specs, self_test=False)).test_client()


def _label(client: FlaskClient, path: str, image: Path) -> tuple[str, str]:
    """(model_version, top label) of the V2 classification answer at ``path`` for ``image``."""
    card = json.loads(client.get("/models/shapes").get_data())["card"]
    pp = ModelCard.from_dict(card).preprocess
    tensor = preprocess(load_image(image), pp)[None]
    body = {
        "inputs": [{"name": "input", "shape": list(tensor.shape), "datatype": "FP32",
                    "data": tensor.ravel().tolist()}],
        "outputs": [{"name": "logits", "parameters": {"classification": 1}}],
    }
    r = client.post(path, json=body)
    assert r.status_code == 200, r.json
    return r.json["model_version"], r.json["outputs"][0]["data"][0].split(":")[2]


def test_every_version_is_reachable_and_the_highest_is_the_default(
    client: FlaskClient, shapes_images: list[Path]
) -> None:
    image = next(p for p in shapes_images if label_of(p) != "heart")
    assert _label(client, "/v2/models/shapes/versions/1/infer", image) == ("1", label_of(image))
    assert _label(client, "/v2/models/shapes/versions/2/infer", image) == ("2", "heart")
    assert _label(client, "/v2/models/shapes/infer", image) == ("2", "heart")
    rest = client.post("/models/shapes/predict", data=image.read_bytes(), content_type="image/jpeg")
    assert rest.json["predictions"][0]["label"] == "heart"
    metadata = client.get("/v2/models/shapes").json
    assert metadata["versions"] == ["1", "2"]
    assert client.get("/v2/models/shapes/versions/1/ready").json == {"name": "shapes", "ready": True}
    assert client.get("/v2/models/shapes/versions/1").json["name"] == "shapes"
    missing = client.get("/v2/models/shapes/versions/3")
    assert missing.status_code == 404
    assert missing.json["error"] == "Model 'shapes' has no version '3'; it has 1, 2."
    assert client.post("/v2/models/shapes/versions/3/infer", json={"inputs": []}).status_code == 404
    models = client.get("/models").json["models"]
    assert [(m["name"], m["version"]) for m in models] == [("shapes", "2")]
    assert client.get("/v2/health/ready").status_code == 200  # every version loaded
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'deploykit_model_ready{model="shapes"} 1.0' in metrics
    assert 'deploykit_model_ready{model="shapes:1"} 1.0' in metrics


def test_serve_a_repository_that_package_wrote_and_predict_over_v2(
    live_server_factory: Callable[..., LiveServer], repository: Path, shapes_onnx: Path,
    shapes_images: list[Path]
) -> None:
    server = live_server_factory(str(repository), "--no-self-test")
    images = [p for p in shapes_images if label_of(p) != "heart"][:3]
    paths = [str(p) for p in images]
    shapes = run_cli("predict", *paths, "--url", server.url, "--protocol", "v2", "--model", "shapes")
    assert shapes.returncode == 0, shapes.stderr
    assert [json.loads(line)["label"] for line in shapes.stdout.splitlines()] == ["heart"] * 3  # version 2
    other = run_cli("predict", *paths, "--url", server.url, "--protocol", "v2", "--model", "other")
    assert other.returncode == 0, other.stderr
    assert [json.loads(line)["label"] for line in other.stdout.splitlines()] == [label_of(p) for p in images]
