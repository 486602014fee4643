"""`deploykit predict`: classify images on a server (REST or V2) or locally, for people and pipelines."""

from __future__ import annotations

import csv
import enum
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from deploykit.cli._app import app
from deploykit.errors import PartialFailureError
from deploykit.predict import DEFAULT_CONCURRENCY

if TYPE_CHECKING:
    from deploykit.predict import ImageResult, PredictRun

PROGRESS_MIN_IMAGES = 4  # below this a progress bar only flickers
CSV_HEADER = ["path", "model", "label", "index", "probability", "latency_ms", "error", "top_k"]


class Protocol(str, enum.Enum):
    rest = "rest"
    v2 = "v2"


class Format(str, enum.Enum):
    table = "table"
    jsonl = "jsonl"
    csv = "csv"


def _jsonl_writer() -> Callable[[ImageResult], None]:
    from deploykit.cli._output import to_json

    def write(result: ImageResult) -> None:
        sys.stdout.write(to_json(result.to_dict()) + "\n")
        sys.stdout.flush()  # one record as soon as it is known, for `| jq` and `| head`

    return write


def _csv_writer() -> Callable[[ImageResult], None]:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    sys.stdout.flush()

    def write(result: ImageResult) -> None:
        row: dict[str, Any] = result.to_dict()
        top = ";".join(f"{p.label}:{p.probability:.6g}" for p in result.top_k)
        writer.writerow([*("" if row[k] is None else row[k] for k in CSV_HEADER[:-1]), top])
        sys.stdout.flush()

    return write


def _render_table(run: PredictRun) -> None:
    from rich.table import Table
    from rich.text import Text

    from deploykit.cli._output import out_console

    # Text cells, not markup: paths and server messages may contain [brackets].
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("Image", overflow="fold", ratio=3)
    table.add_column("Model")
    table.add_column("Top-k", overflow="fold", ratio=2)  # an error message in full, however long its path
    table.add_column("Latency", justify="right", no_wrap=True)
    for result in run.results:
        if result.error is not None:
            table.add_row(result.path, result.model or "", Text(result.error, style="red"), "")
            continue
        classes = Text()
        for i, p in enumerate(result.top_k):
            classes.append(("\n" if i else "") + p.label + " ")
            classes.append(f"{p.probability:.3f}", style="dim" if i else "bold")
        table.add_row(Text(result.path), result.model or "", classes, f"{result.latency_ms or 0:.1f} ms")
    out_console.print(table)


@app.command(epilog="Exit codes: 0 every image predicted; 2 usage error; 4 server unreachable, not "
             "answering or failing; 5 some images failed (the others are still printed); 1 other errors, "
             "such as the server refusing the request (unknown --model, missing --api-key).")
