"""Predict client benchmark: cold start of one prediction, and throughput of many images against a server.

1. Cold start: ``deploykit predict IMAGE --url URL`` as a whole process (interpreter start, imports, one HTTP
   request, output), median of ``--runs`` runs, next to ``python -c pass`` (the floor no Python CLI can beat)
   and ``python -c "import deploykit.cli"``; local mode (``--model-file``, which loads ONNX Runtime) for
   comparison.
2. Throughput: predicting ``--images`` images (the bundled examples, copied round-robin into a temporary
   folder) against a local ``deploykit serve`` with default settings, through ``predict_images`` in this
   process at several concurrencies (median of ``--repeats`` runs), and as a whole ``deploykit predict DIR``
   process at the default concurrency.

The model is the bundled shapes example exported to a temporary folder, unless ``--model``. Everything binds
to 127.0.0.1. It prints tables, and ``--doc FILE`` writes them as the "## Predict client" section of
docs/benchmarks.md.

    python benchmarks/bench_predict.py
    python benchmarks/bench_predict.py --runs 5 --images 100 --json out.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402 - the scripts folder is not a package
    REPO,
    ServerProcess,
    format_table,
    free_port,
    machine_info,
    python,
    write_json,
)

EXAMPLE_IMAGES = REPO / "examples" / "shapes" / "images"


def deploykit_command() -> list[str]:
    """The console script next to this interpreter (what users run), else ``python -m deploykit``."""
    script = Path(python()).with_name("deploykit")
    return [str(script)] if script.exists() else [python(), "-m", "deploykit"]


def median_process_seconds(cmd: list[str], runs: int) -> tuple[float, float]:
    """Median and minimum wall time of running ``cmd`` to completion; fails loudly if it fails."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise RuntimeError(f"{cmd} exited with {done.returncode}: {done.stderr.decode()[-2000:]}")
    return statistics.median(times), min(times)


