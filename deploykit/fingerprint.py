"""Output fingerprints: record the exporter's outputs for a seeded input, check them later without torch.

``export`` stores a :class:`~deploykit.card.Fingerprint` in the card; ``verify --fingerprint`` and the
server's readiness self-test check that this ONNX Runtime, on this hardware, reproduces it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from deploykit.card import Fingerprint, ModelCard, Preprocess

DEFAULT_SEED = 20240607
DEFAULT_BATCH = 2
SAMPLES = 256
TOPK = 5


def fingerprint_input(pp: Preprocess, seed: int = DEFAULT_SEED, batch: int = DEFAULT_BATCH) -> np.ndarray:
    """The seeded input tensor a fingerprint is computed on; reproducible with NumPy alone."""
    shape = tuple(int(d) for d in pp.input_shape(batch))
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def make_fingerprint(output: np.ndarray, *, seed: int = DEFAULT_SEED, atol: float = 1e-3, rtol: float = 1e-3,
                     reference: str = "pytorch") -> Fingerprint:
    """Summarise a (N, C) reference output: top-k per row and ``SAMPLES`` values at seeded positions."""
    output = np.asarray(output, dtype=np.float32)
    flat = output.reshape(-1)
    count = min(SAMPLES, flat.size)
    indices = np.sort(np.random.default_rng(seed + 1).choice(flat.size, size=count, replace=False))
    k = min(TOPK, output.shape[-1])
    topk = np.argsort(-output.reshape(output.shape[0], -1), axis=-1, kind="stable")[:, :k]
    return Fingerprint(
        seed=seed,
        batch=int(output.shape[0]),
        indices=tuple(int(i) for i in indices),
        values=tuple(float(v) for v in flat[indices]),
        topk=tuple(tuple(int(i) for i in row) for row in topk),
        atol=atol,
        rtol=rtol,
        reference=reference,
    )


@dataclass(frozen=True)
class FingerprintResult:
    """Outcome of a fingerprint check; truthy when it passed."""

    passed: bool
    max_abs_diff: float
    elements_outside: int
    top1_agreement: float
    atol: float
    rtol: float
    reason: str = ""

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "max_abs_diff": self.max_abs_diff if math.isfinite(self.max_abs_diff) else None,  # no NaN in JSON
            "elements_outside_tolerance": self.elements_outside,
            "top1_agreement": self.top1_agreement,
            "atol": self.atol,
            "rtol": self.rtol,
            "reason": self.reason,
        }

    def __str__(self) -> str:
        verdict = "passed" if self.passed else f"FAILED: {self.reason}"
        return (f"fingerprint {verdict} (max abs diff {self.max_abs_diff:.3g}, "
                f"top-1 agreement {self.top1_agreement:.0%})")


def check_fingerprint(card: ModelCard, run: Callable[[np.ndarray], np.ndarray]) -> FingerprintResult:
    """Run the card's fingerprint input through ``run`` (input batch -> first output) and compare.

    Passes when every sampled value is within ``atol + rtol * |reference|`` and each row's reference top-1
    class scores within ``2 * atol`` of the row's best class (ties on random weights are not failures).
    """
    fp = card.fingerprint
    if fp is None:
        return FingerprintResult(False, float("nan"), 0, 0.0, 0.0, 0.0, "the model card has no fingerprint")
    output = np.asarray(run(fingerprint_input(card.preprocess, fp.seed, fp.batch)), dtype=np.float32)
    flat = output.reshape(-1)
    if flat.size <= max(fp.indices, default=-1):
        return FingerprintResult(False, float("inf"), len(fp.indices), 0.0, fp.atol, fp.rtol,
                                 f"output has {flat.size} elements, fingerprint expects more")
    reference = np.asarray(fp.values, dtype=np.float32)
    actual = flat[np.asarray(fp.indices, dtype=np.int64)]
    diff = np.abs(actual - reference)
    # Written so that NaN counts as outside: NaN compares False with everything.
    outside = int(np.count_nonzero(~(diff <= fp.atol + fp.rtol * np.abs(reference))))
    rows = output.reshape(output.shape[0], -1)
    agree = [float(row.max() - row[ref[0]]) <= 2 * fp.atol for row, ref in zip(rows, fp.topk, strict=False)]
    top1 = float(np.mean(agree)) if agree else 0.0
    max_diff = float(diff.max(initial=0.0)) if np.isfinite(diff).all() else float("inf")
    reasons = []
    if outside:
        broken = int(np.count_nonzero(~np.isfinite(actual)))
        reasons.append(f"{outside} of {diff.size} sampled values differ by more than atol {fp.atol:g} + "
                       f"rtol {fp.rtol:g} ("
                       + (f"{broken} are NaN or infinite)" if broken else f"max abs diff {max_diff:.3g})"))
    if top1 < 1.0:
        reasons.append(f"top-1 class differs on {agree.count(False)} of {len(agree)} rows")
    return FingerprintResult(not reasons, max_diff, outside, top1, fp.atol, fp.rtol, "; ".join(reasons))
