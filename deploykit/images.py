"""Image decoding and preprocessing: the one implementation, driven by the model card.

Used by verify, serve, predict and int8 calibration, so client and server cannot drift apart. It mirrors
torchvision's PIL path (``Resize(int)`` then ``CenterCrop``, ``ToTensor``, ``Normalize``) with Pillow and
NumPy only; it never imports torch.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deploykit.card import Preprocess
from deploykit.errors import DeployKitError

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_MAX_PIXELS = 64_000_000
#: Beyond this aspect ratio only the part of the image that the centre crop keeps is resized (see
#: resize_and_crop): resizing a 1x10000 image whole to a shorter side of 256 would make 655 million pixels.
MAX_WHOLE_RESIZE_ASPECT = 16
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                            ".pgm"})


class InvalidImageError(DeployKitError):
    """An image that cannot be decoded. ``unsupported`` is True when the bytes are no image format at all."""

    def __init__(self, message: str, *, unsupported: bool = False) -> None:
        super().__init__(message)
        self.unsupported = unsupported


def is_image_path(path: str | Path) -> bool:
    """True when the file name has a known image suffix."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes into an upright 8-bit RGB image.

    EXIF orientation is applied; grayscale, 16-bit, palette, CMYK and alpha images are converted (transparent
    pixels are composited on white). Raises ``InvalidImageError`` for empty, unknown, truncated or oversized
    (decompression bomb) input.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise InvalidImageError("The image is empty (0 bytes).")
    try:
        # Our own pixel limit is checked before decoding. warnings.catch_warnings is not used to turn
        # Pillow's DecompressionBombWarning into an error because it is not thread-safe (the server decodes
        # in threads); Pillow itself still raises DecompressionBombError above twice its own limit.
        opened = Image.open(io.BytesIO(data))
        width, height = opened.size
        if width * height > max_pixels:
            raise InvalidImageError(
                f"The image is {width}x{height} pixels, over the limit of {max_pixels:,} pixels "
                "(decompression bomb protection)."
            )
        opened.load()
        # in place: without it Pillow returns a full copy of every image that needs no rotation
        ImageOps.exif_transpose(opened, in_place=True)
        image: Image.Image = opened
    except UnidentifiedImageError as exc:
        raise InvalidImageError(
            "The data is not an image in a format Pillow can read (JPEG, PNG, WebP, BMP, TIFF, GIF...).",
            unsupported=True,
        ) from exc
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(
            "The image is too large to decode safely (decompression bomb protection).") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImageError(
            f"The image could not be decoded; it may be truncated or corrupt ({exc}).") from exc
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, scaling 16/32-bit data instead of clipping it."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        if image.mode == "F" and array.max(initial=0) <= 1.0:
            peak = 1.0
        gray = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read and decode an image file; errors name the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidImageError(f"Cannot read {str(path)!r}: {exc.strerror}.") from exc
    try:
        return decode_image(data, max_pixels=max_pixels)
    except InvalidImageError as exc:
        raise InvalidImageError(f"{path}: {exc.message}", unsupported=exc.unsupported) from exc


def _resample(name: str) -> int:
    from PIL import Image

    return {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "lanczos": Image.Resampling.LANCZOS,
        "box": Image.Resampling.BOX,
        "hamming": Image.Resampling.HAMMING,
    }[name]


def resize_and_crop(image: Image.Image, pp: Preprocess) -> Image.Image:
    """Resize the shorter side to ``pp.resize`` and cut the centre ``pp.crop`` square, as torchvision does."""
    resample = _resample(pp.interpolation)
    if pp.resize is None:
        return image.resize((pp.crop, pp.crop), resample)
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = pp.resize, int(pp.resize * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    top = int(round((size[1] - pp.crop) / 2.0))
    left = int(round((size[0] - pp.crop) / 2.0))
    if new_long > MAX_WHOLE_RESIZE_ASPECT * new_short:
        # An extreme aspect ratio: resample only the source region under the crop, to the crop's size. The
        # same filter at the same scale, so pixels differ from resizing the whole image by rounding only (at
        # most a level or two), while memory stays that of one crop instead of growing with the ratio.
        sx, sy = width / size[0], height / size[1]
        box = (left * sx, top * sy, (left + pp.crop) * sx, (top + pp.crop) * sy)
        return image.resize((pp.crop, pp.crop), resample, box=box)
    if size != image.size:
        image = image.resize(size, resample)
    return image.crop((left, top, left + pp.crop, top + pp.crop))


@lru_cache(maxsize=32)
def _normalization_table(pp: Preprocess) -> np.ndarray:
    """(3, 256) float32: the normalised value of every 8-bit level, per model input channel.

    The same float32 arithmetic as normalising the pixels one by one, so the result is bit-identical; a
    table lookup replaces three passes over the image with one.
    """
    levels = np.arange(256, dtype=np.float32)
    mean = np.asarray(pp.mean, dtype=np.float32)
    std = np.asarray(pp.std, dtype=np.float32)
    table = (levels[:, None] * np.float32(pp.scale) - mean) / std
    table = np.ascontiguousarray(table.T)
    table.setflags(write=False)
    return table


def preprocess(image: Image.Image, pp: Preprocess) -> np.ndarray:
    """One RGB image to one input tensor (no batch axis), in the card's layout and dtype."""
    pixels = np.asarray(resize_and_crop(image, pp))
    table = _normalization_table(pp)
    sources = (2, 1, 0) if pp.channel_order == "BGR" else (0, 1, 2)
    height, width = pixels.shape[:2]
    if pp.layout == "NCHW":
        tensor = np.empty((3, height, width), dtype=np.float32)
        for channel, source in enumerate(sources):
            np.take(table[channel], pixels[..., source], out=tensor[channel])
    else:
        tensor = np.empty((height, width, 3), dtype=np.float32)
        for channel, source in enumerate(sources):
            tensor[..., channel] = table[channel][pixels[..., source]]
    return tensor if pp.dtype == "float32" else tensor.astype(np.dtype(pp.dtype))


def preprocess_batch(images: Sequence[Image.Image], pp: Preprocess) -> np.ndarray:
    """Several RGB images to one batch tensor."""
    return np.stack([preprocess(image, pp) for image in images])


def iter_image_files(folder: str | Path) -> list[Path]:
    """Image files below ``folder`` (recursively), sorted by path."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_image_path(p))


def bundled_images() -> list[Path]:
    """The example images shipped in the repository (``examples/shapes/images``), if present."""
    folder = Path(__file__).resolve().parent.parent / "examples" / "shapes" / "images"
    return iter_image_files(folder) if folder.is_dir() else []


def load_images(paths: Iterable[str | Path]) -> list[Image.Image]:
    """Decode several image files."""
    return [load_image(p) for p in paths]
