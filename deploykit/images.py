"""Image decoding and preprocessing: the one implementation, driven by the model card.

Used by verify, serve, predict and int8 calibration, so client and server cannot drift apart. It mirrors
torchvision's PIL path (``Grayscale`` for a one-channel model, ``Resize(int)`` then ``CenterCrop``, or
``Resize((h, w))``, ``ToTensor``, ``Normalize``) with Pillow and NumPy only; it never imports torch.

Two ways to decode. Exact decodes the whole image, as torchvision's pipeline does, bit for bit. Fast (the
default of ``load_tensor``) decodes a large image at about the size the model needs: a JPEG is decoded at
1/2, 1/4 or 1/8 scale inside libjpeg (Pillow's draft mode), keeping its shorter side at or above the resize
target; other formats are shrunk by a whole factor right after decoding, to no less than
``REDUCING_GAP`` times the target. The same final resize and crop follow. An image too small to shrink
that way (a JPEG whose shorter side is under twice the resize target, for instance) is decoded the same
way in both modes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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
#: Formats other than JPEG are shrunk (``Image.reduce``: box averaging, cruder than libjpeg's DCT scaling)
#: only down to this many times the resize target, as Pillow's ``reducing_gap``: the final resize then does
#: the rest of the filtering, and the result stays as close to the full decode as a JPEG's.
REDUCING_GAP = 3
#: ``shrink_image`` reduces only images whose shorter side is at least this many times the resize target.
SHRINK_MIN_FACTOR = 2
SHRINK_QUALITY = 95
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


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding a pixel (see ``probe_image``).

    ``width`` and ``height`` are as stored, before EXIF orientation (what the ``max_pixels`` limit counts);
    ``format`` is Pillow's name for it ("JPEG", "PNG", "WEBP", "MPO", ...), ``mode`` its pixel mode.
    """

    width: int
    height: int
    format: str
    mode: str

    @property
    def pixels(self) -> int:
        """Width times height: what a full decode holds in memory, in pixels."""
        return self.width * self.height

    def decoded_pixels(self, target: Preprocess | None = None, *, exact: bool = False) -> int:
        """The pixels that ``decode_image(..., target=target, exact=exact)`` decodes this image to.

        A fast-decoded JPEG never exists at full size (libjpeg decodes it scaled); other formats are decoded
        whole before they are shrunk, so for them this is ``pixels``.
        """
        if target is None or exact or self.format not in ("JPEG", "MPO"):
            return self.pixels
        scale = _dct_scale(self.width, self.height, target)
        return math.ceil(self.width / scale) * math.ceil(self.height / scale)

    def to_dict(self) -> dict[str, int | str]:
        return {"width": self.width, "height": self.height, "format": self.format, "mode": self.mode}


@contextmanager
def _decoding_errors() -> Iterator[None]:
    """Turn Pillow's ways of failing on bad input into ``InvalidImageError``."""
    from PIL import Image, UnidentifiedImageError

    try:
        yield
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


def _open(data: bytes) -> Image.Image:
    """Read the header only: Pillow decodes pixels on ``load()``."""
    from PIL import Image

    if not data:
        raise InvalidImageError("The image is empty (0 bytes).")
    return Image.open(io.BytesIO(data))


