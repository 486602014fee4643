"""Render the bundled example images: two 160x120 RGB JPEGs per digit, named ``<label>_<n>.jpg``.

Usage: ``python examples/digits/make_images.py [--seed S] [--out DIR]``. The seed differs from the training
and test seeds; the images are in colour (the model converts them to grayscale) and the non-square size
exercises the exact resize to 28x28.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import CLASSES, render  # noqa: E402

SIZE = (160, 120)  # width, height
PER_CLASS = 2


def make_images(out: Path, seed: int) -> list[Path]:
    """Write ``PER_CLASS`` images of every class into ``out`` (each atomically) and return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for label in CLASSES:
        for n in range(1, PER_CLASS + 1):
            path = out / f"{label}_{n}.jpg"
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                render(label, rng, SIZE).save(tmp, format="JPEG", quality=90)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=2024, help="render seed (default 2024)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().with_name("images"),
                        help="output folder (default images/ next to this script)")
    args = parser.parse_args(argv)
    for path in make_images(args.out, args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
