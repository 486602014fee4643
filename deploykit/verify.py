"""``verify_model``: does an exported ONNX file compute what its source model computes, here and now?

Checks, in report order (``docs/verify.md`` documents each and the JSON schema):

- ``checker``: ``onnx.checker`` with full shape inference.
- ``runtime``: the file loads in ONNX Runtime with each requested provider.
- ``card``: the graph's input/output names, shapes and dtypes match the model card.
- ``source``: the reference model could be rebuilt (a checkpoint's sha256 still matches the card).
- ``batch``: ONNX Runtime runs every requested batch size and returns that many rows.
- ``random@N``: ONNX vs reference on seeded random tensors at batch N.
- ``images``: ONNX on real images preprocessed as the card says, vs the reference on the same images
  preprocessed as the *source* says (so a wrong mean/std in the card shows up here). Images are decoded in
  full, as torchvision does; the check also reports, for information, how the inputs and the ONNX top-1
  change when the images are decoded fast, as ``deploykit serve`` and ``predict`` do by default.
- ``fingerprint``: the card's fingerprint reproduces (no torch; the numeric check of ``fingerprint_only``).

torch is imported lazily and only for a PyTorch reference; the fingerprint path never imports it.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploykit.card import ModelCard, Preprocess, TensorSpec, card_from_metadata, load_onnx
from deploykit.compare import effective_atol, topk_agreement
from deploykit.errors import ModelFileError, ModelNotFoundError, UsageError, VerificationError, one_line
from deploykit.fingerprint import check_fingerprint, fingerprint_input

if TYPE_CHECKING:
    import onnxruntime as ort

    from deploykit.sources import LoadedModel

SCHEMA = "deploykit.verify/1"
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
DEFAULT_BATCH_SIZES = (1, 4)
VERIFY_SEED = 1234
MAX_IMAGES = 32
LATENCY_RUNS = 5
TWO_GB = 2**31
Progress = Callable[[str], None]

@dataclass(frozen=True)
class OutputDiff:
    """Figures for one output of one parity check (candidate ONNX vs reference)."""

    name: str
    shape: tuple[int, ...]
    reference_shape: tuple[int, ...]
    dtype: str
    reference_dtype: str
    max_abs_diff: float
    max_rel_diff: float
    mean_abs_diff: float
    fraction_outside_tolerance: float
    worst_excess: float
    top1_agreement: float | None
    top5_agreement: float | None
    within_tolerance: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "reference_shape": list(self.reference_shape),
            "dtype": self.dtype,
            "reference_dtype": self.reference_dtype,
            "max_abs_diff": _num(self.max_abs_diff),
            "max_rel_diff": _num(self.max_rel_diff),
            "mean_abs_diff": _num(self.mean_abs_diff),
            "fraction_outside_tolerance": _num(self.fraction_outside_tolerance),
            "worst_excess": _num(self.worst_excess),
            "top1_agreement": _num(self.top1_agreement),
            "top5_agreement": _num(self.top5_agreement),
            "within_tolerance": self.within_tolerance,
        }


@dataclass(frozen=True)
class DecodeDiff:
    """Information only: the images check's images decoded fast (at the size the model needs, as ``serve``
    and ``predict`` decode by default) vs in full (what parity is checked on), both preprocessed as the card
    says. ``differing`` counts the images whose input changed (those large enough to be decoded reduced);
    the differences are in the model's normalised input units; ``top1_agreement`` is the share of images on
    which the ONNX model's top-1 class is the same."""

    images: int
    differing: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "differing": self.differing, "max_abs_diff": _num(self.max_abs_diff),
                "mean_abs_diff": _num(self.mean_abs_diff), "top1_agreement": _num(self.top1_agreement)}

    def __str__(self) -> str:
        if not self.differing:
            return (f"fast decode = exact on all {self.images} images (none large enough to be decoded "
                    "reduced)")
        top1 = "" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.1%}"
        return (f"fast vs exact decode: inputs differ on {self.differing} of {self.images} images (max abs "
                f"diff {self.max_abs_diff:.3g}, mean {self.mean_abs_diff:.3g}){top1} (information only)")


@dataclass(frozen=True)
class Check:
    """One check of a report. ``status`` is ``passed``, ``failed`` or ``skipped``; only ``failed`` fails."""

    name: str
    kind: str
    status: str
    detail: str
    provider: str | None = None
    input: dict[str, Any] | None = None
    outputs: tuple[OutputDiff, ...] = ()
    metric: str | None = None
    value: float | None = None
    limit: float | None = None
    excess: float | None = None
    fingerprint: dict[str, Any] | None = None
    fast_decode: DecodeDiff | None = None

    @property
    def passed(self) -> bool:
        return self.status != "failed"

    def to_dict(self) -> dict[str, Any]:
        first = self.outputs[0] if self.outputs else None
        return {
            "name": self.name,
            "kind": self.kind,
            "status": self.status,
            "passed": self.passed,
            "detail": self.detail,
            "provider": self.provider,
            # the images check: how its inputs change when decoded fast, beside how they were made
            "input": {**(self.input or {}), "fast_decode": self.fast_decode.to_dict()} if self.fast_decode
            else self.input,
            "top1_agreement": _num(first.top1_agreement) if first else None,
            "top5_agreement": _num(first.top5_agreement) if first else None,
            "outputs": [o.to_dict() for o in self.outputs],
            "metric": self.metric,
            "value": _num(self.value),
            "limit": _num(self.limit),
            "excess": _num(self.excess),
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True)
class Latency:
    """Information only: median batch-1 latency of the reference and of ONNX Runtime. Never a pass/fail."""

    batch: int
    runs: int
    reference: str
    reference_ms: float
    onnx_ms: float
    provider: str

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "runs": self.runs, "reference": self.reference,
                "reference_ms": round(self.reference_ms, 3), "onnx_ms": round(self.onnx_ms, 3),
                "provider": self.provider}

    def __str__(self) -> str:
        return (f"latency at batch {self.batch} (median of {self.runs}, information only): {self.reference} "
                f"{self.reference_ms:.2f} ms, ONNX Runtime [{self.provider}] {self.onnx_ms:.2f} ms")


