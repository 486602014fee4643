"""`deploykit export`: PyTorch -> one self-describing ONNX file."""

from __future__ import annotations

from pathlib import Path

import typer

from deploykit.cli._app import app
from deploykit.cli._output import emit_json, info, out_console, progress_status

LIST_SOURCES = ("torchvision", "timm")


def _list_models(source: str | None) -> None:
    """`--list` prints torchvision's names, `--list timm` timm's (MODEL is then the source to list)."""
    source = source or "torchvision"
    if source not in LIST_SOURCES:
        raise typer.BadParameter(f"--list takes one of {', '.join(LIST_SOURCES)}, got {source!r}",
                                 param_hint="MODEL")
    from deploykit.sources import classification_models, timm_models

    for name in timm_models() if source == "timm" else classification_models():
        typer.echo(name)


def _numbers(value: str | None, option: str) -> tuple[float, ...] | None:
    """``0.5`` or ``0.485,0.456,0.406``: one value per channel."""
    if value is None:
        return None
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) not in (1, 3):
        raise typer.BadParameter(f"expected one number per channel (1 or 3, comma-separated), got {value!r}",
                                 param_hint=option)
    return parts


def _size(value: str | None) -> tuple[int, int] | None:
    """``224`` (square), ``128x384``, ``128,384`` or ``"128 384"``: height then width."""
    if value is None:
        return None
    import re

    match = re.fullmatch(r"\s*(\d+)\s*(?:[x,\s]\s*(\d+)\s*)?", value.lower())
    if match is None:
        raise typer.BadParameter(f"expected a size as 224 or HEIGHTxWIDTH (128x384), got {value!r}",
                                 param_hint="--input-size")
    height = int(match.group(1))
    return height, int(match.group(2) or height)


@app.command()
def export(
    model: str | None = typer.Argument(None, show_default=False,
                                help="torchvision name (resnet18), timm:NAME, hf:ORG/NAME or a Transformers "
                                "save_pretrained folder, checkpoint (.pt/.pth), TorchScript file, or factory "
                                "package.module:function / path/file.py:function."),
    output: Path | None = typer.Option(None, "-o", "--output",
                                       help="Output .onnx path \\[default: <name>.onnx]."),
    arch: str | None = typer.Option(None, "--arch", help="Architecture of a state-dict checkpoint."),
    weights: str = typer.Option("DEFAULT", "--weights", help="DEFAULT, a weights name (IMAGENET1K_V1), none "
                                "(random, seeded), or a state-dict path (torchvision and timm)."),
    num_classes: int | None = typer.Option(None, "--num-classes", help="timm and Hugging Face: class count "
                                           "of a fine-tuned head \\[default: from the weights]."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow loading a full pickled model; "
                                      "unpickling runs code from the file."),
    labels: Path | None = typer.Option(None, "--labels", exists=True, dir_okay=False,
                                       help="Class labels: text file (one per line) or JSON list."),
    input_size: str | None = typer.Option(None, "--input-size", help="Model input size: 224 (square) or "
                                          "HEIGHTxWIDTH (128x384) \\[default: from the weights]."),
    resize: int | None = typer.Option(None, "--resize",
                                      help="Resize the shorter side to this before the centre crop."),
    resize_mode: str | None = typer.Option(None, "--resize-mode", help="shorter-side (resize the shorter "
                                           "side, then centre crop) or exact (resize straight to the input "
                                           "size, as Resize((h, w))) \\[default: from the weights]."),
    channels: int | None = typer.Option(None, "--channels", help="1 (grayscale) or 3 \\[default: from the "
                                        "model's first convolution]."),
    channel_order: str | None = typer.Option(None, "--channel-order", help="RGB, or BGR for a model trained "
                                             "on OpenCV-loaded images."),
    pixel_scale: int | None = typer.Option(None, "--pixel-scale", help="1 (pixels in 0..1, as ToTensor) or "
                                           "255 (pixels in 0..255)."),
    mean: str | None = typer.Option(None, "--mean", help="Normalisation mean, one per channel: "
                                    "0.485,0.456,0.406 (or 0.5 for one channel)."),
    std: str | None = typer.Option(None, "--std", help="Normalisation std, one per channel: "
                                   "0.229,0.224,0.225."),
    static_batch: int | None = typer.Option(None, "--static-batch",
                                            help="Fix the batch size \\[default: dynamic]."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset."),
    exporter: str = typer.Option("auto", "--exporter",
                                 help="auto (dynamo, then torchscript), dynamo, torchscript."),
    seed: int = typer.Option(0, "--seed", help="Seed for --weights none and the check inputs."),
    name: str | None = typer.Option(None, "--name", help="Model name in the card \\[default: from MODEL]."),
    quantize: str | None = typer.Option(None, "--quantize", help="int8: also write <stem>.int8.onnx "
                                        "beside the fp32 file (static QDQ, per-channel), then checked; with "
                                        "--optimize, <stem>.int8.opt.onnx instead."),
    calibration: Path | None = typer.Option(None, "--calibration", help="Folder of images from your "
                                            "domain to calibrate int8 on (default: the bundled examples)."),
    precision: str | None = typer.Option(None, "--precision", help="fp16: also write <stem>.fp16.onnx "
                                         "(half-precision weights, fp32 inputs and outputs; for GPUs)."),
    optimize: bool = typer.Option(False, "--optimize", help="Also write <stem>.opt.onnx, the graph as "
                                  "optimised by ONNX Runtime (extended level); with --quantize int8: "
                                  "<stem>.int8.opt.onnx only (no <stem>.int8.onnx)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    list_models: bool = typer.Option(False, "--list", help="List torchvision classification models "
                                     "(`--list timm`: timm's) and exit."),
) -> None:
    """Export a PyTorch model to ONNX with its model card inside, and check it against PyTorch."""
    if list_models:
        _list_models(model)
        return
    if model is None:
        raise typer.BadParameter("missing MODEL (or --list)", param_hint="MODEL")
    from deploykit.export import export_model

    steps: tuple[str, ...] = ()
    if quantize or precision or optimize or calibration:
        from deploykit.optimize import check_options

        steps = check_options(quantize=quantize, precision=precision, optimize=optimize,
                              calibration=calibration)
    with progress_status(not as_json) as say:
        result = export_model(
            model, output=output, arch=arch, weights=weights, trust_pickle=trust_pickle, labels_file=labels,
            input_size=_size(input_size), resize=resize, resize_mode=resize_mode, channels=channels,
            channel_order=channel_order.upper() if channel_order else None, pixel_scale=pixel_scale,
            mean=_numbers(mean, "--mean"), std=_numbers(std, "--std"),
            static_batch=static_batch, opset=opset, exporter=exporter, seed=seed, num_classes=num_classes,
            name=name, progress=say,
        )
        summary = result.to_dict()
        if steps:
            from deploykit.optimize import optimize_export

            optimized = optimize_export(result, quantize=quantize, precision=precision, optimize=optimize,
                                        calibration=calibration, progress=say, warn=info)
            summary["optimized"] = optimized.to_dict()
    if as_json:
        emit_json(summary)
        return
    out_console.print(str(result), markup=False)
    if steps:
        out_console.print(str(optimized), markup=False)
