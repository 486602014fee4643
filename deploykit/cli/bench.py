"""`deploykit bench`: latency and throughput tables, JSON and charts. The measuring is in deploykit.bench."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from deploykit.cli._app import app
from deploykit.cli._output import emit_json, info, out_console, progress_status

if TYPE_CHECKING:
    from deploykit.bench import BenchReport


@app.command()
def bench(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help="The .onnx file to measure."),
    against: Path | None = typer.Option(None, "--against", exists=True, dir_okay=False,
                                        help="Another .onnx file (e.g. the fp32 parent), same run."),
    batch_size: list[int] | None = typer.Option(None, "--batch-size",
                                                help="Batch size (repeatable; default 1 and 8)."),
    threads: list[int] | None = typer.Option(None, "--threads",
                                             help="Intra-op threads (repeatable; default 1 and 2)."),
    duration: float = typer.Option(2.0, "--duration",
                                   help="Seconds of timed runs per engine and configuration."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed runs per engine and configuration."),
    torch_eager: str = typer.Option("auto", "--torch", help="PyTorch eager side by side: auto (when torch "
                                    "and the card's source are available), on, off."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report on stdout."),
    plot: Path | None = typer.Option(None, "--plot", dir_okay=False,
                                     help="Write latency and throughput charts to this .png (matplotlib)."),
) -> None:
    """Measure latency (p50/p90/p99) and throughput by batch size and thread count, engines interleaved."""
    from deploykit.bench import bench_model
    from deploykit.errors import UsageError

    if torch_eager not in ("auto", "on", "off"):
        raise UsageError(f"--torch must be auto, on or off, got {torch_eager!r}.")
    if plot is not None:
        from deploykit.files import check_writable

        _require_matplotlib()
        check_writable(plot, option="--plot")  # before the run, not after it
    with progress_status(not as_json) as say:
        report = bench_model(model, against=against, batch_sizes=tuple(batch_size or (1, 8)),
                             threads=tuple(threads or (1, 2)), duration=duration, warmup=warmup,
                             torch_eager=torch_eager, progress=say)
    if plot is not None:
        write_plot(report, plot)
        info(f"Wrote {plot}")
    if as_json:
        emit_json(report.to_dict())
    else:
        out_console.print(str(report), markup=False)


def _require_matplotlib() -> None:
    from deploykit.errors import require

    require("matplotlib", "plot")


def write_plot(report: BenchReport, path: Path) -> None:
    """Two bar charts, p50 latency (whiskers to p99) and throughput, per configuration and engine; atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from deploykit.files import atomic_path

    configs = [(b, t) for b in report.batch_sizes for t in report.threads]
    engines = list(report.engines)
    width = 0.8 / len(engines)
    x = np.arange(len(configs))
    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, engine in enumerate(engines):
        rows = [report.measurement(engine, b, t) for b, t in configs]
        p50 = np.array([m.p50_ms for m in rows])
        p99 = np.array([m.p99_ms for m in rows])
        offset = x + (i - (len(engines) - 1) / 2) * width
        ax_lat.bar(offset, p50, width, yerr=[np.zeros_like(p50), p99 - p50], capsize=3,
                   label=report.engines[engine])
        ax_thr.bar(offset, [m.throughput for m in rows], width, label=report.engines[engine])
    labels = [f"batch {b}\n{t} thread{'s' if t > 1 else ''}" for b, t in configs]
    ax_lat.set_yscale("log")  # batch 1 and batch 8 calls differ by an order of magnitude
    for ax, title, unit in ((ax_lat, "Latency per call (p50, whisker to p99; log scale)", "ms"),
                            (ax_thr, "Throughput", "images/s")):
        ax.set_xticks(x, labels)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    handles, names = ax_thr.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(engines), 3), fontsize=8, frameon=False)
    cpu = report.machine.get("cpu", "")
    fig.suptitle(f"{report.model.name} on {cpu} ({report.machine.get('cores')} cores)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
