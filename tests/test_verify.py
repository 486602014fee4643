"""`deploykit verify`: passes on real exports; fails (exit 3, with the reason) on each kind of breakage."""

from __future__ import annotations

import json
import shutil
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import EXAMPLES, SHAPES_FACTORY, run_cli
from onnx import numpy_helper

from deploykit.card import CARD_KEY, ModelCard, TensorSpec, read_card, write_card
from deploykit.errors import ExitCode, ModelNotFoundError, UsageError
from deploykit.verify import ParityReport, verify_model

OUTPUT_FIELDS = {"name", "shape", "reference_shape", "dtype", "reference_dtype", "max_abs_diff",
                 "max_rel_diff", "mean_abs_diff", "fraction_outside_tolerance", "worst_excess",
                 "top1_agreement", "top5_agreement", "within_tolerance"}
CHECK_FIELDS = {"name", "kind", "status", "passed", "detail", "provider", "input", "top1_agreement",
                "top5_agreement", "outputs", "metric", "value", "limit", "excess", "fingerprint"}


# ----------------------------------------------------------------------------------------------------------
# Helpers that break exported models the way real mistakes do.


def _save_with_card(src: Path, dst: Path, card: ModelCard) -> Path:
    """Copy an ONNX file, replacing only its model card."""
    model = onnx.load(str(src))
    write_card(model, card)
    onnx.save(model, str(dst))
    return dst


def _tamper(src: Path, dst: Path, change: str = "conv", amount: float = 1e-2) -> Path:
    """Copy an ONNX file with one weight tensor changed: every element of the first conv weight + ``amount``,
    or ``amount`` added to the first class's bias of the final linear layer (``change="bias"``)."""
    model = onnx.load(str(src))
    inits = list(model.graph.initializer)
    if change == "conv":
        target = next(i for i in inits if numpy_helper.to_array(i).ndim == 4)
    else:
        gemm = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
        target = next(i for i in inits if i.name == gemm.input[2])
    array = numpy_helper.to_array(target).copy()
    if change == "conv":
        array += np.float32(amount)
    else:
        array[0] += np.float32(amount)
    target.CopyFrom(numpy_helper.from_array(array, target.name))
    onnx.save(model, str(dst))
    return dst


def _json(stdout: str) -> dict:
    return json.loads(stdout)


def _check(data: dict, name: str) -> dict:
    return next(c for c in data["checks"] if c["name"] == name)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("verify")


@pytest.fixture(scope="module")
def tampered_onnx(shapes_onnx: Path, work: Path) -> Path:
    return _tamper(shapes_onnx, work / "tampered.onnx")


@pytest.fixture(scope="module")
def static1_onnx(work: Path) -> Path:
    """The example model exported with its batch frozen at 1."""
    from deploykit.export import export_model

    return export_model(SHAPES_FACTORY, output=work / "static1.onnx", static_batch=1).path


@pytest.fixture(scope="module")
def checkpoint_onnx(work: Path) -> tuple[Path, Path]:
    """The example model exported from a bare state dict with --arch; returns (onnx, checkpoint)."""
    from deploykit.export import export_model

    ckpt = work / "shapes_state.pt"
    shutil.copyfile(EXAMPLES / "shapes.pt", ckpt)
    return export_model(str(ckpt), arch=SHAPES_FACTORY, output=work / "from_ckpt.onnx").path, ckpt


# ----------------------------------------------------------------------------------------------------------
# Passing models.


def test_resnet18_passes_with_figures(resnet18_onnx: Path) -> None:
    result = run_cli("verify", str(resnet18_onnx), "--json")
    assert result.returncode == 0, result.stderr
    data = _json(result.stdout)
    assert data["passed"] is True
    assert data["mode"] == "pytorch"
    assert "resnet18" in data["reference"]
    assert "weights none" in data["reference"]
    names = [c["name"] for c in data["checks"]]
    assert names == ["checker", "runtime/cpu", "card", "source", "batch", "random@1", "random@4", "images",
                     "fingerprint"]
    assert all(c["status"] == "passed" for c in data["checks"])
    for name in ("random@1", "random@4", "images"):
        out = _check(data, name)["outputs"][0]
        assert out["name"] == "logits"
        assert out["max_abs_diff"] < 1e-4
        assert out["fraction_outside_tolerance"] == 0.0
        assert out["top1_agreement"] == 1.0
    assert _check(data, "random@4")["outputs"][0]["shape"] == [4, 1000]
    assert _check(data, "images")["input"]["images"] > 0
    assert data["latency"]["reference"] == "PyTorch eager"
    assert data["latency"]["onnx_ms"] > 0
    assert data["verdict"] == {**data["verdict"], "passed": True, "failed_check": None, "failed_checks": []}


