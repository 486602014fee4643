"""The numerical tolerance rule shared by export's check, verify and the fingerprint. No torch."""

from __future__ import annotations

import math

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
