"""Derived models: int8 static quantization, fp16 conversion and ONNX Runtime graph optimization.

``optimize_model`` turns an fp32 ONNX file written by ``export`` into one derived file beside it:
``<stem>.int8.onnx``, ``<stem>.fp16.onnx``, ``<stem>.opt.onnx`` or a combination (``<stem>.int8.opt.onnx``:
the suffixes name the steps in the order they were applied). The derived file carries the parent's card with
its precision, a ``quantization`` record (calibration set, parent, agreement with the parent, method) and a
fresh fingerprint from its own ONNX Runtime outputs, so ``serve`` can self-test it.

int8 choices, measured on a 2-core Xeon with AVX512-VNNI (see docs/benchmarks.md):

- QDQ format, per-channel symmetric QInt8 weights, asymmetric QUInt8 activations. U8S8 is the combination
  ONNX Runtime's x86 kernels are built for (VPDPBUSD multiplies unsigned by signed bytes); S8S8 QDQ ran about
  3x slower than U8S8 here.
- MinMax calibration by default. On the example model over 600 held-out images every method kept 100% top-1
  agreement with fp32; MinMax had the smallest max probability difference (0.019; Entropy equal, Percentile
  0.030), is the cheapest to calibrate and needs no histogram memory. ``method`` selects another.
- ``reduce_range`` off: 7-bit weights avoid int16 saturation in VPMADDUBSW on x86 CPUs *without* VNNI;
  with VNNI (and on ARM) nothing saturates, and the 8th bit is worth keeping (max probability difference
  0.044 with it on, 0.019 off). Where it does saturate it can cost a model dearly: the one-channel digits
  example kept 81% top-1 agreement with 8-bit weights on an AVX2-only AMD EPYC, 100% with 7-bit ones. So
  unless ``reduce_range`` is given, a model whose top-1 agreement on the check images falls under
  ``RETRY_REDUCE_RANGE_BELOW`` on this CPU is quantized again with 7-bit weights, and the better one is kept.
  Saturation depends on the CPU that runs the model: ``deploykit verify int8.onnx --against fp32.onnx`` on
  the serving machine checks it there.

torch is never imported here.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploykit.card import ModelCard, read_card, write_card
from deploykit.errors import DeployKitError, UsageError
from deploykit.files import atomic_path, sha256_file
from deploykit.fingerprint import DEFAULT_BATCH, DEFAULT_SEED, fingerprint_input, make_fingerprint

if TYPE_CHECKING:
    from deploykit.export import ExportResult
    from deploykit.runtime import Predictor

Callback = Callable[[str], None]
QUANTIZE_CHOICES = ("int8",)
PRECISION_CHOICES = ("fp32", "fp16")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_MAX_IMAGES = 256
CALIBRATION_BATCH = 8
#: With ``reduce_range`` left to the default, 8-bit weights that keep less top-1 agreement than this are
#: retried as 7-bit weights (see the module docstring).
RETRY_REDUCE_RANGE_BELOW = 0.99
# ORT_ENABLE_EXTENDED: constant folding and operator fusions (Conv+Relu, QDQ -> QLinearConv, ...) that any
# x86 or ARM CPU runs. "all" adds NCHWc/NHWC layout rewrites tied to this CPU's vector width; ONNX Runtime
# warns that such a file "should only be used in the same environment", and it applies them at load anyway.
OPTIMIZATION_LEVEL = "extended"


class CalibrationError(DeployKitError):
    """No usable calibration images (exit 1); a missing or empty folder is a ``UsageError`` (exit 2)."""


@dataclass(frozen=True)
class Agreement:
    """How often a derived model predicts what its parent predicts, on real images.

    ``top1``: share of images where both models have the same top-1 class. ``top5``: share where the parent's
    top-1 class is among the derived model's top-5. ``max_abs_prob_diff``: largest absolute difference of any
    class probability.
    """

    top1: float
    top5: float
    max_abs_prob_diff: float
    images: int

    def to_dict(self) -> dict[str, Any]:
        return {"top1": self.top1, "top5": self.top5, "max_abs_prob_diff": self.max_abs_prob_diff,
                "images": self.images}

    def __str__(self) -> str:
        return (f"top-1 {self.top1:.1%}, top-5 {self.top5:.1%}, max abs probability diff "
                f"{self.max_abs_prob_diff:.3g} on {self.images} images")


@dataclass(frozen=True)
class CalibrationSet:
    """The images int8 calibration used: count, an order-independent digest, and where they came from."""

    images: int
    sha256: str
    source: str
    skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "sha256": self.sha256, "source": self.source}


@dataclass(frozen=True)
class OptimizeResult:
    """What ``optimize_model`` wrote: the derived file, its card and how close it stays to the parent."""

    path: Path
    parent: Path
    steps: tuple[str, ...]
    precision: str
    size_bytes: int
    parent_size_bytes: int
    seconds: float
    card: ModelCard
    agreement: Agreement | None = None
    calibration: CalibrationSet | None = None
    method: dict[str, Any] | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "parent": str(self.parent),
            "steps": list(self.steps),
            "precision": self.precision,
            "size_bytes": self.size_bytes,
            "parent_size_bytes": self.parent_size_bytes,
            "seconds": round(self.seconds, 3),
            "agreement": self.agreement.to_dict() if self.agreement else None,
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "method": self.method,
            "warnings": list(self.warnings),
        }

    def __str__(self) -> str:
        sizes = f"{self.size_bytes / 1e6:.1f} MB; fp32 {self.parent_size_bytes / 1e6:.1f} MB"
        lines = [f"Wrote {self.path} ({sizes}) in {self.seconds:.1f}s: "
                 f"{' + '.join(_STEP_NAMES[s] for s in self.steps)}."]
        if self.calibration:
            skipped = f" ({self.calibration.skipped} unreadable skipped)" if self.calibration.skipped else ""
            calibrate = (self.method or {}).get("calibrate_method", "")
            lines.append(f"Calibrated on {self.calibration.images} images from "
                         f"{self.calibration.source}{skipped}, {calibrate} ranges.")
        if self.agreement:
            lines.append(f"Agreement with fp32: {self.agreement}.")
        return "\n".join(lines)


_STEP_NAMES = {"int8": "int8 static QDQ quantization", "fp16": "fp16 weights with fp32 inputs/outputs",
               "opt": f"ONNX Runtime graph optimization ({OPTIMIZATION_LEVEL})"}


def check_options(*, quantize: str | None = None, precision: str | None = None, optimize: bool = False,
                  calibration: str | Path | None = None) -> tuple[str, ...]:
    """Validate the optimization options and return the steps to apply, in order.

    Raises ``UsageError`` for unknown values, contradictory options and a calibration folder that is
    missing or holds no images; call it before a long export so the user learns early.
    """
    if quantize is not None and quantize.lower() not in QUANTIZE_CHOICES:
        raise UsageError(f"Unknown --quantize {quantize!r}; the only choice is int8.",
                         hint="Use --precision fp16 for half precision.")
    if precision is not None and precision.lower() not in PRECISION_CHOICES:
        raise UsageError(f"Unknown --precision {precision!r}; choose fp32 or fp16 (int8 is --quantize int8).")
    quantize = quantize.lower() if quantize else None
    precision = precision.lower() if precision else None
    if quantize and precision == "fp16":
        raise UsageError("--quantize int8 and --precision fp16 exclude each other; choose one.",
                         hint="int8 is for CPUs, fp16 for GPUs.")
    if calibration is not None:
        if not quantize:
            raise UsageError("--calibration only applies to --quantize int8.")
        _require_one_readable(calibration_files(calibration), str(calibration))
    steps: list[str] = []
    if quantize:
        steps.append("int8")
    if precision == "fp16":
        steps.append("fp16")
    if optimize:
        steps.append("opt")
    return tuple(steps)


def calibration_files(folder: str | Path) -> list[Path]:
    """Image files below ``folder``; ``UsageError`` when it is missing, not a folder, unlistable or empty."""
    from deploykit.images import iter_image_files

    path = Path(folder)
    if not path.exists():
        raise UsageError(f"Calibration folder {str(path)!r} does not exist.",
                         hint="Pass --calibration with a folder of images from your domain.")
    if not path.is_dir():
        raise UsageError(f"--calibration {str(path)!r} is a file; it must be a folder of images.")
    try:
        files = iter_image_files(path)
    except OSError as exc:
        raise UsageError(f"Cannot read calibration folder {str(path)!r}: {exc.strerror}.",
                         hint="Check its permissions.") from exc
    if not files:
        raise UsageError(f"Calibration folder {str(path)!r} holds no images (.jpg, .png, .webp, ...).",
                         hint="Add a few hundred representative images from your domain.")
    return files


def _require_one_readable(files: Sequence[Path], source: str) -> None:
    """Raise ``CalibrationError`` unless at least one of ``files`` decodes (stops at the first that does)."""
    from deploykit.images import InvalidImageError, load_image

    first_error = ""
    for file in files:
        try:
            load_image(file)
        except InvalidImageError as exc:
            first_error = first_error or exc.message
            continue
        return
    raise CalibrationError(f"None of the {len(files)} images in {source} could be read, e.g. {first_error}",
                           hint="Pass --calibration with a folder of readable JPEG/PNG images.")


def optimize_export(result: ExportResult, *, quantize: str | None = None, precision: str | None = None,
                    optimize: bool = False, calibration: str | Path | None = None,
                    progress: Callback | None = None, warn: Callback | None = None) -> OptimizeResult:
    """Derive a quantized/half/optimized model from a fresh export; the fp32 file stays at ``result.path``."""
    return optimize_model(result.path, quantize=quantize, precision=precision, optimize=optimize,
                          calibration=calibration, progress=progress, warn=warn)


def optimize_model(
    path: str | Path,
    *,
    quantize: str | None = None,
    precision: str | None = None,
    optimize: bool = False,
    calibration: str | Path | None = None,
    output: str | Path | None = None,
    method: str = "minmax",
    reduce_range: bool | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    progress: Callback | None = None,
    warn: Callback | None = None,
) -> OptimizeResult:
    """Write a derived model of the fp32 ONNX file ``path`` and check it against its parent.

    Args:
        quantize: ``int8`` for static QDQ quantization calibrated on ``calibration`` (a folder of images; the
            bundled example images, with a warning, when None).
        precision: ``fp16`` to convert weights to half precision, keeping fp32 inputs and outputs.
        optimize: save the graph as optimized by ONNX Runtime (``extended`` level, portable across CPUs).
        output: target path; default beside ``path`` as ``<stem>.<steps>.onnx``.
        method: int8 calibration method, ``minmax``, ``entropy`` or ``percentile``.
        reduce_range: quantize weights to 7 bits (True) or 8 (False), for x86 CPUs without VNNI; None: 8,
            retried with 7 when top-1 agreement on this CPU falls under ``RETRY_REDUCE_RANGE_BELOW``.
        max_images: use at most this many calibration images (evenly spaced over the sorted files).

    Raises:
        UsageError: bad options, or a calibration folder that is missing or empty.
        CalibrationError: no calibration image could be decoded. ModelFileError: unreadable model.
    """
    say = progress or (lambda _msg: None)
    tell = warn or (lambda _msg: None)
    steps = check_options(quantize=quantize, precision=precision, optimize=optimize, calibration=calibration)
    if not steps:
        raise UsageError("Nothing to do: pass --quantize int8, --precision fp16 or --optimize.")
    if method.lower() not in CALIBRATION_METHODS:
        raise UsageError(f"Unknown calibration method {method!r}; choose one of "
                         f"{', '.join(CALIBRATION_METHODS)}.")
    if max_images < 1:
        raise UsageError(f"max_images must be at least 1, got {max_images}.")
    started = time.perf_counter()
    parent = Path(path)
    card = read_card(parent)
    if card.precision != "fp32":
        raise UsageError(f"{str(parent)!r} is already {card.precision}; derive models from the fp32 export.")
    target = Path(output) if output else parent.with_name(f"{_stem(parent)}.{'.'.join(steps)}.onnx")
    if target.resolve() == parent.resolve():
        raise UsageError(f"The derived model would overwrite its fp32 parent {str(parent)!r}; choose another "
                         "output path.")
    notes: list[str] = []

    def note(message: str) -> None:
        """Tell the user now (``warn``) and keep it in the result."""
        notes.append(message)
        tell(message)

    calibration_set: CalibrationSet | None = None
    calib: np.ndarray | None = None
    calib_files: list[Path] = []
    if "int8" in steps:
        say("Reading calibration images")
        calib, calibration_set, calib_files = _calibration_data(card, calibration, max_images, note)

    import onnx

    from deploykit.images import bundled_images

    used = set(calib_files)
    reference = _reference(parent, card, calib, [p for p in bundled_images() if p.resolve() not in used])
    with tempfile.TemporaryDirectory(prefix="deploykit-optimize-") as scratch:

        def derive(seven_bit: bool) -> tuple[Path, dict[str, Any], Agreement | None]:
            """Run the steps into a folder of their own; the result, its method record and its agreement."""
            folder = Path(scratch) / f"reduce-range-{int(seven_bit)}"
            folder.mkdir()
            current, record = parent, {}
            for step in steps:
                produced = folder / f"{step}.onnx"
                if step == "int8":
                    say("Quantizing to int8 (pre-processing, calibration)"
                        + (" with 7-bit weights" if seven_bit and reduce_range is None else ""))
                    assert calib is not None
                    # Equal batch sizes always: the histogram calibrators stack per-batch outputs.
                    batches = _batches(calib, _input_batch(card, CALIBRATION_BATCH), static=True)
                    record = _quantize_int8(current, produced, card, batches, method=method.lower(),
                                            reduce_range=seven_bit, scratch=folder, note=note)
                elif step == "fp16":
                    say("Converting to fp16")
                    record = _convert_fp16(current, produced, note)
                else:
                    say("Optimizing the graph with ONNX Runtime")
                    _optimize_graph(current, produced)
                current = produced
            say("Comparing with the fp32 model")
            return current, record, _agreement(reference, current, card)

        current, method_record, agreement = derive(bool(reduce_range))
        if "int8" in steps and reduce_range is None and agreement is not None \
                and agreement.top1 < RETRY_REDUCE_RANGE_BELOW:
            retried = derive(True)
            if retried[2] is not None and retried[2].top1 > agreement.top1:
                note(f"8-bit weights kept {agreement.top1:.1%} top-1 agreement with fp32 on this CPU (x86 "
                     f"int8 kernels without VNNI can saturate on them); 7-bit weights keep "
                     f"{retried[2].top1:.1%}, so the model has 7-bit weights (reduce_range).")
                current, method_record, agreement = retried
        precision_out = "int8" if "int8" in steps else "fp16" if "fp16" in steps else card.precision
        derived = _derived_card(card, current, precision_out, parent=parent, agreement=agreement,
                                calibration=calibration_set, method=method_record or None)
        proto = onnx.load(str(current))
        write_card(proto, derived)
        say(f"Writing {target}")
        with atomic_path(target) as tmp:
            onnx.save_model(proto, str(tmp))
    return OptimizeResult(path=target, parent=parent, steps=steps, precision=precision_out,
                          size_bytes=target.stat().st_size, parent_size_bytes=parent.stat().st_size,
                          seconds=time.perf_counter() - started, card=derived, agreement=agreement,
                          calibration=calibration_set, method=method_record or None, warnings=tuple(notes))


def _stem(path: Path) -> str:
    return path.name[: -len(".onnx")] if path.name.lower().endswith(".onnx") else path.name


def _input_batch(card: ModelCard, default: int) -> int:
    first = card.input.shape[0] if card.input.shape else default
    return first if isinstance(first, int) else default


def _calibration_data(card: ModelCard, folder: str | Path | None, max_images: int,
                      note: Callback) -> tuple[np.ndarray, CalibrationSet, list[Path]]:
    """Decode and preprocess the calibration images into batches the model accepts.

    Decoded as ``deploykit serve`` decodes by default (``load_tensor``: a large photo at the size the model
    needs), so int8 ranges come from the inputs the served model sees, and a folder of phone photos is
    read several times faster.
    """
    from deploykit.images import InvalidImageError, bundled_images, load_tensor

    if folder is None:
        files = bundled_images()
        if not files:
            raise UsageError("No calibration images: pass --calibration DIR with images from your domain.")
        source = "bundled example images"
        message = ("Calibrating int8 on the bundled example images; pass --calibration DIR with a few "
                   "hundred images from your own domain for accurate int8 ranges.")
        note(message)
    else:
        files = calibration_files(folder)
        source = str(folder)
    if len(files) > max_images:
        picks = np.linspace(0, len(files) - 1, max_images).round().astype(int)
        files = [files[i] for i in sorted(set(picks.tolist()))]
        note(f"Using {len(files)} evenly spaced images of the calibration folder (max_images).")
    tensors: list[np.ndarray] = []
    digests: list[str] = []
    used: list[Path] = []
    bad: list[str] = []
    for file in files:
        try:
            data = file.read_bytes()
            tensors.append(load_tensor(data, card.preprocess))
        except (OSError, InvalidImageError) as exc:
            bad.append(f"{file.name} ({exc.strerror if isinstance(exc, OSError) else exc.message})")
            continue
        digests.append(hashlib.sha256(data).hexdigest())
        used.append(file.resolve())
    if not tensors:
        raise CalibrationError(f"None of the {len(files)} images in {source} could be read, e.g. {bad[0]}.",
                               hint="Pass --calibration with a folder of readable JPEG/PNG images.")
    if bad:
        message = f"Skipped {len(bad)} unreadable calibration image(s), e.g. {bad[0]}."
        note(message)
    # Order-independent: the digest of the sorted per-file digests, so renaming or moving files keeps it.
    digest = hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()
    return np.stack(tensors), CalibrationSet(len(tensors), digest, source, skipped=len(bad)), used


def _batches(array: np.ndarray, size: int, *, static: bool) -> list[np.ndarray]:
    """Split into batches of ``size``; with a static batch dimension the last one is padded by repetition."""
    out = []
    for start in range(0, len(array), size):
        chunk = array[start:start + size]
        if static and len(chunk) < size:
            chunk = np.resize(chunk, (size, *chunk.shape[1:]))
        out.append(np.ascontiguousarray(chunk))
    return out


def _run_probabilities(predictor: Predictor, images: np.ndarray, card: ModelCard) -> np.ndarray:
    """Probabilities for every image, batched as the model accepts; padding rows are dropped."""
    static = isinstance(card.input.shape[0], int)
    batches = _batches(images, _input_batch(card, CALIBRATION_BATCH), static=static)
    return np.concatenate([predictor.probabilities(b) for b in batches])[: len(images)]


def _reader_class(base: type) -> type:
    """A ``CalibrationDataReader`` subclass over batches (made here because onnxruntime loads lazily)."""
    return type("CalibrationReader", (_Reader, base), {})


class _Reader:
    """Feeds preprocessed batches to ONNX Runtime's calibrator, one ``{input: batch}`` at a time."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        self.input_name = input_name
        self.batches = batches
        self._iter: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._iter = iter(self.batches)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime.quantization logs advice through the root logger and its histogram calibrators print();
    keep both off the terminal, and above all off stdout, which may carry ``--json``."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _quantize_int8(source: Path, target: Path, card: ModelCard, batches: Sequence[np.ndarray], *, method: str,
                   reduce_range: bool, scratch: Path, note: Callback) -> dict[str, Any]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = scratch / "preprocessed.onnx"
    with _quiet():
        try:
            quant_pre_process(str(source), str(prepared))
        except Exception as exc:  # symbolic shape inference raises assorted errors on unusual graphs
            note(f"Symbolic shape inference failed ({type(exc).__name__}); pre-processed without it.")
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        reader = _reader_class(CalibrationDataReader)(card.input.name, batches)
        calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                     "percentile": CalibrationMethod.Percentile}[method]
        quantize_static(str(prepared), str(target), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        reduce_range=reduce_range, calibrate_method=calibrate)
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "per_channel": True,
            "weight_type": "QInt8", "activation_type": "QUInt8", "reduce_range": reduce_range,
            "calibrate_method": calibrate.name, "pre_processed": True}


