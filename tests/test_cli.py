"""The `deploykit` command as a user runs it: exit codes, one-line errors, --json, the issue's "done when"."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from deploykit import __version__
from deploykit.card import read_card
from deploykit.errors import ExitCode
from deploykit.runtime import create_session

HIDE_TORCH = textwrap.dedent('''
    """Installed by the tests through PYTHONPATH: behave as if torch and torchvision were not installed."""
    import atexit
    import json
    import os
    import sys

    HIDDEN = ("torch", "torchvision")
    attempts = []


    class HideTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                attempts.append(name)
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None


    sys.meta_path.insert(0, HideTorch())


    def report():
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN)
        with open(os.environ["DEPLOYKIT_TEST_PROBE"], "w") as fh:
            json.dump({"attempts": attempts, "loaded": loaded}, fh)


    atexit.register(report)
''')


@pytest.fixture
def no_torch(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """Environment for a subprocess in which torch and torchvision cannot be imported, and its probe file."""
    site = tmp_path / "hide_torch"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE_TORCH)
    probe = tmp_path / "probe.json"
    return {"PYTHONPATH": str(site), "DEPLOYKIT_TEST_PROBE": str(probe)}, probe


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def assert_user_error(proc: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    """Exit ``code``, no traceback, exactly one line on stderr containing every fragment; returns the line."""
    assert proc.returncode == code, f"exit {proc.returncode}, stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --- the "done when" --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """`deploykit export resnet18 --weights none -o r.onnx --json`, run once in an empty folder."""
    folder = tmp_path_factory.mktemp("cli_export")
    proc = run_cli("export", "resnet18", "--weights", "none", "-o", "r.onnx", "--json", cwd=folder)
    return folder, proc


def test_export_writes_one_file_that_runs_at_batch_1_and_7(
    cli_export: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    folder, proc = cli_export
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["r.onnx"], "one file, no temp or external data files"
    session = create_session(folder / "r.onnx")
    for batch in (1, 7):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224), dtype=np.float32)
        assert session.run(None, {"input": x})[0].shape == (batch, 1000)
    card = read_card(folder / "r.onnx")
    assert card.name == "resnet18"
    assert card.num_classes == 1000
    assert card.source.weights == "none"


def test_export_json_is_pure_json_on_stdout(
    cli_export: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    folder, proc = cli_export
    summary = json.loads(proc.stdout)  # the whole of stdout is one JSON document
    assert summary["path"] == "r.onnx"
    assert summary["size_bytes"] == (folder / "r.onnx").stat().st_size
    assert summary["exporter"] in ("dynamo", "torchscript")
    assert summary["opset"] == 18
    assert summary["input"]["shape"] == ["batch", 3, 224, 224]
    parity = summary["parity"]
    assert parity["passed"] is True
    assert parity["batch_sizes"] == [1, 3]
    assert 0 <= parity["max_abs_diff"] <= 1e-4


def test_inspect_json_works_without_torch(
    cli_export: tuple[Path, subprocess.CompletedProcess[str]], no_torch: tuple[dict[str, str], Path]
) -> None:
    folder, _ = cli_export
    env, probe = no_torch
    proc = run_cli("inspect", "r.onnx", "--json", env=env, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["path"] == "r.onnx"
    assert info["inputs"] == [{"name": "input", "shape": ["batch", 3, 224, 224], "dtype": "float32"}]
    assert info["outputs"] == [{"name": "logits", "shape": ["batch", 1000], "dtype": "float32"}]
    assert info["opset"] == 18
    assert 11_000_000 < info["parameters"] < 12_000_000  # resnet18 has 11.7 M
    assert info["card"]["name"] == "resnet18"
    assert len(info["card"]["labels"]) == 1000
    assert info["card"]["preprocess"]["height"] == 224
    report = json.loads(probe.read_text())
    assert report == {"attempts": [], "loaded": []}, "inspect must not even try to import torch"


def test_hidden_torch_really_is_hidden(no_torch: tuple[dict[str, str], Path]) -> None:
    """The probe itself works: importing torch under it fails and is recorded."""
    env, probe = no_torch
    proc = subprocess.run(
        [sys.executable, "-c", "import torch"],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, **env},
        timeout=120,
    )
    assert proc.returncode != 0
    assert "ModuleNotFoundError" in proc.stderr
    assert json.loads(probe.read_text())["attempts"] == ["torch"]


def test_export_without_torch_names_the_extra(no_torch: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    env, _ = no_torch
    work = tmp_path / "work"
    work.mkdir()
    assert_user_error(
        run_cli("export", "resnet18", "--weights", "none", env=env, cwd=work),
        ExitCode.ERROR,
        "pip install 'deploykit[torch]'",
        "torch",
    )
    assert list(work.iterdir()) == []


def test_inspect_human_output_is_plain_when_piped(
    cli_export: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    folder, _ = cli_export
    proc = run_cli("inspect", "r.onnx", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stdout, "no colour codes when stdout is not a terminal"
    assert "inputs:  input ['batch', 3, 224, 224] float32" in proc.stdout
    assert "model card: resnet18 (image-classification, fp32, 1000 classes: tench" in proc.stdout
    assert "preprocess: RGB, shorter side 256, centre crop 224x224, bilinear" in proc.stdout


# --- exit codes and one-line errors -------------------------------------------------------------------------


def test_version() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"deploykit {__version__}"


def test_help_lists_commands_and_exit_codes() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for word in ("export", "inspect", "Exit codes", "--debug"):
        assert word in proc.stdout


def test_export_help_says_which_int8_file_optimize_writes() -> None:
    text = " ".join(run_cli("export", "--help", env={"COLUMNS": "200"}).stdout.split())
    assert "with --optimize, <stem>.int8.opt.onnx instead" in text
    assert "<stem>.int8.opt.onnx only (no <stem>.int8.onnx)" in text


def test_no_arguments_shows_help() -> None:
    """No command is a usage error (exit 2), answered with the help: usage line, commands, exit codes."""
    proc = run_cli(env={"COLUMNS": "200"})
    assert proc.returncode == ExitCode.USAGE, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Usage: deploykit [OPTIONS] COMMAND [ARGS]..." in proc.stdout
    for word in ("export", "inspect", "verify", "serve", "predict", "bench", "package", "Exit codes"):
        assert word in proc.stdout, word


def test_export_list() -> None:
    proc = run_cli("export", "--list")
    assert proc.returncode == 0, proc.stderr
    names = proc.stdout.split()
    assert {"resnet18", "mobilenet_v3_small", "efficientnet_b0", "vit_b_16", "inception_v3"} <= set(names)
    assert names == sorted(names)


def test_unknown_model(tmp_path: Path) -> None:
    line = assert_user_error(
        run_cli("export", "resnet81", cwd=tmp_path),
        ExitCode.USAGE,
        "Unknown model 'resnet81'",
        "Did you mean resnet18",
        "deploykit export --list",
    )
    assert line.startswith("Error: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["0", "false", "no", "off", ""])
def test_debug_environment_variable_off_values(value: str, tmp_path: Path) -> None:
    assert_user_error(run_cli("export", "resnet81", env={"DEPLOYKIT_DEBUG": value}, cwd=tmp_path),
                      ExitCode.USAGE, "Unknown model 'resnet81'")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    for args, env in (
        (["--debug", "export", "resnet81"], None),
        (["export", "resnet81"], {"DEPLOYKIT_DEBUG": "1"}),
        (["export", "resnet81"], {"DEPLOYKIT_DEBUG": "true"}),
    ):
        proc = run_cli(*args, env=env, cwd=tmp_path)
        assert proc.returncode == ExitCode.USAGE
        assert "Traceback" in proc.stderr
        assert "ModelNotFoundError" in proc.stderr
        assert proc.stderr.rstrip().splitlines()[-1].startswith("Error: Unknown model 'resnet81'")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_checkpoint(damage: str, tmp_path: Path) -> None:
    import torch
    import torchvision

    path = tmp_path / "model.pt"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if damage == "truncated" else bytes(reversed(data)))
    assert_user_error(
        run_cli("export", str(path), "--arch", "squeezenet1_1", cwd=tmp_path),
        ExitCode.USAGE,
        "model.pt",
        "not a readable checkpoint",
        "truncated or corrupt",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_state_dict_that_does_not_fit(tmp_path: Path) -> None:
    import torch
    import torchvision

    path = tmp_path / "sq.pt"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    assert_user_error(
        run_cli("export", str(path), "--arch", "squeezenet1_0", cwd=tmp_path),
        ExitCode.USAGE,
        "does not fit --arch squeezenet1_0",
        "shape mismatch",
    )


def test_unwritable_output(tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for target, fragment in (
        (a_file / "m.onnx", "is not a folder"),
        (tmp_path / "nope" / "m.onnx", "does not exist"),
        (Path("/proc/deploykit-test.onnx"), "Cannot write to '/proc'"),
    ):
        assert_user_error(
            run_cli("export", "resnet18", "--weights", "none", "-o", str(target)), ExitCode.USAGE, fragment
        )
        assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_typer_validation_errors_exit_2(tmp_path: Path) -> None:
    """Typer's own validation: exit 2 with its usage message, naming the option and what is wrong."""
    for args, says in (
        (["export", "resnet18", "--labels", str(tmp_path / "missing.txt")],
         ("Invalid value for '--labels'", "missing.txt' does not exist")),
        (["export", "resnet18", "--mean", "0.5,0.5"],
         ("Invalid value for --mean",
          "expected one number per channel (1 or 3, comma-separated), got '0.5,0.5'")),
        (["export", "resnet18", "--static-batch", "many"], ("Invalid value for '--static-batch'",)),
        (["inspect", str(tmp_path / "missing.onnx")], ("Invalid value for", "missing.onnx' does not exist")),
        (["export", "resnet18", "--no-such-option"], ("No such option: --no-such-option",)),
    ):
        proc = run_cli(*args, cwd=tmp_path, env={"COLUMNS": "250"})
        assert proc.returncode == ExitCode.USAGE, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert proc.stdout == ""
        assert f"Usage: deploykit {args[0]} [OPTIONS]" in proc.stderr, proc.stderr
        for fragment in says:
            assert fragment in proc.stderr, (args, proc.stderr)
    assert list(tmp_path.iterdir()) == []


