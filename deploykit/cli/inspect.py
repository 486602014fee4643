"""`deploykit inspect`: what an ONNX file holds. Works without torch."""

from __future__ import annotations

from pathlib import Path

import typer

from deploykit.cli._app import app
from deploykit.cli._output import emit_json, out_console


@app.command()
def inspect(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help="An .onnx file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Show inputs, outputs, opset, size, parameter count and the model card of an ONNX file."""
    from deploykit.inspect import inspect_model

    result = inspect_model(model)
    if as_json:
        emit_json(result.to_dict())
    else:
        out_console.print(str(result), markup=False)