def predict(
    ctx: typer.Context,
    images: list[str] | None = typer.Argument(None, help="Image files, directories (recursive), globs, or "
                                              "'-' for one image on stdin.", show_default=False),
    url: str | None = typer.Option(None, "--url", envvar="DEPLOYKIT_URL",
                                   help="Server URL \\[default: http://127.0.0.1:5000]."),
    model: str | None = typer.Option(None, "--model", "-m", help="Model name on a multi-model server "
                                     "\\[default: the server's default]."),
    model_file: Path | None = typer.Option(None, "--model-file", exists=True, dir_okay=False,
                                           help="Predict locally with this ONNX file (no server)."),
    protocol: Protocol = typer.Option(Protocol.rest, "--protocol", help="rest: deploykit's API. v2: Open "
                                      "Inference Protocol (Triton, KServe, MLServer, deploykit /v2)."),
    card: Path | None = typer.Option(None, "--card", exists=True, dir_okay=False, metavar="MODEL.onnx",
                                     help="With --protocol v2: read preprocessing and labels from this file "
                                     "\\[default: ask the deploykit server]."),
    binary: bool | None = typer.Option(None, "--binary/--no-binary", show_default=False,
                                       help="With --protocol v2: send tensors as binary data (Triton's "
                                       "extension) or as JSON \\[default: binary when the server lists "
                                       "binary_tensor_data in GET /v2]."),
    shrink: bool | None = typer.Option(None, "--shrink/--no-shrink", show_default=False,
                                       help="REST protocol: send a large photo re-encoded at the size the "
                                       "model resizes it to (JPEG quality 95; the server only crops it) "
                                       "instead of the whole file \\[default: on, off with --exact-decode]."),
    exact_decode: bool = typer.Option(False, "--exact-decode",
                                      help="Decode every image at full size, bit-identical to torchvision's "
                                      "transforms, where this client decodes (--model-file, --protocol v2); "
                                      "REST: send every image as it is \\[default: a large photo is decoded "
                                      "at the size the model needs, as deploykit serve does]."),
    files_from: str | None = typer.Option(None, "--files-from", metavar="FILE",
                                          help="Read image paths from FILE, one per line ('-' for stdin)."),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, help="Classes per image."),
    concurrency: int = typer.Option(DEFAULT_CONCURRENCY, "--concurrency", "-c", min=1, max=256,
                                    help="Requests in flight."),
    retries: int = typer.Option(3, "--retries", min=0, help="Retries on connection errors, 503 and 429."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.001, help="Seconds to wait for each answer."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="DEPLOYKIT_API_KEY",
                                       help="Key for servers that need one (sent as a Bearer token)."),
    as_json: bool = typer.Option(False, "--json", help="JSON Lines, the same as --format jsonl."),
    output_format: Format | None = typer.Option(None, "--format", help="table, jsonl or csv "
                                                "\\[default: table on a terminal, else jsonl]."),
) -> None:
    """Classify images with a deploykit or V2 server, or locally with --model-file.

    Results come in input order: a table on a terminal, else JSON Lines (one object per image, flushed as it
    is known), or CSV.
    """
    from deploykit.predict import check_options, expand_inputs, predict_images

    if model_file is not None and _from_environment(ctx, "url"):
        url = None  # DEPLOYKIT_URL in the environment must not make --model-file an error
    default_format = Format.table if sys.stdout.isatty() else Format.jsonl
    fmt = Format.jsonl if as_json else output_format or default_format
    options: dict[str, Any] = {
        "url": url, "model": model, "model_file": model_file, "protocol": protocol.value, "card_file": card,
        "top_k": top_k, "concurrency": concurrency, "retries": retries, "timeout": timeout, "binary": binary,
        "exact_decode": exact_decode, "shrink": shrink,
    }
    check_options(**options)  # before stdin is read
    sources = expand_inputs(images or [], files_from=files_from, stdin=sys.stdin.buffer)
    progress = None
    try:
        if fmt is Format.table:
            on_result, progress = _table_progress(len(sources))
        else:
            on_result = _csv_writer() if fmt is Format.csv else _jsonl_writer()
        run = predict_images(sources, **options, api_key=api_key, on_result=on_result)
    except BrokenPipeError:
        # The reader (`| head`) has gone: stop quietly, and keep Python from complaining at exit.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    finally:
        if progress is not None:
            progress.stop()
    if fmt is Format.table:
        from deploykit.cli._output import info

        _render_table(run)
        info(run.summary())
    if run.failed:
        where = "error field" if fmt is not Format.table else "table"
        raise PartialFailureError(f"{run.failed} of {run.total} images failed; see the {where} for why.")


def _from_environment(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "ENVIRONMENT"


def _table_progress(total: int) -> tuple[Callable[[ImageResult], None] | None, Any]:
    """A progress bar on stderr (a terminal only, for several images); the table is printed at the end."""
    from deploykit.cli._output import err_console

    if total < PROGRESS_MIN_IMAGES or not err_console.is_terminal:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("Predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=err_console, transient=True)
    task = progress.add_task("predict", total=total)
    progress.start()
    return lambda _result: progress.advance(task), progress