def test_inspect_bad_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07 this is not protobuf \xff\xff\xff\xff")
    assert_user_error(run_cli("inspect", str(junk)), ExitCode.ERROR, "junk.onnx", "not a readable ONNX file")


# --- export options through the CLI (a tiny factory model keeps these fast) ---------------------------------

TINY = textwrap.dedent("""
    import torch
    from torch import nn


    def build() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
""")


@pytest.fixture
def tiny(tmp_path: Path) -> str:
    (tmp_path / "tiny.py").write_text(TINY)
    return f"{tmp_path / 'tiny.py'}:build"


def test_export_options_reach_the_card(tiny: str, tmp_path: Path) -> None:
    labels = tmp_path / "labels.json"
    labels.write_text('["red", "green", "blue"]')
    target = tmp_path / "opts.onnx"
    proc = run_cli(
        "export",
        tiny,
        "-o",
        str(target),
        "--static-batch",
        "1",
        "--input-size",
        "40",
        "--opset",
        "17",
        "--exporter",
        "torchscript",
        "--labels",
        str(labels),
        "--mean",
        "0.1,0.2,0.3",
        "--std",
        "0.5,0.5,0.5",
        "--name",
        "colours",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["exporter"] == "torchscript"
    assert summary["opset"] == 17
    assert summary["input"]["shape"] == [1, 3, 40, 40]
    assert summary["dynamic_batch"] is False
    card = read_card(target)
    assert card.name == "colours"
    assert card.labels == ("red", "green", "blue")
    assert card.input.shape == (1, 3, 40, 40)
    assert (card.preprocess.mean, card.preprocess.std) == ((0.1, 0.2, 0.3), (0.5, 0.5, 0.5))
    assert card.exporter == "torchscript"
    assert card.opset == 17


def test_export_human_output(tiny: str, tmp_path: Path) -> None:
    proc = run_cli("export", tiny, "-o", str(tmp_path / "t.onnx"))
    assert proc.returncode == 0, proc.stderr
    assert "Wrote" in proc.stdout
    assert "max abs diff" in proc.stdout
    assert "ok" in proc.stdout
    assert "\x1b[" not in proc.stdout + proc.stderr, "nothing decorative when piped"


def test_failed_export_keeps_the_earlier_file(tiny: str, tmp_path: Path) -> None:
    target = tmp_path / "keep.onnx"
    assert run_cli("export", tiny, "-o", str(target)).returncode == 0
    before = target.read_bytes()
    labels = tmp_path / "labels.txt"
    labels.write_text("only\ntwo\n")
    assert_user_error(
        run_cli("export", tiny, "-o", str(target), "--labels", str(labels)),
        ExitCode.USAGE,
        "2 labels given for a model with 3 outputs",
    )
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.onnx", "labels.txt", "tiny.py"]


SLOW_FACTORY = textwrap.dedent("""
    import time
    from pathlib import Path

    from torch import nn


    def build() -> nn.Module:
        Path(__file__).with_name("started").write_text("export_model is running")
        time.sleep(120)  # interrupted by the test long before this ends
        return nn.Linear(2, 2)
""")


@pytest.mark.parametrize(("signum", "code", "line"), [
    (signal.SIGINT, 130, "Error: Interrupted."),  # Ctrl-C
    (signal.SIGTERM, 143, "Error: Terminated."),  # `kill`, `timeout`, a container or CI job being stopped
])
def test_ctrl_c_and_sigterm_leave_nothing_behind(signum: int, code: int, line: str, tmp_path: Path) -> None:
    """A signal in the middle of an export: its exit code, one line, the earlier file intact, no temporary
    file."""
    import os

    (tmp_path / "slow.py").write_text(SLOW_FACTORY)
    target = tmp_path / "model.onnx"
    target.write_bytes(b"an earlier good export")
    process = subprocess.Popen(
        [sys.executable, "-m", "deploykit", "export", "slow.py:build", "-o", str(target)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
        # A terminal's Ctrl-C: run from a background job (``make test &``) the child would inherit SIGINT
        # ignored, and Python installs no KeyboardInterrupt handler for an ignored signal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "started").exists():  # wait until the export has really begun
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the export did not start"
            time.sleep(0.1)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    assert [text for text in stderr.splitlines() if text.strip()] == [line]
    assert target.read_bytes() == b"an earlier good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "slow.py", "started"]


HOLD_TEMPORARIES = textwrap.dedent("""
    import sys
    import time
    from pathlib import Path

    from deploykit.cli import app, main
    from deploykit.files import atomic_path
    from deploykit.package import _staging_dir


    @app.command("hold")
    def hold(folder: Path) -> None:
        # What export (a half-written .onnx) and package (a half-filled staging folder) hold while they work.
        with atomic_path(folder / "model.onnx") as tmp, \\
                _staging_dir(folder / "package", force=False, source=folder / "model.onnx") as stage:
            tmp.write_bytes(b"half")
            (stage / "config.pbtxt").write_text("half")
            print("holding", flush=True)
            time.sleep(120)


    main(["hold", sys.argv[1]])
""")


def test_sigterm_removes_temporary_files_and_folders(tmp_path: Path) -> None:
    """The CLI's SIGTERM handler lets atomic_path and the package staging folder clean up, as on Ctrl-C."""
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"an earlier good export")
    script = tmp_path / "hold.py"
    script.write_text(HOLD_TEMPORARIES)
    process = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "holding\n", process.communicate()[1]
        assert len(list(folder.iterdir())) == 3  # the temporary file and folder exist now
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr
    assert stderr.strip() == "Error: Terminated."
    assert [p.name for p in folder.iterdir()] == ["model.onnx"]
    assert (folder / "model.onnx").read_bytes() == b"an earlier good export"
