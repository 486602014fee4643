"""card.py: the model card round trip, its storage in ONNX metadata, and clear errors for bad cards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from deploykit.card import (
    CARD_KEY,
    SCHEMA_VERSION,
    Fingerprint,
    ModelCard,
    Preprocess,
    Source,
    TensorSpec,
    card_from_metadata,
    load_onnx,
    read_card,
    write_card,
)
from deploykit.errors import ExitCode, ModelFileError


def make_card(**changes: Any) -> ModelCard:
    card = ModelCard(
        name="shapes",
        labels=("circle", "square", "triangle"),
        preprocess=Preprocess(height=64, width=64, resize=72, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        inputs=(TensorSpec("input", ("batch", 3, 64, 64)),),
        outputs=(TensorSpec("logits", ("batch", 3)),),
        source=Source(kind="factory", name="examples/shapes/model.py:build", weights="factory", seed=0),
        exporter="dynamo",
        opset=18,
        versions={"deploykit": "0.1.0", "torch": "2.14.1"},
        created="2026-01-01T00:00:00+00:00",
        fingerprint=Fingerprint(
            seed=1,
            batch=2,
            indices=(0, 4),
            values=(0.5, -1.25),
            topk=((0, 1, 2), (2, 1, 0)),
            atol=1e-3,
            rtol=1e-3,
        ),
        parity={"max_abs_diff": 1e-6, "passed": True},
    )
    return card.replace(**changes) if changes else card


def tiny_onnx() -> onnx.ModelProto:
    """A one-node ONNX model (Identity), built without torch."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_round_trip_through_dict_and_json() -> None:
    card = make_card()
    assert ModelCard.from_dict(card.to_dict()) == card
    text = card.to_json()
    assert ModelCard.from_json(text) == card
    data = json.loads(text)
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["inputs"][0]["shape"] == ["batch", 3, 64, 64]
    assert data["preprocess"]["mean"] == [0.5, 0.5, 0.5]


def test_card_properties() -> None:
    card = make_card()
    assert card.num_classes == 3
    assert card.dynamic_batch
    assert card.input.name == "input"
    assert card.output.name == "logits"
    assert card.label(1) == "square"
    assert card.label(7) == "7"
    assert card.fixed_batch is None
    static = card.replace(inputs=(TensorSpec("input", (2, 3, 64, 64)),))
    assert not static.dynamic_batch
    assert static.fixed_batch == 2


def test_optional_fields_default() -> None:
    data = make_card(fingerprint=None, parity=None).to_dict()
    for key in (
        "task",
        "output_kind",
        "precision",
        "exporter",
        "opset",
        "versions",
        "created",
        "fingerprint",
        "parity",
        "quantization",
        "schema_version",
    ):
        data.pop(key)
    card = ModelCard.from_dict(data)
    assert card.task == "image-classification"
    assert card.output_kind == "logits"
    assert card.precision == "fp32"
    assert card.fingerprint is None
    assert card.schema_version == SCHEMA_VERSION


def test_write_and_read_card(tmp_path: Path) -> None:
    model = tiny_onnx()
    entry = model.metadata_props.add()
    entry.key, entry.value = "author", "someone"
    write_card(model, make_card())
    write_card(model, make_card(name="second"))  # replaces, never duplicates
    keys = [p.key for p in model.metadata_props]
    assert keys.count(CARD_KEY) == 1
    assert "author" in keys
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    assert read_card(path) == make_card(name="second")


def test_card_is_readable_by_onnxruntime(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = tiny_onnx()
    write_card(model, make_card())
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert card_from_metadata(session.get_modelmeta().custom_metadata_map) == make_card()


def test_file_without_card(tmp_path: Path) -> None:
    path = tmp_path / "plain.onnx"
    onnx.save(tiny_onnx(), str(path))
    with pytest.raises(ModelFileError) as info:
        read_card(path)
    message = str(info.value)
    assert "plain.onnx" in message
    assert "no deploykit model card" in message
    assert CARD_KEY in message
    assert "deploykit export" in message
    assert info.value.exit_code == ExitCode.ERROR


def test_missing_and_corrupt_onnx_files(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        read_card(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage-that-is-not-protobuf\xff\xff\xff")
    with pytest.raises(ModelFileError, match="not a readable ONNX file"):
        load_onnx(junk)


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (("name",), "name"),
        (("labels",), "labels"),
        (("preprocess",), "preprocess"),
        (("preprocess", "height"), "preprocess.height"),
        (("preprocess", "mean"), "preprocess.mean"),
        (("inputs",), "inputs"),
        (("source",), "source"),
        (("source", "kind"), "source.kind"),
        (("fingerprint", "values"), "fingerprint.values"),
    ],
)
def test_missing_field_is_named(path: tuple[str, ...], field: str) -> None:
    data = make_card().to_dict()
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    with pytest.raises(ModelFileError) as info:
        ModelCard.from_dict(data)
    assert f"missing field '{field}'" in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("height", "big", "preprocess.height"),
        ("width", 0, "height and width must be positive, got 64x0"),
        ("resize", 10, "resize (10) must be at least the smaller of height and width (64)"),
        ("interpolation", "cubic-ish", "interpolation must be one of"),
        ("mean", [0.5, 0.5], "mean and std must have 3 values each (one per channel), got 2 and 3"),
        ("mean", "0.5", "preprocess.mean"),
        ("std", [0.2, 0.0, 0.2], "std values must be non-zero"),
        ("channel_order", "RBG", "channel_order of a 3-channel input must be RGB or BGR"),
        ("layout", "CHW", "layout must be NCHW or NHWC"),
        ("dtype", "int8", "dtype must be one of"),
        ("scale", -1, "scale must be positive"),
        ("mean", [float("nan"), 0.5, 0.5], "mean and std must be finite numbers"),
        ("std", [float("inf"), 0.2, 0.2], "mean and std must be finite numbers"),
        ("scale", float("inf"), "scale must be positive"),
    ],
)
def test_bad_preprocessing_values_are_named(key: str, value: Any, expected: str) -> None:
    data = make_card().to_dict()
    data["preprocess"][key] = value
    with pytest.raises(ModelFileError) as info:
        ModelCard.from_dict(data)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("preprocess", [1, 2, 3], "field 'preprocess' must be an object"),
        ("source", "torchvision", "field 'source' must be an object"),
        ("labels", "circle", "field 'labels'"),
        ("inputs", [{"name": "input"}], "field 'inputs'"),
        ("opset", "eighteen", "field 'opset'"),
        ("fingerprint", {"seed": 1}, "missing field 'fingerprint.batch'"),
    ],
)
def test_bad_field_types_are_named(key: str, value: Any, expected: str) -> None:
    data = make_card().to_dict()
    data[key] = value
    with pytest.raises(ModelFileError) as info:
        ModelCard.from_dict(data)
    assert expected in str(info.value)


