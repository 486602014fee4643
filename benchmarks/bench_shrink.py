"""`deploykit predict --shrink`: bytes sent, time per image on a slow link, and top-1 agreement.

With ``--shrink`` (the default of the REST protocol) the client sends a large photo re-encoded at the size the
model resizes it to (``deploykit.images.shrink_image``: a fast decode, the shorter side at the card's resize,
JPEG quality 95 with full-resolution colour) instead of the original file; the server then only crops it.
For each image this measures:

- the bytes of the request body, as ``PredictClient.predict_bytes`` sends it (multipart), untouched and shrunk
  (JPEG, the default, and lossless PNG for comparison);
- the client's time to shrink it, and the server's decode + preprocess time of what it receives
  (``load_tensor`` as ``deploykit serve`` calls it with its default options);
- the time per image on a link of each ``--rates`` speed: client time + body bits / rate + server time.
  Round trips and inference are the same either way and are left out;
- top-1 agreement of the model on the tensor the server makes from the shrunk image with the one it makes
  from the original, and the largest input difference (normalised units).

Images and models are those of ``decode_agreement.py``: (a) the example model on its shapes rendered at
12 MP; (b) a small CNN trained here (about a minute) on real photographs (``--photos DIR``, else the sample
photos of installed packages), on new random views of them at 12 MP. Prints Markdown tables.

    python benchmarks/bench_shrink.py --photos ~/Pictures --count 200 --json shrink.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import format_table, machine_info, write_json  # noqa: E402
from decode_agreement import ImageSet, find_photos, photos_set, progress, shapes_set  # noqa: E402

from deploykit.images import load_tensor, shrink_image  # noqa: E402

MODES = {"untouched": None, "shrink (JPEG q95)": "JPEG", "shrink (PNG)": "PNG"}
FILENAME = "IMG_0001.jpg"


def body_bytes(data: bytes) -> int:
    """Bytes of the multipart body that ``PredictClient.predict_bytes`` posts for ``data``."""
    files = {"file": (FILENAME, data, "application/octet-stream")}
    prepared = requests.Request("POST", "http://127.0.0.1/predict", files=files).prepare()
    return len(prepared.body or b"")


@dataclass
class Mode:
    """One way of sending the images of a set."""

    name: str
    body: list[int] = field(default_factory=list)
    client_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    agree: int = 0
    diff_sum: float = 0.0
    diff_max: float = 0.0

    def per_image_ms(self, mbit_s: float) -> float:
        """Median over images of client time + transfer time at ``mbit_s`` + server time."""
        return statistics.median(c + b * 8 / (mbit_s * 1e3) + s
                                 for c, b, s in zip(self.client_ms, self.body, self.server_ms, strict=True))

    def to_dict(self, images: int, rates: list[float]) -> dict[str, Any]:
        return {"mode": self.name, "images": images, "body_bytes_median": statistics.median(self.body),
                "body_bytes_max": max(self.body), "client_ms_median": statistics.median(self.client_ms),
                "server_ms_median": statistics.median(self.server_ms), "top1_agreement": self.agree / images,
                "mean_abs_diff": self.diff_sum / images, "max_abs_diff": self.diff_max,
                "per_image_ms": {f"{rate:g}": self.per_image_ms(rate) for rate in rates}}


def timed(function: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, (time.perf_counter() - start) * 1e3


def measure(image_set: ImageSet, count: int) -> list[Mode]:
    modes = [Mode(name) for name in MODES]
    for index, (original, _truth) in enumerate(image_set.images):
        served, reference_ms = timed(load_tensor, original, image_set.pp)
        tensors = [served]
        for mode, image_format in zip(modes, MODES.values(), strict=True):
            if image_format is None:
                mode.body.append(body_bytes(original))
                mode.client_ms.append(0.0)
                mode.server_ms.append(reference_ms)
                continue
            shrunk, client_ms = timed(shrink_image, original, image_set.pp, image_format=image_format)
            assert shrunk is not None, "a 12 MP photo is always shrunk"
            tensor, server_ms = timed(load_tensor, shrunk, image_set.pp)
            mode.body.append(body_bytes(shrunk))
            mode.client_ms.append(client_ms)
            mode.server_ms.append(server_ms)
            diff = np.abs(tensor.astype(np.float64) - served)
            mode.diff_sum += float(diff.mean())
            mode.diff_max = max(mode.diff_max, float(diff.max()))
            tensors.append(tensor)
        top = image_set.classify(np.stack(tensors)).argmax(axis=1)
        modes[0].agree += 1
        for mode, choice in zip(modes[1:], top[1:], strict=True):
            mode.agree += int(choice == top[0])
        progress(index + 1, count, image_set.name)
    return modes


def table(results: list[tuple[ImageSet, list[Mode]]], count: int, rates: list[float]) -> str:
    headers = ["images", "sent as", "body kB (median)", "client ms", "server decode ms",
               *(f"per image ms at {rate:g} Mbit/s" for rate in rates), "top-1 agreement with untouched",
               "mean / max Δx"]
    rows = []
    for image_set, modes in results:
        for mode in modes:
            diff = "-" if mode.name == "untouched" else f"{mode.diff_sum / count:.4f} / {mode.diff_max:.3f}"
            rows.append([image_set.name, mode.name, statistics.median(mode.body) / 1e3,
                         statistics.median(mode.client_ms), statistics.median(mode.server_ms),
                         *(mode.per_image_ms(rate) for rate in rates), f"{mode.agree / count:.1%}", diff])
    return format_table(headers, rows, markdown=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="12 MP test images per model (default 100)")
    parser.add_argument("--photos", type=Path, help="folder of photographs for (b), one class each")
    parser.add_argument("--rates", default="20,100", help="link speeds in Mbit/s (default 20,100)")
    parser.add_argument("--views", type=int, default=120, help="training views per photograph in (b)")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs in (b)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sets", default="shapes,photos", help="shapes, photos or both (default)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    rates = [float(rate) for rate in args.rates.split(",")]
    sets = {word.strip() for word in args.sets.split(",")}

    results: list[tuple[ImageSet, list[Mode]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-shrink-") as folder:
        if "shapes" in sets:
            shapes = shapes_set(args.count, Path(folder), args.seed)
            results.append((shapes, measure(shapes, args.count)))
    if "photos" in sets:
        photos = photos_set(find_photos(args.photos), args.count, args.seed, args.views, args.epochs)
        if photos is not None:
            results.append((photos, measure(photos, args.count)))

    print(f"\n## Client-side shrinking of 12 MP photos ({args.count} per set)\n")
    print(table(results, args.count, rates))
    print("\nbody: the multipart request body; client ms: shrinking; server decode ms: decode + preprocess "
          "of what it receives (default options); per image: client + body at the link speed + server, "
          "median; Δx: input tensor difference from the untouched upload's (normalised units).")
    machine = machine_info()
    print(f"\nMachine: {machine.get('cpu')}, {machine.get('usable_cores')} cores, load average "
          f"{machine.get('load_average')}, Pillow {machine.get('pillow')}.")
    if args.json:
        write_json(args.json, {"sets": {s.name: [m.to_dict(args.count, rates) for m in modes]
                                        for s, modes in results}, "rates_mbit_s": rates, "machine": machine})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
