"""timm:NAME: random, pretrained (from the Hugging Face hub cache, offline) and state-dict weights, a
fine-tuned head, preprocessing from timm's data config, and verify rebuilding the model from the card.

timm's test_* models (a few hundred thousand parameters) keep the exports fast."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

timm = pytest.importorskip("timm")

import torch  # noqa: E402
from conftest import run_cli  # noqa: E402
from PIL import Image  # noqa: E402

from deploykit.card import read_card  # noqa: E402
from deploykit.errors import ExitCode, ModelNotFoundError, UsageError  # noqa: E402
from deploykit.export import export_model  # noqa: E402
from deploykit.images import preprocess  # noqa: E402
from deploykit.sources import resolve_source  # noqa: E402
from deploykit.verify import verify_model  # noqa: E402

PHOTO = Path(__file__).parent / "data" / "grace_hopper.jpg"
MODEL = "test_resnet"
HUB_ID = "timm/test_resnet.r160_in1k"


def test_export_random_weights_and_verify(tmp_path: Path) -> None:
    result = export_model(f"timm:{MODEL}", weights="none", output=tmp_path / "m.onnx")
    assert result.parity
    card = read_card(result.path)
    assert (card.source.kind, card.source.name, card.source.weights) == ("timm", MODEL, "none")
    assert card.labels[:2] == ("tench", "goldfish")
    pp = card.preprocess
    # crop_pct 0.95: floor(160 / .95)
    assert (pp.height, pp.width, pp.resize, pp.interpolation) == (160, 160, 168, "bilinear")
    report = verify_model(result.path, max_images=2)
    assert report, str(report)
    assert "timm test_resnet (weights none, seed 0)" in report.reference


# convnextv2_nano.fcmae_ft_in22k_in1k_384: crop_mode "squash" with crop_pct 1, a straight resize to 384x384
@pytest.mark.parametrize("name", ["test_vit", "convnext_tiny", "resnet18", "efficientnet_b0",
                                  "convnextv2_nano.fcmae_ft_in22k_in1k_384"])
def test_preprocessing_reproduces_timms_eval_transform(name: str) -> None:
    from timm.data import create_transform, resolve_model_data_config

    loaded = resolve_source(f"timm:{name}", weights="none")
    transform = create_transform(**resolve_model_data_config(loaded.module), is_training=False)
    with Image.open(PHOTO) as opened:
        image = opened.convert("RGB")
    expected = transform(image).numpy()
    actual = preprocess(image, loaded.preprocess)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_fine_tuned_state_dict_brings_its_head(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = timm.create_model(MODEL, num_classes=5).eval()
    path = tmp_path / "finetuned.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    result = export_model(f"timm:{MODEL}", weights=str(path), output=tmp_path / "ft.onnx")
    card = result.card
    assert card.num_classes == 5
    assert card.labels == tuple(f"class_{i}" for i in range(5)), "ImageNet names do not apply to 5 classes"
    assert (card.source.weights, card.source.path) == ("file", str(path.resolve()))
    assert verify_model(result.path, max_images=1)


def test_num_classes_replaces_the_head(tmp_path: Path) -> None:
    result = export_model(f"timm:{MODEL}", weights="none", num_classes=7, output=tmp_path / "h.onnx")
    assert result.card.output.shape == ("batch", 7)
    assert result.card.source.num_classes == 7
    assert verify_model(result.path, max_images=1)


def test_state_dict_that_does_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save(timm.create_model("test_vit").state_dict(), path)
    with pytest.raises(UsageError) as info:
        resolve_source(f"timm:{MODEL}", weights=str(path))
    message = str(info.value)
    assert f"The state dict {str(path)!r} does not fit timm model {MODEL}" in message
    assert "missing key(s)" in message
    assert "\n" not in message


def test_unknown_name_suggests() -> None:
    with pytest.raises(ModelNotFoundError, match="Did you mean convnext_tiny"):
        resolve_source("timm:convnext_tinyy")


def _hub_env(cache: Path) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf-home")}


def test_default_weights_offline_and_not_cached(tmp_path: Path) -> None:
    proc = run_cli("export", f"timm:{MODEL}", cwd=tmp_path, env=_hub_env(tmp_path / "empty-cache"))
    assert proc.returncode == ExitCode.ERROR
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "are not in the Hugging Face cache and could not be downloaded" in proc.stderr
    assert HUB_ID in proc.stderr


def test_default_weights_from_the_hub_cache(tmp_path: Path) -> None:
    """A checkpoint where timm's loader (hf_hub_download) looks: the hub cache's snapshot layout."""
    from safetensors.torch import save_file

    cache = tmp_path / "hub"
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    torch.manual_seed(3)
    trained = timm.create_model(MODEL).eval()
    save_file(trained.state_dict(), str(snapshot / "model.safetensors"))
    env = _hub_env(cache)

    proc = run_cli("export", f"timm:{MODEL}", "--json", "-o", "pre.onnx", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["parity"]["passed"]
    card = read_card(tmp_path / "pre.onnx")
    assert (card.source.name, card.source.weights) == ("test_resnet.r160_in1k", "DEFAULT")
    x = torch.randn(1, 3, 160, 160)
    with torch.inference_mode():
        expected = trained(x).numpy()
    from deploykit.runtime import create_session

    [logits] = create_session(tmp_path / "pre.onnx").run(["logits"], {"input": x.numpy()})
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-3)

    proc = run_cli("verify", "pre.onnx", "--json", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_cli("inspect", "pre.onnx", cwd=tmp_path)
    assert "source: timm test_resnet.r160_in1k weights=DEFAULT" in proc.stdout


def test_list_timm() -> None:
    proc = run_cli("export", "--list", "timm")
    assert proc.returncode == 0
    names = proc.stdout.split()
    assert "convnext_tiny" in names
    assert len(names) == len(timm.list_models())


# squash with crop_pct 0.95: Resize((floor(384 / 0.95),) * 2) then CenterCrop(384), which no card mode is
SQUASH_CROP = "vit_medium_patch16_gap_384.sw_in12k_ft_in1k"


def test_a_geometry_deploykit_cannot_reproduce_is_refused_until_the_options_choose(tmp_path: Path) -> None:
    proc = run_cli("export", f"timm:{SQUASH_CROP}", "--weights", "none", cwd=tmp_path)
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "crop_mode 'squash' and crop_pct 0.95 to a 384x384 input" in proc.stderr
    assert "--resize-mode exact" in proc.stderr
    assert "--resize N" in proc.stderr
    assert not list(tmp_path.glob("*.onnx"))

    from deploykit.export import InputOptions, input_preprocess

    loaded = resolve_source(f"timm:{SQUASH_CROP}", weights="none")
    assert loaded.geometry_problem is not None
    # what the hint offers is what then works: either option decides the geometry
    exact = input_preprocess(loaded.preprocess, InputOptions(resize_mode="exact"),
                             geometry_problem=loaded.geometry_problem)
    assert (exact.height, exact.width, exact.resize) == (384, 384, None)
    assert exact.mean == loaded.preprocess.mean == (0.5, 0.5, 0.5)
    shorter = input_preprocess(loaded.preprocess, InputOptions(resize=404, size=(320, 320)),
                               geometry_problem=loaded.geometry_problem)
    assert (shorter.height, shorter.width, shorter.resize) == (320, 320, 404)
    with pytest.raises(UsageError, match="crop_pct 0.95"):
        input_preprocess(loaded.preprocess, InputOptions(size=(320, 320)),
                         geometry_problem=loaded.geometry_problem)