def _convert_fp16(source: Path, target: Path, note: Callback) -> dict[str, Any]:
    import onnx

    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        from deploykit.errors import MissingExtraError

        raise MissingExtraError("onnxconverter-common", "torch") from exc
    # The converter warns once per weight it clamps into fp16's range; count them into one note instead.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = float16.convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    clamped = sum("truncated" in str(w.message) for w in caught)
    if clamped:
        note(f"fp16: weights outside the fp16 range were clamped to +-1e-7 or +-1e4 ({clamped} warnings "
             "from the converter); check the agreement.")
    onnx.save_model(model, str(target))
    return {"tool": "onnxconverter_common.float16.convert_float_to_float16", "keep_io_types": True}


def _optimize_graph(source: Path, target: Path) -> None:
    from deploykit.runtime import SessionOptions, create_session

    create_session(source, SessionOptions(optimization=OPTIMIZATION_LEVEL, optimized_model_path=str(target)))


def _predictor(path: Path, card: ModelCard) -> Predictor:
    from deploykit.runtime import Predictor

    return Predictor.open(path, card=card)


def _reference(parent: Path, card: ModelCard, calibration: np.ndarray | None,
               extra_images: Sequence[Path]) -> tuple[np.ndarray, np.ndarray] | None:
    """The check images (the calibration plus the bundled images) and the parent's probabilities on them,
    computed once for every derived candidate; None without images."""
    from deploykit.images import InvalidImageError, load_tensor

    tensors = list(calibration) if calibration is not None else []
    for file in extra_images:
        with contextlib.suppress(InvalidImageError, OSError):
            tensors.append(load_tensor(file.read_bytes(), card.preprocess))
    if not tensors:
        return None
    images = np.stack(tensors)
    return images, _run_probabilities(_predictor(parent, card), images, card)


