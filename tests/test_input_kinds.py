"""Inputs other than a 0..1 RGB square, end to end: export, verify, serve, predict, bench, int8, package.

Three real models, each exported from the command line as a user would:

- ``digits``: the one-channel digit classifier of ``examples/digits`` (28x28 grayscale, resized straight to
  the input size), trained, so its predictions can be checked against the example images' names;
- ``wide``: the trained shapes model at a non-square 72x96 input (``--input-size 72x96 --resize-mode
  exact``; it pools globally, so it takes any size);
- ``bgr``: the shapes model behind a front that takes BGR pixels in 0..255 (``tests/data/kinds.py``). Its
  logits equal the shapes model's on the same images, so a channel order or pixel scale applied wrongly
  anywhere shows as different numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, SHAPES_FACTORY, SHAPES_IMAGES, LiveServer, run_cli, start_server

from deploykit.card import read_card

DIGITS = REPO / "examples" / "digits"
DIGITS_FACTORY = f"{DIGITS / 'model.py'}:build"
DIGITS_IMAGES = DIGITS / "images"
KINDS_FILE = REPO / "tests" / "data" / "kinds.py"
BGR_FACTORY = f"{KINDS_FILE}:bgr255"


@dataclass(frozen=True)
class Kind:
    name: str
    export_args: tuple[str, ...]
    images: Path
    shape: tuple[int | str, ...]


KINDS = [
    Kind("digits", (DIGITS_FACTORY,), DIGITS_IMAGES, ("batch", 1, 28, 28)),
    Kind("wide", (SHAPES_FACTORY, "--input-size", "72x96", "--resize-mode", "exact", "--name", "wide"),
         SHAPES_IMAGES, ("batch", 3, 72, 96)),
    Kind("bgr", (BGR_FACTORY, "--input-size", "64", "--resize", "72", "--channel-order", "BGR",
                 "--pixel-scale", "255", "--mean", "0,0,0", "--std", "1,1,1", "--name", "bgr"),
         SHAPES_IMAGES, ("batch", 3, 64, 64)),
]
IDS = [k.name for k in KINDS]


def true_label(path: Path) -> str:
    """The example images are named after their class: ``7_1.jpg``, ``star_2.jpg``."""
    return path.stem.rsplit("_", 1)[0]


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("kinds")
    paths = {}
    for kind in KINDS:
        out = folder / f"{kind.name}.onnx"
        result = run_cli("export", *kind.export_args, "-o", str(out), "--json")
        assert result.returncode == 0, result.stderr
        paths[kind.name] = out
    return paths


@pytest.fixture(scope="module")
def server(exported: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server([str(p) for p in exported.values()], tmp_path_factory.mktemp("kinds-server") / "log")
    yield live
    assert live.terminate() == 0


def test_the_card_describes_each_input(exported: dict[str, Path]) -> None:
    digits = read_card(exported["digits"]).preprocess
    assert (digits.channels, digits.channel_order, digits.resize) == (1, "L", None)
    assert (digits.height, digits.width) == (28, 28)
    assert len(digits.mean) == len(digits.std) == 1
    wide = read_card(exported["wide"]).preprocess
    assert (wide.channels, wide.channel_order, wide.resize) == (3, "RGB", None)
    assert (wide.height, wide.width) == (72, 96)
    assert (wide.mean, wide.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), "the shapes model's normalisation"
    bgr = read_card(exported["bgr"]).preprocess
    assert (bgr.channel_order, bgr.scale, bgr.mean, bgr.std) == ("BGR", 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert (bgr.height, bgr.width, bgr.resize) == (64, 64, 72)
    for kind in KINDS:
        card = read_card(exported[kind.name])
        assert card.input.shape == kind.shape
        assert card.parity is not None
        assert card.parity["passed"] is True
        assert card.parity["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_verify_passes_on_real_images(kind: Kind, exported: dict[str, Path]) -> None:
    result = run_cli("verify", str(exported[kind.name]), "--images", str(kind.images), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is True
    images = next(c for c in report["checks"] if c["name"] == "images")
    assert images["input"]["images"] == len(list(kind.images.iterdir()))
    out = images["outputs"][0]
    assert out["max_abs_diff"] < 1e-4
    assert out["top1_agreement"] == 1.0


def test_local_predictions_are_right(exported: dict[str, Path]) -> None:
    digits = run_cli("predict", "--model-file", str(exported["digits"]), str(DIGITS_IMAGES))
    assert digits.returncode == 0, digits.stderr
    found = records(digits.stdout)
    assert len(found) == 20
    assert [r["label"] for r in found] == [true_label(Path(r["path"])) for r in found]
    # The BGR 0..255 front computes the shapes model: the same probabilities on the same images.
    bgr = records(run_cli("predict", "--model-file", str(exported["bgr"]), str(SHAPES_IMAGES)).stdout)
    wide = records(run_cli("predict", "--model-file", str(exported["wide"]), str(SHAPES_IMAGES)).stdout)
    assert len(bgr) == len(wide) == 12
    assert [r["label"] for r in bgr] == [true_label(Path(r["path"])) for r in bgr]
    assert sum(r["label"] == true_label(Path(r["path"])) for r in wide) >= 11


def test_bgr_front_gives_the_shapes_models_numbers(exported: dict[str, Path], shapes_onnx: Path) -> None:
    args = ("--top-k", "6", str(SHAPES_IMAGES))
    bgr = records(run_cli("predict", "--model-file", str(exported["bgr"]), *args).stdout)
    shapes = records(run_cli("predict", "--model-file", str(shapes_onnx), *args).stdout)
    assert len(bgr) == len(shapes) == 12
    for ours, theirs in zip(bgr, shapes, strict=True):
        probabilities = {t["label"]: t["probability"] for t in ours["top_k"]}
        for top in theirs["top_k"]:
            assert probabilities[top["label"]] == pytest.approx(top["probability"], abs=1e-5)


@pytest.mark.parametrize("protocol", ["rest", "v2"])
@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_served_predictions_equal_local_ones(kind: Kind, protocol: str, exported: dict[str, Path],
                                             server: LiveServer) -> None:
    local = records(run_cli("predict", "--model-file", str(exported[kind.name]), str(kind.images)).stdout)
    remote = run_cli("predict", "--url", server.url, "--model", kind.name, "--protocol", protocol,
                     str(kind.images))
    assert remote.returncode == 0, remote.stderr
    served = records(remote.stdout)
    assert [r["label"] for r in served] == [r["label"] for r in local]
    for ours, theirs in zip(served, local, strict=True):
        assert ours["probability"] == pytest.approx(theirs["probability"], abs=1e-5)


def test_v2_metadata_shows_each_shape(exported: dict[str, Path], server: LiveServer) -> None:
    import requests

    for kind in KINDS:
        meta = requests.get(f"{server.url}/v2/models/{kind.name}", timeout=10).json()
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, *kind.shape[1:]]}]


def test_v2_client_with_a_card_sends_the_cards_shape(exported: dict[str, Path], server: LiveServer) -> None:
    image = sorted(DIGITS_IMAGES.iterdir())[0]
    result = run_cli("predict", "--url", server.url, "--protocol", "v2", "--model", "digits", "--card",
                     str(exported["digits"]), str(image))
    assert result.returncode == 0, result.stderr
    assert records(result.stdout)[0]["label"] == true_label(image)


def test_int8_calibrates_on_grayscale_images(exported: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "digits.onnx"
    result = run_cli("export", DIGITS_FACTORY, "-o", str(out), "--quantize", "int8", "--calibration",
                     str(DIGITS_IMAGES), "--json")
    assert result.returncode == 0, result.stderr
    optimized = json.loads(result.stdout)["optimized"]
    assert optimized["calibration"]["images"] == 20
    assert optimized["agreement"]["images"] >= 20
    assert 0 < optimized["agreement"]["top1"] <= 1
    int8 = tmp_path / "digits.int8.onnx"
    card = read_card(int8)
    assert card.precision == "int8"
    assert card.input.shape == ("batch", 1, 28, 28)
    found = run_cli("predict", "--model-file", str(int8), str(DIGITS_IMAGES))
    assert found.returncode == 0, found.stderr
    assert [r["error"] for r in records(found.stdout)] == [None] * 20


def test_bench_runs_at_the_cards_shape(exported: dict[str, Path]) -> None:
    result = run_cli("bench", str(exported["wide"]), "--batch-size", "2", "--duration", "0.2", "--warmup",
                     "1", "--torch", "off", "--json")
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)["results"]
    assert [(r["batch_size"], r["threads"]) for r in results] == [(2, 1), (2, 2)]
    assert all(r["iterations"] > 0 and r["throughput"] > 0 for r in results)


def test_triton_config_has_each_models_dims(exported: dict[str, Path], tmp_path: Path) -> None:
    for kind in KINDS:
        out = tmp_path / kind.name
        result = run_cli("package", str(exported[kind.name]), "--format", "triton", "--output", str(out))
        assert result.returncode == 0, result.stderr
        config = (out / kind.name / "config.pbtxt").read_text()
        dims = ", ".join(str(d) for d in kind.shape[1:])
        assert f"dims: [ {dims} ]" in config


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((DIGITS_FACTORY, "--channels", "3"), "--channels 3 does not fit the model: its first layer"),
        ((DIGITS_FACTORY, "--channel-order", "BGR"),
         "--channel-order applies to 3-channel models"),
        ((DIGITS_FACTORY, "--mean", "0.5,0.5,0.5"),
         "--mean has 3 values, but the model takes 1 channel"),
        ((SHAPES_FACTORY, "--pixel-scale", "255"), "--pixel-scale 255 changes the units of the"),
        ((SHAPES_FACTORY, "--input-size", "64x"), "expected a size as 224 or HEIGHTxWIDTH"),
        ((SHAPES_FACTORY, "--input-size", "64x96x3"), "expected a size as 224 or HEIGHTxWIDTH"),
        ((SHAPES_FACTORY, "--resize-mode", "fit"), "--resize-mode must be shorter-side or exact"),
        ((SHAPES_FACTORY, "--resize-mode", "exact", "--resize", "80"), "--resize sets the shorter side"),
        ((SHAPES_FACTORY, "--channels", "4"), "--channels must be 1 (grayscale) or 3 (colour), got 4"),
        ((f"{KINDS_FILE}:gray_net",), "The model takes 1 channel where its source declares a normalisation "
         "for 3: pass --mean and --std with 1 value (for example --mean 0.5 --std 0.5)."),
        ((f"{KINDS_FILE}:gray_net", "--mean", "0.5"), "pass --std with 1 value"),
        ((f"{KINDS_FILE}:rgba_net",), "The model's first layer, '0' (Conv2d), takes 4 channels; deploykit "
         "feeds images as 1 (grayscale) or 3 (colour) channels."),
    ],
)
def test_options_that_do_not_fit_are_one_line_before_any_export(args: tuple[str, ...], message: str,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "never.onnx"
    result = run_cli("export", *args, "-o", str(out))
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "Exporting" not in result.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
