"""export_model: real exports of torchvision models checked with ONNX Runtime, all options, atomic writing."""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision

from deploykit.card import ModelCard, read_card
from deploykit.errors import ExitCode, UsageError
from deploykit.export import DEFAULT_OPSET, export_model
from deploykit.files import atomic_path, write_bytes_atomic
from deploykit.runtime import create_session

# --- the model zoo ------------------------------------------------------------------------------------------
# swin_t stands for the vision transformers: torchvision's ViTs (vit_b_16 and up, 330+ MB) zero-initialise
# their head, so with --weights none every output is 0 and a parity check proves nothing; swin_t is one too
# (shifted-window attention, 28 M parameters, bicubic preprocessing) whose random outputs are informative.
ZOO = [
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    pytest.param("swin_t", marks=pytest.mark.slow),
    pytest.param("inception_v3", marks=pytest.mark.slow),
]


@dataclass(frozen=True)
class Exported:
    name: str
    path: Path
    card: ModelCard


@pytest.fixture(scope="module", params=ZOO)
def zoo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Each zoo model exported once with seeded random weights (resnet18 shares the session's export)."""
    name = request.param
    if name == "resnet18":
        path = request.getfixturevalue("resnet18_onnx")
    else:
        path = export_model(name, weights="none", output=tmp_path_factory.mktemp("zoo") / f"{name}.onnx").path
    return Exported(name, path, read_card(path))


def _reference(name: str) -> torch.nn.Module:
    """The same random-weight model, built with torchvision directly (not through deploykit)."""
    torch.manual_seed(0)
    extra = {"init_weights": True} if name == "inception_v3" else {}  # its default, without the warning
    return torchvision.models.get_model(name, weights=None, **extra).eval()


def test_zoo_runs_in_onnxruntime_at_batch_1_and_7(
    zoo: Exported, record_property: pytest.RecordProperty
) -> None:
    session = create_session(zoo.path)
    [model_input] = session.get_inputs()
    assert model_input.name == "input"
    assert isinstance(model_input.shape[0], str), "the batch dimension must be dynamic"
    size = zoo.card.preprocess.height
    reference = _reference(zoo.name)
    for batch in (1, 7):
        x = np.random.default_rng(batch).standard_normal((batch, 3, size, size), dtype=np.float32)
        [logits] = session.run(["logits"], {"input": x})
        assert logits.shape == (batch, 1000)
        assert np.isfinite(logits).all()
        with torch.inference_mode():
            expected = reference(torch.from_numpy(x)).numpy()
        # Random-weight outputs range from 1e-14 (efficientnet_b0) to 1e12 (inception_v3): compare relative to
        # their scale, and in absolute terms too where the scale is ordinary.
        scale = float(np.abs(expected).max())
        diff = float(np.abs(logits - expected).max())
        record_property(f"max_abs_diff_batch_{batch}", diff)
        record_property(f"output_scale_batch_{batch}", scale)
        assert diff <= 1e-5 * scale, f"{zoo.name} at batch {batch}: differs by {diff} at output scale {scale}"
        if 1 <= scale <= 100:
            assert diff < 1e-4
        if batch > 1:
            spread = float(np.abs(logits[0] - logits[1]).max())
            assert spread > 1e-3 * scale, "outputs must depend on the input"


def test_zoo_card(zoo: Exported, record_property: pytest.RecordProperty) -> None:
    card = zoo.card
    weights = torchvision.models.get_model_weights(zoo.name).DEFAULT
    transform = weights.transforms()
    assert card.name == zoo.name
    assert card.labels == tuple(weights.meta["categories"])
    assert card.num_classes == 1000
    crop = transform.crop_size[0]
    assert crop == (299 if zoo.name == "inception_v3" else 224)
    assert card.input.shape == ("batch", 3, crop, crop)
    assert card.output.shape == ("batch", 1000)
    pp = card.preprocess
    assert (pp.height, pp.width) == (crop, crop)
    assert pp.resize == transform.resize_size[0]
    assert pp.interpolation == transform.interpolation.value
    assert pp.mean == tuple(transform.mean)
    assert pp.std == tuple(transform.std)
    assert (pp.channel_order, pp.layout, pp.dtype) == ("RGB", "NCHW", "float32")
    assert card.source.kind == "torchvision"
    assert card.source.name == zoo.name
    assert card.source.weights == "none"
    assert card.source.seed == 0
    assert card.exporter in ("dynamo", "torchscript")
    assert card.opset == DEFAULT_OPSET
    assert set(card.versions) >= {"deploykit", "torch", "onnx", "onnxruntime", "python"}
    assert card.created
    assert card.fingerprint is not None
    assert card.fingerprint.batch == 2
    assert card.parity is not None
    record_property("exporter", card.exporter)
    record_property("parity", json.dumps(dict(card.parity)))
    assert card.parity["passed"] is True
    assert card.parity["batch_sizes"] == [1, 3]
    assert card.parity["atol"] == 1e-4
    assert card.parity["max_abs_diff"] <= card.parity["effective_atol"]
    if 1 <= card.parity["output_scale"] <= 10:  # ordinary logits: exactly the documented atol
        assert card.parity["effective_atol"] == 1e-4


def test_zoo_file_is_valid_and_self_contained(zoo: Exported) -> None:
    model = onnx.load(str(zoo.path))
    onnx.checker.check_model(model)
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    assert [p.name for p in zoo.path.parent.iterdir() if p.name.startswith(f".{zoo.path.name}")] == []


def test_weights_none_rebuilds_identical_weights(tmp_path: Path) -> None:
    """Same name and seed: the same initialisers and the same outputs; another seed: different weights."""
    first = export_model("squeezenet1_1", weights="none", output=tmp_path / "a.onnx", input_size=96)
    again = export_model("squeezenet1_1", weights="none", output=tmp_path / "b.onnx", input_size=96)

    def initializers(path: Path) -> list[bytes]:
        return sorted(onnx.numpy_helper.to_array(i).tobytes() for i in onnx.load(str(path)).graph.initializer)

    assert initializers(first.path) == initializers(again.path)
    x = np.random.default_rng(0).standard_normal((4, 3, 96, 96), dtype=np.float32)
    out_a = create_session(first.path).run(None, {"input": x})[0]
    out_b = create_session(again.path).run(None, {"input": x})[0]
    np.testing.assert_array_equal(out_a, out_b)
    assert first.card.fingerprint == again.card.fingerprint


# --- options, on a tiny factory model (fast) ----------------------------------------------------------------

TINY = textwrap.dedent("""
    import torch
    from torch import nn


    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(6, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


    def build() -> nn.Module:
        model = Tiny()
        model.deploykit_meta = {"name": "tiny",
                                "preprocess": {"crop": 32, "resize": 40, "mean": [0.5] * 3,
                                               "std": [0.25] * 3}}
        return model


    def zero_head() -> nn.Module:
        model = build()
        nn.init.zeros_(model.fc.weight)
        return model


    def features() -> nn.Module:
        return nn.Conv2d(3, 4, 3)


    def fixed_size() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 5))
""")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("factory") / "tiny.py"
    path.write_text(TINY)
    return f"{path}:build"


def run(path: Path, batch: int) -> np.ndarray:
    card = read_card(path)
    shape = [batch, 3, card.preprocess.height, card.preprocess.width]
    x = np.random.default_rng(batch).standard_normal(shape, dtype=np.float32)
    return create_session(path).run(None, {card.input.name: x})[0]


def test_result_object(tiny: str, tmp_path: Path) -> None:
    result = export_model(tiny, output=tmp_path / "tiny.onnx")
    assert result.path == tmp_path / "tiny.onnx"
    assert result.size_bytes == result.path.stat().st_size
    assert result.parity
    assert result.parity.max_abs_diff <= 1e-4
    data = result.to_dict()
    assert json.loads(json.dumps(data)) == data
    for key in ("path", "size_bytes", "exporter", "opset", "parity", "input", "output", "num_classes"):
        assert key in data
    assert data["parity"]["batch_sizes"] == [1, 3]
    text = str(result)
    assert str(result.path) in text
    assert "max abs diff" in text
    assert result.exporter in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


def test_default_output_is_name_in_the_working_folder(
    tiny: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = export_model(tiny)
    assert result.path == Path("tiny.onnx")
    assert (tmp_path / "tiny.onnx").is_file()
    named = export_model(tiny, name="my/model")  # the name is made safe for a file name
    assert named.path == Path("my_model.onnx")
    assert read_card(tmp_path / "my_model.onnx").name == "my/model"


def test_static_batch(tiny: str, tmp_path: Path) -> None:
    result = export_model(tiny, output=tmp_path / "static.onnx", static_batch=1)
    card = read_card(result.path)
    assert card.input.shape == (1, 3, 32, 32)
    assert card.output.shape == (1, 5)
    assert not card.dynamic_batch
    assert result.parity.batch_sizes == (1,)
    session = create_session(result.path)
    assert session.get_inputs()[0].shape == [1, 3, 32, 32]
    assert run(result.path, 1).shape == (1, 5)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        run(result.path, 2)


def test_input_size_scales_the_resize(tiny: str, tmp_path: Path) -> None:
    result = export_model(tiny, output=tmp_path / "big.onnx", input_size=64)
    pp = read_card(result.path).preprocess
    # keeps the 40/32 ratio of the model's own preprocessing
    assert (pp.height, pp.width, pp.resize) == (64, 64, 80)
    assert run(result.path, 3).shape == (3, 5)
    result = export_model(
        tiny,
        output=tmp_path / "custom.onnx",
        input_size=48,
        resize=50,
        mean=(0.1, 0.2, 0.3),
        std=(0.4, 0.5, 0.6),
    )
    pp = read_card(result.path).preprocess
    assert (pp.height, pp.width, pp.resize, pp.mean, pp.std) == (48, 48, 50, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))


def test_opset(tiny: str, tmp_path: Path) -> None:
    result = export_model(tiny, output=tmp_path / "o17.onnx", opset=17)
    model = onnx.load(str(result.path))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {17}
    assert read_card(result.path).opset == 17
    assert result.opset == 17
    # The dynamo exporter converts down from its own opset; where it cannot, auto mode falls back.
    assert result.exporter == "dynamo" or "opset 17" in (result.fallback_reason or "")
    assert run(result.path, 2).shape == (2, 5)


def test_torchscript_exporter_is_recorded(tiny: str, tmp_path: Path) -> None:
    result = export_model(tiny, output=tmp_path / "ts.onnx", exporter="torchscript")
    assert result.exporter == "torchscript"
    assert read_card(result.path).exporter == "torchscript"
    assert run(result.path, 7).shape == (7, 5)
    assert result.parity


def test_dynamo_exporter_is_the_default(tiny: str, tmp_path: Path) -> None:
    result = export_model(tiny, output=tmp_path / "dyn.onnx")
    assert result.exporter == "dynamo"
    assert result.fallback_reason is None


@pytest.mark.parametrize("form", ["txt", "json"])
def test_labels_file(form: str, tiny: str, tmp_path: Path) -> None:
    labels = ["ant", "bee", "cat", "dog", "eel"]
    file = tmp_path / f"labels.{form}"
    file.write_text(json.dumps(labels) if form == "json" else "\n".join(labels) + "\n\n")
    result = export_model(tiny, output=tmp_path / "labelled.onnx", labels_file=file)
    assert read_card(result.path).labels == tuple(labels)


def test_wrong_label_count_keeps_the_earlier_file(tiny: str, tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    export_model(tiny, output=target)
    before = target.read_bytes()
    labels = tmp_path / "labels.txt"
    labels.write_text("one\ntwo\nthree\n")
    with pytest.raises(UsageError) as info:
        export_model(tiny, output=target, labels_file=labels)
    assert "3 labels given for a model with 5 outputs" in str(info.value)
    assert info.value.exit_code == ExitCode.USAGE
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.txt", "model.onnx"]


def test_bad_labels_files(tiny: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        export_model(tiny, output=tmp_path / "x.onnx", labels_file=tmp_path / "missing.txt")
    broken = tmp_path / "broken.json"
    broken.write_text('["a", "b",')
    with pytest.raises(UsageError, match="not a valid JSON list"):
        export_model(tiny, output=tmp_path / "x.onnx", labels_file=broken)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"cat\n\xd0\xff\xfe dog\n")
    with pytest.raises(UsageError, match="is not UTF-8 text"):
        export_model(tiny, output=tmp_path / "x.onnx", labels_file=binary)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"static_batch": 0}, "--static-batch must be at least 1"),
        ({"opset": 5}, "--opset 5 is out of range"),
        ({"exporter": "tensorrt"}, "Unknown exporter 'tensorrt'"),
        ({"input_size": 4}, "--input-size must be between 8 and 4096, got 4"),
        ({"input_size": (64, 100_000)}, "--input-size must be between 8 and 4096, got 100000"),
        ({"resize": 100_000}, "--resize must be between 1 and 8192, got 100000"),
        ({"seed": -1}, "--seed must be between 0 and 4294967295"),
        ({"mean": (float("nan"), 0.0, 0.0)}, "mean and std must be finite numbers"),
        ({"std": (float("inf"), 1.0, 1.0)}, "mean and std must be finite numbers"),
        ({"atol": -1.0}, "must not be negative"),
        ({"input_size": 64, "resize": 32},
         "resize (32) must be at least the smaller of height and width (64)"),
    ],
)
def test_invalid_options(kwargs: dict[str, object], message: str, tiny: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        export_model(tiny, output=tmp_path / "x.onnx", **kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_model_that_is_not_a_classifier(tiny: str, tmp_path: Path) -> None:
    from deploykit.errors import ExportError

    with pytest.raises(ExportError, match="output of shape"):
        export_model(tiny.replace(":build", ":features"), output=tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_model_that_rejects_the_input_size(tiny: str, tmp_path: Path) -> None:
    from deploykit.errors import ExportError

    with pytest.raises(ExportError) as info:
        export_model(tiny.replace(":build", ":fixed_size"), output=tmp_path / "x.onnx")
    assert "failed on an input of shape (2, 3, 224, 224)" in str(info.value)
    assert "--input-size" in str(info.value)
    result = export_model(tiny.replace(":build", ":fixed_size"), output=tmp_path / "x.onnx", input_size=64)
    assert read_card(result.path).input.shape == ("batch", 3, 64, 64)


def test_constant_output_is_flagged(tiny: str, tmp_path: Path) -> None:
    result = export_model(tiny.replace(":build", ":zero_head"), output=tmp_path / "zero.onnx")
    assert result.parity  # it does pass, but proves little, and the result says so
    assert any("does not depend on its input" in w for w in result.warnings)
    normal = export_model(tiny, output=tmp_path / "normal.onnx")
    assert not any("does not depend on its input" in w for w in normal.warnings)


# --- unwritable outputs: exit 2 before any work, nothing written --------------------------------------------


def _unwritable(tmp_path: Path) -> list[tuple[Path, str]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    return [
        (tmp_path / "no" / "such" / "folder" / "m.onnx", "does not exist"),
        (a_file / "m.onnx", "is not a folder"),
        (Path("/proc/deploykit-test.onnx"), "Cannot write to '/proc'"),
    ]


def test_unwritable_output_fails_before_loading_the_model(tmp_path: Path) -> None:
    for target, message in _unwritable(tmp_path):
        # An unknown model would fail too, but the output is checked first: no time lost on a doomed export.
        with pytest.raises(UsageError) as info:
            export_model("resnet81", output=target)
        assert message in str(info.value), str(info.value)
        assert info.value.exit_code == ExitCode.USAGE
        assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_unwritable_working_folder_fails_before_loading_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/proc")  # no --output: the default <name>.onnx would go here
    with pytest.raises(UsageError, match="Cannot write to '/proc'"):
        export_model("resnet81")


def test_output_that_is_a_folder(tiny: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is a folder"):
        export_model(tiny, output=tmp_path)


# --- atomic writing -----------------------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_path_replaces_on_success(tmp_path: Path) -> None:
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp != target
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old", "the target changes only when the block succeeds"
    assert target.read_bytes() == b"new"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    assert _leftovers(tmp_path) == []
    write_bytes_atomic(target, b"newer")
    assert target.read_bytes() == b"newer"


def _fail_while_writing(target: Path, interruption: BaseException) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"half a model")
        raise interruption


@pytest.mark.parametrize("interruption", [RuntimeError("exporter crashed"), KeyboardInterrupt()])
def test_atomic_path_cleans_up_and_keeps_the_old_file(interruption: BaseException, tmp_path: Path) -> None:
    target = tmp_path / "m.onnx"
    target.write_bytes(b"earlier good file")
    with pytest.raises(type(interruption)):
        _fail_while_writing(target, interruption)
    assert target.read_bytes() == b"earlier good file"
    assert _leftovers(tmp_path) == []
    fresh = tmp_path / "fresh.onnx"
    with pytest.raises(type(interruption)):
        _fail_while_writing(fresh, interruption)
    assert not fresh.exists()
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_atomic_path_errors(tmp_path: Path) -> None:
    for target, message in _unwritable(tmp_path):
        with pytest.raises(UsageError, match=message.replace("(", r"\(")):
            write_bytes_atomic(target, b"x")
    with pytest.raises(UsageError, match="is a folder"):
        write_bytes_atomic(tmp_path, b"x")
