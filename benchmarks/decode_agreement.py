"""Fast vs exact image decoding at phone resolution: top-1 agreement, input differences, time and memory.

``deploykit.images.load_tensor`` decodes a large image at about the size the model needs (a JPEG in libjpeg's
draft mode at 1/2, 1/4 or 1/8 scale, other formats reduced right after decoding) unless ``exact=True``,
which decodes the whole image as torchvision does. This measures what that changes:

(a) the bundled example model (examples/shapes, trained), exported to ONNX, on its shapes rendered at
    1008x756, upscaled to a phone's 4032x3024 with Gaussian grain and saved as JPEG (quality 92); every
    other one is stored as phones store portrait photos (landscape pixels, EXIF orientation 6);
(b) real photographs at 12 MP. No ImageNet weights can be downloaded here, so a small CNN with ImageNet's
    preprocessing (resize 256, crop 224, bilinear) is trained here, in about a minute, to tell apart the
    photographs found (matplotlib's sample photo, scikit-image's and scikit-learn's sample photos when
    those are installed, or the images in --photos DIR) from random views of them; the test images are
    new random views upscaled to 12 MP with grain, as in (a);
(c) decode + preprocess time of one 12 MP JPEG and PNG, and the peak memory of a decode (in a fresh
    interpreter), fast vs exact.

Differences are in the model's normalised input units (one 8-bit level is 1/255/std: 0.0157 for the
example model, about 0.017 for ImageNet's). It prints Markdown tables; --json writes the figures.

    python benchmarks/decode_agreement.py
    python benchmarks/decode_agreement.py --count 400 --photos ~/Pictures --json decode.json
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, format_table, machine_info, python, sample_photo, write_json  # noqa: E402

from deploykit.card import Preprocess  # noqa: E402
from deploykit.images import iter_image_files, load_tensor, preprocess, probe_image  # noqa: E402

PHONE = (4032, 3024)
IMAGENET = Preprocess()
GRAIN = 5.0  # sensor-like noise, in 8-bit levels (a phone JPEG of this photo at quality 92 is ~3 MB)
SCIKIT_PHOTOS = {  # photographs shipped inside the scikit-image and scikit-learn wheels
    "skimage": ["data/astronaut.png", "data/chelsea.png", "data/coffee.png", "data/rocket.jpg",
                "data/motorcycle_left.png", "data/hubble_deep_field.jpg", "data/retina.jpg",
                "data/camera.png", "data/coins.png", "data/moon.png", "data/brick.png", "data/grass.png",
                "data/gravel.png"],
    "sklearn": ["datasets/images/china.jpg", "datasets/images/flower.jpg"],
}


# --- images -------------------------------------------------------------------------------------------------


def phone_jpeg(view: Image.Image, rng: np.random.Generator, *, portrait_exif: bool,
               box: tuple[float, float, float, float] | None = None, fmt: str = "JPEG") -> bytes:
    """``view`` (or its ``box``) upscaled with Lanczos to 12 MP, with grain, encoded as a phone would.

    With ``portrait_exif`` the view is a portrait photo (3024x4032 upright), stored turned left with EXIF
    orientation 6.
    """
    size = PHONE[::-1] if portrait_exif else PHONE
    big = view.convert("RGB").resize(size, Image.Resampling.LANCZOS, box=box)
    pixels = np.asarray(big, dtype=np.float32)
    pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(GRAIN)
    image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    if portrait_exif:
        exif = Image.Exif()
        exif[0x0112] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(buffer, fmt, quality=92, exif=exif.tobytes())
    else:
        image.save(buffer, fmt, quality=92)
    return buffer.getvalue()


def random_view(photo: Image.Image, rng: np.random.Generator, *, portrait: bool,
                min_area: float = 0.25) -> tuple[float, float, float, float]:
    """A random 4:3 (or 3:4) box covering ``min_area`` to all of what fits in ``photo``."""
    aspect = 3 / 4 if portrait else 4 / 3
    width, height = photo.size
    full_w = min(width, height * aspect)
    scale = float(np.sqrt(rng.uniform(min_area, 1.0)))
    w, h = full_w * scale, full_w * scale / aspect
    left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return (left, top, left + w, top + h)


def find_photos(folder: Path | None) -> list[Path]:
    """Photographs to use in (b): ``folder``'s images, else the sample photos of installed packages."""
    if folder is not None:
        return iter_image_files(folder)
    photos = [sample_photo()]
    for package, names in SCIKIT_PHOTOS.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        photos.extend(root / name for name in names if (root / name).is_file())
    return photos


# --- measuring ----------------------------------------------------------------------------------------------