@dataclass(frozen=True)
class ParityReport:
    """The outcome of ``verify_model``; truthy when every check passed."""

    model: str
    name: str
    mode: str
    reference: str
    atol: float
    rtol: float
    tolerance_gated: bool
    min_top1_agreement: float | None
    providers: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    checks: tuple[Check, ...]
    latency: Latency | None = None
    notes: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def failed_checks(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def check(self, name: str) -> Check:
        """The check called ``name`` (``KeyError`` if there is none)."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def verdict(self) -> str:
        """One line: passed, or the first failing check, why and by how much."""
        failed = self.failed_checks
        if not failed:
            return f"verification passed: {len(self.checks)} checks against {self.reference}"
        more = f" (and {len(failed) - 1} more failed check{'s' if len(failed) > 2 else ''}: " \
               f"{', '.join(c.name for c in failed[1:])})" if len(failed) > 1 else ""
        return f"verification failed: {failed[0].name}: {failed[0].detail}{more}"

    def to_dict(self) -> dict[str, Any]:
        failed = self.failed_checks
        first = failed[0] if failed else None
        return {
            "schema": SCHEMA,
            "model": self.model,
            "name": self.name,
            "passed": self.passed,
            "mode": self.mode,
            "reference": self.reference,
            "tolerance": {"atol": self.atol, "rtol": self.rtol, "gated": self.tolerance_gated,
                          "min_top1_agreement": self.min_top1_agreement},
            "providers": list(self.providers),
            "batch_sizes": list(self.batch_sizes),
            "checks": [c.to_dict() for c in self.checks],
            "latency": self.latency.to_dict() if self.latency else None,
            "verdict": {
                "passed": self.passed,
                "message": self.verdict,
                "failed_check": first.name if first else None,
                "failed_checks": [c.name for c in failed],
                "metric": first.metric if first else None,
                "value": _num(first.value) if first else None,
                "limit": _num(first.limit) if first else None,
                "excess": _num(first.excess) if first else None,
            },
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }

    def __str__(self) -> str:
        mark = {"passed": "ok  ", "failed": "FAIL", "skipped": "skip"}
        lines = [f"Verify {self.model} ({self.name}) against {self.reference}"]
        for c in self.checks:
            lines.append(f"  {mark[c.status]} {c.name:<14} {c.detail}")
            if c.fast_decode:
                lines.append(f"  info {'decode':<14} {c.fast_decode}")
        if self.latency:
            lines.append(f"  info {'latency':<14} {self.latency}")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(("PASSED: " if self.passed else "FAILED: ") + self.verdict)
        return "\n".join(lines)


def _num(value: float | None) -> float | None:
    """JSON-safe number: NaN and infinities become null."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


# ----------------------------------------------------------------------------------------------------------
# References: what the candidate ONNX model is compared with.


@dataclass
class _Reference:
    """Something that maps an input batch to named outputs: a PyTorch module or another ONNX session."""

    description: str
    label: str
    preprocess: Preprocess
    run: Callable[[np.ndarray], list[np.ndarray]]
    names: list[str] | None = None
    fixed_batch: int | None = None
    notes: list[str] = field(default_factory=list)


def _torch_available() -> bool:
    """torch and torchvision importable (a finder that hides torch raises ImportError: also "absent")."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in ("torch", "torchvision"))
    except (ImportError, ValueError):
        return False


def _torch_outputs(result: Any) -> list[np.ndarray]:
    """Flatten what a module returns (tensor, tuple/list, dict, object with ``.logits``) to NumPy arrays."""
    import torch

    if isinstance(result, torch.Tensor):
        return [result.detach().cpu().numpy()]
    if isinstance(result, (tuple, list)):
        return [a for item in result for a in _torch_outputs(item)]
    if isinstance(result, dict):
        return [a for item in result.values() for a in _torch_outputs(item)]
    logits = getattr(result, "logits", None)
    if isinstance(logits, torch.Tensor):
        return [logits.detach().cpu().numpy()]
    raise VerificationError(f"The PyTorch reference returned {type(result).__name__}, not tensors.")


def _declared_preprocess(loaded: LoadedModel) -> Preprocess | None:
    """The preprocessing the source itself declares, or None when the card is the only authority.

    A factory or pickled module declares it in ``deploykit_meta``; torchvision pretrained weights declare
    it in their transforms, timm pretrained weights in their data config, a Hugging Face model in its image
    processor. Random (``none``) weights, bare state dicts and TorchScript declare nothing.
    """
    meta = getattr(loaded.module, "deploykit_meta", None)
    if isinstance(meta, dict) and meta.get("preprocess"):
        return loaded.preprocess
    src = loaded.source
    if src.kind in ("torchvision", "timm") and src.weights not in (None, "none", "file") or src.kind == "hf":
        return loaded.preprocess
    return None


def _image_preprocess(card_pp: Preprocess, declared: Preprocess | None) -> Preprocess:
    """The reference's preprocessing: the card's geometry with the source's declared pixel normalisation.

    Geometry (crop, resize, interpolation) is a legitimate export choice (``--input-size``); normalisation is
    a property of how the model was trained, so the source's declaration wins over the card's.
    """
    if declared is None or declared.channels != card_pp.channels:  # the card's channels are the model's own
        return card_pp
    return replace(card_pp, mean=declared.mean, std=declared.std, scale=declared.scale,
                   channel_order=declared.channel_order)


def _describe_source(loaded: LoadedModel) -> str:
    s = loaded.source
    if s.kind == "torchvision":
        weights = f"weights {s.weights}" + (f", seed {s.seed}" if s.weights == "none" else "")
        return f"PyTorch torchvision {s.name} ({weights})"
    if s.kind == "factory":
        return f"PyTorch factory {s.name}" + (f" (weights {s.path})" if s.path else "")
    if s.kind == "checkpoint":
        return f"PyTorch checkpoint {s.path} (arch {s.arch})"
    if s.kind == "timm":
        weights = str(s.path) if s.weights == "file" else str(s.weights)
        weights += f", seed {s.seed}" if s.weights == "none" else ""
        return f"PyTorch timm {s.name} (weights {weights})"
    if s.kind == "hf":
        return f"PyTorch Hugging Face Transformers {s.path or s.name}"
    return f"PyTorch {s.kind} {s.path or s.name}"


def _torch_reference(loaded: LoadedModel, card_pp: Preprocess) -> _Reference:
    import torch

    module = loaded.module

    def run(x: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            return _torch_outputs(module(torch.from_numpy(x)))

    declared = _declared_preprocess(loaded)
    ref = _Reference(_describe_source(loaded), "PyTorch eager", _image_preprocess(card_pp, declared), run)
    if declared is None:
        ref.notes.append("the source declares no preprocessing, so the reference sees images preprocessed as "
                         "the card says")
    return ref


def _onnx_reference(path: Path, card: ModelCard, provider: str) -> _Reference:
    from deploykit.runtime import SessionOptions, create_session

    if not path.is_file():
        raise ModelNotFoundError(f"--against {str(path)!r} does not exist.", hint="Check the path.")
    session = create_session(path, SessionOptions(providers=(provider,)))
    notes = []
    try:
        other = card_from_metadata(session.get_modelmeta().custom_metadata_map, origin=str(path))
        pp = other.preprocess
    except ModelFileError:
        pp = card.preprocess
        notes.append(f"{path.name} has no model card; its images are preprocessed as this model's card says")
    names = [o.name for o in session.get_outputs()]
    input_name = session.get_inputs()[0].name
    dim0 = session.get_inputs()[0].shape[0]

    def run(x: np.ndarray) -> list[np.ndarray]:
        return list(session.run(names, {input_name: x}))

    ref = _Reference(f"ONNX {path}", f"ONNX Runtime ({path.name})", pp, run, names=names,
                     fixed_batch=dim0 if isinstance(dim0, int) else None)
    ref.notes.extend(notes)
    return ref


# ----------------------------------------------------------------------------------------------------------
# Comparison.


def _compare(name: str, actual: np.ndarray, expected: np.ndarray, *, atol: float, rtol: float) -> OutputDiff:
    """Element-wise figures and, for (N, C) classifier outputs, top-1/top-5 agreement."""
    a = np.asarray(actual)
    e = np.asarray(expected)
    base = dict(name=name, shape=tuple(a.shape), reference_shape=tuple(e.shape), dtype=str(a.dtype),
                reference_dtype=str(e.dtype))
    if a.shape != e.shape:
        inf = float("inf")
        return OutputDiff(**base, max_abs_diff=inf, max_rel_diff=inf, mean_abs_diff=inf,  # type: ignore[arg-type]
                          fraction_outside_tolerance=1.0, worst_excess=inf, top1_agreement=None,
                          top5_agreement=None, within_tolerance=False)
    a64 = a.astype(np.float64)
    e64 = e.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a64 - e64)
    same = (a64 == e64) | (np.isnan(a64) & np.isnan(e64))  # equal infinities and matching NaNs agree
    diff = np.where(same, 0.0, diff)
    diff = np.where(np.isnan(diff), np.inf, diff)
    finite = np.abs(np.nan_to_num(e64, nan=0.0, posinf=0.0, neginf=0.0))
    # the same scale-aware rule as export's check: atol follows outputs that are tiny or huge
    allowed = effective_atol(atol, float(finite.max(initial=0.0))) + rtol * finite
    outside = diff > allowed
    size = max(diff.size, 1)
    top1 = top5 = None
    if a.ndim == 2 and a.shape[1] >= 2 and a.shape[0] > 0:
        top1, top5 = topk_agreement(a64, e64)
    return OutputDiff(
        **base,  # type: ignore[arg-type]
        max_abs_diff=float(diff.max(initial=0.0)),
        max_rel_diff=float((diff / np.maximum(np.abs(e64), 1e-12)).max(initial=0.0)),
        mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
        fraction_outside_tolerance=float(np.count_nonzero(outside)) / size,
        worst_excess=float((diff - allowed).max(initial=-np.inf)) if diff.size else 0.0,
        top1_agreement=top1,
        top5_agreement=top5,
        within_tolerance=not bool(outside.any()),
    )


def _pair(names: Sequence[str], actual: Sequence[np.ndarray], ref_names: Sequence[str] | None,
          expected: Sequence[np.ndarray]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Match candidate outputs to reference outputs: by name when the reference has names, else by position.

    A PyTorch module may return more tensors than the exported graph (export keeps the first), so extra
    reference outputs are ignored.
    """
    by_name = dict(zip(ref_names, expected, strict=False)) if ref_names else {}
    pairs = []
    for i, (name, arr) in enumerate(zip(names, actual, strict=True)):
        if name in by_name:
            pairs.append((name, arr, by_name[name]))
        elif i < len(expected):
            pairs.append((name, arr, expected[i]))
    return pairs


def _parity_check(name: str, provider: str | None, info: dict[str, Any], diffs: list[OutputDiff], *,
                  atol: float, rtol: float, gated: bool, min_top1: float | None) -> Check:
    """Turn per-output figures into a pass/fail with the reason and the amount."""
    if not diffs:
        return Check(name, "parity", "failed", "no output could be matched with the reference", provider,
                     info)
    for d in diffs:
        if d.shape != d.reference_shape:
            return Check(name, "parity", "failed", f"output {d.name!r} has shape {list(d.shape)}, the "
                         f"reference {list(d.reference_shape)}", provider, info, tuple(diffs))
    first = diffs[0]
    worst = max(diffs, key=lambda d: d.worst_excess)
    if gated and not worst.within_tolerance:
        detail = (f"output {worst.name!r}: max abs diff {worst.max_abs_diff:.3g} (atol {atol:g}, rtol "
                  f"{rtol:g}); {worst.fraction_outside_tolerance:.1%} of elements exceed the tolerance, the "
                  f"worst by {worst.worst_excess:.3g}")
        return Check(name, "parity", "failed", detail, provider, info, tuple(diffs), "max_abs_diff",
                     worst.max_abs_diff, atol, worst.worst_excess)
    if min_top1 is not None and first.top1_agreement is not None and first.top1_agreement < min_top1:
        detail = (f"output {first.name!r}: top-1 agreement {first.top1_agreement:.1%} is below the required "
                  f"{min_top1:.1%} by {min_top1 - first.top1_agreement:.1%}")
        return Check(name, "parity", "failed", detail, provider, info, tuple(diffs), "top1_agreement",
                     first.top1_agreement, min_top1, min_top1 - first.top1_agreement)
    detail = f"max abs diff {max(d.max_abs_diff for d in diffs):.3g}"
    if first.top1_agreement is not None:
        detail += f", top-1 agreement {first.top1_agreement:.1%}, top-5 {first.top5_agreement:.1%}"
    if not gated and not worst.within_tolerance:
        detail += f" ({worst.fraction_outside_tolerance:.1%} outside atol/rtol, not gated)"
    return Check(name, "parity", "passed", detail, provider, info, tuple(diffs), "max_abs_diff",
                 worst.max_abs_diff, atol if gated else None, None)


# ----------------------------------------------------------------------------------------------------------
# Structural checks.


def _checker(proto: Any, path: Path) -> Check:
    import onnx

    try:
        if proto.ByteSize() > TWO_GB:
            onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        return Check("checker", "structural", "failed", f"onnx.checker: {one_line(exc)}")
    return Check("checker", "structural", "passed", f"onnx.checker passed (opset "
                 f"{max((o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')), default=0)})")


def _graph_tensors(values: Any) -> list[TensorSpec]:
    import onnx

    specs = []
    for v in values:
        t = v.type.tensor_type
        dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                 for d in t.shape.dim]
        specs.append(TensorSpec(v.name, tuple(dims), onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
                                if t.elem_type else "?"))
    return specs


