"""Comparing model outputs: the tolerance rule and top-k agreement shared by export, verify and optimize.

No torch; NumPy only where needed."""

from __future__ import annotations

import math
from typing import Any

# float32 cannot agree better than about this fraction of the outputs' magnitude.
FP32_RELATIVE_FLOOR = 1e-5


def effective_atol(atol: float, scale: float) -> float:
    """The absolute tolerance for outputs whose largest magnitude is ``scale``.

    ``atol`` is meant for logits of ordinary size. Random-weight models can produce outputs of 1e-14
    (efficientnet_b0), where any atol passes vacuously, or of 1e12 (inception_v3), where float32 rounding
    alone exceeds it. So below 1 the tolerance shrinks with the outputs, and above 1 it never drops under
    what float32 can resolve at that magnitude.
    """
    if not math.isfinite(scale) or scale == 0:
        return atol
    if scale < 1:
        return atol * scale
    return max(atol, FP32_RELATIVE_FLOOR * scale)


def topk_agreement(candidate: Any, reference: Any, k: int = 5) -> tuple[float, float]:
    """(top-1, top-k) agreement of two (N, C) score arrays.

    top-1: share of rows where both pick the same class. top-k: share of rows where the reference's top-1
    class is among the candidate's top k (top-k accuracy with the reference as ground truth).
    """
    import numpy as np

    cand = np.asarray(candidate)
    ref = np.asarray(reference)
    k = min(k, cand.shape[1])
    ref_top1 = ref.argmax(axis=1)
    cand_topk = np.argsort(-cand, axis=1, kind="stable")[:, :k]
    top1 = float(np.mean(cand.argmax(axis=1) == ref_top1))
    topk = float(np.mean((cand_topk == ref_top1[:, None]).any(axis=1)))
    return top1, topk
