"""The torchvision zoo through state dicts (--weights PATH): module versions kept, one-line load errors,
and one model of each family that tests/test_export.py does not cover (it has ResNet, MobileNet,
EfficientNet, Swin and Inception), at its smallest variant with seeded random weights."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import run_cli

from deploykit.errors import ExitCode, UsageError
from deploykit.export import export_model
from deploykit.runtime import create_session
from deploykit.sources import resolve_source


def _seeded(name: str) -> torch.nn.Module:
    """torchvision's model with seeded random weights; a zero-initialised head (ViT) gets random values so the
    outputs depend on the input and parity means something."""
    torch.manual_seed(0)
    extra = {"init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **extra)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.detach().any():
            torch.nn.init.normal_(module.weight, std=0.02)
    return model.eval()


def test_mnasnet_state_dict_keeps_its_module_versions(tmp_path: Path) -> None:
    """torch.save(model.state_dict()) keeps _metadata; MNASNet's loader needs its version from it."""
    model = _seeded("mnasnet0_5")
    path = tmp_path / "mnasnet.pt"
    torch.save(model.state_dict(), path)
    loaded = resolve_source("mnasnet0_5", weights=str(path))
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.module(x), model(x))


@pytest.mark.parametrize("wrap", ["dataparallel", "nested", "both"])
def test_module_versions_survive_prefix_stripping(wrap: str, tmp_path: Path) -> None:
    model = _seeded("mnasnet0_5")
    state = (torch.nn.DataParallel(model).state_dict() if wrap in ("dataparallel", "both")
             else model.state_dict())
    assert hasattr(state, "_metadata")
    obj = {"state_dict": state, "epoch": 3} if wrap in ("nested", "both") else state
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    loaded = resolve_source(str(path), arch="mnasnet0_5")
    metadata = loaded.module.state_dict()._metadata  # type: ignore[attr-defined]
    assert metadata["layers.0"]["version"] == 1
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.module(x), model(x))


def _bad_version_checkpoint(tmp_path: Path) -> Path:
    state = _seeded("mnasnet0_5").state_dict()
    state._metadata[""]["version"] = 7  # type: ignore[attr-defined]  # MNASNet accepts 1 or 2
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    return path


def test_a_modules_own_load_error_is_one_line(tmp_path: Path) -> None:
    path = _bad_version_checkpoint(tmp_path)
    with pytest.raises(UsageError) as info:
        resolve_source("mnasnet0_5", weights=str(path))
    message = str(info.value)
    assert str(path) in message
    assert "ValueError: version should be set to 1 or 2 instead of 7" in message
    assert "\n" not in message
    assert info.value.exit_code == ExitCode.USAGE


def test_load_errors_on_the_command_line_are_one_line(tmp_path: Path) -> None:
    path = _bad_version_checkpoint(tmp_path)
    proc = run_cli("export", "mnasnet0_5", "--weights", str(path), cwd=tmp_path)
    assert proc.returncode == ExitCode.USAGE
    assert "Traceback" not in proc.stderr
    assert "version should be set to 1 or 2" in proc.stderr
    assert str(path) in proc.stderr
    missing = OrderedDict(_seeded("squeezenet1_1").state_dict())
    missing.pop("features.0.weight")
    torch.save(missing, tmp_path / "missing.pt")
    proc = run_cli("export", "squeezenet1_1", "--weights", str(tmp_path / "missing.pt"), cwd=tmp_path)
    assert proc.returncode == ExitCode.USAGE
    assert "Traceback" not in proc.stderr
    assert "1 missing key(s) (features.0.weight)" in proc.stderr
    assert "missing.pt" in proc.stderr


# The smallest model of each family test_export.py does not export; ViT is the slowest (88 M parameters).
FAMILIES = [
    "mnasnet0_5",
    "squeezenet1_1",
    "shufflenet_v2_x0_5",
    "regnet_x_400mf",
    "densenet121",
    "googlenet",
    pytest.param("convnext_tiny", marks=pytest.mark.slow),
    pytest.param("efficientnet_v2_s", marks=pytest.mark.slow),
    pytest.param("swin_v2_t", marks=pytest.mark.slow),
    pytest.param("maxvit_t", marks=pytest.mark.slow),
    pytest.param("vit_b_32", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_exports_from_a_state_dict(name: str, tmp_path: Path) -> None:
    model = _seeded(name)
    weights = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    result = export_model(name, weights=str(weights), output=tmp_path / f"{name}.onnx")
    assert result.parity, result.parity
    card = result.card
    assert card.source.kind == "torchvision"
    assert card.source.weights == "file"
    assert card.labels[0] == "tench", "1000 classes: the ImageNet names apply"
    size = card.preprocess.height
    x = np.random.default_rng(1).standard_normal((2, 3, size, size), dtype=np.float32)
    [logits] = create_session(result.path).run(["logits"], {"input": x})
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    assert logits.shape == (2, 1000)
    scale = max(float(np.abs(expected).max()), 1e-30)
    assert float(np.abs(logits - expected).max()) <= 1e-4 * max(scale, 1.0)
    assert float(np.ptp(expected, axis=1).min()) > 0, "the outputs must depend on the input"