def _agreement(reference: tuple[np.ndarray, np.ndarray] | None, derived: Path,
               card: ModelCard) -> Agreement | None:
    """Top-1/top-5 agreement and max probability difference with the parent on the check images."""
    from deploykit.compare import topk_agreement

    if reference is None:
        return None
    images, pa = reference
    pb = _run_probabilities(_predictor(derived, card), images, card)
    top1, top5 = topk_agreement(pb, pa)
    return Agreement(top1=top1, top5=top5, max_abs_prob_diff=float(np.abs(pa - pb).max()),
                     images=int(len(pa)))


def _derived_card(card: ModelCard, model_path: Path, precision: str, *, parent: Path,
                  agreement: Agreement | None, calibration: CalibrationSet | None,
                  method: dict[str, Any] | None) -> ModelCard:
    """The parent's card with the new precision, a quantization record and a fingerprint of this model."""
    seed = card.fingerprint.seed if card.fingerprint else DEFAULT_SEED
    batch = card.fingerprint.batch if card.fingerprint else _input_batch(card, DEFAULT_BATCH)
    predictor = _predictor(model_path, card)
    output = np.asarray(predictor.run(fingerprint_input(card.preprocess, seed, batch))[0], dtype=np.float32)
    parent_atol = card.fingerprint.atol if card.fingerprint else 1e-3
    if precision == "int8":
        # Integer kernels differ across CPUs (VNNI, AVX2's saturating int16 path, ARM dot products) by a few
        # quantization steps of the output; tie the tolerance to the output's own step size.
        step = _output_step(model_path) or float(np.ptp(output)) / 255.0
        atol, rtol, reference = max(4.0 * step, parent_atol), 1e-2, "onnxruntime-int8"
    elif precision == "fp16":
        atol, rtol, reference = max(parent_atol, 2e-3 * float(np.abs(output).max())), 1e-2, "onnxruntime-fp16"
    else:
        rtol = card.fingerprint.rtol if card.fingerprint else 1e-3
        atol, reference = parent_atol, "onnxruntime"
    fingerprint = make_fingerprint(output, seed=seed, atol=atol, rtol=rtol, reference=reference)
    quantization = None
    if precision != card.precision:
        quantization = {
            "precision": precision,
            "calibration": calibration.to_dict() if calibration else None,
            "parent": {"path": str(parent), "sha256": sha256_file(parent)},
            "agreement": agreement.to_dict() if agreement else None,
            "method": method,
        }
    return card.replace(precision=precision, fingerprint=fingerprint, quantization=quantization)


def _output_step(path: Path) -> float | None:
    """The scale of the DequantizeLinear that produces the first graph output, if there is one."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    output = model.graph.output[0].name
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and output in node.output and node.input[1] in inits:
            return float(np.max(numpy_helper.to_array(inits[node.input[1]])))
    return None