def test_newer_schema_version_asks_for_an_upgrade() -> None:
    data = make_card().to_dict()
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ModelFileError) as info:
        ModelCard.from_dict(data)
    assert f"schema version {SCHEMA_VERSION + 1}" in str(info.value)
    assert "pip install -U deploykit" in str(info.value)


def test_a_schema_1_card_is_read_as_the_current_schema() -> None:
    data = make_card().to_dict()
    data["schema_version"] = 1
    pp = data["preprocess"]
    pp["crop"] = pp.pop("height")
    del pp["width"], pp["channels"]
    card = ModelCard.from_dict(data)
    assert (card.preprocess.height, card.preprocess.width, card.preprocess.channels) == (64, 64, 3)
    assert card == make_card()
    assert card.to_dict()["schema_version"] == SCHEMA_VERSION == 2
    assert "crop" not in card.to_dict()["preprocess"]


def test_grayscale_and_non_square_inputs() -> None:
    gray = Preprocess(height=28, width=28, resize=None, channels=1, channel_order="L", mean=(0.5,),
                      std=(0.25,))
    gray.validate()
    assert gray.input_shape() == ("batch", 1, 28, 28)
    assert gray.summary() == ("L, resize to 28x28, bilinear, pixels 0..1, mean [0.5], std [0.25], NCHW")
    wide = Preprocess(height=64, width=192, resize=64, layout="NHWC", scale=1.0)
    wide.validate()
    assert wide.input_shape(2) == (2, 64, 192, 3)
    assert wide.summary().startswith("RGB, shorter side 64, centre crop 64x192, bilinear, pixels 0..255")
    data = make_card(preprocess=gray).to_dict()
    assert data["preprocess"] | {"mean": None, "std": None} == {
        "height": 28, "width": 28, "resize": None, "interpolation": "bilinear", "mean": None, "std": None,
        "scale": 1 / 255, "channels": 1, "channel_order": "L", "layout": "NCHW", "dtype": "float32"}
    del data["preprocess"]["channel_order"]  # one channel: L is the only order, so the default
    assert ModelCard.from_dict(data).preprocess == gray


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"channels": 1, "channel_order": "RGB", "mean": (0.5,), "std": (0.5,)},
         "channel_order of a 1-channel input must be L, got 'RGB'"),
        ({"channels": 1, "channel_order": "L"},
         "mean and std must have 1 value each (one per channel), got 3"),
        ({"channels": 4}, "channels must be 1 or 3, got 4"),
        ({"channel_order": "L"}, "channel_order of a 3-channel input must be RGB or BGR, got 'L'"),
        ({"height": 32, "width": 96, "resize": 31}, "resize (31) must be at least the smaller of height and "
         "width (32)"),
    ],
)
def test_inconsistent_channels_and_sizes_are_named(changes: dict[str, Any], expected: str) -> None:
    with pytest.raises(ModelFileError) as info:
        Preprocess(**changes).validate()
    assert expected in str(info.value)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    data = make_card().to_dict()
    data["something_new"] = {"added": "in a later minor release"}
    data["preprocess"]["future_option"] = True
    assert ModelCard.from_dict(data) == make_card()


def test_invalid_json_and_non_objects() -> None:
    with pytest.raises(ModelFileError, match="not valid JSON"):
        ModelCard.from_json("{not json")
    with pytest.raises(ModelFileError, match="not a JSON object"):
        ModelCard.from_json("[1, 2]")
    with pytest.raises(ModelFileError, match="no inputs or no outputs"):
        ModelCard.from_dict({**make_card().to_dict(), "inputs": []})


def test_write_card_refuses_invalid_preprocessing() -> None:
    bad = make_card(preprocess=Preprocess(height=64, width=64, resize=32))
    with pytest.raises(ModelFileError, match="resize"):
        write_card(tiny_onnx(), bad)
    not_a_number = make_card(preprocess=Preprocess(height=64, width=64, resize=None,
                                                   mean=(float("nan"), 0.5, 0.5)))
    with pytest.raises(ModelFileError, match="must be finite"):
        write_card(tiny_onnx(), not_a_number)
