"""Hugging Face Transformers image classifiers: a save_pretrained folder and hf:ORG/NAME from the local hub
cache (offline). Tiny ViT, ConvNeXt and Swin models are built from configs, so nothing is downloaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from conftest import run_cli  # noqa: E402

from deploykit.card import read_card  # noqa: E402
from deploykit.errors import ExitCode, ModelNotFoundError  # noqa: E402
from deploykit.export import export_model  # noqa: E402
from deploykit.runtime import create_session  # noqa: E402
from deploykit.sources import resolve_source  # noqa: E402
from deploykit.verify import verify_model  # noqa: E402

LABELS = {0: "cat", 1: "dog", 2: "bird"}


def _save(kind: str, folder: Path) -> Path:
    """A tiny randomly initialised image classifier of ``kind`` with its image processor, save_pretrained."""
    t = transformers
    names = {"id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}}
    torch.manual_seed(0)
    if kind == "vit":
        model = t.ViTForImageClassification(t.ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, **names))
        processor = t.ViTImageProcessor(size={"height": 32, "width": 32})
    elif kind == "convnext":
        model = t.ConvNextForImageClassification(t.ConvNextConfig(
            num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], **names))
        processor = t.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875)
    else:
        model = t.SwinForImageClassification(t.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
            **names))
        processor = t.ViTImageProcessor(size={"height": 32, "width": 32}, resample=3)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# (kind, crop, resize, interpolation): ViT and Swin resize straight to 32x32; ConvNeXt resizes the shorter
# side to 32 / crop_pct and crops 32.
CASES = [("vit", 32, None, "bilinear"), ("convnext", 32, 36, "bicubic"), ("swin", 32, None, "bicubic")]


@pytest.mark.parametrize(("kind", "crop", "resize", "interpolation"), CASES)
def test_export_a_save_pretrained_folder(kind: str, crop: int, resize: int | None, interpolation: str,
                                         tmp_path: Path, record_property: pytest.RecordProperty) -> None:
    folder = _save(kind, tmp_path / kind)
    result = export_model(str(folder), output=tmp_path / f"{kind}.onnx")
    record_property("max_abs_diff", result.parity.max_abs_diff)
    assert result.parity, result.parity
    card = read_card(result.path)
    assert card.labels == ("cat", "dog", "bird")
    assert card.output.name == "logits"
    assert (card.source.kind, card.source.path) == ("hf", str(folder.resolve()))
    pp = card.preprocess
    assert (pp.height, pp.width, pp.resize, pp.interpolation) == (crop, crop, resize, interpolation)
    assert pp.mean == (0.5, 0.5, 0.5)

    model = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    x = np.random.default_rng(0).standard_normal((2, 3, crop, crop), dtype=np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).logits.numpy()
    [logits] = create_session(result.path).run(["logits"], {"input": x})
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-3)

    report = verify_model(result.path, max_images=2)
    assert report, str(report)
    assert "Hugging Face" in report.reference


def test_resize_that_ignores_the_aspect_ratio_then_crops(tmp_path: Path) -> None:
    """BEiT's processor resizes to 40x40 whatever the image's aspect ratio, then crops 32x32: no card mode
    does that, so export asks for a choice; the choice it names then exports."""
    folder = _save("vit", tmp_path / "beit-style")
    transformers.BeitImageProcessor(size={"height": 40, "width": 40}, do_center_crop=True,
                                    crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    proc = run_cli("export", str(folder), cwd=tmp_path)
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "resizes images to 40x40, ignoring their aspect ratio, and then crops 32x32" in proc.stderr
    assert not list(tmp_path.glob("*.onnx"))

    proc = run_cli("export", str(folder), "--resize", "36", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    pp = read_card(tmp_path / json.loads(proc.stdout)["path"]).preprocess
    assert (pp.height, pp.width, pp.resize) == (32, 32, 36)


def test_folder_without_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve_source(str(tmp_path))


def _hub_env(cache: Path) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf-home")}


def test_hub_name_not_cached_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("export", "hf:someone/not-here", cwd=tmp_path, env=_hub_env(tmp_path / "hub"))
    assert proc.returncode == ExitCode.USAGE
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "'hf:someone/not-here'" in proc.stderr
    assert "from the local Hugging Face cache" in proc.stderr


def test_hub_name_from_the_cache_and_verify(tmp_path: Path) -> None:
    saved = _save("vit", tmp_path / "saved")
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-vit"
    commit = "1" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(saved, repo / "snapshots" / commit)
    env = _hub_env(cache)
    proc = run_cli("export", "hf:tiny-org/tiny-vit", "--json", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["parity"]["passed"]
    card = read_card(summary["path"] if Path(summary["path"]).is_absolute() else tmp_path / summary["path"])
    assert (card.source.kind, card.source.name, card.source.path) == ("hf", "tiny-org/tiny-vit", None)
    proc = run_cli("verify", summary["path"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_cli("inspect", summary["path"], cwd=tmp_path)
    assert "source: hf tiny-org/tiny-vit" in proc.stdout
