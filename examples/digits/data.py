"""Deterministic synthetic digits dataset, drawn with Pillow and NumPy only (no torch).

Each image holds one printed digit, 0-9, in Pillow's built-in scalable font (random size, stroke weight,
slant, small rotation, aspect ratio and position) on a tinted background with a little shading, blur and
noise. Half the images are dark ink on light paper, half light ink on a dark background (like MNIST); ink
and background are coloured, but always far apart in grayscale (ITU-R 601 luma), so the one-channel model
input keeps the digit. The digit always lies clear of the border, so no part of it is lost in preprocessing.

Without FreeType (or on a Pillow older than 10.1, whose ``load_default`` takes no size) the glyphs come from
Pillow's small bitmap font, scaled up; the bundled images and weights were made with the scalable font.
"""

from __future__ import annotations

import io
import math
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CLASSES: list[str] = [str(digit) for digit in range(10)]

_FONT_SIZES = (40, 48, 56, 64, 72)  # glyphs are drawn this large, then resampled to their size in the image
_STROKES = (0.0, 0.015, 0.03, 0.045, 0.06)  # extra outline around the glyph, per pixel of font size
_MAX_ROTATION = 12.0  # degrees either way; more and a 6 starts to look like a 9
_MAX_SLANT = 0.25  # horizontal shear (x += slant * y): italic either way
_MIN_CONTRAST = 100.0  # minimum luma difference between the ink and every background colour
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as Pillow's convert("L") and torchvision's Grayscale

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@cache
def _font(size: int) -> Font:
    """Pillow's built-in font at ``size`` pixels, or its bitmap font where scalable fonts are unavailable."""
    try:
        return ImageFont.load_default(size=size)  # FreeType: Aileron Regular (Pillow >= 10.1)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


@cache
def _glyph(label: str, font_size: int, stroke: int) -> Image.Image:
    """An "L" mask of ``label`` (255 = ink) at ``font_size`` with a ``stroke``-pixel outline, cropped to the
    ink; cached, so callers must not modify it."""
    if label not in CLASSES:
        raise ValueError(f"Unknown digit {label!r}; expected one of {', '.join(CLASSES)}.")
    font = _font(font_size)
    scalable = isinstance(font, ImageFont.FreeTypeFont)
    width = stroke if scalable else 0  # a bitmap font cannot be stroked (its scaled-up strokes are bold)
    left, top, right, bottom = font.getbbox(label, stroke_width=width) if scalable else font.getbbox(label)
    pad = 2
    mask = Image.new("L", (int(right - left) + 2 * pad, int(bottom - top) + 2 * pad), 0)
    ImageDraw.Draw(mask).text((pad - left, pad - top), label, fill=255, font=font,
                              stroke_width=width, stroke_fill=255)
    if not scalable:
        # Scale the ~11 px bitmap glyph up to the font size and smooth the pixel steps.
        scale = font_size / mask.height
        mask = mask.resize((round(mask.width * scale), font_size), Image.Resampling.NEAREST)
        mask = mask.filter(ImageFilter.GaussianBlur(scale / 3)).point(lambda v: 255 if v >= 128 else 0)
    box = mask.getbbox()
    return mask.crop(box) if box else mask


def _luma(colour: np.ndarray) -> float:
    return float(colour @ _LUMA)


def _tinted(rng: np.random.Generator, low: float, high: float, tint: float) -> np.ndarray:
    """A colour near a gray level in ``[low, high]``, each channel moved by up to ``tint``."""
    gray = rng.uniform(low, high)
    return np.clip(gray + rng.uniform(-tint, tint, size=3), 0.0, 255.0)


