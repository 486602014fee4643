"""Train ShapeNet on freshly generated shapes and save the weights to ``shapes.pt``.

Usage: ``python examples/shapes/train.py [--epochs N] [--seed S] [--out PATH]``. Runs in well under a
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import make_dataset  # noqa: E402
from model import PREPROCESS, WEIGHTS, ShapeNet  # noqa: E402


def resize_and_crop(image: Image.Image, pp: dict[str, Any]) -> Image.Image:
    """Shorter side to ``pp["resize"]`` (aspect kept, PIL bilinear), then the centre ``pp["crop"]`` square."""
    resize, crop = int(pp["resize"]), int(pp["crop"])
    if pp["interpolation"] != "bilinear":
        raise ValueError(f"Only bilinear interpolation is implemented, got {pp['interpolation']!r}.")
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    width, height = image.size
    top = int(round((height - crop) / 2.0))
    left = int(round((width - crop) / 2.0))
    return image.crop((left, top, left + crop, top + crop))


def preprocess(images: Sequence[Image.Image], pp: dict[str, Any] = PREPROCESS) -> np.ndarray:
    """RGB images to a normalised float32 NCHW batch."""
    mean = np.asarray(pp["mean"], dtype=np.float32)
    std = np.asarray(pp["std"], dtype=np.float32)
    batch = []
    for image in images:
        pixels = np.asarray(resize_and_crop(image.convert("RGB"), pp), dtype=np.float32)
        pixels = pixels * np.float32(1.0 / 255.0)
        batch.append(((pixels - mean) / std).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(batch), dtype=np.float32)


def _tensors(samples: list[tuple[Image.Image, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(preprocess([image for image, _ in samples]))
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
    """Generate data, train a ShapeNet and return it with its held-out test accuracy."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    gen = torch.Generator().manual_seed(seed)

    start = time.perf_counter()
    x_train, y_train = _tensors(make_dataset(n_train, seed=seed, augment=True))
    x_test, y_test = _tensors(make_dataset(n_test, seed=seed + 10_000, augment=True))
    print(f"data: {len(x_train)} train / {len(x_test)} test images in {time.perf_counter() - start:.1f}s",
          flush=True)

    model = ShapeNet().to(memory_format=torch.channels_last)  # ~1.5x faster convolutions on CPU
    x_train = x_train.contiguous(memory_format=torch.channels_last)
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
            xb, yb = x_train[index], y_train[index]
            flip = torch.rand(len(xb), generator=gen) < 0.5  # every shape class is mirror-invariant
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
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
    return model.to(memory_format=torch.contiguous_format), accuracy


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
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
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
