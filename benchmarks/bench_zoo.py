"""The whole model zoo through `deploykit export`: export time, size, parity, ONNX Runtime vs PyTorch speed.

For every name `deploykit export --list` prints (or `deploykit export --list timm` with ``--source timm``),
in a subprocess of its own (memory is returned between models, and one crash or timeout costs one row):

1. build the model with seeded random weights (no pretrained weights can be downloaded on an offline
   machine; export time, size, parity and speed do not depend on the values), re-initialising classifier
   heads that are zero-initialised (torchvision's ViTs) so parity compares informative outputs;
2. save its state dict and export it with ``--weights PATH`` (the path users' fine-tuned models take);
3. time batch-1 inference, ONNX Runtime (the exported file) and PyTorch eager, 2 threads each, median of
   interleaved runs.

Writes the table to docs/model-zoo.md (``--doc``) and the rows as JSON (``--json``):

    python benchmarks/bench_zoo.py             # every torchvision classifier: hours on 2 cores
    python benchmarks/bench_zoo.py --only resnet18,mnasnet0_5 --no-doc
    python benchmarks/bench_zoo.py --source timm --only convnext_tiny,resnet18 --no-doc
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, format_table, machine_info, write_json  # noqa: E402

DOC = REPO / "docs" / "model-zoo.md"
THREADS = 2


def list_models(source: str) -> list[str]:
    """The names `deploykit export --list [timm]` prints."""
    extra = [source] if source != "torchvision" else []
    args = [sys.executable, "-m", "deploykit", "export", "--list", *extra]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def build(source: str, name: str) -> Any:
    """The model with seeded random weights, as `deploykit export NAME --weights none` builds it."""
    import torch

    from deploykit.sources import resolve_source

    spec = f"timm:{name}" if source == "timm" else name
    module = resolve_source(spec, weights="none", seed=0).module
    for child in module.modules():  # a zero-initialised head makes every output equal
        if isinstance(child, torch.nn.Linear) and not child.weight.detach().any():
            torch.nn.init.normal_(child.weight, std=0.02)
    return module


def interleaved_ms(runs: dict[str, Any], x: Any, *, budget_s: float = 6.0,
                   rounds: int = 15) -> dict[str, float]:
    """Median milliseconds of each runner, run in alternation so that load from elsewhere hits both alike."""
    for run in runs.values():
        run(x)  # warm-up
    times: dict[str, list[float]] = {key: [] for key in runs}
    started = time.perf_counter()
    for i in range(rounds):
        if i >= 3 and time.perf_counter() - started > budget_s:
            break
        for key, run in runs.items():
            t0 = time.perf_counter()
            run(x)
            times[key].append((time.perf_counter() - t0) * 1e3)
    return {key: round(statistics.median(values), 2) for key, values in times.items()}


def one(source: str, name: str) -> dict[str, Any]:
    """Export one model and measure it; runs in its own process."""
    import numpy as np
    import torch

    from deploykit.errors import DeployKitError, one_line
    from deploykit.export import export_model
    from deploykit.runtime import SessionOptions, create_session

    torch.set_num_threads(THREADS)
    # Random weights give tiny activations deep in a network (1e-14 and below): denormal floats, which slow
    # PyTorch's CPU kernels many times over; trained weights do not, so flush them as ONNX Runtime's do.
    torch.set_flush_denormal(True)
    row: dict[str, Any] = {"model": name, "source": source}
    module = build(source, name)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / f"{name}.pt"
        torch.save(module.state_dict(), weights)
        spec = f"timm:{name}" if source == "timm" else name
        try:
            result = export_model(spec, weights=str(weights), output=Path(tmp) / f"{name}.onnx")
        except DeployKitError as exc:
            row.update(passed=False, error=one_line(exc))
            return row
        row.update(passed=bool(result.parity), export_s=round(result.seconds, 1),
                   size_mb=round(result.size_bytes / 1e6, 1), exporter=result.exporter,
                   max_abs_diff=result.parity.max_abs_diff, crop=result.card.preprocess.height)
        if result.external_data:
            row["note"] = "external data (over 2 GB)"
            return row
        session = create_session(result.path, SessionOptions(intra_op_threads=THREADS))
        x = np.random.default_rng(0).standard_normal((1, *result.card.input.shape[1:]), dtype=np.float32)

        def ort_run(a: Any) -> Any:
            return session.run(None, {"input": a})

        def torch_run(a: Any) -> Any:
            with torch.inference_mode():
                return module(torch.from_numpy(a))

        speed = interleaved_ms({"ort_ms": ort_run, "torch_ms": torch_run}, x)
        row.update(speed)
        row["speedup"] = round(row["torch_ms"] / row["ort_ms"], 2)
    return row


def run_all(source: str, names: list[str], timeout: float, json_path: str | None) -> list[dict[str, Any]]:
    """Each model in a subprocess; the rows so far go to ``json_path`` after each one."""
    rows: list[dict[str, Any]] = []
    for i, name in enumerate(names, 1):
        started = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", name, "--source", source],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            row = {"model": name, "source": source, "passed": False,
                   "error": f"timed out after {timeout:.0f}s"}
        else:
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode == 0 and lines:
                row = json.loads(lines[-1])
            else:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                row = {"model": name, "source": source, "passed": False, "error": tail[:200]}
        row["wall_s"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        status = "ok" if row.get("passed") else f"FAILED: {row.get('error', 'parity')}"
        print(f"[{i}/{len(names)}] {name}: {status} ({row['wall_s']}s)", file=sys.stderr, flush=True)
        if json_path:
            write_json(json_path, {"machine": machine_info(), "rows": rows})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def num(row: dict[str, Any], key: str, fmt: str) -> str:
        return format(row[key], fmt) if isinstance(row.get(key), (int, float)) else "-"

    body = []
    for r in rows:
        parity = f"ok ({r['max_abs_diff']:.1e})" if r.get("passed") else "FAILED (below)"
        body.append([r["model"], num(r, "crop", "d"), parity, num(r, "export_s", ".1f"),
                     num(r, "size_mb", ".1f"), num(r, "ort_ms", ".1f"), num(r, "torch_ms", ".1f"),
                     num(r, "speedup", ".2f") + ("x" if "speedup" in r else "")])
    return format_table(["model", "input", "parity (max abs diff)", "export s", "MB", "ORT ms", "PyTorch ms",
                         "ORT speed-up"], body, markdown=True)


def failures(rows: list[dict[str, Any]]) -> str:
    """The failed rows' errors, one bullet each (empty when none failed)."""
    failed = [f"- `{r['model']}`: {r.get('error', 'parity')}" for r in rows if not r.get("passed")]
    return ("\nFailed:\n\n" + "\n".join(failed) + "\n") if failed else ""