@dataclass
class Agreement:
    """Fast vs exact decoding over one set of images with one model."""

    name: str
    model: str
    images: int = 0
    agree: int = 0
    correct_exact: int = 0
    correct_fast: int = 0
    diff_sum: float = 0.0
    diff_max: float = 0.0
    max_prob_change: float = 0.0
    exact_ms: list[float] = field(default_factory=list)
    fast_ms: list[float] = field(default_factory=list)
    flips: list[dict[str, Any]] = field(default_factory=list)  # the images whose top-1 class changed
    mean_jpeg_mb: float = 0.0

    def add(self, data: bytes, label: int, pp: Preprocess,
            classify: Callable[[np.ndarray], np.ndarray]) -> None:
        start = time.perf_counter()
        exact = load_tensor(data, pp, exact=True)
        middle = time.perf_counter()
        fast = load_tensor(data, pp)
        end = time.perf_counter()
        self.exact_ms.append((middle - start) * 1e3)
        self.fast_ms.append((end - middle) * 1e3)
        diff = np.abs(fast.astype(np.float64) - exact)
        self.diff_sum += float(diff.mean())
        self.diff_max = max(self.diff_max, float(diff.max()))
        probs = classify(np.stack([exact, fast]))
        top = probs.argmax(axis=1)
        self.images += 1
        self.agree += int(top[0] == top[1])
        if top[0] != top[1]:
            first, second = np.sort(probs[0])[::-1][:2]
            self.flips.append({"image": self.images - 1, "label": label, "exact": int(top[0]),
                               "fast": int(top[1]), "exact_top2_margin": float(first - second)})
        self.correct_exact += int(top[0] == label)
        self.correct_fast += int(top[1] == label)
        self.max_prob_change = max(self.max_prob_change, float(np.abs(probs[0] - probs[1]).max()))
        self.mean_jpeg_mb += (len(data) / 1e6 - self.mean_jpeg_mb) / self.images

    def row(self) -> list[Any]:
        exact_ms, fast_ms = statistics.median(self.exact_ms), statistics.median(self.fast_ms)
        accuracy = f"{self.correct_exact / self.images:.1%} / {self.correct_fast / self.images:.1%}"
        return [self.name, self.model, self.images, f"{self.agree / self.images:.1%}", accuracy,
                f"{self.diff_sum / self.images:.4f}", f"{self.diff_max:.3f}", f"{self.max_prob_change:.3f}",
                exact_ms, fast_ms, f"{exact_ms / fast_ms:.1f}x"]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(agreement=self.agree / self.images, mean_abs_diff=self.diff_sum / self.images,
                    exact_ms_median=statistics.median(self.exact_ms),
                    fast_ms_median=statistics.median(self.fast_ms))
        del data["exact_ms"], data["fast_ms"]
        return data


AGREEMENT_HEADERS = ["images", "model", "n", "top-1 agreement", "accuracy exact / fast", "mean |Δx|",
                     "max |Δx|", "max |Δp|", "exact ms", "fast ms", "speed-up"]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def progress(done: int, total: int, what: str) -> None:
    if done % 25 == 0 or done == total:
        print(f"  {what}: {done}/{total}", flush=True)


# --- (a) the example model on renders of its shapes ---------------------------------------------------------


@dataclass
class ImageSet:
    """A model and a stream of 12 MP JPEGs for it: ``images`` yields (JPEG bytes, true class index)."""

    name: str
    model: str
    pp: Preprocess
    classify: Callable[[np.ndarray], np.ndarray]  # input batch -> class probabilities
    images: Iterator[tuple[bytes, int]]


def shapes_set(count: int, workdir: Path, seed: int) -> ImageSet:
    """The example model, exported to ``workdir``, and ``count`` renders of its shapes at 12 MP."""
    from deploykit.runtime import Predictor

    print("Exporting the example model ...", flush=True)
    onnx_path = workdir / "shapes.onnx"
    factory = f"{REPO / 'examples' / 'shapes' / 'model.py'}:build"
    subprocess.run([python(), "-m", "deploykit", "export", factory, "--output", str(onnx_path)], check=True,
                   stdout=subprocess.DEVNULL)
    predictor = Predictor.open(onnx_path)
    sys.path.insert(0, str(REPO / "examples" / "shapes"))
    from data import CLASSES, render

    labels = list(predictor.card.labels or [])

    def images() -> Iterator[tuple[bytes, int]]:
        rng = np.random.default_rng(seed)
        for index in range(count):
            label = index % len(CLASSES)
            portrait = index % 2 == 1
            drawing = render(CLASSES[label], rng, (756, 1008) if portrait else (1008, 756))
            yield (phone_jpeg(drawing, rng, portrait_exif=portrait),
                   labels.index(CLASSES[label]) if labels else label)

    return ImageSet("shapes renders, 12 MP JPEG", "examples/shapes", predictor.card.preprocess,
                    lambda batch: softmax(predictor.first_output(batch)), images())


