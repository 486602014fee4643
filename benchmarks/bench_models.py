"""Model speed and int8 accuracy: fp32 vs int8 vs PyTorch eager in-process, int8 agreement, served throughput.

Reproduces the figures of the "Faster models" section of docs/benchmarks.md:

1. In-process latency and throughput of resnet18 (random weights: speed does not depend on them) and of the
   bundled example model, as fp32 ONNX, int8 ONNX and PyTorch eager, measured with ``deploykit.bench``
   (engines interleaved round by round) at batch 1 and 8 with 1 and 2 threads. Charts go to docs/img/.
2. Top-1/top-5 agreement of int8 with fp32, and both models' accuracy, on the example model with its trained
   weights over a held-out generated test set (``make_dataset(100, seed=31337)``: 600 images that neither
   training, the bundled images nor calibration used), for several calibration sets and methods.
3. Served throughput of fp32 and int8 resnet18 with ``deploykit serve``, by running benchmarks/bench_serve.py
   (its load generator, deploykit serve only) on each model.

    python benchmarks/bench_models.py                  # about 9 minutes on 2 cores
    python benchmarks/bench_models.py --quick --no-serve --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHAPES = REPO / "examples" / "shapes"
IMG = REPO / "docs" / "img"
TEST_SEED = 31337  # training uses 0 (and 10000 for its test split), the bundled images 2024
CALIBRATION_SEED = 555


def _data_module() -> Any:
    spec = importlib.util.spec_from_file_location("shapes_data", SHAPES / "data.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render_calibration(folder: Path, per_class: int) -> Path:
    """Write ``per_class`` generated images per class as JPEG files (a user's calibration folder)."""
    data = _data_module()
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(data.make_dataset(per_class, CALIBRATION_SEED, size=(160, 120))):
        image.save(folder / f"{data.CLASSES[label]}_{i}.jpg", quality=92)
    return folder


def agreement_study(fp32: Path, calibration: Path, workdir: Path, per_class: int) -> dict[str, Any]:
    """Quantize the example model several ways and compare each with fp32 on the held-out test set."""
    from deploykit.images import preprocess
    from deploykit.optimize import optimize_model
    from deploykit.runtime import Predictor

    data = _data_module()
    reference = Predictor.open(fp32)
    samples = data.make_dataset(per_class, TEST_SEED, size=(160, 120))
    x = np.stack([preprocess(image.convert("RGB"), reference.card.preprocess) for image, _ in samples])
    y = np.array([label for _, label in samples])
    p32 = reference.probabilities(x)
    rows = []
    variants: list[tuple[str, Path | None, str, bool]] = [
        ("bundled images (12)", None, "minmax", False),
        (f"generated ({calibration_count(calibration)})", calibration, "minmax", False),
        (f"generated ({calibration_count(calibration)})", calibration, "entropy", False),
        (f"generated ({calibration_count(calibration)})", calibration, "percentile", False),
        (f"generated ({calibration_count(calibration)})", calibration, "minmax", True),
    ]
    for name, folder, method, reduce_range in variants:
        target = workdir / f"shapes.{method}.{int(reduce_range)}.{folder is None}.int8.onnx"
        result = optimize_model(fp32, quantize="int8", calibration=folder, method=method,
                                reduce_range=reduce_range, output=target)
        p8 = Predictor.open(result.path).probabilities(x)
        top5 = np.argsort(-p8, axis=1)[:, :5]
        rows.append({
            "calibration": name, "method": method, "reduce_range": reduce_range,
            "top1_agreement": float(np.mean(p8.argmax(1) == p32.argmax(1))),
            "top5_agreement": float(np.mean((top5 == p32.argmax(1)[:, None]).any(axis=1))),
            "max_abs_prob_diff": float(np.abs(p8 - p32).max()),
            "int8_accuracy": float(np.mean(p8.argmax(1) == y)),
            "card_agreement": result.agreement.to_dict() if result.agreement else None,
        })
    return {"test_images": len(samples), "test_seed": TEST_SEED,
            "fp32_accuracy": float(np.mean(p32.argmax(1) == y)), "variants": rows}


def calibration_count(folder: Path) -> int:
    return len(list(folder.glob("*.jpg")))


def served(fp32: Path, int8: Path, concurrency: str, duration: float, warmup: float, workdir: Path,
           repeats: int) -> dict[str, Any]:
    """Run benchmarks/bench_serve.py (deploykit serve only) on each model, alternating fp32 and int8
    ``repeats`` times so that machine noise hits both alike; keeps the median throughput per cell."""
    script = REPO / "benchmarks" / "bench_serve.py"
    if not script.is_file():
        return {"skipped": "benchmarks/bench_serve.py not found"}
    runs: dict[str, list[dict[str, Any]]] = {"fp32": [], "int8": []}
    for repeat in range(repeats):
        order = (("fp32", fp32), ("int8", int8)) if repeat % 2 == 0 else (("int8", int8), ("fp32", fp32))
        for name, model in order:
            target = workdir / f"serve-{name}-{repeat}.json"
            cmd = [sys.executable, str(script), "--model", str(model), "--skip", "ceiling,tutorial",
                   "--concurrency", concurrency, "--duration", str(duration), "--warmup", str(warmup),
                   "--json", str(target)]
            print(f"\n$ {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True)
            runs[name].append(json.loads(target.read_text()))
    out: dict[str, Any] = {"repeats": repeats, "runs": runs}
    for name, reports in runs.items():
        cells: dict[int, list[dict[str, Any]]] = {}
        for report in reports:
            for row in report["results"]:
                cells.setdefault(row["concurrency"], []).append(row)
        out[name] = {"results": [
            {"concurrency": c, "throughput": float(np.median([r["throughput"] for r in rows])),
             "p50_ms": float(np.median([r["p50_ms"] for r in rows])),
             "p99_ms": float(np.median([r["p99_ms"] for r in rows])),
             "all_throughputs": [r["throughput"] for r in rows]}
            for c, rows in sorted(cells.items())]}
    return out


def plot_served(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deploykit.files import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4))
    levels = sorted({r["concurrency"] for r in result["fp32"]["results"]})
    width = 0.38
    for i, name in enumerate(("fp32", "int8")):
        rows = {r["concurrency"]: r["throughput"] for r in result[name]["results"]}
        ax.bar([j + (i - 0.5) * width for j in range(len(levels))], [rows[c] for c in levels], width,
               label=f"resnet18 {name}")
    ax.set_xticks(range(len(levels)), [f"{c} client{'s' if c > 1 else ''}" for c in levels])
    ax.set_ylim(0, ax.get_ylim()[1] * 1.2)  # room for the legend above the bars
    ax.set_ylabel("images/s")
    ax.set_title(f"deploykit serve, resnet18 (median of {result['repeats']} alternating runs)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--duration", type=float, default=6.0,
                        help="timed seconds per engine and configuration in-process (default 6)")
    parser.add_argument("--test-per-class", type=int, default=100, help="held-out test images per class")
    parser.add_argument("--calibration-per-class", type=int, default=20, help="generated calibration images")
    parser.add_argument("--serve-concurrency", default="1,8", help="client counts for the served run")
    parser.add_argument("--serve-duration", type=float, default=10.0, help="seconds per served cell")
    parser.add_argument("--serve-repeats", type=int, default=3, help="alternating fp32/int8 served runs")
    parser.add_argument("--no-serve", action="store_true", help="skip the served throughput")
    parser.add_argument("--quick", action="store_true", help="short run: 1 s per cell, 20 test images/class")
    parser.add_argument("--plots", type=Path, default=IMG, help=f"folder for the PNG charts (default {IMG})")
    parser.add_argument("--json", type=Path, help="write all results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.test_per_class, args.serve_duration = 1.0, 20, 3.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from deploykit.bench import bench_model, machine_info
    from deploykit.cli.bench import write_plot
    from deploykit.export import export_model
    from deploykit.optimize import optimize_model

    machine = machine_info()
    print(f"CPU {machine['cpu']}, {machine['cores']} cores, VNNI: {'yes' if machine['vnni'] else 'NO'} "
          f"({', '.join(machine['isa'])}), onnxruntime {machine['onnxruntime']}", flush=True)
    args.plots.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine, "settings": {k: str(v) for k, v in vars(args).items()}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deploykit-bench-models-") as tmp:
        work = Path(tmp)
        calibration = render_calibration(work / "calibration", args.calibration_per_class)
        print("Exporting resnet18 (random weights) and the example model ...", flush=True)
        resnet = export_model("resnet18", weights="none", output=work / "resnet18.onnx").path
        shapes = export_model(f"{SHAPES / 'model.py'}:build", output=work / "shapes.onnx").path

        speed: dict[str, Any] = {}
        int8_paths: dict[str, Path] = {}
        for name, fp32 in (("resnet18", resnet), ("shapes", shapes)):
            int8 = optimize_model(fp32, quantize="int8", calibration=calibration)
            int8_paths[name] = int8.path
            print(f"\n{int8}\nBenchmarking {name} ...", flush=True)
            report = bench_model(int8.path, against=fp32, batch_sizes=(1, 8), threads=(1, 2),
                                 duration=args.duration, progress=lambda m: print("  " + m, flush=True))
            print(report, flush=True)
            write_plot(report, args.plots / f"bench-models-{name}.png")
            speed[name] = report.to_dict()
        results["in_process"] = speed

        print("\nint8 agreement with fp32 on held-out images (example model, trained weights)", flush=True)
        study = agreement_study(shapes, calibration, work, args.test_per_class)
        results["agreement"] = study
        print(f"fp32 accuracy {study['fp32_accuracy']:.2%} on {study['test_images']} images")
        for row in study["variants"]:
            print(f"  {row['calibration']:<22} {row['method']:<10} reduce_range={row['reduce_range']!s:<5} "
                  f"top-1 {row['top1_agreement']:.2%}  top-5 {row['top5_agreement']:.2%}  "
                  f"max |dp| {row['max_abs_prob_diff']:.3f}  int8 accuracy {row['int8_accuracy']:.2%}")

        if not args.no_serve:
            serve = served(resnet, int8_paths["resnet18"], args.serve_concurrency, args.serve_duration,
                           1.0 if args.quick else 3.0, work, 1 if args.quick else args.serve_repeats)
            results["served"] = serve
            if "fp32" in serve:
                plot_served(serve, args.plots / "bench-models-served.png")
                for f, i in zip(serve["fp32"]["results"], serve["int8"]["results"], strict=True):
                    print(f"served c={f['concurrency']}: fp32 {f['throughput']:.1f} img/s, int8 "
                          f"{i['throughput']:.1f} img/s ({i['throughput'] / f['throughput']:.2f}x)")
    print(f"\nDone in {time.perf_counter() - started:.0f}s; charts in {args.plots}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
