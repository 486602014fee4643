"""errors.one_line: real ONNX Runtime, torch and requests failures as one line of error text."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import requests
import torch
from onnx import TensorProto, helper

from deploykit.client import PredictClient
from deploykit.errors import ConnectionFailedError, ModelFileError, one_line
from deploykit.runtime import create_session
from tests.conftest import free_port


def _raised(call: Callable[..., object], *args: object, **kwargs: object) -> BaseException:
    """The exception ``call(*args, **kwargs)`` raises."""
    with pytest.raises(Exception) as info:  # noqa: PT011 - any type: its text is what is tested
        call(*args, **kwargs)
    return info.value


def _identity_model(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_onnxruntime_lines_are_joined_without_the_error_code(tmp_path: Path) -> None:
    session = ort.InferenceSession(str(_identity_model(tmp_path / "identity.onnx")))
    exc = _raised(session.run, None, {"x": np.zeros((1, 4), np.float32)})
    assert "\n" in str(exc)  # what ONNX Runtime gives
    assert str(exc).startswith("[ONNXRuntimeError]")
    text = one_line(exc)
    assert "\n" not in text
    assert text.startswith("Got invalid dimensions for input: x")
    assert "index: 1 Got: 4 Expected: 3" in text  # the detail is on the second line
    assert "ONNXRuntimeError" not in text
    assert not text.endswith(".")


def test_onnxruntime_load_failure_reads_as_one_sentence(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not an onnx model")
    assert "ONNXRuntimeError" in str(_raised(ort.InferenceSession, str(junk)))
    with pytest.raises(ModelFileError) as info:
        create_session(junk)
    message = info.value.message
    assert message.startswith(f"ONNX Runtime cannot load {str(junk)!r}: ")
    assert "Protobuf parsing failed." in message
    assert message.endswith(".")
    assert not message.endswith("..")
    assert "ONNXRuntimeError" not in message


def test_torch_shape_mismatch_keeps_its_message() -> None:
    exc = _raised(torch.nn.Linear(4, 3), torch.zeros(2, 5))
    expected = "RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x5 and 4x3)"
    assert one_line(exc, with_type=True) == expected


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torch_long_message_is_cut_to_its_first_sentence(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torchscript archive" * 4)
    exc = _raised(torch.jit.load, str(junk))
    assert len(str(exc)) > 300
    assert one_line(exc) == str(exc).split(". ")[0]
    assert one_line(exc).startswith("PytorchStreamReader failed reading zip archive")


def test_torch_multi_line_advice_is_left_out(tmp_path: Path) -> None:
    pickled = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)
    exc = _raised(torch.load, pickled, weights_only=True)
    assert len(str(exc).splitlines()) > 1
    assert one_line(exc, with_type=True) == "UnpicklingError: Weights only load failed"


def test_a_first_line_ending_in_a_colon_keeps_the_lines_it_introduces() -> None:
    state = {"weight": torch.zeros(3, 5), "bias": torch.zeros(3)}
    exc = _raised(torch.nn.Linear(4, 3).load_state_dict, state)
    assert str(exc).splitlines()[0].endswith(":")
    text = one_line(exc)
    assert text.startswith("Error(s) in loading state_dict for Linear: size mismatch for weight: ")
    assert "torch.Size([3, 5])" in text
    assert "\n" not in text
    assert "\t" not in text


def test_requests_connection_error_to_a_closed_port() -> None:
    url = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    exc = _raised(requests.get, url, timeout=5)
    assert isinstance(exc, requests.exceptions.ConnectionError)
    text = one_line(exc)
    assert "Connection refused" in text
    assert "\n" not in text
    assert len(text) <= 300
    with PredictClient(url, retries=0) as client, pytest.raises(ConnectionFailedError) as info:
        client.request("GET", "/")
    reason = "connection refused (1 attempt)."
    assert info.value.message == f"Cannot reach the server at {url.rstrip('/')}: {reason}"


@pytest.mark.parametrize("message", ["", "   ", "\n\t \n"])
def test_an_empty_message_gives_the_type_name(message: str) -> None:
    assert one_line(ValueError(message)) == "ValueError"
    assert one_line(ValueError(message), with_type=True) == "ValueError"


def test_a_long_message_is_cut_to_the_limit() -> None:
    exc = ValueError("x" * 5000)
    assert len(one_line(exc)) == 300
    assert one_line(exc).endswith("...")
    assert len(one_line(exc, 50)) == 50
    typed = one_line(exc, 50, with_type=True)
    assert len(typed) == 50
    assert typed.startswith("ValueError: x")
    assert typed.endswith("...")


def test_a_long_message_keeps_its_first_sentence() -> None:
    exc = RuntimeError("The first sentence says it. " + "Advice. " * 100)
    assert one_line(exc) == "The first sentence says it"


def test_a_short_one_line_message_keeps_all_its_sentences() -> None:
    exc = _raised(torch.cat, [torch.zeros(1, 2), torch.zeros(1, 3)], dim=0)
    assert str(exc).count(". ") == 1  # the second sentence has the sizes
    assert "\n" not in str(exc)
    assert one_line(exc) == str(exc).removesuffix(".")


def test_a_multi_line_message_keeps_its_first_line() -> None:
    assert one_line(RuntimeError("what failed\n  File 'x.py', line 3\nmore detail")) == "what failed"


def test_colour_codes_and_only_a_final_period_are_dropped() -> None:
    coloured = RuntimeError("\x1b[96mThis is step 1/3\x1b[0m of exporting")  # as torch.onnx writes it
    assert one_line(coloured) == "This is step 1/3 of exporting"
    assert one_line(RuntimeError("Loading...")) == "Loading..."
    assert one_line(KeyError("input")) == "'input'"
