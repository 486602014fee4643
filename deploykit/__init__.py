"""deploykit: from a trained PyTorch model to a verified, served, monitored ONNX endpoint.

The public API is re-exported lazily so that ``import deploykit`` stays cheap and never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "export_model": "deploykit.export",
    "ExportResult": "deploykit.export",
    "verify_model": "deploykit.verify",
    "ParityReport": "deploykit.verify",
    "inspect_model": "deploykit.inspect",
    "ModelCard": "deploykit.card",
    "read_card": "deploykit.card",
    "Predictor": "deploykit.runtime",
    "create_app": "deploykit.serve.app",
    "PredictClient": "deploykit.client",
    "predict_images": "deploykit.predict",
    "package_model": "deploykit.package",
    "DeployKitError": "deploykit.errors",
    "ExitCode": "deploykit.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deploykit' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