def _card_check(proto: Any, card: ModelCard) -> Check:
    """The graph's real inputs and outputs against what the card promises."""
    initializers = {i.name for i in proto.graph.initializer}
    graph_in = [t for t in _graph_tensors(proto.graph.input) if t.name not in initializers]
    graph_out = _graph_tensors(proto.graph.output)
    problems: list[str] = []
    for kind, declared, actual in (("input", card.inputs, graph_in), ("output", card.outputs, graph_out)):
        found = {t.name: t for t in actual}
        for spec in declared:
            real = found.get(spec.name)
            if real is None:
                problems.append(f"the card's {kind} {spec.name!r} is not in the graph (it has "
                                f"{', '.join(repr(n) for n in found) or 'none'})")
                continue
            problems += _shape_problems(kind, spec, real)
    if len(card.labels) and card.outputs and isinstance(card.output.shape[-1], int) \
            and card.output.shape[-1] != len(card.labels):
        problems.append(f"the card has {len(card.labels)} labels for {card.output.shape[-1]} classes")
    if problems:
        return Check("card", "structural", "failed", "; ".join(problems))
    shapes = ", ".join(f"{t.name} {list(t.shape)}" for t in (*card.inputs, *card.outputs))
    return Check("card", "structural", "passed", f"graph inputs/outputs match the card: {shapes}")


