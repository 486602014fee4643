"""``deploykit serve``: a Flask inference server for exported ONNX models.

Modules: :mod:`~deploykit.serve.config` (``ServeConfig``), :mod:`~deploykit.serve.app` (``create_app``),
:mod:`~deploykit.serve.server` (waitress). Nothing is imported here so that ``import deploykit.serve`` stays
cheap; the server never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ServeConfig": "deploykit.serve.config",
    "ModelSpec": "deploykit.serve.config",
    "create_app": "deploykit.serve.app",
    "run_server": "deploykit.serve.server",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deploykit.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
