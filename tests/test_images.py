"""images.py: decoding every common kind of image, refusing bad ones, preprocessing exactly as torchvision."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploykit.card import Preprocess
from deploykit.images import (
    MAX_WHOLE_RESIZE_ASPECT,
    InvalidImageError,
    decode_image,
    is_image_path,
    iter_image_files,
    load_image,
    preprocess,
    preprocess_batch,
    resize_and_crop,
)


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def gradient(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image with structure (so resizing and cropping mistakes show)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), rng.integers(0, 256, (height, width))],
        axis=-1,
    )
    return Image.fromarray(pixels.astype(np.uint8), mode="RGB")


# --- decoding -----------------------------------------------------------------------------------------------


def test_decodes_jpeg_and_png_to_rgb() -> None:
    source = gradient(40, 30)
    for fmt in ("JPEG", "PNG"):
        image = decode_image(encode(source, fmt))
        assert image.mode == "RGB"
        assert image.size == (40, 30)
    assert np.array_equal(np.asarray(decode_image(encode(source, "PNG"))), np.asarray(source))


def test_grayscale_becomes_three_equal_channels() -> None:
    gray = Image.fromarray(np.full((8, 9), 77, dtype=np.uint8), mode="L")
    pixels = np.asarray(decode_image(encode(gray)))
    assert pixels.shape == (8, 9, 3)
    assert (pixels == 77).all()


def test_transparent_rgba_is_composited_on_white() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red ...
    rgba[:2, :, 3] = 0  # ... fully transparent in the top half
    rgba[2:, :, 3] = 255  # ... opaque in the bottom half
    pixels = np.asarray(decode_image(encode(Image.fromarray(rgba, mode="RGBA"))))
    assert (pixels[:2] == 255).all(), "transparent pixels must become white, not the hidden colour or black"
    assert (pixels[2:] == [255, 0, 0]).all()


def test_half_transparent_pixels_blend_with_white() -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 3] = 128  # black at ~50% opacity
    pixels = np.asarray(decode_image(encode(Image.fromarray(rgba, mode="RGBA"))))
    assert np.all(np.abs(pixels.astype(int) - 127) <= 1)


def test_cmyk_jpeg_is_converted() -> None:
    cmyk = Image.new("CMYK", (10, 6), (0, 255, 255, 0))  # pure red in CMYK
    image = decode_image(encode(cmyk, "JPEG", quality=95))
    assert image.mode == "RGB"
    assert image.size == (10, 6)
    r, g, b = np.asarray(image).reshape(-1, 3).mean(axis=0)
    assert r > 200
    assert g < 60
    assert b < 60


def test_16_bit_png_is_scaled_not_clipped() -> None:
    levels = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(levels))
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    pixels = np.asarray(decode_image(data))[0, :, 0].astype(int)
    # clipping would give 0, 255, 255, 255; scaling gives 0, 64, 128, 255
    assert abs(pixels[1] - 64) <= 1
    assert abs(pixels[2] - 128) <= 1
    assert pixels[0] == 0
    assert pixels[3] == 255


def test_mid_gray_16_bit_image_becomes_mid_gray() -> None:
    data = encode(Image.fromarray(np.full((6, 5), 32768, dtype=np.uint16)))
    pixels = np.asarray(decode_image(data))
    assert pixels.shape == (6, 5, 3)
    assert np.all(np.abs(pixels.astype(int) - 128) <= 1)


def test_palette_image_with_transparency() -> None:
    palette_image = Image.new("P", (4, 2))
    palette_image.putpalette([0, 0, 255] + [0, 255, 0] + [0] * 762)  # index 0 blue, 1 green
    palette_image.putpixel((0, 0), 0)
    palette_image.putpixel((1, 0), 1)
    data = encode(palette_image, transparency=0)
    pixels = np.asarray(decode_image(data))
    assert (pixels[0, 0] == 255).all(), "the transparent palette index must become white"
    assert list(pixels[0, 1]) == [0, 255, 0]


def test_exif_orientation_is_applied() -> None:
    # A 40x20 image: left half black, right half white. Orientation 6: "rotate 90 degrees clockwise to view".
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    upright = np.asarray(decode_image(data)).astype(int)
    assert upright.shape == (40, 20, 3), "width and height must be swapped after the rotation"
    # Rotated clockwise, the former left (black) half is on top and the white half at the bottom.
    assert upright[:15].mean() < 30
    assert upright[25:].mean() > 225


def test_truncated_jpeg_is_invalid() -> None:
    data = encode(gradient(64, 64), "JPEG")
    with pytest.raises(InvalidImageError) as info:
        decode_image(data[: len(data) // 2])
    assert not info.value.unsupported
    assert "truncated or corrupt" in str(info.value)


def test_non_image_bytes_are_unsupported() -> None:
    with pytest.raises(InvalidImageError) as info:
        decode_image(b"%PDF-1.4 this is not an image at all" * 10)
    assert info.value.unsupported
    assert "not an image" in str(info.value)


def test_empty_bytes_are_invalid() -> None:
    with pytest.raises(InvalidImageError, match="empty"):
        decode_image(b"")


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is patched (with a correct CRC) to claim ``width`` x ``height``."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    start = data.index(b"IHDR")
    body = struct.pack(">II", width, height) + bytes(data[start + 12 : start + 17])
    data[start + 4 : start + 17] = body
    data[start + 17 : start + 21] = struct.pack(">I", zlib.crc32(b"IHDR" + body) & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.parametrize("side", [9_000, 50_000])  # under and over Pillow's own limit (89 M pixels)
def test_decompression_bomb_is_refused(side: int) -> None:
    data = _png_claiming(side, side)
    assert len(data) < 100
    with pytest.raises(InvalidImageError, match="decompression bomb"):
        decode_image(data)


def test_patched_header_is_what_pillow_sees() -> None:
    assert Image.open(io.BytesIO(_png_claiming(9_000, 8_000))).size == (9_000, 8_000)


def test_pixel_limit_is_configurable() -> None:
    data = encode(gradient(100, 100))
    assert decode_image(data).size == (100, 100)
    with pytest.raises(InvalidImageError, match="100x100"):
        decode_image(data, max_pixels=9_999)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns first
def test_compressed_large_bilevel_image_is_refused_before_decoding() -> None:
    # 12000 x 12000 one-bit pixels compress to a few kB but would need 432 MB as RGB.
    data = encode(Image.new("1", (12_000, 12_000)))
    assert len(data) < 100_000
    with pytest.raises(InvalidImageError, match="decompression bomb"):
        decode_image(data)


def test_load_image_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not really a jpeg")
    with pytest.raises(InvalidImageError, match="broken.jpg"):
        load_image(bad)
    with pytest.raises(InvalidImageError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_image_file_listing(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.JPG", "a.png", "sub/c.webp", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in iter_image_files(tmp_path)] == [
        "a.png",
        "b.JPG",
        "sub/c.webp",
    ]
    assert is_image_path("x.jpeg")
    assert not is_image_path("x.onnx")


# --- preprocessing: the one implementation must equal torchvision's -----------------------------------------


def _torchvision_pipeline(pp: Preprocess):  # noqa: ANN202 - torchvision types stay out of the signature
    from torchvision import transforms

    mode = {
        "bilinear": transforms.InterpolationMode.BILINEAR,
        "bicubic": transforms.InterpolationMode.BICUBIC,
        "nearest": transforms.InterpolationMode.NEAREST,
    }[pp.interpolation]
    resize = transforms.Resize(pp.resize if pp.resize is not None else (pp.crop, pp.crop), interpolation=mode)
    return transforms.Compose(
        [resize, transforms.CenterCrop(pp.crop), transforms.ToTensor(), transforms.Normalize(pp.mean, pp.std)]
    )


@pytest.mark.parametrize(
    "size",
    [
        (224, 224),
        (256, 256),
        (500, 375),
        (375, 500),
        (333, 257),
        (257, 1001),
        (640, 480),
        (225, 301),
        (1023, 767),
    ],
)
@pytest.mark.parametrize(
    "pp",
    [
        Preprocess(),  # ImageNet: Resize(256), CenterCrop(224), bilinear
        Preprocess(crop=299, resize=342),  # inception_v3
        Preprocess(crop=224, resize=232, interpolation="bicubic"),  # swin_t
        Preprocess(crop=64, resize=72, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),  # the shapes example
        Preprocess(crop=96, resize=None),  # straight resize to the crop size
    ],
    ids=["imagenet", "inception", "bicubic", "shapes", "no-resize"],
)
def test_preprocess_matches_torchvision(size: tuple[int, int], pp: Preprocess) -> None:
    image = gradient(*size, seed=size[0])
    ours = preprocess(image, pp)
    theirs = _torchvision_pipeline(pp)(image).numpy()
    assert ours.shape == theirs.shape == (3, pp.crop, pp.crop)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(20, 2000), (3000, 40)])
def test_extreme_aspect_ratio_resizes_only_the_crop(size: tuple[int, int]) -> None:
    # Past MAX_WHOLE_RESIZE_ASPECT only the region under the crop is resampled: the pixels stay within two
    # 8-bit levels of torchvision's whole-image resize.
    assert max(size) / min(size) > MAX_WHOLE_RESIZE_ASPECT
    image = gradient(*size, seed=7)
    pp = Preprocess()
    ours = preprocess(image, pp)
    theirs = _torchvision_pipeline(pp)(image).numpy()
    levels = np.abs(ours - theirs) * np.asarray(pp.std, dtype=np.float32)[:, None, None] * 255
    assert levels.max() <= 2.01


def test_one_pixel_wide_image_does_not_blow_up_memory() -> None:
    # Resized whole, a 1 x 200,000 image would become 256 x 51,200,000 pixels (39 GB).
    image = Image.new("RGB", (1, 200_000), (200, 30, 90))
    tensor = preprocess(image, Preprocess())
    assert tensor.shape == (3, 224, 224)
    expected = (np.float32(200 / 255) - np.float32(0.485)) / np.float32(0.229)
    np.testing.assert_allclose(tensor[0], expected, atol=1e-5)


def test_preprocess_after_decoding_matches_torchvision_on_a_jpeg() -> None:
    data = encode(gradient(517, 389, seed=3), "JPEG", quality=90)
    pp = Preprocess()
    ours = preprocess(decode_image(data), pp)
    theirs = _torchvision_pipeline(pp)(Image.open(io.BytesIO(data)).convert("RGB")).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_preprocess_layouts_and_channel_order() -> None:
    image = gradient(300, 260)
    nchw = preprocess(image, Preprocess())
    nhwc = preprocess(image, Preprocess(layout="NHWC"))
    bgr = preprocess(
        image, Preprocess(channel_order="BGR", mean=(0.406, 0.456, 0.485), std=(0.225, 0.224, 0.229))
    )
    assert nhwc.shape == (224, 224, 3)
    np.testing.assert_array_equal(nhwc.transpose(2, 0, 1), nchw)
    np.testing.assert_allclose(bgr[::-1], nchw, atol=1e-6)
    assert preprocess(image, Preprocess(dtype="float16")).dtype == np.float16


def test_preprocess_batch_stacks() -> None:
    batch = preprocess_batch([gradient(300, 200), gradient(200, 300)], Preprocess())
    assert batch.shape == (2, 3, 224, 224)
    assert batch.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("order", ["RGB", "BGR"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_preprocess_is_bit_identical_to_pixelwise_normalisation(layout: str, order: str, dtype: str) -> None:
    """The lookup table must give exactly what normalising each float32 pixel gives."""
    pp = Preprocess(crop=64, resize=72, mean=(0.3, 0.5, 0.7), std=(0.2, 0.25, 0.3), channel_order=order,
                    layout=layout, dtype=dtype)
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))  # every level occurs
    pixels = np.asarray(resize_and_crop(image, pp), dtype=np.float32)
    if order == "BGR":
        pixels = pixels[..., ::-1]
    mean, std = np.asarray(pp.mean, np.float32), np.asarray(pp.std, np.float32)
    expected = (pixels * np.float32(pp.scale) - mean) / std
    if layout == "NCHW":
        expected = expected.transpose(2, 0, 1)
    ours = preprocess(image, pp)
    assert ours.dtype == np.dtype(dtype)
    assert ours.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(ours, expected.astype(dtype))