def test_shapes_passes_on_every_image(shapes_onnx: Path, shapes_images: list[Path]) -> None:
    report = verify_model(shapes_onnx)
    assert isinstance(report, ParityReport)
    assert report, report.verdict
    images = report.check("images")
    assert images.input is not None
    assert images.input["images"] == len(shapes_images)
    # the factory declares its preprocessing, so the reference is fed by it (and it equals the card's)
    assert images.input["reference_preprocess"] == "card"
    assert images.outputs[0].top1_agreement == 1.0
    assert report.check("source").status == "passed"
    text = str(report)
    assert "PASSED" in text
    assert "images" in text
    assert "latency" in text


def test_cli_report_file_and_plain_output(shapes_onnx: Path, tmp_path: Path) -> None:
    report = tmp_path / "out" / "report.json"
    report.parent.mkdir()
    result = run_cli("verify", str(shapes_onnx), "--report", str(report))
    assert result.returncode == 0, result.stderr
    assert "PASSED" in result.stdout
    assert "random@4" in result.stdout
    data = json.loads(report.read_text())
    assert data["passed"] is True
    assert data["model"] == str(shapes_onnx)
    assert [p.name for p in report.parent.iterdir()] == ["report.json"]  # no temporary file left behind


def test_json_follows_the_documented_schema(shapes_onnx: Path) -> None:
    result = run_cli("verify", str(shapes_onnx), "--json", "--batch-size", "2", "--batch-size", "5")
    assert result.returncode == 0, result.stderr
    data = _json(result.stdout)
    assert set(data) == {"schema", "model", "name", "passed", "mode", "reference", "tolerance", "providers",
                         "batch_sizes", "checks", "latency", "verdict", "notes", "seconds"}
    assert data["schema"] == "deploykit.verify/1"
    assert data["tolerance"] == {"atol": 1e-4, "rtol": 1e-3, "gated": True, "min_top1_agreement": None}
    assert data["batch_sizes"] == [2, 5]
    assert data["providers"] == ["cpu"]
    for check in data["checks"]:
        assert set(check) == CHECK_FIELDS
        for out in check["outputs"]:
            assert set(out) == OUTPUT_FIELDS
    assert _check(data, "random@5")["outputs"][0]["shape"] == [5, 6]
    assert _check(data, "random@5")["input"] == {"kind": "random", "batch": 5, "seed": 1234 + 5}
    assert set(data["verdict"]) == {"passed", "message", "failed_check", "failed_checks", "metric", "value",
                                    "limit", "excess"}
    assert set(data["latency"]) == {"batch", "runs", "reference", "reference_ms", "onnx_ms", "provider"}


# ----------------------------------------------------------------------------------------------------------
# Real breakage: each must fail with exit 3 and say why.


def test_changed_weight_fails_naming_the_output_and_the_difference(tampered_onnx: Path) -> None:
    result = run_cli("verify", str(tampered_onnx), "--json")
    assert result.returncode == 3, result.stderr
    data = _json(result.stdout)
    assert data["passed"] is False
    assert data["verdict"]["failed_check"] == "random@1"
    assert {"random@1", "random@4", "images", "fingerprint"} <= set(data["verdict"]["failed_checks"])
    out = _check(data, "random@1")["outputs"][0]
    assert out["name"] == "logits"
    assert out["within_tolerance"] is False
    assert out["max_abs_diff"] > 1e-3
    assert data["verdict"]["metric"] == "max_abs_diff"
    assert data["verdict"]["value"] == pytest.approx(out["max_abs_diff"])
    assert data["verdict"]["excess"] > 0
    line = result.stderr.strip().splitlines()[-1]
    assert "random@1" in line
    assert "'logits'" in line
    assert f"max abs diff {out['max_abs_diff']:.3g}" in line
    assert "Traceback" not in result.stderr


