"""`deploykit bench` and deploykit.bench: what is measured and how it is reported (no timing assertions)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import SHAPES_IMAGES, run_cli

from deploykit.bench import BenchReport, Measurement, bench_model
from deploykit.errors import ExitCode, UsageError
from deploykit.optimize import optimize_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pair(shapes_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(int8, fp32) copies of the example model in a private folder."""
    folder = tmp_path_factory.mktemp("bench")
    fp32 = Path(shutil.copy(shapes_onnx, folder / "shapes.onnx"))
    return optimize_model(fp32, quantize="int8", calibration=SHAPES_IMAGES).path, fp32


def test_bench_with_against_and_pytorch_eager(pair: tuple[Path, Path]) -> None:
    int8, fp32 = pair
    report = bench_model(int8, against=fp32, batch_sizes=(1, 2), threads=(1,), warmup=1, iterations=6)
    assert isinstance(report, BenchReport)
    assert set(report.engines) == {"onnx", "against", "pytorch"}
    assert "int8" in report.engines["onnx"]
    assert "fp32" in report.engines["against"]
    assert len(report.measurements) == 3 * 2
    for m in report.measurements:
        assert m.iterations == 6
        assert 0 < m.p50_ms <= m.p90_ms <= m.p99_ms
        assert m.throughput > 0
    assert report.baseline == "against"
    ratios = report.ratios
    expected = {("onnx", 1), ("onnx", 2), ("pytorch", 1), ("pytorch", 2)}
    assert {(r.engine, r.batch_size) for r in ratios} == expected
    assert all(r.baseline == "against" and r.threads == 1 and r.speedup > 0 for r in ratios)
    text = str(report)
    assert "p99 ms" in text
    assert "pytorch eager" in text
    assert "int8" in text


def _measured(engine: str, batch_size: int, throughput: float) -> Measurement:
    latency = 1000 * batch_size / throughput
    return Measurement(engine, engine, batch_size, 1, 10, latency, latency, latency, latency, throughput)


def test_speedup_is_the_throughput_over_the_baselines(tmp_path: Path) -> None:
    """Known throughputs, known answers: 300 img/s against a baseline of 100 is 3x, in the ratios, the JSON
    and the table; a configuration the baseline was not measured at gets no ratio."""
    report = BenchReport(
        model=tmp_path / "m.int8.onnx", against=tmp_path / "m.onnx",
        engines={"onnx": "int8 ONNX", "against": "fp32 ONNX (m.onnx)"},
        measurements=(_measured("onnx", 1, 300.0), _measured("against", 1, 100.0),
                      _measured("onnx", 8, 400.0), _measured("against", 8, 500.0),
                      _measured("onnx", 16, 1.0)),
        baseline="against", batch_sizes=(1, 8, 16), threads=(1,), warmup=0, duration=None, iterations=10,
        machine={"cpu": "test", "cores": 2},
    )
    assert [(r.engine, r.baseline, r.batch_size, r.threads, r.speedup) for r in report.ratios] == [
        ("onnx", "against", 1, 1, 3.0),
        ("onnx", "against", 8, 1, 0.8),
    ]
    assert [r["speedup"] for r in report.to_dict()["ratios"]] == [3.0, 0.8]
    rows = str(report).splitlines()
    assert rows[1].endswith("vs fp32 ONNX")
    assert rows[3].endswith("300.0  3.00x")
    assert rows[5].endswith("400.0  0.80x")
    assert rows[7].endswith("1.0")  # batch 16: no baseline to compare with


def test_bench_without_torch_has_no_baseline(pair: tuple[Path, Path]) -> None:
    int8, _ = pair
    report = bench_model(int8, batch_sizes=(3,), threads=(1, 2), iterations=2, warmup=0, torch_eager=False)
    assert set(report.engines) == {"onnx"}
    assert [(m.batch_size, m.threads) for m in report.measurements] == [(3, 1), (3, 2)]
    assert report.baseline is None
    assert report.ratios == ()
    assert report.to_dict()["ratios"] == []