def probe_image(data: bytes) -> ImageHeader:
    """The size, format and mode from an image's header, without decoding it (cheap even for a bomb).

    Raises ``InvalidImageError`` for empty or unknown data and unreadable headers, as ``decode_image`` does;
    a truncated body is only found by decoding.
    """
    with _decoding_errors():
        image = _open(data)
        return ImageHeader(image.width, image.height, image.format or "", image.mode)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, target: Preprocess | None = None,
                 exact: bool = False) -> Image.Image:
    """Decode image bytes into an upright 8-bit RGB image.

    EXIF orientation is applied; grayscale, 16-bit, palette, CMYK and alpha images are converted (transparent
    pixels are composited on white). The header's pixel count is checked against ``max_pixels`` before any
    pixel is decoded.

    Without ``target`` (or with ``exact``) the whole image is decoded, as torchvision does. With ``target``,
    an image large enough to shrink (a JPEG whose shorter side is at least twice the resize target, other
    formats ``2 * REDUCING_GAP`` times) is decoded at reduced size (see the module docstring) and returned
    already resized to the size ``preprocess(image, target)`` resizes to, so that call only crops: such an
    image is meant for that ``target`` only. Smaller images come back exactly as without ``target``.

    Raises ``InvalidImageError`` for empty, unknown, truncated or oversized (decompression bomb) input.
    """
    from PIL import ImageOps

    with _decoding_errors():
        # Our own pixel limit is checked before decoding. warnings.catch_warnings is not used to turn
        # Pillow's DecompressionBombWarning into an error because it is not thread-safe (the server decodes
        # in threads); Pillow itself still raises DecompressionBombError above twice its own limit.
        opened = _open(data)
        width, height = opened.size
        if width * height > max_pixels:
            raise InvalidImageError(
                f"The image is {width}x{height} pixels, over the limit of {max_pixels:,} pixels "
                "(decompression bomb protection)."
            )
        reduced = None if target is None or exact else _decode_reduced(opened, target)
        if reduced is None:
            opened.load()
            # in place: without it Pillow returns a full copy of every image that needs no rotation
            ImageOps.exif_transpose(opened, in_place=True)
    return to_rgb(opened) if reduced is None else reduced.finish()


def _resize_target(pp: Preprocess) -> int:
    """The shorter side a reduced decode must keep: the resize target, or (exact resize to HxW, in either
    orientation) the larger of height and width."""
    return pp.resize if pp.resize is not None else max(pp.height, pp.width)


def _shrink_factor(width: int, height: int, pp: Preprocess, gap: int) -> int:
    """How many times the image can shrink with its shorter side staying ``gap`` times the resize target."""
    return min(width, height) // (_resize_target(pp) * gap)


def _dct_scale(width: int, height: int, pp: Preprocess) -> int:
    """The JPEG draft scale: the smallest of 1/2, 1/4, 1/8 that keeps the shorter side at least the target."""
    factor = _shrink_factor(width, height, pp, 1)
    return 8 if factor >= 8 else 4 if factor >= 4 else 2 if factor >= 2 else 1


#: Modes that ``Image.reduce`` averages correctly (alpha is premultiplied); others become RGB first.
_REDUCIBLE_MODES = frozenset({"RGB", "RGBA", "L", "LA"})


@dataclass(frozen=True)
class _Reduced:
    """A decoded, upright image smaller than the source by a factor, and where the source lies in it.

    The reduced image rounds its size up (libjpeg and ``Image.reduce`` do), so the source covers ``box``, up
    to one pixel less than the whole; resizing from ``box`` keeps the geometry of resizing the full image.
    """

    image: Image.Image
    box: tuple[float, float, float, float]
    size: tuple[int, int]  # what preprocess resizes the full-size image to
    resample: int

    def finish(self) -> Image.Image:
        """RGB at ``size``: the final resize, from the reduced image instead of the full one."""
        # Only ever a shrink, even at an extreme aspect ratio: the result is smaller than the reduced image.
        return to_rgb(self.image).resize(self.size, self.resample, box=self.box)