def test_wrong_mean_std_in_the_card_fails_on_real_images(shapes_onnx: Path, tmp_path: Path) -> None:
    card = read_card(shapes_onnx)
    wrong = card.replace(preprocess=replace(card.preprocess, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    model = _save_with_card(shapes_onnx, tmp_path / "wrong_norm.onnx", wrong)
    report = verify_model(model)
    assert not report
    # the graph is intact: random tensors and the fingerprint agree; only the real images expose the card
    assert [c.name for c in report.failed_checks] == ["images"]
    images = report.check("images")
    assert images.input is not None
    assert images.input["reference_preprocess"] == "source"
    assert images.outputs[0].max_abs_diff > 0.1
    assert "mean [0.0, 0.0, 0.0] in the card vs [0.5, 0.5, 0.5]" in images.detail


def test_exported_with_wrong_mean_std_fails_exit_3(tmp_path: Path) -> None:
    """Export the example model with ImageNet statistics instead of the ones it was trained with."""
    from deploykit.export import export_model

    out = export_model(SHAPES_FACTORY, output=tmp_path / "imagenet_norm.onnx", mean=(0.485, 0.456, 0.406),
                       std=(0.229, 0.224, 0.225)).path
    result = run_cli("verify", str(out))
    assert result.returncode == 3
    assert "images" in result.stderr
    assert "preprocessing differs" in result.stderr
    assert "FAIL images" in result.stdout
    assert "ok   random@4" in result.stdout


def test_frozen_batch_passes_as_declared_and_fails_other_batches(static1_onnx: Path) -> None:
    report = verify_model(static1_onnx)
    assert report, report.verdict
    assert report.check("batch").status == "skipped"
    assert report.batch_sizes == (1,)

    report = verify_model(static1_onnx, batch_sizes=(1, 4))
    assert not report
    batch = report.check("batch")
    assert batch.status == "failed"
    assert "batch 4 does not run" in batch.detail
    assert "fixed at 1" in batch.detail
    assert report.failed_checks[0].name == "batch"
    assert report.check("random@4").status == "skipped"


def test_frozen_batch_with_a_card_claiming_dynamic_fails(static1_onnx: Path, tmp_path: Path) -> None:
    card = read_card(static1_onnx)
    dynamic = card.replace(inputs=(TensorSpec("input", ("batch", 3, 64, 64)),),
                           outputs=(TensorSpec("logits", ("batch", 6)),))
    model = _save_with_card(static1_onnx, tmp_path / "lying.onnx", dynamic)
    result = run_cli("verify", str(model), "--json")
    assert result.returncode == 3
    data = _json(result.stdout)
    batch = _check(data, "batch")
    assert batch["status"] == "failed"
    assert "fixed at 1 while the card declares a dynamic batch" in batch["detail"]
    assert _check(data, "card")["status"] == "failed"
    assert "declares a dynamic batch but the graph fixes it at 1" in _check(data, "card")["detail"]
    assert "batch" in result.stderr


def test_checkpoint_source_passes_then_fails_when_the_checkpoint_changes(
        checkpoint_onnx: tuple[Path, Path], tmp_path: Path) -> None:
    model, ckpt = checkpoint_onnx
    card = read_card(model)
    assert card.source.kind == "checkpoint"
    assert card.source.sha256
    report = verify_model(model)
    assert report, report.verdict
    assert "sha256 matches" in report.check("source").detail

    # a private copy of the checkpoint, so the shared one stays intact for other tests
    changed = tmp_path / "changed.pt"
    shutil.copyfile(ckpt, changed)
    moved = _save_with_card(model, tmp_path / "model.onnx", card.replace(source=replace(card.source,
                                                                                        path=str(changed))))
    assert verify_model(moved)  # the copy is byte-identical: still passes
    import torch

    state = torch.load(changed, weights_only=True)
    next(iter(state.values())).add_(1e-3)
    torch.save(state, changed)
    result = run_cli("verify", str(moved), "--json")
    assert result.returncode == 3
    data = _json(result.stdout)
    assert data["verdict"]["failed_check"] == "source"
    assert "has changed since export" in result.stderr
    assert "sha256" in result.stderr


def test_missing_source_is_a_clear_error(checkpoint_onnx: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = checkpoint_onnx
    card = read_card(model)
    gone = _save_with_card(model, tmp_path / "orphan.onnx",
                           card.replace(source=replace(card.source, path=str(tmp_path / "deleted.pt"))))
    with pytest.raises(ModelNotFoundError, match="no longer exists"):
        verify_model(gone)
    result = run_cli("verify", str(gone))
    assert result.returncode == 2
    assert "no longer exists" in result.stderr
    assert "--against" in result.stderr
    assert "Traceback" not in result.stderr
    # the fingerprint needs no source
    assert run_cli("verify", str(gone), "--fingerprint").returncode == 0


def test_factory_source_gone_names_against_and_fingerprint(shapes_onnx: Path, tmp_path: Path) -> None:
    card = read_card(shapes_onnx)
    moved = replace(card.source, name=f"{tmp_path / 'gone' / 'model.py'}:build")
    gone = _save_with_card(shapes_onnx, tmp_path / "gone.onnx", card.replace(source=moved))
    result = run_cli("verify", str(gone))
    assert result.returncode == 2
    assert "The source recorded in the model card is gone" in result.stderr
    assert "--against" in result.stderr
    assert "--fingerprint" in result.stderr
    assert "Check the path" not in result.stderr
    assert "Traceback" not in result.stderr


def test_report_path_is_checked_before_the_run(shapes_onnx: Path, tmp_path: Path) -> None:
    result = run_cli("verify", str(shapes_onnx), "--report", str(tmp_path / "missing" / "report.json"))
    assert result.returncode == 2
    assert "choose another --report" in result.stderr
    assert result.stdout == ""  # nothing ran, so there is no verdict to lose
    assert [line for line in result.stderr.splitlines() if line.strip()][0].startswith("Error: Cannot write")


def test_nan_weights_fail_with_strict_json(nan_shapes_onnx: Path, tmp_path: Path) -> None:
    """NaN outputs fail the fingerprint, are counted as outside the tolerance, and are null in the JSON."""
    report = tmp_path / "report.json"
    result = run_cli("verify", str(nan_shapes_onnx), "--fingerprint", "--json", "--report", str(report))
    assert result.returncode == 3, result.stderr

    def strict(text: str) -> dict:
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the JSON output"))

    data = strict(result.stdout)
    assert strict(report.read_text()) == data
    fingerprint = _check(data, "fingerprint")
    assert fingerprint["passed"] is False
    assert "are NaN or infinite" in fingerprint["detail"]
    assert fingerprint["fingerprint"]["max_abs_diff"] is None
    assert fingerprint["fingerprint"]["elements_outside_tolerance"] == fingerprint["input"]["samples"]


def test_corrupt_onnx_is_an_error_exit_1(shapes_onnx: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(shapes_onnx.read_bytes()[: shapes_onnx.stat().st_size // 2])
    result = run_cli("verify", str(truncated))
    assert result.returncode == 1
    assert "not a readable ONNX file" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_onnx_without_a_card_is_an_error(shapes_onnx: Path, tmp_path: Path) -> None:
    model = onnx.load(str(shapes_onnx))
    kept = [p for p in model.metadata_props if p.key != CARD_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    result = run_cli("verify", str(bare))
    assert result.returncode == 1
    assert "no deploykit model card" in result.stderr


# ----------------------------------------------------------------------------------------------------------
# --against another ONNX file, and the top-1 gate.


def test_against_an_identical_onnx_has_zero_difference(shapes_onnx: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.onnx"
    shutil.copyfile(shapes_onnx, copy)
    result = run_cli("verify", str(shapes_onnx), "--against", str(copy), "--json")
    assert result.returncode == 0, result.stderr
    data = _json(result.stdout)
    assert data["mode"] == "onnx"
    for name in ("random@1", "random@4", "images"):
        assert _check(data, name)["outputs"][0]["max_abs_diff"] == 0.0


def test_against_a_changed_onnx_fails(shapes_onnx: Path, tampered_onnx: Path) -> None:
    report = verify_model(shapes_onnx, against=tampered_onnx)
    assert not report
    assert report.failed_checks[0].name == "random@1"
    assert report.check("fingerprint").passed  # the candidate itself still matches its own card


def test_min_top1_agreement_gates_instead_of_the_tolerance(shapes_onnx: Path, tampered_onnx: Path,
                                                          tmp_path: Path) -> None:
    # small drift everywhere, same predictions: passes the top-1 gate, the tolerance is only reported
    report = verify_model(shapes_onnx, against=tampered_onnx, min_top1_agreement=0.9)
    assert report, report.verdict
    assert not report.tolerance_gated
    images = report.check("images")
    assert images.outputs[0].within_tolerance is False
    assert images.outputs[0].top1_agreement is not None
    assert images.outputs[0].top1_agreement >= 0.9

    # a reference that always answers class 0 disagrees on most images: the gate fails, saying by how much
    biased = _tamper(shapes_onnx, tmp_path / "biased.onnx", change="bias", amount=1000.0)
    result = run_cli("verify", str(shapes_onnx), "--against", str(biased), "--min-top1-agreement", "0.9",
                     "--json")
    assert result.returncode == 3
    data = _json(result.stdout)
    assert data["verdict"]["failed_check"] == "images"
    assert data["verdict"]["metric"] == "top1_agreement"
    assert data["verdict"]["value"] < 0.9
    assert data["verdict"]["excess"] == pytest.approx(0.9 - data["verdict"]["value"])
    assert "top-1 agreement" in result.stderr
    assert "below the required 90.0%" in result.stderr

    # an explicit tolerance gates too
    assert not verify_model(shapes_onnx, against=tampered_onnx, min_top1_agreement=0.9, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Without torch: the fingerprint.


@pytest.fixture
def no_torch_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """Environment for a subprocess in which torch cannot be imported; the log records every attempt."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(textwrap.dedent("""
        import atexit, os, sys

        LOG = os.environ["HIDE_TORCH_LOG"]
        HIDDEN = ("torch", "torchvision", "functorch")

        class HideTorch:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in HIDDEN:
                    with open(LOG, "a") as fh:
                        fh.write(f"attempt {name}\\n")
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, HideTorch())

        @atexit.register
        def loaded():
            with open(LOG, "a") as fh:
                names = [m for m in sys.modules if m.partition(".")[0] in HIDDEN]
                fh.write("loaded:" + ",".join(names) + "\\n")
    """))
    log = tmp_path / "torch.log"
    return {"PYTHONPATH": str(hide), "HIDE_TORCH_LOG": str(log)}, log


def test_fingerprint_without_torch(shapes_onnx: Path, tampered_onnx: Path,
                                   no_torch_env: tuple[dict[str, str], Path]) -> None:
    env, log = no_torch_env
    result = run_cli("verify", str(shapes_onnx), "--fingerprint", "--json", env=env)
    assert result.returncode == 0, result.stderr
    data = _json(result.stdout)
    assert data["passed"] is True
    assert data["mode"] == "fingerprint"
    assert [c["name"] for c in data["checks"]] == ["checker", "runtime/cpu", "card", "batch", "fingerprint"]
    assert _check(data, "fingerprint")["fingerprint"]["passed"] is True
    assert log.read_text().splitlines() == ["loaded:"]  # never even tried to import torch
    log.unlink()

    # plain verify falls back to the fingerprint and says so
    result = run_cli("verify", str(shapes_onnx), "--json", env=env)
    assert result.returncode == 0, result.stderr
    data = _json(result.stdout)
    assert data["mode"] == "fingerprint"
    assert any("torch is not installed" in n for n in data["notes"])
    assert log.read_text().splitlines()[-1] == "loaded:"
    log.unlink()

    # a tampered file fails the fingerprint check
    result = run_cli("verify", str(tampered_onnx), "--fingerprint", env=env)
    assert result.returncode == 3
    assert "fingerprint" in result.stderr
    assert "sampled values differ" in result.stderr
    assert log.read_text().splitlines() == ["loaded:"]


def test_fingerprint_only_checks_a_frozen_batch_at_its_own_batch(static1_onnx: Path) -> None:
    report = verify_model(static1_onnx, fingerprint_only=True)
    assert report, report.verdict
    assert report.mode == "fingerprint"
    assert report.check("fingerprint").status == "passed"


# ----------------------------------------------------------------------------------------------------------
# Usage errors.

ABSENT = "absent"  # stands for the absent_provider fixture's provider in a parameter list


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"atol": -1.0}, "--atol and --rtol"),
    ({"atol": float("inf")}, "--atol and --rtol must be finite"),
    ({"rtol": float("nan")}, "--atol and --rtol must be finite"),
    ({"min_top1_agreement": 95.0}, "between 0 and 1"),
    ({"batch_sizes": (0,)}, "at least 1"),
    ({"providers": ABSENT}, "is not available; available providers are"),
    ({"fingerprint_only": True, "against": "resnet18"}, "takes no --against"),
])
def test_bad_values_are_usage_errors(
    shapes_onnx: Path, kwargs: dict, message: str, absent_provider: tuple[str, str]
) -> None:
    if kwargs.get("providers") == ABSENT:  # whichever provider this onnxruntime build lacks
        kwargs = {**kwargs, "providers": (absent_provider[0],)}
    with pytest.raises(UsageError, match=message):
        verify_model(shapes_onnx, **kwargs)


def test_unavailable_provider_is_a_usage_error_before_any_check(
    shapes_onnx: Path, absent_provider: tuple[str, str]
) -> None:
    short, full = absent_provider
    result = run_cli("verify", str(shapes_onnx), "--provider", short)
    assert result.returncode == ExitCode.USAGE
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"Requested provider {short!r} ({full}) is not available" in lines[0]
    assert result.stdout == ""


def test_empty_images_folder_is_a_usage_error(shapes_onnx: Path, tmp_path: Path) -> None:
    result = run_cli("verify", str(shapes_onnx), "--images", str(tmp_path))
    assert result.returncode == 2
    assert "holds no image files" in result.stderr


def test_images_check_reports_the_fast_vs_exact_decode_difference(shapes_onnx: Path,
                                                                  shapes_images: list[Path],
                                                                  phone_jpeg_file: Path,
                                                                  tmp_path: Path) -> None:
    """Parity is checked on fully decoded images; the check also says what fast decoding (serve's and
    predict's default) changes: here a phone-size photo, decoded reduced, among small images that are not."""
    from deploykit.verify import DecodeDiff

    folder = tmp_path / "images"
    folder.mkdir()
    for image in [*shapes_images[:2], phone_jpeg_file]:
        shutil.copy(image, folder / image.name)
    report = verify_model(shapes_onnx, images=folder, batch_sizes=(1,))
    assert report, report.verdict
    fast = report.check("images").fast_decode
    assert isinstance(fast, DecodeDiff)
    assert (fast.images, fast.differing) == (3, 1)
    assert 0 < fast.mean_abs_diff < fast.max_abs_diff < 0.5  # a fraction of a level on average
    assert fast.top1_agreement is not None
    assert fast.top1_agreement in (2 / 3, 1.0)
    data = report.to_dict()
    images = _check(data, "images")
    assert images["input"]["fast_decode"] == fast.to_dict()
    assert set(fast.to_dict()) == {"images", "differing", "max_abs_diff", "mean_abs_diff", "top1_agreement"}
    assert images["outputs"][0]["top1_agreement"] == 1.0  # parity itself is on the exact decode
    assert "inputs differ on 1 of 3 images" in str(report)
    result = run_cli("verify", str(shapes_onnx), "--images", str(folder), "--batch-size", "1")
    assert result.returncode == 0, result.stderr
    assert "fast vs exact decode: inputs differ on 1 of 3 images" in " ".join(result.stdout.split())
    # The bundled images are too small to be decoded reduced: fast decoding is exact on them.
    small = verify_model(shapes_onnx, batch_sizes=(1,)).check("images").fast_decode
    assert small is not None
    assert (small.differing, small.max_abs_diff, small.top1_agreement) == (0, 0.0, 1.0)