def test_bench_rejects_bad_values(pair: tuple[Path, Path]) -> None:
    int8, _ = pair
    with pytest.raises(UsageError, match="batch-size"):
        bench_model(int8, batch_sizes=(0,))
    with pytest.raises(UsageError, match="threads"):
        bench_model(int8, threads=())
    with pytest.raises(UsageError, match="duration"):
        bench_model(int8, duration=0)


@pytest.mark.parametrize("duration", ["nan", "inf"])
def test_cli_bench_rejects_a_duration_that_never_ends(duration: str, pair: tuple[Path, Path]) -> None:
    int8, _ = pair
    # A NaN deadline is never reached: before the check this ran until the timeout killed it.
    proc = run_cli("bench", str(int8), "--duration", duration, "--torch", "off", timeout=120)
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert "--duration must be a positive, finite number" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_bench_json_schema_and_plot(pair: tuple[Path, Path], tmp_path: Path) -> None:
    int8, fp32 = pair
    plot = tmp_path / "bench.png"
    proc = run_cli("bench", str(int8), "--against", str(fp32), "--batch-size", "1", "--batch-size", "2",
                   "--threads", "1", "--duration", "0.05", "--warmup", "1", "--json", "--plot", str(plot))
    assert proc.returncode == ExitCode.OK, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) >= {"model", "against", "engines", "baseline", "config", "machine", "results", "ratios",
                         "notes"}
    assert data["model"] == str(int8)
    assert data["against"] == str(fp32)
    assert data["config"]["batch_sizes"] == [1, 2]
    assert data["config"]["threads"] == [1]
    assert set(data["machine"]) >= {"cpu", "cores", "vnni", "onnxruntime"}
    engines = set(data["engines"])
    assert engines == {"onnx", "against", "pytorch"}
    assert len(data["results"]) == len(engines) * 2
    for row in data["results"]:
        assert set(row) == {"engine", "label", "batch_size", "threads", "iterations", "latency_ms",
                            "throughput"}
        assert set(row["latency_ms"]) == {"p50", "p90", "p99", "mean"}
        assert row["iterations"] >= 1
        assert row["throughput"] > 0
    assert {r["baseline"] for r in data["ratios"]} == {"against"}
    assert len(data["ratios"]) == 2 * 2
    content = plot.read_bytes()
    assert content.startswith(PNG_SIGNATURE)
    assert len(content) > 1000
    assert not [p for p in tmp_path.iterdir() if p.name != "bench.png"]  # no temporary file left


def test_cli_bench_table(pair: tuple[Path, Path]) -> None:
    int8, _ = pair
    proc = run_cli("bench", str(int8), "--batch-size", "1", "--threads", "1", "--duration", "0.05",
                   "--torch", "off")
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert "p50 ms" in proc.stdout
    assert int8.name in proc.stdout


def test_cli_bench_usage_errors(pair: tuple[Path, Path], tmp_path: Path) -> None:
    int8, _ = pair
    for args, says in (
        (["--batch-size", "0"], "Error: --batch-size values must be at least 1."),
        (["--torch", "maybe"], "Error: --torch must be auto, on or off, got 'maybe'."),
    ):
        proc = run_cli("bench", str(int8), *args, env={"COLUMNS": "250"})
        assert proc.returncode == ExitCode.USAGE, proc.stderr
        assert proc.stderr.strip() == says  # one line, no traceback
        assert proc.stdout == ""
    missing = tmp_path / "missing.onnx"
    proc = run_cli("bench", str(missing), env={"COLUMNS": "250"})
    assert proc.returncode == ExitCode.USAGE
    assert "Usage: deploykit bench [OPTIONS]" in proc.stderr
    assert f"Invalid value for 'model': file '{missing}' does not exist." in proc.stderr
    assert proc.stdout == ""


def test_cli_bench_checks_the_plot_path_before_measuring(pair: tuple[Path, Path], tmp_path: Path) -> None:
    int8, _ = pair
    # Ten minutes of measuring if the path were checked only at the end; run_cli's timeout is shorter.
    proc = run_cli("bench", str(int8), "--duration", "600", "--torch", "off",
                   "--plot", str(tmp_path / "missing" / "p.png"), timeout=120)
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert "choose another --plot" in proc.stderr
    assert "--output" not in proc.stderr
    assert proc.stdout == ""
