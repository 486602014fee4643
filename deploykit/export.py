"""``export_model``: a PyTorch model to one self-describing, checked ONNX file."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from deploykit import __version__
from deploykit.card import (
    CHANNEL_ORDERS,
    ModelCard,
    Preprocess,
    TensorSpec,
    default_channel_order,
    write_card,
)
from deploykit.compare import effective_atol
from deploykit.errors import ExportError, ModelFileError, UsageError, VerificationError, one_line
from deploykit.files import atomic_path, check_writable
from deploykit.fingerprint import fingerprint_input, make_fingerprint
from deploykit.sources import DEFAULT_SEED, LoadedModel, first_layer_channels, resolve_source

if TYPE_CHECKING:
    import torch

DEFAULT_OPSET = 18
EXPORTERS = ("auto", "dynamo", "torchscript")
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
TWO_GB = 2**31
MAX_SEED = 2**32 - 1  # what every seeded generator involved (NumPy, torch) takes
# Larger crops allocate gigabytes for the check inputs alone (3 x 8192 x 8192 float32 is 800 MB an image).
MAX_INPUT_SIZE = 4096
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ParityCheck:
    """PyTorch vs ONNX Runtime on seeded inputs at a few batch sizes.

    Passed when every element satisfies ``|onnx - torch| <= effective_atol + rtol * |torch|``;
    ``effective_atol`` is ``atol`` for outputs of ordinary magnitude and follows ``output_scale`` (the largest
    reference output) when the outputs are tiny or huge, see ``compare.effective_atol``.
    """

    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    max_rel_diff: float
    atol: float
    rtol: float
    passed: bool
    output_scale: float = float("nan")
    effective_atol: float = float("nan")

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        def number(value: float) -> float | None:  # JSON has no NaN (an unchecked external-data model)
            return value if np.isfinite(value) else None

        return {"batch_sizes": list(self.batch_sizes), "max_abs_diff": number(self.max_abs_diff),
                "max_rel_diff": number(self.max_rel_diff), "atol": self.atol, "rtol": self.rtol,
                "passed": self.passed, "output_scale": number(self.output_scale),
                "effective_atol": number(self.effective_atol)}


@dataclass(frozen=True)
class ExportResult:
    """What ``export_model`` wrote."""

    path: Path
    size_bytes: int
    exporter: str
    opset: int
    seconds: float
    card: ModelCard
    parity: ParityCheck
    external_data: bool = False
    fallback_reason: str | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "exporter": self.exporter,
            "opset": self.opset,
            "seconds": round(self.seconds, 3),
            "model": self.card.name,
            "input": {"name": self.card.input.name, "shape": list(self.card.input.shape)},
            "output": {"name": self.card.output.name, "shape": list(self.card.output.shape)},
            "dynamic_batch": self.card.dynamic_batch,
            "num_classes": self.card.num_classes,
            "parity": self.parity.to_dict(),
            "external_data": self.external_data,
            "fallback_reason": self.fallback_reason,
            "warnings": list(self.warnings),
        }

    def __str__(self) -> str:
        mb = self.size_bytes / 1e6
        lines = [
            f"Wrote {self.path} ({mb:.1f} MB) in {self.seconds:.1f}s with the {self.exporter} exporter, "
            f"opset {self.opset}.",
            f"Input {self.card.input.name} {list(self.card.input.shape)} -> output {self.card.output.name} "
            f"{list(self.card.output.shape)}, {self.card.num_classes} classes.",
            f"Parity with PyTorch at batch {', '.join(map(str, self.parity.batch_sizes))}: max abs diff "
            f"{self.parity.max_abs_diff:.2e} (atol {self.parity.atol:g}) - "
            + ("ok" if self.parity.passed else "FAILED"),
        ]
        if self.fallback_reason:
            lines.append(f"Note: the dynamo exporter failed ({self.fallback_reason}); "
                         "used TorchScript instead.")
        if self.external_data:
            lines.append("Note: the model is over 2 GB, so its weights are in an external data file "
                         "beside it.")
        return "\n".join(lines)


def export_model(
    model: str,
    *,
    output: str | Path | None = None,
    arch: str | None = None,
    weights: str | None = "DEFAULT",
    trust_pickle: bool = False,
    labels_file: str | Path | None = None,
    input_size: int | tuple[int, int] | None = None,
    resize: int | None = None,
    resize_mode: str | None = None,
    channels: int | None = None,
    channel_order: str | None = None,
    pixel_scale: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    static_batch: int | None = None,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    seed: int = DEFAULT_SEED,
    num_classes: int | None = None,
    name: str | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    progress: Progress | None = None,
) -> ExportResult:
    """Export MODEL to ONNX with its model card, check it, and write it atomically.

    Args:
        model: torchvision name, ``timm:NAME``, ``hf:ORG/NAME`` or a Transformers folder, checkpoint or
            TorchScript path, or factory (see ``resolve_source``).
        output: target path; default ``<name>.onnx`` in the current folder.
        input_size, resize, resize_mode, channels, channel_order, pixel_scale, mean, std: the input as the
            model takes it, overriding what the source declares (see ``input_preprocess``); ``channels`` is
            read from the model's first convolution where there is one.
        num_classes: timm and Hugging Face models: the class count of a fine-tuned head.
        static_batch: fix the batch dimension to this size instead of a dynamic one.
        exporter: ``auto`` (dynamo, falling back to TorchScript), ``dynamo`` or ``torchscript``.
        atol, rtol: tolerance of the PyTorch vs ONNX Runtime check at batch 1 and 3.

    Raises:
        UsageError, ModelNotFoundError, WeightsUnavailableError, ExportError, VerificationError.
    """
    say = progress or (lambda _msg: None)
    if exporter not in EXPORTERS:
        raise UsageError(f"Unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}.")
    if static_batch is not None and static_batch < 1:
        raise UsageError(f"--static-batch must be at least 1, got {static_batch}.")
    if atol < 0 or rtol < 0:
        raise UsageError("--atol and --rtol must not be negative.")
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED}, got {seed}.")
    if not 7 <= opset <= 25:
        raise UsageError(f"--opset {opset} is out of range; use an opset between 7 and 25 "
                         f"(default {DEFAULT_OPSET}).")
    options = InputOptions(size=(input_size, input_size) if isinstance(input_size, int) else input_size,
                           resize=resize, resize_mode=resize_mode, channels=channels,
                           channel_order=channel_order, pixel_scale=pixel_scale, mean=mean, std=std)
    options.check()
    labels = _read_labels(labels_file) if labels_file else None
    if output is not None:
        if Path(output).is_dir():
            raise UsageError(f"--output {str(output)!r} is a folder; give a file path such as model.onnx.")
        check_writable(output)  # fail before a long export, not after it
    else:
        check_writable(Path.cwd() / "model.onnx")  # the default <name>.onnx goes to the current folder

    started = time.perf_counter()
    say(f"Loading {model}")
    loaded = resolve_source(model, arch=arch, weights=weights, trust_pickle=trust_pickle, seed=seed,
                            num_classes=num_classes)
    preprocess = input_preprocess(loaded.preprocess, options, first_layer=first_layer_channels(loaded.module),
                                  geometry_problem=loaded.geometry_problem)
    target = Path(output) if output else Path(f"{_safe_name(name or loaded.name)}.onnx")

    import torch

    torch.manual_seed(seed)
    trace_batch = static_batch or 2
    example = torch.from_numpy(fingerprint_input(preprocess, seed, trace_batch))
    try:
        with torch.inference_mode():
            reference = loaded.module(example)
    except Exception as exc:  # the user's model code: any error type, usually a shape mismatch
        raise ExportError(
            f"The model failed on an input of shape {tuple(example.shape)}: {one_line(exc, with_type=True)}.",
            hint="Pass --input-size (and --resize) matching the size the model expects, or --channels when "
            "its first layer does not show how many it takes; --debug shows where.",
        ) from exc
    reference = _first_tensor(reference)
    if reference.ndim != 2:
        raise ExportError(f"The model returns an output of shape {tuple(reference.shape)}; deploykit exports "
                          "image classifiers whose output is (batch, classes).")
    num_classes = int(reference.shape[1])
    labels = _labels_for(labels or loaded.labels, num_classes)
    # `example` is the fingerprint input at `seed`, so this output is also the fingerprint's reference.
    reference_out = reference.float().numpy()
    constant = bool(np.ptp(reference_out, axis=0).max() == 0) if reference.shape[0] > 1 else False

    say("Exporting to ONNX")
    proto, used, fallback_reason, notes = _export(loaded, example, opset=opset, exporter=exporter,
                                                  dynamic=static_batch is None)
    external = proto.ByteSize() > TWO_GB

    say("Checking with onnx.checker and ONNX Runtime")
    parity_batches = (static_batch,) if static_batch else (1, 3)
    parity = _check(proto, loaded.module, preprocess, parity_batches, seed=seed, atol=atol, rtol=rtol,
                    external=external)
    if not parity:
        raise VerificationError(
            f"The exported model differs from PyTorch: max abs diff {parity.max_abs_diff:.3g} exceeds atol "
            f"{parity.effective_atol:.3g} (+ rtol {rtol:g}); nothing was written.",
            hint="Try --exporter torchscript or another --opset; relax with --atol only if that is "
            "acceptable.",
        )

    fp_atol = effective_atol(1e-3, float(np.abs(reference_out).max(initial=0.0)))
    actual_opset = _opset_of(proto)
    if actual_opset != opset:
        notes.insert(0, f"The {used} exporter produced opset {actual_opset}, not the requested {opset}.")
    batch_dim: int | str = static_batch if static_batch else "batch"
    import onnx

    card = ModelCard(
        name=name or loaded.name,
        labels=tuple(labels),
        preprocess=preprocess,
        inputs=(TensorSpec(INPUT_NAME, preprocess.input_shape(batch_dim), "float32"),),
        outputs=(TensorSpec(OUTPUT_NAME, (batch_dim, num_classes), "float32"),),
        source=replace(loaded.source, num_classes=num_classes),
        output_kind=loaded.output_kind,
        exporter=used,
        opset=actual_opset,
        versions={"deploykit": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                  "onnxruntime": _ort_version(), "python": platform.python_version()},
        created=dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        fingerprint=make_fingerprint(reference_out, seed=seed, atol=fp_atol),
        parity=parity.to_dict(),
    )
    write_card(proto, card)

    say(f"Writing {target}")
    size = _write(proto, target, external=external)
    if constant:
        # e.g. a zero-initialised head (torchvision's ViTs) with --weights none: parity then proves little.
        notes.insert(0, "The model's output does not depend on its input (random weights with a "
                     "zero-initialised head?), so the parity check compares constants.")
    return ExportResult(path=target, size_bytes=size, exporter=used, opset=actual_opset,
                        seconds=time.perf_counter() - started, card=card, parity=parity,
                        external_data=external, fallback_reason=fallback_reason, warnings=tuple(notes))


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def _opset_of(proto: Any) -> int:
    """The default-domain opset a ModelProto declares."""
    return max((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"


def _read_labels(path: str | Path) -> list[str]:
    """Labels from a text file (one per line) or a JSON list."""
    import json

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"Labels file {str(file)!r} does not exist.")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"Labels file {str(file)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}).",
                         hint="Give a text file with one label per line, or a JSON list, in UTF-8.") from exc
    if text.lstrip().startswith("["):
        try:
            return [str(v) for v in json.loads(text)]
        except json.JSONDecodeError as exc:
            raise UsageError(f"Labels file {str(file)!r} is not a valid JSON list: {exc}.") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def _labels_for(labels: list[str] | None, num_classes: int) -> list[str]:
    if labels is None:
        return [f"class_{i}" for i in range(num_classes)]
    if len(labels) != num_classes:
        raise UsageError(f"{len(labels)} labels given for a model with {num_classes} outputs.",
                         hint="Pass a --labels file with one label per class.")
    return labels


RESIZE_MODES = ("shorter-side", "exact")
PIXEL_SCALES = (1, 255)


@dataclass(frozen=True)
class InputOptions:
    """What the export options say about the model's input; None leaves the source's declaration."""

    size: tuple[int, int] | None = None  # height, width
    resize: int | None = None
    resize_mode: str | None = None
    channels: int | None = None
    channel_order: str | None = None
    pixel_scale: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def check(self) -> None:
        """Raise ``UsageError`` for a value no model could take, before anything is loaded."""
        for value in self.size or ():
            if not 8 <= value <= MAX_INPUT_SIZE:
                raise UsageError(f"--input-size must be between 8 and {MAX_INPUT_SIZE}, got {value}.")
        if self.resize is not None and not 1 <= self.resize <= 2 * MAX_INPUT_SIZE:
            raise UsageError(f"--resize must be between 1 and {2 * MAX_INPUT_SIZE}, got {self.resize}.")
        if self.resize_mode is not None and self.resize_mode not in RESIZE_MODES:
            raise UsageError(f"--resize-mode must be {' or '.join(RESIZE_MODES)}, got {self.resize_mode!r}.")
        if self.resize is not None and self.resize_mode == "exact":
            raise UsageError("--resize sets the shorter side for --resize-mode shorter-side; --resize-mode "
                             "exact resizes straight to --input-size.", hint="Drop one of the two.")
        if self.channels is not None and self.channels not in CHANNEL_ORDERS:
            raise UsageError(f"--channels must be 1 (grayscale) or 3 (colour), got {self.channels}.")
        if self.channel_order is not None and self.channel_order not in CHANNEL_ORDERS[3]:
            raise UsageError(f"--channel-order must be RGB or BGR, got {self.channel_order!r}.")
        if self.pixel_scale is not None and self.pixel_scale not in PIXEL_SCALES:
            raise UsageError("--pixel-scale must be 1 (pixels in 0..1) or 255 (pixels in 0..255), got "
                             f"{self.pixel_scale}.")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def input_preprocess(base: Preprocess, options: InputOptions, *, first_layer: tuple[int, str] | None = None,
                     geometry_problem: UsageError | None = None) -> Preprocess:
    """The card's preprocessing: what the source declares (``base``), changed by the export options.

    ``first_layer`` is the channel count the model's first convolution takes and its name
    (``first_layer_channels``): it decides the channels unless ``--channels`` says otherwise (an error).
    ``geometry_problem`` (a source whose resize and crop no card mode reproduces) is raised unless the
    options choose the geometry (``--resize-mode`` or ``--resize``).
    Where the options change the channels or the pixel scale, the source's mean and std no longer apply and
    must be given; a changed channel order alone reverses them. Raises ``UsageError``, naming the option to
    change, for a mismatch with the model or between options.
    """
    if geometry_problem is not None and options.resize_mode is None and options.resize is None:
        raise geometry_problem
    channels = options.channels
    if first_layer is not None:
        found, layer = first_layer
        if found not in CHANNEL_ORDERS:
            raise UsageError(f"The model's first layer, {layer}, takes {found} channels; deploykit feeds "
                             "images as 1 (grayscale) or 3 (colour) channels.")
        if channels is not None and channels != found:
            raise UsageError(f"--channels {channels} does not fit the model: its first layer, {layer}, takes "
                             f"{_count(found, 'channel')}.",
                             hint=f"Pass --channels {found}, or leave it out.")
        channels = found
    channels = channels or base.channels
    if options.channel_order is not None and channels == 1:
        raise UsageError("--channel-order applies to 3-channel models; this one takes 1 channel (grayscale).")
    order = options.channel_order or (base.channel_order if base.channels == channels
                                      else default_channel_order(channels))
    scale = {1: 1.0 / 255.0, 255: 1.0}[options.pixel_scale] if options.pixel_scale else base.scale
    changes: dict[str, Any] = {"channels": channels, "channel_order": order, "scale": scale}

    mean, std = options.mean, options.std
    if mean is None or std is None:
        missing = " and ".join(o for o, v in (("--mean", mean), ("--std", std)) if v is None)
        if channels != base.channels:
            example = ",".join(["0.5"] * channels)
            raise UsageError(f"The model takes {_count(channels, 'channel')} where its source declares a "
                             f"normalisation for {base.channels}: pass {missing} with "
                             f"{_count(channels, 'value')} (for example --mean {example} --std {example}).")
        if scale != base.scale:
            zeros, ones = ",".join(["0"] * channels), ",".join(["1"] * channels)
            raise UsageError(f"--pixel-scale {options.pixel_scale} changes the units of the normalisation: "
                             f"pass {missing} in those units (for example --mean {zeros} --std {ones} for "
                             "raw pixels).")
        if order != base.channel_order:  # the same colour's statistics, in its new position
            mean, std = mean or base.mean[::-1], std or base.std[::-1]
    for option, values in (("--mean", mean), ("--std", std)):
        if values is not None and len(values) != channels:
            raise UsageError(f"{option} has {_count(len(values), 'value')}, but the model takes "
                             f"{_count(channels, 'channel')}: give one value per channel.")
    if mean is not None:
        changes["mean"] = tuple(mean)
    if std is not None:
        changes["std"] = tuple(std)

    if options.size is not None:
        height, width = options.size
        changes["height"], changes["width"] = height, width
        if options.resize is None and options.resize_mode != "exact" and base.resize is not None:
            # keep the source's ratio of resize to crop, against the larger side
            base_side, side = max(base.height, base.width), max(height, width)
            changes["resize"] = max(side, round(side * base.resize / base_side))
    if options.resize_mode == "exact":
        changes["resize"] = None
    elif options.resize is not None:
        changes["resize"] = options.resize
    elif options.resize_mode == "shorter-side" and base.resize is None:
        changes["resize"] = max(changes.get("height", base.height), changes.get("width", base.width))
    pp = replace(base, **changes)
    try:
        pp.validate()
    except ModelFileError as exc:
        raise UsageError(exc.message.replace("in model card", "in the options")) from exc
    return pp


def _first_tensor(output: Any) -> torch.Tensor:
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ExportError(f"The model returns {type(output).__name__}; deploykit expects a tensor of class "
                      "scores.")


class _FirstOutput:
    """Wrap a module so it returns one tensor (inception/googlenet in eval mode already do)."""

    def __new__(cls, module: Any) -> Any:
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = module

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return _first_tensor(self.inner(x))

        return Wrapped().eval()


def _export(loaded: LoadedModel, example: torch.Tensor, *, opset: int, exporter: str,
            dynamic: bool) -> tuple[Any, str, str | None, list[str]]:
    """Run the chosen exporter; returns (ModelProto, exporter used, fallback reason, captured notes)."""
    import torch

    scripted = isinstance(loaded.module, torch.jit.ScriptModule)
    module = loaded.module if scripted else _FirstOutput(loaded.module)
    notes: list[str] = []
    fallback_reason = None
    if exporter in ("auto", "dynamo") and not isinstance(module, torch.jit.ScriptModule):
        try:
            proto = _export_dynamo(module, example, opset=opset, dynamic=dynamic, notes=notes)
        except Exception as exc:  # the dynamo exporter raises many unrelated types on unsupported models
            if exporter == "dynamo":
                raise ExportError(f"The dynamo exporter failed: {one_line(exc, with_type=True)}.",
                                  hint="Try --exporter torchscript.") from exc
            fallback_reason = one_line(exc, with_type=True)
        else:
            # The dynamo exporter builds at its own opset and converts down; when that conversion fails it
            # keeps its own opset with only a warning, so check what it produced.
            produced = _opset_of(proto)
            if produced == opset:
                return proto, "dynamo", None, notes
            if exporter == "dynamo":
                raise ExportError(f"The dynamo exporter could not produce opset {opset} "
                                  f"(it produced {produced}).",
                                  hint=f"Use --opset {produced}, or --exporter torchscript.")
            fallback_reason = f"it could not convert to opset {opset} (it produced {produced})"
    try:
        proto = _export_torchscript(module, example, opset=opset, dynamic=dynamic, notes=notes)
        return proto, "torchscript", fallback_reason, notes
    except Exception as exc:  # torch.onnx.errors.* and RuntimeErrors from tracing
        before = f" (the dynamo exporter failed first: {fallback_reason})" if fallback_reason else ""
        raise ExportError(f"ONNX export failed: {one_line(exc, with_type=True)}{before}.",
                          hint="Try another --opset, or simplify the model's forward().") from exc


@contextlib.contextmanager
def _quiet(notes: list[str]) -> Any:
    """Keep the exporters' prints and warnings off stdout (which may carry --json); keep them as notes."""
    buffer = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(buffer):
        warnings.simplefilter("always")
        yield
    notes.extend(line for line in buffer.getvalue().splitlines() if line.strip() and "✅" not in line)
    notes.extend(str(w.message).splitlines()[0] for w in caught if "deprecat" not in str(w.message).lower())


