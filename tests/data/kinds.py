"""Test model factories for inputs other than 0..1 RGB (tests/test_input_kinds.py).

``bgr255`` is the trained shapes example behind a front that takes what an OpenCV pipeline gives it: BGR
pixels in 0..255. Its logits on an image equal the shapes model's on the same image, so a channel order or
scale applied wrongly anywhere downstream shows as different predictions. ``gray_net`` and ``rgba_net`` are
untrained, for the export's errors about channels.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

SHAPES_MODEL = Path(__file__).resolve().parents[2] / "examples" / "shapes" / "model.py"


def _shapes() -> nn.Module:
    spec = importlib.util.spec_from_file_location("deploykit_tests_shapes_model", SHAPES_MODEL)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net: nn.Module = module.build()
    return net


class Bgr255(nn.Module):
    """BGR 0..255 in, the shapes model's normalisation (RGB, 0..1, mean 0.5, std 0.25) inside."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = torch.flip(x, dims=[1]) / 255.0
        return self.net((rgb - 0.5) / 0.25)


def bgr255() -> nn.Module:
    shapes = _shapes()
    model = Bgr255(shapes).eval()
    model.deploykit_meta = {"labels": shapes.deploykit_meta["labels"], "name": "shapes-bgr255"}
    return model


def gray_net() -> nn.Module:
    """A one-channel CNN that declares no preprocessing: its source's normalisation is the RGB default."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def rgba_net() -> nn.Module:
    """A CNN whose first layer takes four channels, which no image preprocessing feeds."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
