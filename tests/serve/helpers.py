"""Image builders shared by the serve tests (written under tmp_path or kept in memory)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def label_of(path: Path) -> str:
    return path.stem.rsplit("_", 1)[0]


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def exif_rotated(image: Image.Image, fmt: str = "PNG") -> bytes:
    """The image stored rotated by 90 degrees, with EXIF orientation 6 saying how to turn it upright."""
    stored = image.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    return encode(stored, fmt, exif=exif.tobytes())


def variants(image: Image.Image) -> dict[str, bytes]:
    """The same picture as grayscale, RGBA, CMYK, 16-bit and palette files."""
    rgb = image.convert("RGB")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(255)
    gray16 = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    return {
        "gray.jpg": encode(rgb.convert("L"), "JPEG"),
        "rgba.png": encode(rgba, "PNG"),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "gray16.png": encode(gray16, "PNG"),
        "palette.png": encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256), "PNG"),
        "palette_transparent.gif": encode(
            rgb.convert("P", palette=Image.Palette.ADAPTIVE), "GIF", transparency=0
        ),
    }
