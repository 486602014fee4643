"""Heavy imports stay lazy: the torch-free modules never import torch, and `--help` imports neither torch nor
onnxruntime. Each check runs in a fresh interpreter, since this test process has long imported both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("torch", "torchvision", "onnxruntime", "onnxscript")


def imported_after(code: str) -> dict[str, list[str]]:
    """Run ``code`` in a fresh interpreter; which heavy packages are in sys.modules afterwards."""
    body = textwrap.indent(textwrap.dedent(code).strip(), "    ")
    report = f"{{n: sorted(m for m in sys.modules if m.split('.')[0] == n) for n in {HEAVY!r}}}"
    probe = (
        f"import json, sys\ntry:\n{body}\nexcept SystemExit:\n    pass\n"
        f"print()\nprint(json.dumps({report}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


TORCH_FREE = [
    "deploykit",
    "deploykit.cli",
    "deploykit.card",
    "deploykit.images",
    "deploykit.runtime",
    "deploykit.fingerprint",
    "deploykit.inspect",
    "deploykit.files",
    "deploykit.errors",
    # export and sources use torch, but only inside functions: importing them must stay cheap
    "deploykit.export",
    "deploykit.sources",
]


def test_torch_free_modules_do_not_import_torch() -> None:
    heavy = imported_after("\n".join(f"import {name}" for name in TORCH_FREE))
    assert heavy["torch"] == []
    assert heavy["torchvision"] == []


@pytest.mark.parametrize("module", TORCH_FREE)
def test_each_module_alone(module: str) -> None:
    """One at a time too, so one module cannot hide behind another's import order."""
    heavy = imported_after(f"import {module}")
    assert heavy["torch"] == [], f"import {module} imported torch"


def test_public_api_names_resolve_lazily() -> None:
    heavy = imported_after(
        "import deploykit\nfrom deploykit import ModelCard, read_card, inspect_model, ExitCode"
    )
    assert heavy["torch"] == []


def test_reading_a_card_and_running_a_model_do_not_import_torch(shapes_onnx: object) -> None:
    heavy = imported_after(f"""
        from deploykit.inspect import inspect_model
        from deploykit.runtime import Predictor
        from deploykit.images import bundled_images, load_image
        inspect_model({str(shapes_onnx)!r})
        predictor = Predictor.open({str(shapes_onnx)!r})
        predictor.predict_images([load_image(p) for p in bundled_images()[:2]])
    """)
    assert heavy["torch"] == []
    assert heavy["torchvision"] == []
    assert heavy["onnxruntime"], "the probe must have run ONNX Runtime"


@pytest.mark.parametrize("argv", [["--help"], ["export", "--help"], ["inspect", "--help"], ["--version"]])
def test_help_imports_neither_torch_nor_onnxruntime(argv: list[str]) -> None:
    heavy = imported_after(f"""
        import runpy
        sys.argv = ["deploykit", *{argv!r}]
        runpy.run_module("deploykit", run_name="__main__", alter_sys=True)
    """)
    for name in HEAVY:
        assert heavy[name] == [], f"deploykit {' '.join(argv)} imported {name}"