def _export_dynamo(module: Any, example: torch.Tensor, *, opset: int, dynamic: bool, notes: list[str]) -> Any:
    import torch

    dynamic_shapes = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic else None
    with _quiet(notes):
        program = torch.onnx.export(module, (example,), None, dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], opset_version=opset,
                                    dynamic_shapes=dynamic_shapes,
                                    external_data=False, optimize=True, verbose=False)
    if program is None:
        raise ExportError("The dynamo exporter produced no program.")
    proto = program.model_proto
    _strip_export_metadata(proto)
    return proto


def _export_torchscript(module: Any, example: torch.Tensor, *, opset: int, dynamic: bool,
                        notes: list[str]) -> Any:
    import onnx
    import torch

    buffer = io.BytesIO()
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None
    with _quiet(notes):
        torch.onnx.export(module, (example,), cast(Any, buffer), dynamo=False, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=min(opset, 20), dynamic_axes=axes,
                          do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def _strip_export_metadata(proto: Any) -> None:
    """Drop the exporter's per-value debug metadata (node names, stack traces) that bloats the file."""
    for value in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
        del value.metadata_props[:]
    for node in proto.graph.node:
        del node.metadata_props[:]
    for init in proto.graph.initializer:
        del init.metadata_props[:]


def _check(proto: Any, module: Any, pp: Preprocess, batches: tuple[int, ...], *, seed: int, atol: float,
           rtol: float, external: bool) -> ParityCheck:
    """onnx.checker, then ONNX Runtime against PyTorch on seeded inputs at each batch size."""
    import onnx
    import torch

    from deploykit.runtime import create_session

    try:
        onnx.checker.check_model(proto, full_check=not external)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"The exported graph is invalid: {one_line(exc, with_type=True)}.") from exc
    if external:
        return ParityCheck(batches, float("nan"), float("nan"), atol, rtol, True)
    session = create_session(proto.SerializeToString())
    input_name = session.get_inputs()[0].name
    pairs = []
    for i, batch in enumerate(batches):
        x = fingerprint_input(pp, seed + 100 + i, batch)
        with torch.inference_mode():
            expected = _first_tensor(module(torch.from_numpy(x))).numpy()
        try:
            actual = session.run(None, {input_name: x})[0]
        except Exception as exc:  # onnxruntime's own error types
            raise ExportError(f"ONNX Runtime failed to run the exported model at batch {batch}: "
                              f"{one_line(exc, with_type=True)}.") from exc
        if actual.shape != expected.shape:
            raise ExportError(f"At batch {batch} ONNX Runtime returned shape {actual.shape}, PyTorch "
                              f"{expected.shape}.")
        pairs.append((actual, expected))
    scale = max(float(np.abs(expected).max(initial=0.0)) for _, expected in pairs)
    tolerance = effective_atol(atol, scale)
    max_abs = max_rel = 0.0
    ok = True
    for actual, expected in pairs:
        diff = np.abs(actual - expected)
        max_abs = max(max_abs, float(diff.max(initial=0.0)))
        max_rel = max(max_rel, float((diff / np.maximum(np.abs(expected), 1e-12)).max(initial=0.0)))
        ok = ok and bool(np.all(diff <= tolerance + rtol * np.abs(expected)))
    return ParityCheck(batches, max_abs, max_rel, atol, rtol, ok, scale, tolerance)


def _write(proto: Any, target: Path, *, external: bool) -> int:
    import onnx

    with atomic_path(target) as tmp:
        if external:
            data_name = target.name + ".data"
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            # onnx writes the data file under its final name next to the temporary model file.
        else:
            tmp.write_bytes(proto.SerializeToString())
    size = target.stat().st_size
    if external:
        size += (target.parent / (target.name + ".data")).stat().st_size
    return size