def _shape_problems(kind: str, spec: TensorSpec, real: TensorSpec) -> list[str]:
    problems = []
    if len(spec.shape) != len(real.shape):
        return [f"{kind} {spec.name!r} has shape {list(real.shape)}, the card says {list(spec.shape)}"]
    for axis, (want, have) in enumerate(zip(spec.shape, real.shape, strict=True)):
        if isinstance(want, str) and isinstance(have, int):
            what = "a dynamic batch" if axis == 0 else f"a dynamic axis {axis}"
            problems.append(f"{kind} {spec.name!r}: the card declares {what} but the graph fixes it at "
                            f"{have}")
        elif isinstance(want, int) and want != have:
            problems.append(f"{kind} {spec.name!r} axis {axis} is {have} in the graph, {want} in the card")
    if real.dtype != "?" and spec.dtype != real.dtype:
        problems.append(f"{kind} {spec.name!r} is {real.dtype} in the graph, {spec.dtype} in the card")
    return problems


class _OrtRunner:
    """One ONNX Runtime session; caches outputs per input so checks that share an input run it once."""

    def __init__(self, session: ort.InferenceSession, provider: str) -> None:
        self.session = session
        self.provider = provider
        self.input_name = session.get_inputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]
        dim0 = session.get_inputs()[0].shape[0]
        self.fixed_batch = dim0 if isinstance(dim0, int) else None
        self._cache: dict[int, list[np.ndarray] | str] = {}

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        return list(self.session.run(self.output_names, {self.input_name: x}))

    def try_run(self, key: int, x: np.ndarray) -> list[np.ndarray] | str:
        """Outputs, or the error ONNX Runtime raised as a one-line string."""
        if key not in self._cache:
            try:
                self._cache[key] = self.run(x)
            except Exception as exc:  # onnxruntime's untyped Fail/InvalidArgument/RuntimeException
                if not type(exc).__module__.startswith("onnxruntime"):
                    raise
                self._cache[key] = one_line(exc)
        return self._cache[key]


