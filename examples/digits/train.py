"""Train DigitNet on freshly generated digits and save the weights to ``digits.pt``.

Usage: ``python examples/digits/train.py [--epochs N] [--seed S] [--out PATH]``. Runs in well under a
minute on two CPU cores and needs no downloads.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import make_dataset  # noqa: E402
from model import PREPROCESS, WEIGHTS, DigitNet  # noqa: E402


def transform(pp: dict[str, Any] = PREPROCESS) -> transforms.Compose:
    """``pp`` as torchvision transforms on a PIL image: grayscale, exact resize, [0, 1], normalise.

    ``Grayscale()`` is Pillow's ``convert("L")`` and ``Resize((h, w))`` Pillow's bilinear ``resize`` on a PIL
    image; ``ToTensor()`` divides by 255. Only the preprocessing that ``PREPROCESS`` describes is supported.
    """
    expected = {"resize": None, "interpolation": "bilinear", "channels": 1, "channel_order": "L"}
    for key, value in expected.items():
        if pp[key] != value:
            raise ValueError(f"Only {key}={value!r} is implemented, got {pp[key]!r}.")
    if not np.isclose(pp["scale"], 1.0 / 255.0):
        raise ValueError(f"Only scale=1/255 (ToTensor) is implemented, got {pp['scale']!r}.")
    return transforms.Compose([
        transforms.Grayscale(num_output_channels=1),
        transforms.Resize((int(pp["height"]), int(pp["width"])), interpolation=InterpolationMode.BILINEAR),
        transforms.ToTensor(),
        transforms.Normalize(list(pp["mean"]), list(pp["std"])),
    ])


def preprocess(images: Sequence[Image.Image], pp: dict[str, Any] = PREPROCESS) -> torch.Tensor:
    """PIL images (any mode Pillow converts to "L", any size) to a normalised float32 (N, 1, H, W) batch."""
    pipeline = transform(pp)
    return torch.stack([pipeline(image) for image in images]).contiguous()


def _tensors(samples: list[tuple[Image.Image, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    x = preprocess([image for image, _ in samples])
    y = torch.tensor([label for _, label in samples], dtype=torch.long)
    return x, y


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on a preprocessed set."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch])
        loss += nn.functional.cross_entropy(logits, y[i:i + batch], reduction="sum").item()
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    return loss / len(x), correct / len(x)


def train(epochs: int, seed: int, n_train: int, n_test: int, *, batch_size: int = 32,
          max_lr: float = 6e-3) -> tuple[nn.Module, float]:
    """Generate data, train a DigitNet and return it with its held-out test accuracy."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    gen = torch.Generator().manual_seed(seed)

    start = time.perf_counter()
    x_train, y_train = _tensors(make_dataset(n_train, seed=seed, augment=True))
    x_test, y_test = _tensors(make_dataset(n_test, seed=seed + 10_000, augment=True))
    print(f"data: {len(x_train)} train / {len(x_test)} test images in {time.perf_counter() - start:.1f}s",
          flush=True)

    model = DigitNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=max_lr, weight_decay=1e-4)
    steps = epochs * ((len(x_train) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, total_steps=steps, pct_start=0.25)
    accuracy = 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        total, correct, seen = 0.0, 0, 0
        for i in range(0, len(order), batch_size):
            index = order[i:i + batch_size]
            xb, yb = x_train[index], y_train[index]  # no flips: a mirrored digit is not that digit
            logits = model(xb)
            loss = nn.functional.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(xb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(xb)
        test_loss, accuracy = evaluate(model, x_test, y_test)
        print(f"epoch {epoch:2d}/{epochs}: train loss {total / seen:.4f} acc {correct / seen:.2%} | "
              f"test loss {test_loss:.4f} acc {accuracy:.2%} | {time.perf_counter() - start:.1f}s",
              flush=True)
    model.eval()
    return model, accuracy


def save(model: nn.Module, out: Path) -> None:
    """Write the state dict atomically (temp file, then rename)."""
    buffer = io.BytesIO()  # saving to a buffer keeps the archive's inner name independent of the temp name
    torch.save(model.state_dict(), buffer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, init and shuffling (default 0)")
    parser.add_argument("--per-class", type=int, default=600, help="training images per class (default 600)")
    parser.add_argument("--test-per-class", type=int, default=100, help="test images per class (default 100)")
    parser.add_argument("--out", type=Path, default=WEIGHTS,
                        help=f"output state dict (default {WEIGHTS.name} next to model.py)")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    start, cpu_start = time.perf_counter(), time.process_time()
    model, accuracy = train(args.epochs, args.seed, args.per_class, args.test_per_class)
    save(model, args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"test accuracy {accuracy:.2%}; {params:,} parameters; saved {args.out} "
          f"({args.out.stat().st_size:,} bytes); total time {time.perf_counter() - start:.1f}s "
          f"(CPU {time.process_time() - cpu_start:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
