"""Deterministic synthetic shapes dataset, drawn with Pillow and NumPy only (no torch).

Each image holds one filled shape (random colour, position, scale and rotation) on a random solid or
gradient background with a little noise. The shape always lies inside the centre square of the image,
clear of the border, so a resize-then-centre-crop never cuts it off.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES: list[str] = ["circle", "square", "triangle", "star", "cross", "heart"]

_SUPERSAMPLE = 4  # masks are drawn this many times larger, then downsampled (anti-aliasing)
_MIN_CONTRAST = 130.0  # minimum RGB distance between the shape colour and every background colour
_MAX_ROTATION = {"heart": 40.0}  # degrees either way; other classes rotate freely

Point = tuple[float, float]


def _outline(label: str, rotation: float) -> list[Point]:
    """Polygon of a shape of radius ~1 centred on the origin, rotated by ``rotation`` radians."""
    if label == "circle":
        points = [(math.cos(t), math.sin(t)) for t in np.linspace(0.0, 2 * math.pi, 96, endpoint=False)]
    elif label == "square":
        s = 0.78  # half side: the corners reach radius ~1.1
        points = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif label == "triangle":
        points = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        points = [(x * 1.1, y * 1.1) for x, y in points]  # centred on the centroid
    elif label == "star":
        points = []
        for i in range(10):
            r = 1.1 if i % 2 == 0 else 0.45
            a = -math.pi / 2 + i * math.pi / 5
            points.append((r * math.cos(a), r * math.sin(a)))
    elif label == "cross":
        a, b = 0.95, 0.32  # arm half-length and half-width
        points = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b),
                  (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
    elif label == "heart":
        ts = np.linspace(0.0, 2 * math.pi, 120, endpoint=False)
        xs = 16 * np.sin(ts) ** 3
        ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        points = [(x / 16.5, (y - 2.5) / 16.5) for x, y in zip(xs.tolist(), ys.tolist(), strict=True)]
    else:
        raise ValueError(f"Unknown shape {label!r}; expected one of {', '.join(CLASSES)}.")
    c, s = math.cos(rotation), math.sin(rotation)
    return [(x * c - y * s, x * s + y * c) for x, y in points]


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float64)


def _contrasting(rng: np.random.Generator, against: list[np.ndarray]) -> np.ndarray:
    """A random colour at least ``_MIN_CONTRAST`` away from every colour in ``against``."""
    best, best_distance = _colour(rng), -1.0
    for _ in range(64):
        candidate = _colour(rng)
        distance = min(float(np.linalg.norm(candidate - c)) for c in against)
        if distance >= _MIN_CONTRAST:
            return candidate
        if distance > best_distance:
            best, best_distance = candidate, distance
    # Fall back to the farthest corner of the RGB cube from the mean background colour.
    mean = np.mean(against, axis=0)
    return np.where(mean < 128, 255.0, 0.0) if best_distance < _MIN_CONTRAST else best


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A solid or linear-gradient background (float HxWx3) and the colours it is made of."""
    first = _colour(rng)
    if rng.random() < 0.4:
        return np.broadcast_to(first, (height, width, 3)).copy(), [first]
    second = _colour(rng)
    angle = rng.uniform(0.0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    proj = xs * math.cos(angle) + ys * math.sin(angle)
    t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    return first + t[..., None] * (second - first), [first, second]


def render(label: str, rng: np.random.Generator, size: int | tuple[int, int] = 96) -> Image.Image:
    """Draw one filled ``label`` shape on a random background; ``size`` is a side or ``(width, height)``."""
    width, height = (size, size) if isinstance(size, int) else size
    side = min(width, height)
    background, colours = _background(rng, width, height)
    fill = _contrasting(rng, colours)

    # Radius 0.22..0.36 of the centre square. Outline points reach ~1.1 radii (x1.1 squash), so the
    # shape stays inside the central 76% of that square wherever its centre moves.
    radius = side * rng.uniform(0.22, 0.36)
    limit = max(side * 0.38 - radius * 1.25, 0.0)
    cx = width / 2 + rng.uniform(-limit, limit)
    cy = height / 2 + rng.uniform(-limit, limit)
    max_rot = _MAX_ROTATION.get(label, 180.0)
    rotation = math.radians(rng.uniform(-max_rot, max_rot))
    squash = rng.uniform(0.9, 1.1)  # slight aspect jitter keeps the model from memorising exact outlines

    k = _SUPERSAMPLE
    outline = _outline(label, rotation)
    polygon = [((cx + x * radius * squash) * k, (cy + y * radius / squash) * k) for x, y in outline]
    mask_img = Image.new("L", (width * k, height * k), 0)
    ImageDraw.Draw(mask_img).polygon(polygon, fill=255)
    mask_img = mask_img.resize((width, height), Image.Resampling.BOX)
    if rng.random() < 0.3:
        mask_img = mask_img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    mask = np.asarray(mask_img, dtype=np.float64)[..., None] / 255.0

    # Slight shading across the shape so it is not always perfectly flat.
    shade = rng.uniform(-20.0, 20.0) * np.linspace(-1.0, 1.0, width)[None, :, None]
    pixels = background * (1.0 - mask) + np.clip(fill + shade, 0, 255) * mask
    pixels += rng.uniform(0.0, 10.0) * rng.standard_normal(pixels.shape, dtype=np.float32)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    """``image`` after a round trip through JPEG at ``quality``."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def _augmented(label: str, rng: np.random.Generator, size: int) -> Image.Image:
    """``render`` at a random side (0.8-1.35x ``size``, sometimes non-square); JPEG half the time."""
    side = int(rng.integers(int(size * 0.8), int(size * 1.35) + 1))
    long = int(side * rng.uniform(1.0, 1.4)) if rng.random() < 0.3 else side
    image = render(label, rng, (long, side) if rng.random() < 0.5 else (side, long))
    return _jpeg(image, int(rng.integers(50, 96))) if rng.random() < 0.5 else image


def make_dataset(n_per_class: int, seed: int, size: int = 96, *,
                 augment: bool = False) -> list[tuple[Image.Image, int]]:
    """``n_per_class`` images of every class, interleaved by class; identical for identical arguments.

    With ``augment`` the image size and aspect ratio vary around ``size`` and about half the images are
    JPEG-compressed, like real inputs to the resize + centre-crop preprocessing.
    """
    rng = np.random.default_rng(seed)
    draw = _augmented if augment else render
    return [(draw(label, rng, size), index)
            for _ in range(n_per_class)
            for index, label in enumerate(CLASSES)]