def _batch_check(runners: list[_OrtRunner], inputs: dict[int, np.ndarray], card: ModelCard,
                 explicit: bool) -> Check:
    sizes = list(inputs)
    if not runners:
        return Check("batch", "structural", "skipped", "no ONNX Runtime session (see runtime)")
    if not card.dynamic_batch and not explicit:
        return Check("batch", "structural", "skipped", f"the card declares a fixed batch of "
                     f"{card.input.shape[0]}; pass --batch-size to test others", input={"batch_sizes": sizes})
    problems = []
    for r in runners:
        for b, x in inputs.items():
            result = r.try_run(b, x)
            where = f" [{r.provider}]" if len(runners) > 1 else ""
            if isinstance(result, str):
                fixed = f"the graph's batch is fixed at {r.fixed_batch}" + (
                    " while the card declares a dynamic batch" if card.dynamic_batch else "") + "; " \
                    if r.fixed_batch is not None and r.fixed_batch != b else ""
                problems.append(f"batch {b}{where} does not run: {fixed}ONNX Runtime says: {result}")
            elif not result or result[0].shape[:1] != (b,):
                got = list(result[0].shape) if result else []
                problems.append(f"batch {b}{where} returned shape {got}, expected {b} rows")
    if problems:
        return Check("batch", "structural", "failed", "; ".join(problems), input={"batch_sizes": sizes})
    return Check("batch", "structural", "passed", f"ran batch sizes {', '.join(map(str, sizes))}",
                 input={"batch_sizes": sizes})


# ----------------------------------------------------------------------------------------------------------
# The entry point.