def _decode_reduced(opened: Image.Image, pp: Preprocess) -> _Reduced | None:
    """Decode ``opened`` shrunk for ``pp``, then orient it; None, before decoding, if it is too small."""
    from PIL import ExifTags, Image, JpegImagePlugin

    width, height = opened.size
    box: tuple[float, float, float, float] | None = None  # where the source lies in the decoded image
    if isinstance(opened, JpegImagePlugin.JpegImageFile) and (dct := _dct_scale(width, height, pp)) > 1:
        # Before load(): libjpeg then decodes straight at the scale, the full-size image is never in memory.
        # Asking for the current mode keeps it (draft would switch RGB to L or YCbCr if asked to).
        drafted = opened.draft(opened.mode, (width // dct, height // dct))
        if drafted is not None:
            box = drafted[1]
    factor = _shrink_factor(width, height, pp, REDUCING_GAP)
    if box is None and factor < 2:
        return None
    opened.load()
    # Read from the file (JPEG APP1, PNG eXIf, TIFF tags, XMP) before a reduced copy drops what is not EXIF.
    orientation = opened.getexif().get(ExifTags.Base.Orientation, 1)
    image: Image.Image = opened
    if box is None:
        # Reduce before converting, orienting or compositing: those then work on the small image.
        if image.mode not in _REDUCIBLE_MODES:
            image = to_rgb(image)
        image = image.reduce(factor)
        box = (0.0, 0.0, width / factor, height / factor)
    method = _transpose_method(orientation)
    if method is not None:
        box = _transposed_box(box, image.size, method)
        image = image.transpose(method)
        if method in (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
                      Image.Transpose.ROTATE_270):
            width, height = height, width
    return _Reduced(image, box, _resize_size(width, height, pp), _resample(pp.interpolation))


def _transpose_method(orientation: int) -> Image.Transpose | None:
    """The transposition that shows an image with this EXIF orientation upright (as exif_transpose does)."""
    from PIL import Image

    return {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }.get(orientation)


def _transposed_box(box: tuple[float, float, float, float], size: tuple[int, int],
                    method: Image.Transpose) -> tuple[float, float, float, float]:
    """Where ``box`` of an image of ``size`` lies after ``Image.transpose(method)``."""
    from PIL import Image

    w, h = size
    x0, y0, x1, y1 = box
    corner = {
        Image.Transpose.FLIP_LEFT_RIGHT: lambda x, y: (w - x, y),
        Image.Transpose.FLIP_TOP_BOTTOM: lambda x, y: (x, h - y),
        Image.Transpose.ROTATE_180: lambda x, y: (w - x, h - y),
        Image.Transpose.ROTATE_90: lambda x, y: (y, w - x),  # counter-clockwise
        Image.Transpose.ROTATE_270: lambda x, y: (h - y, x),
        Image.Transpose.TRANSPOSE: lambda x, y: (y, x),
        Image.Transpose.TRANSVERSE: lambda x, y: (h - y, w - x),
    }[method]
    (ax, ay), (bx, by) = corner(x0, y0), corner(x1, y1)
    return (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by))


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


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, target: Preprocess | None = None,
               exact: bool = False) -> Image.Image:
    """Read and decode an image file (as ``decode_image``); errors name the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidImageError(f"Cannot read {str(path)!r}: {exc.strerror}.") from exc
    try:
        return decode_image(data, max_pixels=max_pixels, target=target, exact=exact)
    except InvalidImageError as exc:
        raise InvalidImageError(f"{path}: {exc.message}", unsupported=exc.unsupported) from exc


def load_tensor(data: bytes, pp: Preprocess, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                exact: bool = False) -> np.ndarray:
    """Image bytes to one input tensor (no batch axis): decode at the size ``pp`` needs, then preprocess.

    ``exact`` decodes the whole image, bit-identical to torchvision's pipeline; otherwise a large image is
    decoded reduced (see ``decode_image``). Raises ``InvalidImageError`` as ``decode_image`` does.
    """
    return preprocess(decode_image(data, max_pixels=max_pixels, target=pp, exact=exact), pp)


def shrink_image(data: bytes, pp: Preprocess, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 image_format: str = "JPEG", quality: int = SHRINK_QUALITY) -> bytes | None:
    """A large image re-encoded at the size ``pp`` resizes it to, to send to a server; None for a small one.

    The image is decoded fast for ``pp`` (``decode_image``), brought to the size that ``preprocess`` resizes
    it to (the shorter side at ``pp.resize``, the aspect ratio kept) and encoded as ``image_format``: JPEG at
    ``quality`` with full-resolution colour, or lossless PNG. Nothing is cropped: a server that preprocesses
    the result with ``pp`` only crops it, so its tensor is the one a fast decode of ``data`` gives, within
    the JPEG encoding's rounding (PNG: exactly). EXIF orientation is applied; metadata is not kept.

    None, before anything is decoded, when the shorter side is under ``SHRINK_MIN_FACTOR`` times the resize
    target (the image goes as it is) or the resized aspect ratio is extreme (the server then resizes only
    the part under its crop). Raises ``InvalidImageError`` as ``decode_image`` does.
    """
    header = probe_image(data)
    if min(header.width, header.height) < SHRINK_MIN_FACTOR * _resize_target(pp) or _extreme_aspect(
            _resize_size(header.width, header.height, pp)):
        return None
    image = decode_image(data, max_pixels=max_pixels, target=pp)
    size = _resize_size(*image.size, pp)
    if image.size != size:  # not reduced in decoding (a PNG under 2 * REDUCING_GAP times the target)
        image = image.resize(size, _resample(pp.interpolation))
    buffer = io.BytesIO()
    if image_format.upper() == "PNG":
        image.save(buffer, "PNG")
    else:
        # 4:4:4: chroma subsampling would halve the colour resolution that the model sees.
        image.save(buffer, "JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


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


def _resize_size(width: int, height: int, pp: Preprocess) -> tuple[int, int]:
    """The size torchvision's ``Resize`` gives a ``width`` x ``height`` image under ``pp``."""
    if pp.resize is None:
        return (pp.width, pp.height)
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = pp.resize, int(pp.resize * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _extreme_aspect(size: tuple[int, int]) -> bool:
    return max(size) > MAX_WHOLE_RESIZE_ASPECT * min(size)


def resize_and_crop(image: Image.Image, pp: Preprocess) -> Image.Image:
    """Resize the shorter side to ``pp.resize`` and cut the centre ``pp.height`` x ``pp.width``, as
    torchvision's ``Resize`` and ``CenterCrop`` do (zero padding where the crop is larger than the image);
    with ``pp.resize`` None, resize straight to that size."""
    from PIL import Image

    resample = _resample(pp.interpolation)
    size = _resize_size(*image.size, pp)
    if pp.resize is None:
        return image if image.size == size else image.resize(size, resample)
    crop_w, crop_h = pp.width, pp.height
    left, top = _crop_offset(size[0], crop_w), _crop_offset(size[1], crop_h)
    if not _extreme_aspect(size):
        if size != image.size:
            image = image.resize(size, resample)
        # Pillow fills what lies outside the image with zeros, as CenterCrop's padding does.
        return image.crop((left, top, left + crop_w, top + crop_h))
    # An extreme aspect ratio: resample only the source region under the crop, to its final size. The same
    # filter at the same scale, so pixels differ from resizing the whole image by rounding only (at most a
    # level or two), while memory stays that of one crop instead of growing with the ratio.
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + crop_w, size[0]), min(top + crop_h, size[1])
    sx, sy = image.width / size[0], image.height / size[1]
    region = image.resize((x1 - x0, y1 - y0), resample, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))
    if region.size == (crop_w, crop_h):
        return region
    padded = Image.new(image.mode, (crop_w, crop_h))
    padded.paste(region, (x0 - left, y0 - top))
    return padded


