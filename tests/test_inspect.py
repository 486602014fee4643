"""inspect_model: what an ONNX file holds, with or without a card; fingerprints checked without torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploykit.card import read_card
from deploykit.errors import ModelFileError
from deploykit.fingerprint import check_fingerprint, fingerprint_input
from deploykit.inspect import inspect_model
from deploykit.runtime import create_session


def test_inspect_an_exported_model(resnet18_onnx: Path) -> None:
    result = inspect_model(resnet18_onnx)
    assert result.path == resnet18_onnx
    assert result.size_bytes == resnet18_onnx.stat().st_size
    assert result.opset == 18
    assert [(t.name, t.shape, t.dtype) for t in result.inputs] == [
        ("input", ("batch", 3, 224, 224), "float32")
    ]
    assert [(t.name, t.shape, t.dtype) for t in result.outputs] == [("logits", ("batch", 1000), "float32")]
    # resnet18 has 11,689,512 parameters; the exporter folds BatchNorm into the convolutions (a few k fewer).
    assert 11_600_000 < result.parameters < 11_700_000
    assert result.nodes > 20
    assert result.card == read_card(resnet18_onnx)
    assert "pytorch" in result.producer.lower()


def test_inspect_result_renders(resnet18_onnx: Path) -> None:
    result = inspect_model(resnet18_onnx)
    data = result.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["card"]["name"] == "resnet18"
    assert data["inputs"][0]["shape"] == ["batch", 3, 224, 224]
    text = str(result)
    assert "opset 18" in text
    assert "parameters" in text
    assert "model card: resnet18 (image-classification, fp32, 1000 classes: tench, goldfish" in text
    assert "source: torchvision resnet18 weights=none" in text
    assert "fingerprint: yes" in text


def test_inspect_a_model_without_card(tmp_path: Path) -> None:
    weight = numpy_helper.from_array(np.ones((4, 2), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        initializer=[weight],
    )
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    result = inspect_model(path)
    assert result.card is None
    assert result.parameters == 8
    assert result.opset == 17
    assert [t.name for t in result.inputs] == ["x"], "initialisers are not inputs"
    assert "model card: none" in str(result)
    assert result.to_dict()["card"] is None


@pytest.mark.parametrize("content", [b"", b"\x08\x07 not protobuf \xff\xff\xff\xff", b"ONNX? no."])
def test_inspect_unreadable_files(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="bad.onnx"):
        inspect_model(path)


def test_inspect_truncated_export(resnet18_onnx: Path, tmp_path: Path) -> None:
    path = tmp_path / "half.onnx"
    data = resnet18_onnx.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="not a readable ONNX file"):
        inspect_model(path)


def test_inspect_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        inspect_model(tmp_path / "nothing.onnx")


# --- fingerprints: the card's record of PyTorch's outputs, checkable with ONNX Runtime alone ----------------


def test_fingerprint_of_an_export_passes_in_onnxruntime(resnet18_onnx: Path) -> None:
    card = read_card(resnet18_onnx)
    session = create_session(resnet18_onnx)
    result = check_fingerprint(card, lambda x: session.run(None, {"input": x})[0])
    assert result, result.reason
    assert result.top1_agreement == 1.0
    assert result.max_abs_diff <= card.fingerprint.atol  # type: ignore[union-attr]
    assert "passed" in str(result)


def test_fingerprint_catches_changed_weights(resnet18_onnx: Path, tmp_path: Path) -> None:
    model = onnx.load(str(resnet18_onnx))
    biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(biggest).copy()
    values *= 1.05  # a 5% drift in one layer, as a broken conversion might produce
    biggest.CopyFrom(numpy_helper.from_array(values, biggest.name))
    path = tmp_path / "drifted.onnx"
    onnx.save(model, str(path))
    session = create_session(path)
    result = check_fingerprint(read_card(path), lambda x: session.run(None, {"input": x})[0])
    assert not result
    assert result.elements_outside > 0
    assert "differ by more than" in result.reason


def test_fingerprint_input_is_reproducible(resnet18_onnx: Path) -> None:
    pp = read_card(resnet18_onnx).preprocess
    a = fingerprint_input(pp, seed=3, batch=2)
    assert a.shape == (2, 3, 224, 224)
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, fingerprint_input(pp, seed=3, batch=2))
    assert not np.array_equal(a, fingerprint_input(pp, seed=4, batch=2))