def interleaved_process_seconds(commands: dict[str, list[str]], runs: int) -> dict[str, tuple[float, float]]:
    """Median and minimum wall time per command, running the commands round-robin so that changes in the
    machine's load during the measurement hit all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, cmd in commands.items():
            times[name].append(median_process_seconds(cmd, 1)[0])
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def prepare(workdir: Path, model: Path | None, count: int) -> tuple[Path, Path]:
    """The ONNX model and a folder of ``count`` images."""
    if model is None:
        from deploykit.export import export_model

        model = export_model(f"{REPO / 'examples' / 'shapes' / 'model.py'}:build",
                             output=workdir / "shapes.onnx").path
    sources = sorted(EXAMPLE_IMAGES.glob("*.jpg"))
    if not sources:
        raise SystemExit(f"No example images in {EXAMPLE_IMAGES}.")
    folder = workdir / "images"
    folder.mkdir()
    for n in range(count):
        source = sources[n % len(sources)]
        shutil.copyfile(source, folder / f"{n:04d}_{source.name}")
    return model, folder


def main(argv: list[str] | None = None) -> int:
    from deploykit.predict import DEFAULT_CONCURRENCY

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="cold-start runs per command (median)")
    parser.add_argument("--images", type=int, default=200, help="images for the throughput runs")
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs per concurrency (median)")
    parser.add_argument("--concurrency", default=f"1,2,{DEFAULT_CONCURRENCY},8",
                        help="comma-separated concurrencies for the in-process throughput runs")
    parser.add_argument("--model", type=Path,
                        help="ONNX model with a deploykit card [default: the shapes example]")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--doc", type=Path,
                        help="also write the Markdown section for docs/benchmarks.md to this file")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    from deploykit.predict import predict_images

    with tempfile.TemporaryDirectory(prefix="deploykit-bench-predict-") as tmp:
        workdir = Path(tmp)
        model, folder = prepare(workdir, args.model, args.images)
        one_image = str(sorted(folder.iterdir())[0])
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = ServerProcess([*deploykit_command(), "serve", str(model), "--host", "127.0.0.1", "--port",
                                str(port)], url=url, log_path=workdir / "server.log")
        try:
            import requests

            server.wait_until(lambda: requests.get(url + "/v2/health/ready", timeout=1).status_code == 200)
            cli = deploykit_command()
            # Warm the OS page cache and the server (first requests build ONNX Runtime's caches).
            predict_images([str(folder)], url=url)
            cold = interleaved_process_seconds({
                "python -c pass": [python(), "-c", "pass"],
                "python -c 'import deploykit.cli'": [python(), "-c", "import deploykit.cli"],
                # For attribution: the HTTP library, and pydantic, which Typer imports to coerce options.
                "python -c 'import requests'": [python(), "-c", "import requests"],
                "python -c 'import pydantic'": [python(), "-c", "import pydantic"],
                "deploykit predict IMG --url (REST)": [*cli, "predict", one_image, "--url", url],
                "deploykit predict IMG --url --protocol v2": [*cli, "predict", one_image, "--url", url,
                                                              "--protocol", "v2"],
                "deploykit predict IMG --model-file (local)": [*cli, "predict", one_image, "--model-file",
                                                               str(model)],
            }, args.runs)
            throughput: dict[int, dict[str, float]] = {}
            for concurrency in concurrencies:
                walls = []
                for _ in range(args.repeats):
                    run = predict_images([str(folder)], url=url, concurrency=concurrency)
                    if run.failed:
                        raise RuntimeError(f"{run.failed} images failed: {run.results[0].error}")
                    walls.append(run.wall_time_s)
                latencies = sorted(r.latency_ms or 0.0 for r in run.results)
                throughput[concurrency] = {"wall_s": statistics.median(walls),
                                           "images_per_s": args.images / statistics.median(walls),
                                           "p50_ms": latencies[len(latencies) // 2]}
            process_wall, _ = median_process_seconds([*cli, "predict", str(folder), "--url", url],
                                                     args.repeats)
            v2_run = predict_images([str(folder)], url=url, protocol="v2")
            local_run = predict_images([str(folder)], model_file=model)
        finally:
            server.stop()

    info = machine_info()
    floor = cold["python -c pass"][0]
    cold_rows = [[name, med * 1e3, low * 1e3, (med - floor) * 1e3] for name, (med, low) in cold.items()]
    cold_table = format_table(["command (whole process)", "median ms", "min ms", "over floor ms"], cold_rows,
                              markdown=True)
    tp_rows: list[list[Any]] = [
        [f"predict_images, REST, concurrency {c}" + (" (default)" if c == DEFAULT_CONCURRENCY else ""),
         t["wall_s"], t["images_per_s"], t["p50_ms"]]
        for c, t in throughput.items()
    ]
    tp_rows.append([f"`deploykit predict DIR --url` whole process incl. start, c={DEFAULT_CONCURRENCY}",
                    process_wall, args.images / process_wall, float("nan")])
    tp_rows.append([f"predict_images, V2 (client preprocessing), concurrency {DEFAULT_CONCURRENCY}",
                    v2_run.wall_time_s, v2_run.images_per_second, float("nan")])
    tp_rows.append([f"predict_images, local --model-file, concurrency {DEFAULT_CONCURRENCY}",
                    local_run.wall_time_s, local_run.images_per_second, float("nan")])
    for row in tp_rows:
        row[1] = row[1] * 1e3
    tp_table = format_table([f"{args.images} images", "wall ms", "images/s", "p50 latency ms"], tp_rows,
                            markdown=True)
    default = throughput.get(DEFAULT_CONCURRENCY)
    headline = (
        f"Cold start of one prediction: **{cold['deploykit predict IMG --url (REST)'][0] * 1e3:.0f} ms** "
        f"median, {cold['deploykit predict IMG --url (REST)'][1] * 1e3:.0f} ms fastest (Python alone: "
        f"{floor * 1e3:.0f} ms median)."
        + (f" {args.images} images at the default concurrency ({DEFAULT_CONCURRENCY}): "
           f"**{default['images_per_s']:.0f} images/s** ({default['wall_s']:.2f} s); at concurrency 1: "
           f"{throughput[1]['images_per_s']:.0f} images/s." if default and 1 in throughput else "")
    )
    print(headline.replace("**", ""))
    print()
    print(cold_table)
    print()
    print(tp_table)
    base = throughput.get(1, {}).get("images_per_s")
    scaling = "; ".join(f"concurrency {c}: {t['images_per_s']:.0f} images/s"
                        + (f" ({t['images_per_s'] / base:.1f}x concurrency 1)" if base and c != 1 else "")
                        + f", p50 latency {t['p50_ms']:.1f} ms" for c, t in throughput.items())
    doc = "\n".join([
        "## Predict client",
        "",
        "`python benchmarks/bench_predict.py` "
        f"(runs={args.runs}, images={args.images}, repeats={args.repeats}); model: "
        f"{'shapes example (64x64, 6 classes)' if args.model is None else args.model.name}, served by "
        "`deploykit serve` with default settings on 127.0.0.1, images: the bundled examples.",
        f"Machine: {info.get('cpu')}, {info.get('usable_cores', info.get('cores'))} usable cores, "
        f"Python {info.get('python')}, onnxruntime {info.get('onnxruntime', '?')}; load average at the end "
        f"{info.get('load_average')} (other work on the machine inflates every figure).",
        "",
        headline,
        "",
        "### Cold start (whole process, median of runs)",
        "",
        cold_table,
        "",
        "The floor is the interpreter itself. Over it: importing the CLI (Typer, Click, Rich's console), "
        "pydantic (Typer imports it to coerce the options of any command), `requests`, one HTTP round trip "
        "and the JSON output. The REST path imports no NumPy, Pillow, onnxruntime or torch (a test checks "
        "this); V2 adds NumPy and Pillow (the client preprocesses); local mode loads ONNX Runtime and the "
        "model.",
        "",
        f"### Throughput ({args.images} images)",
        "",
        tp_table,
        "",
        "Concurrency is the number of requests in flight over keep-alive connections; results are still "
        f"emitted in input order. The default of {DEFAULT_CONCURRENCY} is meant to keep a small server busy "
        "(overlapping upload, decoding and inference, and giving its batcher work) without deep queues that "
        f"only add latency. In this run: {scaling}.",
        "",
    ])
    print("\n" + doc)
    if args.doc:
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        temp = args.doc.with_name(f".{args.doc.name}.tmp")
        temp.write_text(doc)
        temp.replace(args.doc)
        print(f"Wrote {args.doc}")
    if args.json:
        write_json(args.json, {"machine": info, "cold_start_s": {k: v[0] for k, v in cold.items()},
                               "throughput": throughput, "process_wall_s": process_wall,
                               "v2_images_per_s": v2_run.images_per_second,
                               "local_images_per_s": local_run.images_per_second})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