def shapes_agreement(count: int, workdir: Path, seed: int) -> Agreement:
    print("(a) ", end="")
    shapes = shapes_set(count, workdir, seed)
    result = Agreement(shapes.name, shapes.model)
    for index, (data, truth) in enumerate(shapes.images):
        result.add(data, truth, shapes.pp, shapes.classify)
        progress(index + 1, count, "shapes")
    return result


# --- (b) a model trained here on real photographs -----------------------------------------------------------


def train_photo_model(photos: list[Image.Image], seed: int, views_per_photo: int, epochs: int) -> Any:
    """A small CNN (ImageNet preprocessing) trained to tell which photograph a random view comes from."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    rng = np.random.default_rng(seed)
    pixels, targets = [], []
    for label, photo in enumerate(photos):
        for i in range(views_per_photo):
            portrait = i % 2 == 1
            box = random_view(photo, rng, portrait=portrait)
            size = (320, round(320 * 4 / 3)) if portrait else (round(320 * 4 / 3), 320)
            view = photo.resize(size, Image.Resampling.LANCZOS, box=box)
            if rng.random() < 0.5:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            noisy = np.asarray(view, dtype=np.float32) * np.float32(rng.uniform(0.85, 1.15))
            noisy += rng.standard_normal(noisy.shape, dtype=np.float32) * np.float32(GRAIN)
            view = Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))
            pixels.append(preprocess(view, IMAGENET))
            targets.append(label)
    x = torch.from_numpy(np.stack(pixels))
    y = torch.tensor(targets)

    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    model = nn.Sequential(
        nn.Conv2d(3, 24, 7, stride=4, padding=3, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True),
        block(24, 48, 2), block(48, 48, 1), block(48, 96, 2), block(96, 96, 1), block(96, 192, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(192, len(photos)),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * -(-len(y) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y))
        total = 0.0
        for start in range(0, len(y), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        print(f"  epoch {epoch + 1}/{epochs}: loss {total / len(y):.3f}", flush=True)
    model.eval()
    return model


def photos_set(paths: list[Path], count: int, seed: int, views_per_photo: int,
               epochs: int) -> ImageSet | None:
    """A CNN trained here to tell ``paths`` apart, and ``count`` new random views of them at 12 MP; None with
    fewer than two photographs."""
    import torch

    photos = [Image.open(p).convert("RGB") for p in paths]
    if len(photos) < 2:
        print("Real photographs skipped: two or more are needed (install scikit-image or pass --photos DIR).")
        return None
    print(f"Training a {len(photos)}-photo classifier on {views_per_photo * len(photos)} views ...",
          flush=True)
    started = time.perf_counter()
    model = train_photo_model(photos, seed, views_per_photo, epochs)
    print(f"  trained in {time.perf_counter() - started:.0f} s", flush=True)

    def classify(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(model(torch.from_numpy(batch)), dim=1).numpy()

    def images() -> Iterator[tuple[bytes, int]]:
        rng = np.random.default_rng(seed + 1)
        for index in range(count):
            label = index % len(photos)
            portrait = index % 2 == 1
            box = random_view(photos[label], rng, portrait=portrait)
            yield phone_jpeg(photos[label], rng, portrait_exif=portrait, box=box), label

    return ImageSet(f"{len(photos)} real photographs, 12 MP JPEG", "CNN trained here (ImageNet pp)", IMAGENET,
                    classify, images())


def photos_agreement(paths: list[Path], count: int, seed: int, views_per_photo: int,
                     epochs: int) -> Agreement | None:
    print("(b) ", end="")
    photos = photos_set(paths, count, seed, views_per_photo, epochs)
    if photos is None:
        return None
    result = Agreement(photos.name, photos.model)
    for index, (data, truth) in enumerate(photos.images):
        result.add(data, truth, photos.pp, photos.classify)
        progress(index + 1, count, "photos")
    return result


# --- (c) time and memory per 12 MP image --------------------------------------------------------------------

# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak (Linux carries it over fork).
_PEAK_MEMORY = """
import sys
from deploykit.card import Preprocess
from deploykit.images import load_tensor

def peak_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