def write_doc(rows: list[dict[str, Any]], source: str, command: str) -> None:
    info = machine_info()
    passed = sum(1 for r in rows if r.get("passed"))
    section = (f"## {source}\n\n{passed} of {len(rows)} models export and match PyTorch. Batch-1 latency "
               f"with {THREADS} threads; export time includes building the model, loading its state dict, "
               f"both exporter attempts when the first fails, and the parity check at batch 1 and 3.\n\n"
               f"Measured on {info.get('cpu')} ({info.get('cores')} cores) with `{command}`.\n\n"
               f"{table(rows)}\n{failures(rows)}")
    header = ("# Model zoo\n\nEvery model `deploykit export --list` names, exported from a state dict with "
              "`--weights PATH` and checked against PyTorch. Reproduce with "
              "[`benchmarks/bench_zoo.py`](../benchmarks/bench_zoo.py).\n\n")
    text = DOC.read_text() if DOC.is_file() else header
    start = text.find(f"## {source}\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("torchvision", "timm"), default="torchvision")
    parser.add_argument("--only", help="comma-separated model names instead of the whole list")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--no-doc", action="store_true", help=f"do not update {DOC.relative_to(REPO)}")
    parser.add_argument("--from-json", help="write the table of an earlier --json run instead of measuring")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.source, args.one)))
        return
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())["rows"]
    else:
        names = args.only.split(",") if args.only else list_models(args.source)
        rows = run_all(args.source, names, args.timeout, args.json)
    print(table(rows))
    if not args.no_doc:
        command = "python benchmarks/bench_zoo.py"
        command += f" --source {args.source}" if args.source != "torchvision" else ""
        command += f" --only {args.only}" if args.only else ""
        write_doc(rows, args.source, command)


if __name__ == "__main__":
    main()