def verify_model(
    onnx_path: str | Path,
    *,
    against: str | Path | None = None,
    images: str | Path | Sequence[str | Path] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    providers: Sequence[str] = ("cpu",),
    batch_sizes: Sequence[int] | None = None,
    fingerprint_only: bool = False,
    min_top1_agreement: float | None = None,
    arch: str | None = None,
    weights: str | None = None,
    trust_pickle: bool = False,
    seed: int = VERIFY_SEED,
    max_images: int = MAX_IMAGES,
    latency_runs: int = LATENCY_RUNS,
    progress: Progress | None = None,
) -> ParityReport:
    """Check an exported ONNX file structurally and numerically against its reference.

    Args:
        onnx_path: the ``.onnx`` file, with its model card.
        against: the reference instead of the card's source: a MODEL spec as ``export`` takes (with ``arch``,
            ``weights``, ``trust_pickle``) or another ``.onnx`` file (ONNX vs ONNX, e.g. int8 vs fp32).
        images: a folder or image files for the real-image check; default: the bundled example images.
        atol, rtol: element-wise tolerance ``|onnx - ref| <= atol + rtol * |ref|`` (defaults 1e-4 and 1e-3).
            When ``min_top1_agreement`` is given and neither is, the tolerance is reported but not gated.
        providers: ONNX Runtime providers to load and run with (``cpu``, ``cuda``, ...).
        batch_sizes: batch sizes for the batch and random-input checks; default (1, 4), or the fixed batch of
            a card that declares one.
        fingerprint_only: only the structural checks and the card's fingerprint; never imports torch.
        min_top1_agreement: also require this top-1 agreement (0..1) on the real images.
        seed: seed of the random inputs (batch N uses ``seed + N``).
        max_images: at most this many images, spread evenly over the sorted list.

    Raises:
        UsageError: bad values, unavailable provider, no images in ``images``. ModelNotFoundError: the source
        recorded in the card (or ``against``) is gone. ModelFileError: the file is unreadable or has no card.
    """
    started = time.perf_counter()
    say = progress or (lambda _msg: None)
    path = Path(onnx_path)
    explicit_tolerance = atol is not None or rtol is not None
    atol = DEFAULT_ATOL if atol is None else float(atol)
    rtol = DEFAULT_RTOL if rtol is None else float(rtol)
    gated = explicit_tolerance or min_top1_agreement is None
    _validate(atol=atol, rtol=rtol, providers=providers, batch_sizes=batch_sizes,
              min_top1=min_top1_agreement, max_images=max_images, fingerprint_only=fingerprint_only,
              against=against)
    from deploykit.runtime import SessionOptions, create_session, resolve_providers

    resolve_providers(providers)  # an unavailable provider is a usage error, before any work
    notes: list[str] = []
    mode, reference = _choose_mode(against, fingerprint_only, notes)
    paths, origin = _image_paths(images, max_images) if mode != "fingerprint" else ([], "")

    say(f"Reading {path}")
    proto = load_onnx(path)
    card = card_from_metadata({p.key: p.value for p in proto.metadata_props}, origin=str(path))
    checks: list[Check] = [_checker(proto, path)]

    runners: list[_OrtRunner] = []
    for provider in providers:
        say(f"Loading in ONNX Runtime ({provider})")
        try:
            session = create_session(path, SessionOptions(providers=(provider,)))
        except ModelFileError as exc:
            checks.append(Check(f"runtime/{provider}", "structural", "failed", exc.message, provider))
            continue
        used = session.get_providers()
        wanted = resolve_providers((provider,))[0]
        if wanted not in used:
            checks.append(Check(f"runtime/{provider}", "structural", "failed", f"ONNX Runtime fell back to "
                                f"{', '.join(used)} instead of {wanted}", provider))
            continue
        runners.append(_OrtRunner(session, provider))
        checks.append(Check(f"runtime/{provider}", "structural", "passed", f"loads with {wanted}", provider))
    checks.append(_card_check(proto, card))
    del proto  # the weights may be large; sessions hold their own copy

    explicit_batches = batch_sizes is not None
    if batch_sizes is None:
        batch_sizes = DEFAULT_BATCH_SIZES if card.dynamic_batch else (int(card.input.shape[0]),)
    batches = tuple(dict.fromkeys(int(b) for b in batch_sizes))
    inputs = {b: fingerprint_input(card.preprocess, seed + b, b) for b in batches}

    ref: _Reference | None = None
    if mode == "pytorch":
        say("Rebuilding the PyTorch reference")
        ref, source_check = _pytorch_reference(card, against, arch=arch, weights=weights,
                                               trust_pickle=trust_pickle)
        checks.append(source_check)
        if ref is not None:
            reference = ref.description
    elif mode == "onnx":
        say(f"Loading the reference {against}")
        ref = _onnx_reference(Path(str(against)), card, providers[0])
        reference = ref.description
        checks.append(Check("source", "structural", "passed", f"reference {reference} loads", providers[0]))
    if ref is not None:
        notes.extend(ref.notes)

    say("Running batch sizes")
    checks.append(_batch_check(runners, inputs, card, explicit_batches))

    latency = None
    if ref is not None and runners:
        if not paths and min_top1_agreement is not None:
            notes.append("no images, so --min-top1-agreement was applied to the random inputs")
        checks += _random_checks(runners, ref, inputs, say, seed=seed, atol=atol, rtol=rtol, gated=gated,
                                 min_top1=None if paths else min_top1_agreement)
        checks += _images_checks(runners, ref, card, paths, origin, say, atol=atol, rtol=rtol, gated=gated,
                                 min_top1=min_top1_agreement)
        say("Timing batch 1")
        latency = _latency(runners[0], ref, card, latency_runs, seed)
    elif mode == "pytorch" and ref is None:
        notes.append("no parity checks ran: the reference could not be rebuilt (see source)")

    for r in runners:
        say(f"Checking the fingerprint ({r.provider})")
        checks.append(_fingerprint_check(card, r, required=mode == "fingerprint", many=len(runners) > 1))

    return ParityReport(
        model=str(path), name=card.name, mode=mode, reference=reference, atol=atol, rtol=rtol,
        tolerance_gated=gated, min_top1_agreement=min_top1_agreement, providers=tuple(providers),
        batch_sizes=batches, checks=tuple(checks), latency=latency, notes=tuple(notes),
        seconds=time.perf_counter() - started,
    )


def _validate(*, atol: float, rtol: float, providers: Sequence[str], batch_sizes: Sequence[int] | None,
              min_top1: float | None, max_images: int, fingerprint_only: bool,
              against: str | Path | None) -> None:
    if not (0 <= atol < math.inf and 0 <= rtol < math.inf):  # NaN fails every comparison
        raise UsageError(f"--atol and --rtol must be finite, non-negative numbers, got {atol:g} and "
                         f"{rtol:g}.")
    if not providers:
        raise UsageError("Give at least one --provider (for example cpu).")
    if batch_sizes is not None and (not batch_sizes or any(int(b) < 1 for b in batch_sizes)):
        raise UsageError(f"--batch-size values must be at least 1, got {list(batch_sizes)}.")
    if min_top1 is not None and not 0.0 <= min_top1 <= 1.0:
        raise UsageError(f"--min-top1-agreement is a fraction between 0 and 1, got {min_top1:g}.",
                         hint="For 99% pass 0.99.")
    if max_images < 1:
        raise UsageError(f"max_images must be at least 1, got {max_images}.")
    if fingerprint_only and against is not None:
        raise UsageError("--fingerprint checks the model against its own card; it takes no --against.")


def _choose_mode(against: str | Path | None, fingerprint_only: bool, notes: list[str]) -> tuple[str, str]:
    if fingerprint_only:
        return "fingerprint", "the model card's fingerprint"
    if against is not None and str(against).lower().endswith(".onnx"):
        return "onnx", f"ONNX {against}"
    if not _torch_available():
        notes.append("torch is not installed, so the model card's fingerprint was checked instead of parity "
                     "with PyTorch; install deploykit[torch] for the full check")
        if against is not None:
            raise UsageError(f"--against {against!r} needs torch, which is not installed.",
                             hint="Install it with: pip install 'deploykit[torch]', or compare with an .onnx "
                             "file.")
        return "fingerprint", "the model card's fingerprint"
    return "pytorch", "PyTorch"


