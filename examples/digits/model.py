"""DigitNet: a small one-channel (grayscale) CNN that classifies the synthetic digits of ``data.py``.

``build()`` is a deploykit model factory, e.g. ``deploykit export examples/digits/model.py:build``: it returns
the trained network in eval mode with its labels and preprocessing in ``model.deploykit_meta``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

WEIGHTS = Path(__file__).with_name("digits.pt")


def _load_data_module() -> ModuleType:
    """Import the sibling ``data.py`` by path, so this file works however it was loaded."""
    name = "deploykit_examples_digits_data"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("data.py"))
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


LABELS: list[str] = list(_load_data_module().CLASSES)

# Converted to one grayscale channel with Pillow's convert("L") (ITU-R 601 luma, as torchvision's
# Grayscale()), resized straight to ``height`` x ``width`` (``resize`` None: no aspect-preserving resize and
# crop; PIL bilinear, as Resize((28, 28))), pixels (0..255) times ``scale``, normalised with the one-value
# ``mean``/``std``, NCHW float32 of shape (N, 1, 28, 28). train.py uses exactly this pipeline.
PREPROCESS: dict[str, Any] = {
    "height": 28,
    "width": 28,
    "resize": None,
    "interpolation": "bilinear",
    "channels": 1,
    "channel_order": "L",
    "mean": [0.5],
    "std": [0.5],
    "scale": 1.0 / 255.0,
}


def _block(cin: int, cout: int) -> nn.Sequential:
    """3x3 conv, BatchNorm, ReLU, 2x2 max-pool."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class DigitNet(nn.Module):
    """Three conv blocks (28 -> 14 -> 7 -> 3), global average pool and a linear layer; returns raw logits.

    The first convolution takes one input channel: the network sees grayscale images only.
    """

    deploykit_meta: dict[str, Any]  # labels/preprocess/name, set by build()

    def __init__(self, num_classes: int = len(LABELS), widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1  # one grayscale channel: PREPROCESS["channels"]
        for width in widths:
            layers.append(_block(cin, width))
            cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def build(pretrained: bool = True) -> nn.Module:
    """DigitNet in eval mode, with the trained ``digits.pt`` weights unless ``pretrained`` is False."""
    model = DigitNet()
    if pretrained:
        if not WEIGHTS.is_file():
            raise FileNotFoundError(f"{WEIGHTS} is missing; train it with {WEIGHTS.with_name('train.py')}.")
        model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    model.eval()
    model.deploykit_meta = {"labels": list(LABELS), "preprocess": dict(PREPROCESS), "name": "digits"}
    return model
