"""Strict JSON for every document deploykit writes (CLI output, reports, server answers).

JSON has no NaN or infinity; Python's ``json`` writes them as bare ``NaN`` / ``Infinity``, which strict
parsers (JavaScript's ``JSON.parse``, Go, ``jq`` before 1.6) reject. They are written as ``null`` instead.
"""

from __future__ import annotations

import math
from typing import Any


def finite(value: Any) -> Any:
    """``value`` with every float that is not finite (NaN, infinity) replaced by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
