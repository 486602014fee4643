"""runtime.py: sessions, providers and the Predictor, on the bundled (trained) example model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deploykit.errors import ExitCode, ModelFileError, UsageError
from deploykit.images import load_image
from deploykit.runtime import Predictor, SessionOptions, available_providers, create_session, softmax, top_k


def true_label(path: Path) -> str:
    return path.stem.rsplit("_", 1)[0]


def test_predictor_gets_the_example_images_right(shapes_onnx: Path, shapes_images: list[Path]) -> None:
    predictor = Predictor.open(shapes_onnx)
    assert predictor.name == "shapes"
    results = predictor.predict_images([load_image(p) for p in shapes_images], k=3)
    assert len(results) == len(shapes_images)
    for path, top in zip(shapes_images, results, strict=True):
        assert len(top) == 3
        assert top[0].label == true_label(path), f"{path.name}: predicted {top[0].label}"
        assert top[0].probability > 0.5
        assert [p.probability for p in top] == sorted((p.probability for p in top), reverse=True)
        assert top[0].index == predictor.card.labels.index(top[0].label)


def test_probabilities_and_batches(shapes_onnx: Path, shapes_images: list[Path]) -> None:
    predictor = Predictor.open(shapes_onnx)
    images = [load_image(p) for p in shapes_images[:3]]
    batch = predictor.preprocess(images)
    assert batch.shape == (3, 3, 64, 64)
    probabilities = predictor.probabilities(batch)
    assert probabilities.shape == (3, predictor.card.num_classes)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    one_by_one = np.concatenate([predictor.probabilities(batch[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(one_by_one, probabilities, atol=1e-5)
    [logits] = predictor.run(batch)
    np.testing.assert_allclose(softmax(logits), probabilities, atol=1e-6)


def test_top_k_is_clamped_and_labelled() -> None:
    probabilities = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], dtype=np.float32)
    result = top_k(probabilities, 10, ["a", "b", "c"])
    assert [[p.label for p in row] for row in result] == [["b", "c", "a"], ["a", "c", "b"]]
    assert [len(row) for row in top_k(probabilities, 0, ["a", "b", "c"])] == [1, 1]
    assert result[0][0].to_dict() == {"label": "b", "index": 1, "probability": pytest.approx(0.6)}
    assert top_k(probabilities, 1, ["a"])[0][0].label == "1", "missing labels fall back to the index"


def test_unavailable_provider_lists_the_available_ones(
    shapes_onnx: Path, absent_provider: tuple[str, str]
) -> None:
    short, full = absent_provider
    with pytest.raises(UsageError) as info:
        Predictor.open(shapes_onnx, SessionOptions(providers=(short,)))
    message = str(info.value)
    assert f"Requested provider {short!r} ({full}) is not available" in message
    assert f"available providers are {', '.join(available_providers())}" in message
    assert "CPUExecutionProvider" in message
    assert info.value.exit_code == ExitCode.USAGE


def test_session_options(shapes_onnx: Path, tmp_path: Path) -> None:
    optimized = tmp_path / "optimized.onnx"
    options = SessionOptions(
        providers=("cpu",),
        intra_op_threads=1,
        inter_op_threads=1,
        allow_spinning=False,
        optimization="basic",
        optimized_model_path=str(optimized),
    )
    session = create_session(shapes_onnx, options)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert optimized.is_file()
    from_bytes = create_session(shapes_onnx.read_bytes())
    x = np.zeros((2, 3, 64, 64), dtype=np.float32)
    np.testing.assert_allclose(
        session.run(None, {"input": x})[0], from_bytes.run(None, {"input": x})[0], atol=1e-5
    )


def test_sessions_on_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        create_session(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not an onnx model")
    with pytest.raises(ModelFileError, match="ONNX Runtime cannot load"):
        create_session(junk)


def test_predictor_needs_a_card(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
    )
    path = tmp_path / "nocard.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(ModelFileError, match="no deploykit model card"):
        Predictor.open(path)