def _colours(rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """Background colours (one, or two for a gradient) and an ink colour at least ``_MIN_CONTRAST`` away."""
    light_paper = rng.random() < 0.5
    gradient = rng.random() < 0.5
    for _ in range(64):
        if light_paper:  # paper, card, a whiteboard; black, blue, red or green pen
            background = [_tinted(rng, 150.0, 250.0, 30.0) for _ in range(2 if gradient else 1)]
            ink = _tinted(rng, 0.0, 90.0, 60.0)
        else:  # a screen, a blackboard, a dark sign; white, yellowish or coloured chalk
            background = [_tinted(rng, 0.0, 100.0, 30.0) for _ in range(2 if gradient else 1)]
            ink = _tinted(rng, 170.0, 255.0, 50.0)
        if min(abs(_luma(ink) - _luma(c)) for c in background) >= _MIN_CONTRAST:
            return background, ink
    return ([np.full(3, 235.0)], np.full(3, 20.0)) if light_paper else ([np.full(3, 20.0)], np.full(3, 235.0))


def _background(rng: np.random.Generator, colours: list[np.ndarray], width: int, height: int) -> np.ndarray:
    """A solid or linear-gradient background (float32 HxWx3) between ``colours``."""
    if len(colours) == 1:
        return np.broadcast_to(colours[0].astype(np.float32), (height, width, 3)).copy()
    first, second = colours
    angle = rng.uniform(0.0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    proj = xs * np.float32(math.cos(angle)) + ys * np.float32(math.sin(angle))
    t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    return (first + t[..., None] * (second - first)).astype(np.float32)


def _placed_mask(label: str, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """The ink coverage (float32 HxW, 0..1) of one randomly sized, slanted, rotated and placed digit."""
    font_size = int(rng.choice(_FONT_SIZES))
    glyph = _glyph(label, font_size, round(font_size * float(rng.choice(_STROKES))))

    # Slant and rotate at the font size; expanding keeps the whole glyph, and the crop drops the margin.
    slant = rng.uniform(-_MAX_SLANT, _MAX_SLANT)
    pad = int(abs(slant) * glyph.height) + 4
    sheared = Image.new("L", (glyph.width + 2 * pad, glyph.height + 2 * pad), 0)
    sheared.paste(glyph, (pad, pad))
    centre_y = sheared.height / 2
    # AFFINE maps output to input pixels: x_in = x_out - slant * (y_out - centre_y), i.e. a shear by slant.
    sheared = sheared.transform(sheared.size, Image.Transform.AFFINE,
                                (1.0, -slant, slant * centre_y, 0.0, 1.0, 0.0), Image.Resampling.BICUBIC)
    angle = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)
    rotated = sheared.rotate(angle, Image.Resampling.BICUBIC, expand=True)
    box = rotated.getbbox()
    ink = rotated.crop(box) if box else rotated

    # Digit height 45-80% of the image height, its aspect ratio stretched by up to ~20% either way; shrunk
    # further if it would not fit 84% of the width. The margin left over is where it may move.
    target_h = height * rng.uniform(0.45, 0.8)
    target_w = target_h * ink.width / ink.height * math.exp(rng.uniform(-0.2, 0.2))
    fit = min(1.0, width * 0.84 / target_w)
    w, h = max(int(round(target_w * fit)), 2), max(int(round(target_h * fit)), 2)
    ink = ink.resize((w, h), Image.Resampling.LANCZOS if w < ink.width else Image.Resampling.BICUBIC)
    if rng.random() < 0.4:
        ink = ink.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.02 * h + 0.3)))
    margin_x, margin_y = width * 0.06, height * 0.06
    left = rng.uniform(margin_x, max(width - margin_x - w, margin_x))
    top = rng.uniform(margin_y, max(height - margin_y - h, margin_y))
    mask = Image.new("L", (width, height), 0)
    mask.paste(ink, (int(left), int(top)))
    return np.asarray(mask, dtype=np.float32) * np.float32(1.0 / 255.0)


def render(label: str, rng: np.random.Generator, size: int | tuple[int, int] = 64) -> Image.Image:
    """Draw the digit ``label`` ("0".."9") as an RGB image; ``size`` is a side or ``(width, height)``."""
    width, height = (size, size) if isinstance(size, int) else size
    colours, ink = _colours(rng)
    background = _background(rng, colours, width, height)
    mask = _placed_mask(label, rng, width, height)[..., None]

    # Uneven ink (a pen running dry, chalk) and uneven light across the image.
    ink_shade = rng.uniform(-25.0, 25.0) * np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None, None]
    light = 1.0 + rng.uniform(-0.12, 0.12) * np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :, None]
    ink_pixels = np.clip(ink.astype(np.float32) + ink_shade, 0, 255)
    pixels = (background + (ink_pixels - background) * mask) * light
    pixels += np.float32(rng.uniform(0.0, 10.0)) * rng.standard_normal(pixels.shape, dtype=np.float32)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    """``image`` after a round trip through JPEG at ``quality``."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def _augmented(label: str, rng: np.random.Generator, size: int) -> Image.Image:
    """``render`` at a random height (0.5-2x ``size``) and aspect ratio (width 0.7-1.7x height); JPEG half
    the time."""
    height = int(rng.integers(int(size * 0.5), int(size * 2.0) + 1))
    width = int(round(height * math.exp(rng.uniform(math.log(0.7), math.log(1.7)))))
    image = render(label, rng, (width, height))
    return _jpeg(image, int(rng.integers(40, 96))) if rng.random() < 0.5 else image


def make_dataset(n_per_class: int, seed: int, size: int = 64, *,
                 augment: bool = False) -> list[tuple[Image.Image, int]]:
    """``n_per_class`` images of every class, interleaved by class; identical for identical arguments.

    With ``augment`` the image size and aspect ratio vary around ``size`` and about half the images are
    JPEG-compressed, like real inputs to the exact resize of the preprocessing (which squashes or
    stretches the image to the model's square input).
    """
    rng = np.random.default_rng(seed)
    draw = _augmented if augment else render
    return [(draw(label, rng, size), index)
            for _ in range(n_per_class)
            for index, label in enumerate(CLASSES)]
