"""``deploykit package``: the generated files are checked the way their consumers would read them.

config.pbtxt is parsed with Triton's own ModelConfig protobuf schema (shipped in tritonclient), Kubernetes
manifests are parsed with PyYAML and validated strictly against the Kubernetes JSON schemas
(kubernetes-validate), Dockerfiles are parsed with dockerfile-parse and linted with hadolint, and the
docker build context is built into a wheel with pip. Finally a real ``deploykit serve`` runs the packaged
files, and the real ``deploykit predict --protocol v2`` classifies the example images through it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import pytest
import requests
import tomllib
import yaml
from conftest import REPO, SHAPES_FACTORY, run_cli, start_server

from deploykit.card import ModelCard, read_card
from deploykit.errors import ExitCode, ModelFileError, UsageError
from deploykit.package import (
    DEFAULT_GRACEFUL_TIMEOUT,
    DEFAULT_MAX_BATCH_SIZE,
    k8s_name,
    package_model,
    triton_config,
)
from deploykit.serve.config import ModelSpec, ServeConfig
from deploykit.serve.registry import inference_plan

PORT = 8080
ENTRYPOINT = ["deploykit", "serve", "--host", "0.0.0.0", "--port", str(PORT)]


# --- helpers ---------------------------------------------------------------------------------------

def _model_config_module() -> ModuleType:
    """Triton's compiled model_config.proto from the tritonclient package.

    ``tritonclient.grpc/__init__`` refuses to import without the grpc extra, so the generated module (which
    needs only protobuf) is loaded from its file.
    """
    spec = importlib.util.find_spec("tritonclient")
    assert spec is not None
    assert spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert module_spec is not None
    assert module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


MC = _model_config_module()


def parse_config(path: Path) -> Any:
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(encoding="utf-8"), MC.ModelConfig())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_yaml(path: Path) -> dict[str, Any]:
    docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert len(docs) == 1, f"{path.name}: expected one YAML document"
    assert isinstance(docs[0], dict)
    return docs[0]


def validate_k8s(*paths: Path) -> None:
    """Strict schema validation (unknown fields are errors) against Kubernetes 1.28 and the latest version."""
    import kubernetes_validate

    for path in paths:
        for version in ("1.28.0", kubernetes_validate.latest_version()):
            kubernetes_validate.validate(load_yaml(path), version, strict=True)


def graph_dims(onnx_path: Path, kind: str) -> dict[str, list[int]]:
    """Input or output dims of the ONNX graph, symbolic dims as -1 (as Triton compares them)."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    values = [v for v in getattr(graph, kind) if v.name not in initializers]
    return {v.name: [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
            for v in values}


def dockerfile(path: Path) -> list[dict[str, Any]]:
    from dockerfile_parse import DockerfileParser

    return [i for i in DockerfileParser(str(path)).structure if i["instruction"] != "COMMENT"]


def check_dockerfile(path: Path, context: Path) -> dict[str, Any]:
    """The invariants of a deploykit server image; returns the parsed instructions by name."""
    instructions = dockerfile(path)
    names = [i["instruction"] for i in instructions]
    by_name: dict[str, list[str]] = {}
    for i in instructions:
        by_name.setdefault(i["instruction"], []).append(i["value"])
    assert by_name["FROM"] == ["python:3.11-slim"]
    # Runs as a fixed, non-root numeric user (Kubernetes can only verify runAsNonRoot for a numeric UID).
    user = by_name["USER"][-1]
    assert user.isdigit()
    assert int(user) != 0
    assert names.index("USER") < names.index("ENTRYPOINT")
    # The core package only: every pip install names no extra ([torch], [all]) and no torch.
    installs = [v for v in by_name["RUN"] if "pip install" in v]
    assert len(installs) == 1
    assert "[" not in installs[0]
    assert "torch" not in installs[0]
    assert names.index("RUN") < names.index("USER"), "install as root, run as the user"
    target = installs[0].split("pip install", 1)[1].split("&&")[0].strip()
    copied = {v.split()[-1].rstrip("/") for v in by_name["COPY"]}
    assert target.rstrip("/") in copied or any(c.startswith(target.rstrip("/") + "/") for c in copied)
    for value in by_name["COPY"]:  # every COPY source exists in the build context
        sources = [s for s in value.split()[:-1] if not s.startswith("--")]
        for source in sources:
            assert (context / source).exists(), f"COPY source {source} missing from {context}"
    assert json.loads(by_name["ENTRYPOINT"][0]) == ENTRYPOINT
    assert by_name["EXPOSE"] == [str(PORT)]
    health = by_name["HEALTHCHECK"][0]
    assert f"http://127.0.0.1:{PORT}/v2/health/live" in health
    assert "urllib.request" in health
    assert "curl" not in health
    assert "wget" not in health
    cmd = json.loads(by_name["CMD"][0])
    assert cmd[0] == "/models"
    assert cmd[cmd.index("--graceful-timeout") + 1] == f"{DEFAULT_GRACEFUL_TIMEOUT:g}"
    # hadolint: the Dockerfile linter, as a CI would run it.
    hadolint = Path(sys.executable).with_name("hadolint")
    lint = subprocess.run([str(hadolint), "--no-color", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    return by_name


@pytest.fixture(scope="module")
def shapes_card(shapes_onnx: Path) -> ModelCard:
    return read_card(shapes_onnx)


@pytest.fixture(scope="module")
def static_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example model exported with a fixed batch of 2."""
    from deploykit.export import export_model

    return export_model(SHAPES_FACTORY, static_batch=2,
                        output=tmp_path_factory.mktemp("static") / "shapes_static.onnx").path


# --- Triton ----------------------------------------------------------------------------------------

def test_triton_repository_dynamic_batch(shapes_onnx: Path, shapes_card: ModelCard, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    result = package_model(shapes_onnx, format="triton", output_dir=out, instance_count=2)

    assert result.files == ("shapes/1/model.onnx", "shapes/config.pbtxt", "shapes/labels.txt")
    assert sha256(out / "shapes/1/model.onnx") == sha256(shapes_onnx)
    assert (out / "shapes/labels.txt").read_text().splitlines() == list(shapes_card.labels)

    config = parse_config(out / "shapes/config.pbtxt")
    assert config.name == "shapes"  # Triton requires it to equal the folder name
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == DEFAULT_MAX_BATCH_SIZE
    assert config.HasField("dynamic_batching")
    [inp] = config.input
    [out_tensor] = config.output
    assert (inp.name, inp.data_type) == ("input", MC.TYPE_FP32)
    assert list(inp.dims) == [3, 64, 64]  # the batch dimension is left out: Triton adds it
    assert (out_tensor.name, out_tensor.data_type) == ("logits", MC.TYPE_FP32)
    assert list(out_tensor.dims) == [len(shapes_card.labels)]
    assert out_tensor.label_filename == "labels.txt"
    [group] = config.instance_group
    assert (group.kind, group.count) == (MC.ModelInstanceGroup.KIND_CPU, 2)
    card_json = config.parameters["deploykit.card"].string_value
    assert ModelCard.from_json(card_json) == shapes_card

    # What Triton's ONNX Runtime backend checks: config dims = graph dims without the batch (-1) dimension.
    model_path = out / "shapes/1/model.onnx"
    assert graph_dims(model_path, "input") == {"input": [-1, *inp.dims]}
    assert graph_dims(model_path, "output") == {"logits": [-1, *out_tensor.dims]}
    # And the model runs at the largest batch Triton will send it.
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    batch = np.zeros((config.max_batch_size, *inp.dims), dtype=np.float32)
    [logits] = session.run(["logits"], {"input": batch})
    assert logits.shape == (config.max_batch_size, *out_tensor.dims)


def test_triton_repository_static_batch(static_onnx: Path, tmp_path: Path) -> None:
    result = package_model(static_onnx, format="triton", output_dir=tmp_path / "repo", name="fixed",
                           max_queue_delay_us=100)
    assert not result.dynamic_batch
    assert result.max_batch_size == 0
    config = parse_config(tmp_path / "repo/fixed/config.pbtxt")
    assert config.name == "fixed"
    assert config.max_batch_size == 0
    assert not config.HasField("dynamic_batching")  # Triton refuses dynamic batching without a batch dim
    assert list(config.input[0].dims) == [2, 3, 64, 64]  # full shapes, batch included
    assert list(config.output[0].dims) == [2, 6]
    assert graph_dims(tmp_path / "repo/fixed/1/model.onnx", "input") == {"input": list(config.input[0].dims)}

    with pytest.raises(UsageError, match="fixed batch size"):
        package_model(static_onnx, format="triton", output_dir=tmp_path / "other", max_batch_size=4)
    assert not (tmp_path / "other").exists()


def test_triton_options(shapes_onnx: Path, tmp_path: Path) -> None:
    package_model(shapes_onnx, format="triton", output_dir=tmp_path / "r", name="Shapes_v2.1",
                  max_batch_size=32, max_queue_delay_us=500)
    config = parse_config(tmp_path / "r/Shapes_v2.1/config.pbtxt")
    assert config.name == "Shapes_v2.1"
    assert config.max_batch_size == 32
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    with pytest.raises(UsageError, match="max-batch-size"):
        package_model(shapes_onnx, format="triton", output_dir=tmp_path / "x", max_batch_size=0)
    with pytest.raises(UsageError, match="instances"):
        package_model(shapes_onnx, format="triton", output_dir=tmp_path / "x", instance_count=0)
    for bad_name in ("../evil", "shapes\n", "-x"):
        with pytest.raises(UsageError, match="Invalid model name"):
            package_model(shapes_onnx, format="triton", output_dir=tmp_path / "x", name=bad_name)
    with pytest.raises(UsageError, match="Unknown package format"):
        package_model(shapes_onnx, format="tensorrt", output_dir=tmp_path / "x")
    # Values that would break out of their YAML scalar are refused before anything is written.
    with pytest.raises(UsageError, match="storage-uri"):
        package_model(shapes_onnx, format="kserve", output_dir=tmp_path / "x",
                      storage_uri='s3://a"\nkind: Pod')
    with pytest.raises(UsageError, match="image"):
        package_model(shapes_onnx, format="k8s", output_dir=tmp_path / "x", image="deploykit:1\n")
    with pytest.raises(UsageError, match="quantities"):
        package_model(shapes_onnx, format="k8s", output_dir=tmp_path / "x", memory="1 Gi")
    assert not (tmp_path / "x").exists()


def test_card_with_awkward_labels_survives_the_text_format(shapes_card: ModelCard) -> None:
    from google.protobuf import text_format

    labels = ("café", 'say "hi"', "back\\slash", "tab\there", "日本", "{json: [1]}")
    card = shapes_card.replace(labels=labels)
    text = triton_config(card, name="shapes", max_batch_size=4)
    config = text_format.Parse(text, MC.ModelConfig())
    assert ModelCard.from_json(config.parameters["deploykit.card"].string_value).labels == labels


def test_label_with_line_break_is_refused(shapes_onnx: Path, shapes_card: ModelCard, tmp_path: Path) -> None:
    from deploykit.card import write_card

    proto = onnx.load(str(shapes_onnx))
    write_card(proto, shapes_card.replace(labels=("two\nlines", *shapes_card.labels[1:])))
    onnx.save(proto, str(tmp_path / "odd.onnx"))
    with pytest.raises(ModelFileError, match="line break"):
        package_model(tmp_path / "odd.onnx", format="triton", output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_external_data_is_copied_beside_the_model(shapes_onnx: Path, tmp_path: Path) -> None:
    """A model saved with external weights (as export does above 2 GB) keeps them next to model.onnx."""
    src = tmp_path / "src"
    src.mkdir()
    proto = onnx.load(str(shapes_onnx))
    onnx.save_model(proto, str(src / "big.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="big.onnx.data", size_threshold=4096)
    package_model(src / "big.onnx", format="triton", output_dir=tmp_path / "repo")
    version_dir = tmp_path / "repo/shapes/1"
    assert sorted(p.name for p in version_dir.iterdir()) == ["big.onnx.data", "model.onnx"]
    import onnxruntime as ort

    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((1, 3, 64, 64), np.float32)})[0].shape == (1, 6)

    # Without its data file the model cannot be packaged, and nothing is left behind.
    (src / "big.onnx.data").unlink()
    with pytest.raises(ModelFileError, match="missing"):
        package_model(src / "big.onnx", format="triton", output_dir=tmp_path / "broken")
    assert not (tmp_path / "broken").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_model_without_card_is_refused(shapes_onnx: Path, tmp_path: Path) -> None:
    proto = onnx.load(str(shapes_onnx))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    with pytest.raises(ModelFileError, match="no deploykit model card"):
        package_model(tmp_path / "plain.onnx", format="triton", output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- output folder: atomic, --force ----------------------------------------------------------------

def test_existing_output_needs_force(shapes_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty") as info:
        package_model(shapes_onnx, format="triton", output_dir=out)
    assert "--force" in str(info.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # untouched

    result = package_model(shapes_onnx, format="k8s", output_dir=out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["deployment.yaml", "hpa.yaml", "service.yaml"]
    assert result.files == ("deployment.yaml", "hpa.yaml", "service.yaml")
    # An empty existing folder is fine without --force; no temporary folders are left beside the output.
    (tmp_path / "empty").mkdir()
    package_model(shapes_onnx, format="triton", output_dir=tmp_path / "empty")
    assert (tmp_path / "empty/shapes/config.pbtxt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]
    assert oct((tmp_path / "empty").stat().st_mode & 0o777) != oct(0o700)  # not left private like mkdtemp's


def test_output_that_would_destroy_inputs_is_refused(shapes_onnx: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="contains the model"):
        package_model(shapes_onnx, format="triton", output_dir=shapes_onnx.parent, force=True)
    assert shapes_onnx.is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        package_model(shapes_onnx, format="triton", output_dir=tmp_path / "file", force=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="current folder"):
        package_model(shapes_onnx, format="triton", output_dir=".", force=True)
    assert (tmp_path / "file").read_text() == "x"


# --- KServe ----------------------------------------------------------------------------------------

def test_kserve_inference_service(shapes_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "kserve"
    result = package_model(shapes_onnx, format="kserve", output_dir=out, name="Shapes_Model",
                           storage_uri="gs://bucket/models/shapes-repo")
    assert result.files == ("Shapes_Model/1/model.onnx", "Shapes_Model/config.pbtxt",
                            "Shapes_Model/labels.txt", "inferenceservice.yaml")
    assert parse_config(out / "Shapes_Model/config.pbtxt").name == "Shapes_Model"

    isvc = load_yaml(out / "inferenceservice.yaml")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["kind"] == "InferenceService"
    assert isvc["metadata"]["name"] == "shapes-model"  # a DNS-1035 label; the Triton model keeps its name
    predictor = isvc["spec"]["predictor"]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "triton", "version": "2"}
    assert model["runtime"] == "kserve-tritonserver"
    # KServe defaults to protocol v1 and only picks runtimes that support the requested protocol.
    assert model["protocolVersion"] == "v2"
    assert model["storageUri"] == "gs://bucket/models/shapes-repo"
    assert set(model["resources"]) == {"requests", "limits"}
    assert {"cpu", "memory"} <= set(model["resources"]["requests"])
    from deploykit.package import memory_quantity, serve_memory_mb

    # Triton decodes no images: the estimate has no decode budget
    expected = memory_quantity(serve_memory_mb(shapes_onnx.stat().st_size, decode_budget_mb=0))
    assert model["resources"]["limits"]["memory"] == model["resources"]["requests"]["memory"] == expected
    # Only these keys exist in KServe's v1beta1 ModelSpec (+ the embedded core/v1 Container).
    assert set(model) <= {"modelFormat", "runtime", "protocolVersion", "storageUri", "runtimeVersion",
                          "resources", "env", "args", "ports"}

    default = package_model(shapes_onnx, format="kserve", output_dir=tmp_path / "placeholder")
    isvc_path = tmp_path / "placeholder/inferenceservice.yaml"
    assert "YOUR-BUCKET" in load_yaml(isvc_path)["spec"]["predictor"]["model"]["storageUri"]
    assert "storageUri" in isvc_path.read_text().split("apiVersion")[0]  # the header says what to set
    assert default.image is None


def test_k8s_name() -> None:
    assert k8s_name("shapes") == "shapes"
    assert k8s_name("ResNet_18.v2") == "resnet-18-v2"
    assert k8s_name("18layers") == "model-18layers"
    assert k8s_name("a" * 80) == "a" * 63


# --- Docker ----------------------------------------------------------------------------------------

def test_repository_dockerfile() -> None:
    by_name = check_dockerfile(REPO / "Dockerfile", REPO)
    # The repository's own image installs the repository's pyproject, whose core dependencies lack torch.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith(("torch", "torchvision"))]
    assert any(v.startswith("pyproject.toml") for v in by_name["COPY"])
    # .dockerignore excludes everything but what the COPY lines need.
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1:][:3] == ["!pyproject.toml", "!README.md", "!deploykit/"]


def test_docker_build_context(shapes_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "ctx"
    result = package_model(shapes_onnx, format="docker", output_dir=out)
    assert result.image == "deploykit-shapes:0.1.0"
    assert "docker build -t deploykit-shapes:0.1.0" in str(result)
    assert sha256(out / "models/shapes.onnx") == sha256(shapes_onnx)
    by_name = check_dockerfile(out / "Dockerfile", out)
    assert any(v.split()[-1] == "/models/" and "models/" in v for v in by_name["COPY"])
    assert not list(out.rglob("__pycache__"))

    # The generated pyproject installs the core package: no extras at all, so no torch.
    project = tomllib.loads((out / "pyproject.toml").read_text())
    deps = project["project"]["dependencies"]
    assert deps
    assert not [d for d in deps if "torch" in d or "extra" in d]
    assert "optional-dependencies" not in project["project"]
    # each pinned to the version this deploykit runs with here
    from importlib import metadata

    assert f"waitress=={metadata.version('waitress')}" in deps
    assert all("==" in d for d in deps), deps

    # What `pip install <context>` does in the image, minus downloading dependencies: build the wheel.
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(out)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    [wheel] = wheels.glob("deploykit-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {"deploykit/serve/static/index.html", "deploykit/serve/app.py", "deploykit/cli/serve.py",
            "deploykit/templates/deployment.yaml"} <= names
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert any("onnxruntime" in r for r in requires)
    assert not [r for r in requires if "torch" in r]
    assert "deploykit = deploykit.cli:main" in entry_points


# --- Kubernetes ------------------------------------------------------------------------------------

def check_manifests(folder: Path, *, name: str, image: str) -> None:
    validate_k8s(folder / "deployment.yaml", folder / "service.yaml", folder / "hpa.yaml")
    deployment = load_yaml(folder / "deployment.yaml")
    service = load_yaml(folder / "service.yaml")
    hpa = load_yaml(folder / "hpa.yaml")

    assert (deployment["apiVersion"], deployment["kind"]) == ("apps/v1", "Deployment")
    assert deployment["metadata"]["name"] == name
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [container] = pod["spec"]["containers"]
    assert container["image"] == image
    [port] = container["ports"]
    assert port["containerPort"] == PORT  # the port of the image's ENTRYPOINT

    def probe_port(probe: dict[str, Any]) -> int:
        value = probe["httpGet"]["port"]
        return int(port["containerPort"] if value == port["name"] else value)

    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert probe_port(container[probe]) == PORT

    # Drain: preStop sleeps while endpoints are removed, then SIGTERM gives the server --graceful-timeout;
    # the grace period must cover both or the kubelet SIGKILLs requests in flight.
    sleep_cmd = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep_cmd[0] == "sleep"
    prestop = float(sleep_cmd[1])
    args = container["args"]
    graceful = float(args[args.index("--graceful-timeout") + 1])
    assert graceful == DEFAULT_GRACEFUL_TIMEOUT
    assert pod["spec"]["terminationGracePeriodSeconds"] > prestop + graceful
    assert prestop > 0
    # The args replace the image's CMD: serve the model folder the image carries.
    assert args[0] == "/models"

    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert {"cpu", "memory"} <= set(resources["limits"])
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert str(pod["spec"]["securityContext"]["runAsUser"]) == dockerfile_user(REPO / "Dockerfile")

    assert (service["apiVersion"], service["kind"]) == ("v1", "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    [service_port] = service["spec"]["ports"]
    assert service_port["targetPort"] in (port["name"], port["containerPort"])

    assert (hpa["apiVersion"], hpa["kind"]) == ("autoscaling/v2", "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource"
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    # CPU utilization is relative to the request, so the Deployment must have one (checked above).
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


def dockerfile_user(path: Path) -> str:
    return [i["value"] for i in dockerfile(path) if i["instruction"] == "USER"][-1]


def test_k8s_manifests(shapes_onnx: Path, tmp_path: Path) -> None:
    result = package_model(shapes_onnx, format="k8s", output_dir=tmp_path / "k8s",
                           image="registry.example.com/shapes:1", graceful_timeout=DEFAULT_GRACEFUL_TIMEOUT)
    assert result.files == ("deployment.yaml", "hpa.yaml", "service.yaml")
    check_manifests(tmp_path / "k8s", name="shapes", image="registry.example.com/shapes:1")
    # memory from the server's documented peak for this model, a quarter over it, request = limit
    from deploykit.package import memory_quantity, serve_memory_mb

    resources = load_yaml(tmp_path / "k8s/deployment.yaml")["spec"]["template"]["spec"]["containers"][0][
        "resources"
    ]
    peak = serve_memory_mb(shapes_onnx.stat().st_size)
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == memory_quantity(peak)
    assert int(resources["limits"]["memory"].removesuffix("Mi")) >= peak * 1.25
    explicit = package_model(shapes_onnx, format="k8s", output_dir=tmp_path / "k2", memory="3Gi")
    assert "3Gi" in (explicit.output_dir / "deployment.yaml").read_text()


def test_k8s_grace_period_follows_the_timeouts(shapes_onnx: Path, tmp_path: Path) -> None:
    package_model(shapes_onnx, format="k8s", output_dir=tmp_path / "k", graceful_timeout=90,
                  prestop_seconds=12)
    pod = load_yaml(tmp_path / "k/deployment.yaml")["spec"]["template"]["spec"]
    assert pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "12"]
    assert "90" in pod["containers"][0]["args"]
    assert pod["terminationGracePeriodSeconds"] > 90 + 12


def test_examples_k8s_are_what_package_writes(shapes_onnx: Path, tmp_path: Path) -> None:
    """examples/k8s is `deploykit package shapes.onnx --format k8s --image deploykit-shapes:latest`."""
    examples = REPO / "examples" / "k8s"
    check_manifests(examples, name="shapes", image="deploykit-shapes:latest")
    package_model(shapes_onnx, format="k8s", output_dir=tmp_path / "k8s", image="deploykit-shapes:latest")
    for manifest in ("deployment.yaml", "service.yaml", "hpa.yaml"):
        assert load_yaml(examples / manifest) == load_yaml(tmp_path / "k8s" / manifest), manifest


def test_packaged_defaults_are_the_servers() -> None:
    """Triton's batch limit and the drain timeout in the image and manifests are deploykit serve's defaults,
    in the library (ServeConfig) and on the command line the image runs."""
    from typer.main import get_command

    from deploykit.cli import app

    command = get_command(app).commands["serve"]  # type: ignore[attr-defined]
    serve_cli = {p.name: p.default for p in command.params}
    serve_lib = {f.name: f.default for f in dataclasses.fields(ServeConfig)}
    assert serve_cli["graceful_timeout"] == serve_lib["graceful_timeout"] == DEFAULT_GRACEFUL_TIMEOUT
    # the batch limit is the server's for one call at a time, as Triton runs one instance group
    assert serve_cli["max_batch_size"] is None
    assert serve_lib["max_batch_size"] is None
    one_at_a_time = ServeConfig(models=(ModelSpec("m", Path("m.onnx")),), instances=1)
    assert inference_plan(one_at_a_time, cores=2).max_batch_size == DEFAULT_MAX_BATCH_SIZE


# --- CLI -------------------------------------------------------------------------------------------

def test_cli_json_and_errors(shapes_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    done = run_cli("package", str(shapes_onnx), "--format", "triton", "--output", str(out), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["format"] == "triton"
    assert summary["name"] == "shapes"
    assert summary["files"] == ["shapes/1/model.onnx", "shapes/config.pbtxt", "shapes/labels.txt"]
    assert summary["max_batch_size"] == DEFAULT_MAX_BATCH_SIZE
    assert summary["dynamic_batch"] is True

    again = run_cli("package", str(shapes_onnx), "--format", "triton", "--output", str(out))
    assert again.returncode == ExitCode.USAGE
    assert "not empty" in again.stderr
    assert "--force" in again.stderr
    assert "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    forced = run_cli("package", str(shapes_onnx), "-f", "kserve", "-o", str(out), "--force",
                     "--storage-uri", "pvc://models/shapes")
    assert forced.returncode == 0, forced.stderr
    assert "inferenceservice.yaml" in forced.stdout
    assert load_yaml(out / "inferenceservice.yaml")["spec"]["predictor"]["model"]["storageUri"] == \
        "pvc://models/shapes"

    bad = run_cli("package", str(shapes_onnx), "--format", "onnx", "--output", str(tmp_path / "x"))
    assert bad.returncode == ExitCode.USAGE
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "x").exists()

    plain = tmp_path / "plain.onnx"
    proto = onnx.load(str(shapes_onnx))
    del proto.metadata_props[:]
    onnx.save(proto, str(plain))
    nocard = run_cli("package", str(plain), "--format", "triton", "--output", str(tmp_path / "y"))
    assert nocard.returncode == ExitCode.ERROR
    assert "model card" in nocard.stderr
    assert "Traceback" not in nocard.stderr


def test_package_never_imports_torch(shapes_onnx: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from deploykit.package import package_model\n"
        f"for fmt in ('triton', 'kserve', 'docker', 'k8s'):\n"
        f"    package_model({str(shapes_onnx)!r}, format=fmt, output_dir={str(tmp_path)!r} + '/' + fmt)\n"
        "import deploykit.cli.package\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'onnxruntime' not in sys.modules, 'onnxruntime was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr


# --- end to end: deploykit serve + deploykit predict --protocol v2 on the packaged files -----------

@pytest.mark.slow
def test_served_from_packaged_layouts(shapes_onnx: Path, shapes_images: list[Path], tmp_path: Path) -> None:
    """The Triton repository's model file and the docker context's model folder, served by deploykit serve
    exactly as the image's CMD does (`/models --graceful-timeout 30`), answer `deploykit predict --protocol
    v2` with the true label of every example image, and the V2 metadata agrees with config.pbtxt."""
    repo = tmp_path / "repo"
    context = tmp_path / "ctx"
    package_model(shapes_onnx, format="triton", output_dir=repo)
    package_model(shapes_onnx, format="docker", output_dir=context, name="shapes-image")
    cmd = json.loads(check_dockerfile(context / "Dockerfile", context)["CMD"][0])
    assert cmd[0] == "/models"
    server = start_server([f"shapes={repo}/shapes/1/model.onnx", str(context / "models"), *cmd[1:]],
                          tmp_path / "server.log")
    try:
        config = parse_config(repo / "shapes/config.pbtxt")
        meta = requests.get(f"{server.url}/v2/models/shapes", timeout=10).json()
        [inp], [out] = meta["inputs"], meta["outputs"]
        assert (inp["name"], inp["datatype"], inp["shape"]) == (config.input[0].name, "FP32",
                                                               [-1, *config.input[0].dims])
        assert (out["name"], out["datatype"], out["shape"]) == (config.output[0].name, "FP32",
                                                               [-1, *config.output[0].dims])
        assert requests.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200

        images = [str(p) for p in shapes_images]
        runs = {
            # Against Triton the card comes from the packaged file; deploykit's server can also give it.
            "shapes": ["--model", "shapes", "--card", str(repo / "shapes/1/model.onnx")],
            "shapes-image": ["--model", "shapes-image"],
        }
        for model, extra in runs.items():
            done = run_cli("predict", *images, "--url", server.url, "--protocol", "v2", *extra,
                           "--format", "jsonl")
            assert done.returncode == 0, done.stderr
            records = [json.loads(line) for line in done.stdout.splitlines()]
            assert [r["path"] for r in records] == images
            for record in records:
                assert record["error"] is None
                assert record["model"] == model
                assert record["label"] == Path(record["path"]).name.rsplit("_", 1)[0], record
    finally:
        assert server.terminate() == 0, server.log()
