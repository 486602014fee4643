"""`deploykit verify`: structural and numerical parity of an ONNX file with its source (exit 3 on failure)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from deploykit.cli._app import app
from deploykit.cli._output import emit_json, error, out_console, progress_status, to_json
from deploykit.errors import ExitCode

if TYPE_CHECKING:
    from deploykit.verify import ParityReport


@app.command()
def verify(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help="The exported .onnx file."),
    against: str | None = typer.Option(None, "--against", help="Reference instead of the card's source: a "
                                       "MODEL as export takes (name, checkpoint, factory) or an .onnx file."),
    images: Path | None = typer.Option(None, "--images", exists=True, file_okay=False,
                                       help="Folder of images (default: the bundled example images)."),
    atol: float | None = typer.Option(None, "--atol", help="Absolute tolerance (default 1e-4)."),
    rtol: float | None = typer.Option(None, "--rtol", help="Relative tolerance (default 1e-3)."),
    provider: list[str] = typer.Option(["cpu"], "--provider", help="ONNX Runtime provider (repeatable)."),
    batch_size: list[int] | None = typer.Option(None, "--batch-size", help="Batch size to check (repeatable) "
                                                "(default: 1 and 4, or the card's fixed batch)."),
    fingerprint: bool = typer.Option(False, "--fingerprint", help="Only the structural checks and the card's "
                                     "fingerprint; needs no torch."),
    min_top1_agreement: float | None = typer.Option(None, "--min-top1-agreement", help="Require this top-1 "
                                                    "agreement on images (0..1); without --atol/--rtol the "
                                                    "element-wise tolerance is then reported, not gated."),
    arch: str | None = typer.Option(None, "--arch", help="Architecture of a state-dict --against."),
    weights: str | None = typer.Option(None, "--weights", help="Weights for an --against torchvision name."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow unpickling an --against model."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report on stdout."),
    report: Path | None = typer.Option(None, "--report", dir_okay=False,
                                       help="Also write the JSON report to this file."),
) -> None:
    """Check that an ONNX file computes what its PyTorch source computes (exit 3 when it does not)."""
    from deploykit.files import check_writable, write_bytes_atomic
    from deploykit.verify import verify_model

    if report is not None:
        check_writable(report, option="--report")  # before the run, not after it
    with progress_status(not as_json) as say:
        result = verify_model(
            model, against=against, images=images, atol=atol, rtol=rtol, providers=tuple(provider),
            batch_sizes=tuple(batch_size) if batch_size else None, fingerprint_only=fingerprint,
            min_top1_agreement=min_top1_agreement, arch=arch, weights=weights, trust_pickle=trust_pickle,
            progress=say,
        )
    if report is not None:
        write_bytes_atomic(report, (to_json(result.to_dict(), indent=2) + "\n").encode())
    if as_json:
        emit_json(result.to_dict())
    elif out_console.is_terminal:
        _render(result)
    else:
        out_console.print(str(result), markup=False)
    if not result:
        error(result.verdict)
        raise typer.Exit(int(ExitCode.VERIFICATION_FAILED))


def _render(result: ParityReport) -> None:
    """A rich table: one row per check, the latency information row, the notes, then a passing verdict."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{result.model} ({result.name}) vs {result.reference}", title_justify="left")
    for column in ("check", "status", "max abs diff", "top-1", "detail"):
        table.add_column(column, overflow="fold")
    style = {"passed": "green", "failed": "bold red", "skipped": "yellow"}
    for c in result.checks:
        first = c.outputs[0] if c.outputs else None
        diff = f"{max(o.max_abs_diff for o in c.outputs):.3g}" if c.outputs else ""
        top1 = f"{first.top1_agreement:.1%}" if first and first.top1_agreement is not None else ""
        table.add_row(c.name, Text(c.status, style=style[c.status]), diff, top1, Text(c.detail))
        if c.fast_decode:
            fast = c.fast_decode
            # the input difference is in the detail: the diff column is of outputs
            table.add_row("decode", Text("info", style="dim"), "", "" if fast.top1_agreement is None
                          else f"{fast.top1_agreement:.1%}", Text(str(fast)))
    if result.latency:
        lat = result.latency
        table.add_row("latency", Text("info", style="dim"), "", "", Text(
            f"batch {lat.batch}, median of {lat.runs}: {lat.reference} {lat.reference_ms:.2f} ms, "
            f"ONNX Runtime [{lat.provider}] {lat.onnx_ms:.2f} ms (information only)"))
    out_console.print(table)
    for note in result.notes:
        out_console.print(f"note: {note}", markup=False)
    if result:  # a failed verdict goes to stderr, once, from the caller
        out_console.print(Text(result.verdict, style="bold green"))