data = open(sys.argv[1], "rb").read()
before = peak_kb()
load_tensor(data, Preprocess(), exact=sys.argv[2] == "exact")
print((peak_kb() - before) / 1024)
"""


def peak_memory_mb(path: Path, mode: str) -> float:
    """Peak resident memory one decode adds, in a fresh interpreter (Linux: /proc/self/status)."""
    out = subprocess.run([python(), "-c", _PEAK_MEMORY, str(path), mode], check=True, capture_output=True,
                         text=True)
    return float(out.stdout.strip())


def timing(photo: Image.Image, workdir: Path, runs: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(7)
    jpeg = phone_jpeg(photo, rng, portrait_exif=False)
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buffer, "PNG")
    files = {"JPEG q92": jpeg, "PNG": buffer.getvalue()}
    shapes_pp = Preprocess(height=64, width=64, resize=72, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    rows = []
    for kind, data in files.items():
        path = workdir / f"phone.{kind.split()[0].lower()}"
        path.write_bytes(data)
        header = probe_image(data)
        memory = {mode: peak_memory_mb(path, mode) for mode in ("exact", "fast")}
        for pp_name, pp in (("ImageNet 256/224", IMAGENET), ("shapes 72/64", shapes_pp)):
            times: dict[str, list[float]] = {"exact": [], "fast": []}
            for _ in range(runs):
                for mode in ("exact", "fast"):
                    start = time.perf_counter()
                    load_tensor(data, pp, exact=mode == "exact")
                    times[mode].append((time.perf_counter() - start) * 1e3)
            exact_ms, fast_ms = statistics.median(times["exact"]), statistics.median(times["fast"])
            rows.append({
                "format": kind, "size": f"{header.width}x{header.height}", "mb": len(data) / 1e6,
                "preprocess": pp_name, "exact_ms": exact_ms, "fast_ms": fast_ms,
                "speedup": exact_ms / fast_ms,
                "decoded_px_exact": header.pixels, "decoded_px_fast": header.decoded_pixels(pp),
                "peak_mb_exact": memory["exact"] if pp is IMAGENET else None,
                "peak_mb_fast": memory["fast"] if pp is IMAGENET else None,
            })
    return rows


def timing_table(rows: list[dict[str, Any]]) -> str:
    headers = ["image", "MB", "preprocess", "exact ms", "fast ms", "speed-up", "pixels decoded exact / fast",
               "peak MB exact / fast"]
    body = []
    for r in rows:
        memory = "-" if r["peak_mb_exact"] is None else f"{r['peak_mb_exact']:.0f} / {r['peak_mb_fast']:.0f}"
        body.append([f"{r['size']} {r['format']}", r["mb"], r["preprocess"], r["exact_ms"], r["fast_ms"],
                     f"{r['speedup']:.1f}x", f"{r['decoded_px_exact']:,} / {r['decoded_px_fast']:,}", memory])
    return format_table(headers, body, markdown=True)


# --- main ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="12 MP test images per model (default 200)")
    parser.add_argument("--photos", type=Path, help="folder of photographs for (b), one class each")
    parser.add_argument("--runs", type=int, default=9, help="timed decodes per image and mode (median)")
    parser.add_argument("--views", type=int, default=120, help="training views per photograph in (b)")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs in (b)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sets", default="timing,shapes,photos",
                        help="what to run, comma-separated: timing, shapes, photos (default all)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    sets = {word.strip() for word in args.sets.split(",")}

    figures: dict[str, Any] = {}
    agreements: list[Agreement] = []
    with tempfile.TemporaryDirectory(prefix="decode-agreement-") as folder:
        workdir = Path(folder)
        if "timing" in sets:
            print("(c) Timing one 12 MP JPEG and PNG ...", flush=True)
            figures["timing"] = timing(Image.open(sample_photo()).convert("RGB"), workdir, args.runs)
        if "shapes" in sets:
            agreements.append(shapes_agreement(args.count, workdir, args.seed))
            figures["shapes"] = agreements[-1].to_dict()
    if "photos" in sets:
        photos = photos_agreement(find_photos(args.photos), args.count, args.seed, args.views, args.epochs)
        if photos is not None:
            agreements.append(photos)
            figures["photos"] = photos.to_dict()
    figures["machine"] = machine_info()

    if agreements:
        print("\n## Fast vs exact decoding: top-1 agreement\n")
        print(format_table(AGREEMENT_HEADERS, [a.row() for a in agreements], markdown=True))
        print("\nΔx: input tensor difference (normalised units); Δp: change of any class probability; ms: "
              "decode + preprocess of one image, median.")
        for agreement in agreements:
            for flip in agreement.flips:
                print(f"{agreement.name}: image {flip['image']} changed class {flip['exact']} -> "
                      f"{flip['fast']} (true {flip['label']}); its exact top-2 margin was "
                      f"{flip['exact_top2_margin']:.3f}.")
    if "timing" in figures:
        print("\n## Decode + preprocess of one 12 MP photo (median of "
              f"{args.runs}; peak memory of one decode with ImageNet preprocessing)\n")
        print(timing_table(figures["timing"]))
    load = figures["machine"].get("load_average")
    print(f"\nMachine: {figures['machine'].get('cpu')}, {figures['machine'].get('usable_cores')} cores, "
          f"load average {load}, Pillow {figures['machine'].get('pillow')}.")
    if args.json:
        write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