def _pytorch_reference(card: ModelCard, against: str | Path | None, *, arch: str | None, weights: str | None,
                       trust_pickle: bool) -> tuple[_Reference | None, Check]:
    """Rebuild the reference; a changed checkpoint is a failed ``source`` check, a missing one an error."""
    from deploykit.sources import DEFAULT_SEED, rebuild_source, resolve_source

    try:
        if against is None:
            loaded = rebuild_source(card.source)
        else:
            seed = card.source.seed if card.source.seed is not None else DEFAULT_SEED
            loaded = resolve_source(str(against), arch=arch, weights=weights or "DEFAULT",
                                    trust_pickle=trust_pickle, seed=seed)
    except VerificationError as exc:
        return None, Check("source", "structural", "failed", exc.message)
    ref = _torch_reference(loaded, card.preprocess)
    detail = f"rebuilt {ref.description}"
    if loaded.source.sha256:
        detail += " (sha256 matches the card)" if against is None else \
            f" (sha256 {loaded.source.sha256[:12]})"
    return ref, Check("source", "structural", "passed", detail)


def _image_paths(images: str | Path | Sequence[str | Path] | None, limit: int) -> tuple[list[Path], str]:
    from deploykit.images import bundled_images, iter_image_files

    if images is None:
        paths, origin = bundled_images(), "the bundled example images"
    elif isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.exists():
            raise UsageError(f"--images {str(folder)!r} does not exist.", hint="Pass a folder of images.")
        paths = iter_image_files(folder) if folder.is_dir() else [folder]
        origin = str(folder)
        if not paths:
            raise UsageError(f"--images {str(folder)!r} holds no image files (.jpg, .png, ...).",
                             hint="Pass a folder with a few representative images.")
    else:
        paths, origin = [Path(p) for p in images], "the given images"
    if len(paths) > limit:
        # spread the pick over the sorted list, so every class of a name-sorted folder is represented
        step = len(paths) / limit
        paths = [paths[int(i * step)] for i in range(limit)]
    return paths, origin


def _random_checks(runners: list[_OrtRunner], ref: _Reference, inputs: dict[int, np.ndarray], say: Progress,
                   *, seed: int, atol: float, rtol: float, gated: bool,
                   min_top1: float | None) -> list[Check]:
    checks = []
    for b, x in inputs.items():
        say(f"Comparing on random inputs at batch {b}")
        expected = _reference_run(ref, x)
        for r in runners:
            name = f"random@{b}" + (f"/{r.provider}" if len(runners) > 1 else "")
            info = {"kind": "random", "batch": b, "seed": seed + b}
            if isinstance(expected, str):
                checks.append(Check(name, "parity", "failed", f"the reference failed at batch {b}: "
                                    f"{expected}", r.provider, info))
                continue
            actual = r.try_run(b, x)
            if isinstance(actual, str):
                checks.append(Check(name, "parity", "skipped", f"ONNX Runtime cannot run batch {b} (see "
                                    "batch)", r.provider, info))
                continue
            diffs = [_compare(n, a, e, atol=atol, rtol=rtol)
                     for n, a, e in _pair(r.output_names, actual, ref.names, expected)]
            checks.append(_parity_check(name, r.provider, info, diffs, atol=atol, rtol=rtol, gated=gated,
                                        min_top1=min_top1))
    return checks


def _reference_run(ref: _Reference, x: np.ndarray) -> list[np.ndarray] | str:
    """Reference outputs, in chunks of its fixed batch if it has one; an error as a one-line string."""
    try:
        if ref.fixed_batch is None or ref.fixed_batch == x.shape[0]:
            return ref.run(x)
        return _chunked(ref.run, x, ref.fixed_batch)
    except VerificationError:
        raise
    except Exception as exc:  # torch raises RuntimeError/ValueError/TypeError from user code
        return one_line(exc, with_type=True)


def _chunked(run: Callable[[np.ndarray], list[np.ndarray]], x: np.ndarray, size: int) -> list[np.ndarray]:
    """Run ``x`` in chunks of a fixed batch ``size`` (the last one padded by repetition) and join the rows."""
    parts: list[list[np.ndarray]] = []
    for start in range(0, x.shape[0], size):
        chunk = x[start:start + size]
        real = chunk.shape[0]
        if real < size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - real, axis=0)])
        parts.append([a[:real] for a in run(chunk)])
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def _images_checks(runners: list[_OrtRunner], ref: _Reference, card: ModelCard, paths: list[Path],
                   origin: str, say: Progress, *, atol: float, rtol: float, gated: bool,
                   min_top1: float | None) -> list[Check]:
    """ONNX on card-preprocessed images vs the reference on source-preprocessed images, per provider; each
    with the fast-vs-exact decoding difference (``DecodeDiff``)."""
    from deploykit.images import load_image, load_tensor, preprocess_batch

    if not paths:
        return [Check("images", "parity", "skipped", "no images to check with; pass --images DIR")]
    say(f"Comparing on {len(paths)} images")
    decoded = [load_image(p) for p in paths]
    x_onnx = preprocess_batch(decoded, card.preprocess)
    x_fast = np.stack([load_tensor(p.read_bytes(), card.preprocess) for p in paths])
    x_ref = preprocess_batch(decoded, ref.preprocess)
    info = {"kind": "images", "batch": len(paths), "images": len(paths), "origin": origin,
            "reference_preprocess": "card" if ref.preprocess == card.preprocess else "source"}
    expected = _reference_run(ref, x_ref)
    mismatch = _preprocess_mismatch(card.preprocess, ref.preprocess)
    checks = []
    for r in runners:
        name = "images" + (f"/{r.provider}" if len(runners) > 1 else "")
        if isinstance(expected, str):
            checks.append(Check(name, "parity", "failed", f"the reference failed on the images: {expected}",
                                r.provider, info))
            continue
        try:
            actual = _run_batch(r, x_onnx)
            same = np.array_equal(x_fast, x_onnx)  # small images: fast decoding is exact
            fast = _decode_diff(x_fast, x_onnx, actual[0] if same else _run_batch(r, x_fast)[0], actual[0])
        except Exception as exc:  # onnxruntime's own error types
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            checks.append(Check(name, "parity", "failed",
                                f"ONNX Runtime failed on the images: {one_line(exc)}", r.provider, info))
            continue
        diffs = [_compare(n, a, e, atol=atol, rtol=rtol)
                 for n, a, e in _pair(r.output_names, actual, ref.names, expected)]
        check = _parity_check(name, r.provider, info, diffs, atol=atol, rtol=rtol, gated=gated,
                              min_top1=min_top1)
        check = replace(check, fast_decode=fast)
        if not check.passed and mismatch:
            check = replace(check, detail=f"{check.detail}; the card's preprocessing differs from the "
                            f"source's: {mismatch}")
        checks.append(check)
    return checks