def _crop_offset(size: int, crop: int) -> int:
    """Where CenterCrop starts a ``crop`` in a side of ``size``: negative (padding) when the crop is larger,
    padding ``(crop - size) // 2`` before, the rest after, as torchvision does."""
    return -((crop - size) // 2) if crop > size else int(round((size - crop) / 2.0))


@lru_cache(maxsize=32)
def _normalization_table(pp: Preprocess) -> np.ndarray:
    """(channels, 256) float32: the normalised value of every 8-bit level, per model input channel.

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


def _to_model_mode(image: Image.Image, pp: Preprocess) -> Image.Image:
    """An image in the colours the model takes: RGB for RGB and BGR (the tensor swaps the channels), or
    Pillow's ``L`` (ITU-R 601 luma, as torchvision's ``Grayscale``) for one channel."""
    if pp.channels == 1:
        return image if image.mode == "L" else to_rgb(image).convert("L")
    return to_rgb(image)


def preprocess(image: Image.Image, pp: Preprocess) -> np.ndarray:
    """An image (RGB, as ``decode_image`` returns) to one input tensor (no batch axis) as the card says.

    A one-channel model's image is converted to grayscale before it is resized, as ``Grayscale()`` first in
    a torchvision pipeline does.
    """
    pixels = np.asarray(resize_and_crop(_to_model_mode(image, pp), pp))
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    table = _normalization_table(pp)
    sources = (2, 1, 0) if pp.channel_order == "BGR" else tuple(range(pp.channels))
    height, width = pixels.shape[:2]
    if pp.layout == "NCHW":
        tensor = np.empty((pp.channels, height, width), dtype=np.float32)
        for channel, source in enumerate(sources):
            np.take(table[channel], pixels[..., source], out=tensor[channel])
    else:
        tensor = np.empty((height, width, pp.channels), dtype=np.float32)
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
