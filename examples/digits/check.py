"""Classify the bundled images with the trained model and check each against the label in its file name.

Usage: ``python examples/digits/check.py [IMAGE ...]``; exits 1 if any image is misclassified. The images go
through train.py's torchvision pipeline (grayscale, resize to 28x28, normalise), as in training.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model import LABELS, build  # noqa: E402
from train import preprocess  # noqa: E402

IMAGES = Path(__file__).resolve().with_name("images")


def main(argv: Sequence[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])] or sorted(IMAGES.glob("*.jpg"))
    model = build()
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    with torch.no_grad():
        probs = torch.softmax(model(preprocess(images)), dim=1)
    wrong = 0
    for path, p in zip(paths, probs, strict=True):
        expected = path.stem.rsplit("_", 1)[0]
        predicted = LABELS[int(p.argmax())]
        ok = predicted == expected
        wrong += not ok
        print(f"{'ok ' if ok else 'BAD'} {path.name:10s} -> {predicted} p={float(p.max()):.4f}")
    print(f"{len(paths) - wrong}/{len(paths)} correct")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