def _run_batch(runner: _OrtRunner, x: np.ndarray) -> list[np.ndarray]:
    """The runner's outputs for ``x``, in chunks of its fixed batch if it has one."""
    return runner.run(x) if runner.fixed_batch in (None, x.shape[0]) else _chunked(runner.run, x,
                                                                                  runner.fixed_batch)


def _decode_diff(x_fast: np.ndarray, x_exact: np.ndarray, out_fast: np.ndarray,
                 out_exact: np.ndarray) -> DecodeDiff:
    """Fast vs exact decoding: input differences per image and the agreement of the first output's top-1."""
    diff = np.abs(x_fast.astype(np.float64) - x_exact.astype(np.float64)).reshape(len(x_fast), -1)
    top1 = None
    if out_exact.ndim == 2 and out_exact.shape[1] >= 2:
        top1, _top5 = topk_agreement(np.asarray(out_fast, np.float64), np.asarray(out_exact, np.float64))
    return DecodeDiff(images=len(x_fast), differing=int(np.count_nonzero(diff.max(axis=1) > 0)),
                      max_abs_diff=float(diff.max(initial=0.0)), mean_abs_diff=float(diff.mean()),
                      top1_agreement=top1)


def _preprocess_mismatch(card_pp: Preprocess, ref_pp: Preprocess) -> str:
    parts = []
    for name in ("mean", "std", "scale", "channel_order"):
        a, b = getattr(card_pp, name), getattr(ref_pp, name)
        if a != b:
            show = (lambda v: [round(x, 4) for x in v]) if isinstance(a, tuple) else (lambda v: v)
            parts.append(f"{name} {show(a)} in the card vs {show(b)}")
    return ", ".join(parts)


def _fingerprint_check(card: ModelCard, runner: _OrtRunner, *, required: bool, many: bool) -> Check:
    name = "fingerprint" + (f"/{runner.provider}" if many else "")
    if card.fingerprint is None:
        status = "failed" if required else "skipped"
        return Check(name, "fingerprint", status, "the model card has no fingerprint", runner.provider)

    def run(x: np.ndarray) -> np.ndarray:
        if runner.fixed_batch not in (None, x.shape[0]):
            return np.asarray(_chunked(runner.run, x, runner.fixed_batch)[0])
        return runner.run(x)[0]

    try:
        result = check_fingerprint(card, run)
    except Exception as exc:  # onnxruntime's own error types
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        return Check(name, "fingerprint", "failed", f"ONNX Runtime failed on the fingerprint input: "
                     f"{one_line(exc)}", runner.provider)
    fp = card.fingerprint
    info = {"kind": "fingerprint", "batch": fp.batch, "seed": fp.seed, "samples": len(fp.indices)}
    if result:
        return Check(name, "fingerprint", "passed", f"reproduces the exporter's outputs (max abs diff "
                     f"{result.max_abs_diff:.3g} over {len(fp.indices)} sampled values, top-1 agreement "
                     f"{result.top1_agreement:.0%})", runner.provider, info, metric="max_abs_diff",
                     value=result.max_abs_diff, limit=result.atol, fingerprint=result.to_dict())
    return Check(name, "fingerprint", "failed", result.reason, runner.provider, info, metric="max_abs_diff",
                 value=result.max_abs_diff, limit=result.atol,
                 excess=result.max_abs_diff - result.atol if math.isfinite(result.max_abs_diff) else None,
                 fingerprint=result.to_dict())


def _latency(runner: _OrtRunner, ref: _Reference, card: ModelCard, runs: int, seed: int) -> Latency | None:
    """Median batch-1 time of each side after one warm-up run; information only."""
    if runs < 1:
        return None
    batch = runner.fixed_batch or 1
    if ref.fixed_batch not in (None, batch):
        return None
    x = fingerprint_input(card.preprocess, seed, batch)

    def median_ms(fn: Callable[[np.ndarray], Any]) -> float:
        fn(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1000.0)
        return statistics.median(times)

    try:
        return Latency(batch, runs, ref.label, median_ms(ref.run), median_ms(runner.run), runner.provider)
    except Exception as exc:  # a failure here was already reported by a parity check; timing is optional
        if type(exc).__module__.startswith(("onnxruntime", "torch")) or isinstance(exc, RuntimeError):
            return None
        raise
