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
    DEFAULT_MAX_PIXELS,
    MAX_WHOLE_RESIZE_ASPECT,
    REDUCING_GAP,
    SHRINK_MIN_FACTOR,
    ImageHeader,
    InvalidImageError,
    decode_image,
    is_image_path,
    iter_image_files,
    load_image,
    load_tensor,
    preprocess,
    preprocess_batch,
    probe_image,
    resize_and_crop,
    shrink_image,
)
from tests.conftest import upscaled_photo


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
    """The card's preprocessing written with torchvision's transforms, as a training script would."""
    import torch
    from torchvision import transforms

    mode = {
        "bilinear": transforms.InterpolationMode.BILINEAR,
        "bicubic": transforms.InterpolationMode.BICUBIC,
        "nearest": transforms.InterpolationMode.NEAREST,
    }[pp.interpolation]
    steps = [transforms.Grayscale()] if pp.channels == 1 else []
    steps += [
        transforms.Resize(pp.resize if pp.resize is not None else (pp.height, pp.width), interpolation=mode),
        transforms.CenterCrop((pp.height, pp.width)),
        transforms.PILToTensor(),
        transforms.Lambda(lambda t: t.to(torch.float32) * pp.scale),
    ]
    if pp.channel_order == "BGR":  # an OpenCV-trained model: cv2.imread's BGR
        steps.append(transforms.Lambda(lambda t: t.flip(0)))
    steps.append(transforms.Normalize(pp.mean, pp.std))
    return transforms.Compose(steps)


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
        Preprocess(height=299, width=299, resize=342),  # inception_v3
        Preprocess(height=224, width=224, resize=232, interpolation="bicubic"),  # swin_t
        # the shapes example
        Preprocess(height=64, width=64, resize=72, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        # straight resize to the crop size
        Preprocess(height=96, width=96, resize=None),
        Preprocess(height=28, width=28, resize=None, channels=1, channel_order="L", mean=(0.13,),
                   std=(0.31,)),
        Preprocess(height=56, width=56, resize=64, channels=1, channel_order="L", mean=(0.5,), std=(0.2,)),
        Preprocess(height=128, width=64, resize=None),  # person re-identification: Resize((256, 128))
        Preprocess(height=32, width=192, resize=None, interpolation="bicubic"),  # a text line
        # a wide centre crop of a shorter side of 160
        Preprocess(height=96, width=160, resize=160),
        # a crop wider than some resized images: zero padding
        Preprocess(height=64, width=200, resize=100),
        Preprocess(scale=1.0, channel_order="BGR", mean=(103.53, 116.28, 123.675),
                   std=(57.375, 57.12, 58.395)),
    ],
    ids=["imagenet", "inception", "bicubic", "shapes", "no-resize", "gray-28", "gray-crop", "reid",
         "text-line", "wide-crop", "padded", "bgr-255"],
)
def test_preprocess_matches_torchvision(size: tuple[int, int], pp: Preprocess) -> None:
    image = gradient(*size, seed=size[0])
    ours = preprocess(image, pp)
    theirs = _torchvision_pipeline(pp)(image).numpy()
    assert ours.shape == theirs.shape == (pp.channels, pp.height, pp.width)
    assert ours.dtype == np.float32
    # float32 rounding: 1e-5 for pixels in 0..1, more for pixels in 0..255 over a std under 255
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * max(1.0, pp.scale * 255 / min(pp.std)))


@pytest.mark.parametrize("size", [(20, 2000), (3000, 40)])
@pytest.mark.parametrize("pp", [Preprocess(), Preprocess(height=64, width=300, resize=100)],
                         ids=["square", "padded"])
def test_extreme_aspect_ratio_resizes_only_the_crop(size: tuple[int, int], pp: Preprocess) -> None:
    # Past MAX_WHOLE_RESIZE_ASPECT only the region under the crop is resampled (and padded where the crop is
    # wider than the resized image): the pixels stay within two 8-bit levels of torchvision's whole resize.
    assert max(size) / min(size) > MAX_WHOLE_RESIZE_ASPECT
    image = gradient(*size, seed=7)
    ours = preprocess(image, pp)
    theirs = _torchvision_pipeline(pp)(image).numpy()
    assert ours.shape == theirs.shape == (3, pp.height, pp.width)
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
    pp = Preprocess(height=64, width=64, resize=72, mean=(0.3, 0.5, 0.7), std=(0.2, 0.25, 0.3),
                    channel_order=order,
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


# --- fast decoding: large images decoded at the size the model needs ----------------------------------------

IMAGENET = Preprocess()
SHAPES = Preprocess(height=64, width=64, resize=72, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
FAST_PREPROCESS = [
    IMAGENET,
    SHAPES,
    Preprocess(height=224, width=224, resize=232, interpolation="bicubic"),
    Preprocess(height=96, width=96, resize=None),
    Preprocess(height=28, width=28, resize=None, channels=1, channel_order="L", mean=(0.5,), std=(0.25,)),
    Preprocess(height=128, width=64, resize=None),
    Preprocess(height=96, width=160, resize=160, channel_order="BGR", scale=1.0, mean=(104.0, 117.0, 124.0),
               std=(58.0, 57.0, 57.0)),
]
FAST_IDS = ["imagenet", "shapes", "bicubic", "no-resize", "gray", "reid", "bgr-255-wide"]


def phone_photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """The real test photo at ``size`` with a phone's sensor grain (5 levels)."""
    return upscaled_photo(size, grain=5.0, seed=seed)


@pytest.fixture(scope="session")
def phone_image() -> Image.Image:
    """The 12-megapixel photo, upright, as a phone's main camera takes it (4032x3024)."""
    return phone_photo((4032, 3024))


@pytest.fixture(scope="session")
def phone_jpeg(phone_image: Image.Image) -> bytes:
    data = encode(phone_image, "JPEG", quality=92)
    assert 2_000_000 < len(data) < 4_000_000  # like a phone's: about 3 MB
    return data


def with_orientation(upright: Image.Image, orientation: int, fmt: str = "JPEG") -> bytes:
    """``upright`` stored as a camera stores it with this EXIF orientation (the tag says how to undo it)."""
    undo = {
        1: None,
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,  # stored turned left; the tag says: turn it right to view
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }[orientation]
    stored = upright if undo is None else upright.transpose(undo)
    exif = Image.Exif()
    exif[0x0112] = orientation
    params: dict[str, object] = {"quality": 95} if fmt == "JPEG" else {"compress_level": 1}
    return encode(stored, fmt, exif=exif.tobytes(), **params)


def levels_per_unit(pp: Preprocess) -> float:
    """How many normalised units one 8-bit level is, relative to ImageNet's preprocessing (1/255/0.226)."""
    return float(pp.scale / np.mean(pp.std)) / (1 / 255 / 0.226)


def differences(fast: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    assert fast.shape == exact.shape
    diff = np.abs(fast.astype(np.float64) - exact)
    return float(diff.mean()), float(diff.max())


@pytest.mark.parametrize("pp", FAST_PREPROCESS, ids=FAST_IDS)
def test_fast_decode_of_a_phone_photo_is_close_to_the_full_decode(phone_jpeg: bytes, pp: Preprocess) -> None:
    fast = load_tensor(phone_jpeg, pp)
    exact = load_tensor(phone_jpeg, pp, exact=True)
    assert fast.shape == exact.shape == (pp.channels, pp.height, pp.width)
    assert fast.dtype == np.float32
    mean, peak = differences(fast / levels_per_unit(pp), exact / levels_per_unit(pp))
    # A quarter to half an 8-bit level on average (one level is 1/255/std, about 0.017 here).
    assert mean < 0.015
    assert peak < 0.35
    assert mean > 0, "a 12-megapixel JPEG must take the fast path"


def test_fast_decode_returns_the_resized_image_and_decodes_at_one_eighth(phone_jpeg: bytes) -> None:
    image = decode_image(phone_jpeg, target=IMAGENET)
    assert image.mode == "RGB"
    assert image.size == (341, 256), "already at the size preprocess resizes to, so that it only crops"
    np.testing.assert_array_equal(preprocess(image, IMAGENET), load_tensor(phone_jpeg, IMAGENET))
    header = probe_image(phone_jpeg)
    assert header == ImageHeader(4032, 3024, "JPEG", "RGB")
    assert header.decoded_pixels(IMAGENET) == 504 * 378  # decoded at 1/8 scale: 3024 / 8 >= 256
    assert header.decoded_pixels(IMAGENET, exact=True) == header.pixels == 4032 * 3024
    assert header.decoded_pixels(Preprocess(height=224, width=224, resize=512)) == 1008 * 756  # 1/4: >= 512


@pytest.mark.parametrize("pp", [IMAGENET, SHAPES,
                                Preprocess(height=224, width=224, resize=232, interpolation="bicubic")],
                         ids=FAST_IDS[:3])
def test_exact_mode_is_todays_decode_and_torchvisions_pipeline(phone_jpeg: bytes, pp: Preprocess) -> None:
    exact = load_tensor(phone_jpeg, pp, exact=True)
    np.testing.assert_array_equal(exact, preprocess(decode_image(phone_jpeg), pp))
    np.testing.assert_array_equal(exact, preprocess(decode_image(phone_jpeg, target=pp, exact=True), pp))
    reference = Image.open(io.BytesIO(phone_jpeg)).convert("RGB")
    # The pixels after resize and crop are torchvision's bit for bit; the normalised floats differ by float32
    # rounding only (torchvision divides by 255, the lookup table multiplies by 1/255).
    from torchvision import transforms

    mode = {"bilinear": transforms.InterpolationMode.BILINEAR,
            "bicubic": transforms.InterpolationMode.BICUBIC}[pp.interpolation]
    resized = transforms.Resize(pp.resize, interpolation=mode)(reference)
    cropped = transforms.CenterCrop((pp.height, pp.width))(resized)
    ours = resize_and_crop(decode_image(phone_jpeg), pp)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(cropped))
    np.testing.assert_allclose(exact, _torchvision_pipeline(pp)(reference).numpy(), rtol=0, atol=1e-6)


def test_exif_rotated_phone_photo(phone_image: Image.Image) -> None:
    # A portrait photo as phones store it: landscape sensor pixels (4032x3024) and orientation 6.
    upright = phone_image.transpose(Image.Transpose.ROTATE_90)
    data = with_orientation(upright, 6)
    assert probe_image(data).width == 4032
    image = decode_image(data, target=IMAGENET)
    assert image.size == (256, 341), "upright: portrait"
    mean, peak = differences(load_tensor(data, IMAGENET), load_tensor(data, IMAGENET, exact=True))
    assert mean < 0.015
    assert peak < 0.35
    # The same photo stored upright gives (nearly) the same tensor: the rotation was undone, not forgotten.
    stored_upright = encode(upright, "JPEG", quality=95)
    upright_mean, _ = differences(load_tensor(data, IMAGENET), load_tensor(stored_upright, IMAGENET))
    assert upright_mean < 0.02


@pytest.fixture(scope="module")
def odd_sized_photo() -> Image.Image:
    """Sides not divisible by the reduction factors: the reduced image has a partial last row and column."""
    return phone_photo((1203, 901), seed=1)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_keeps_the_geometry(odd_sized_photo: Image.Image, orientation: int,
                                                   fmt: str) -> None:
    # The partial pixel ends up on another side after the rotation; resizing as if it were not there shifts
    # the image by up to half an output pixel, which shows as a mean difference 3 to 10 times these bounds.
    data = with_orientation(odd_sized_photo, orientation, fmt)
    fast = decode_image(data, target=SHAPES)
    assert fast.size == (96, 72)
    mean, peak = differences(load_tensor(data, SHAPES), load_tensor(data, SHAPES, exact=True))
    assert mean < (0.025 if fmt == "JPEG" else 0.008)
    assert peak < (0.4 if fmt == "JPEG" else 0.1)


def test_large_png_is_reduced_before_the_final_resize(phone_image: Image.Image) -> None:
    data = encode(phone_image.resize((2016, 1512)), "PNG", compress_level=1)
    assert 1512 // (SHAPES.resize * REDUCING_GAP) == 7  # reduced 7 times, to 288x216, three times the target
    assert decode_image(data, target=SHAPES).size == (96, 72)
    mean, peak = differences(load_tensor(data, SHAPES), load_tensor(data, SHAPES, exact=True))
    assert 0 < mean < 0.008
    assert peak < 0.1
    header = probe_image(data)
    assert header.decoded_pixels(SHAPES) == header.pixels, "a PNG is decoded whole, then reduced"


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "I;16", "1"])
def test_png_modes_on_the_reduce_path(odd_sized_photo: Image.Image, mode: str) -> None:
    if mode in ("RGBA", "LA"):
        rgba = odd_sized_photo.convert("RGBA")
        alpha = np.full(rgba.size[::-1], 255, dtype=np.uint8)
        alpha[:, : rgba.width // 2] = 0  # left half transparent: white after compositing
        rgba.putalpha(Image.fromarray(alpha))
        image = rgba if mode == "RGBA" else rgba.convert("LA")
    elif mode == "I;16":
        image = Image.fromarray(np.asarray(odd_sized_photo.convert("L")).astype(np.uint16) * 257)
    else:
        image = odd_sized_photo.convert(mode)
    data = encode(image, "PNG", compress_level=1)
    assert Image.open(io.BytesIO(data)).mode == mode
    fast, exact = load_tensor(data, SHAPES), load_tensor(data, SHAPES, exact=True)
    mean, _ = differences(fast, exact)
    assert mean < (0.03 if mode == "1" else 0.008)  # dithered 1-bit pixels are all edges
    if mode in ("RGBA", "LA"):
        white = (np.float32(1.0) - np.float32(0.5)) / np.float32(0.25)
        np.testing.assert_allclose(fast[:, :, :20], white, atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "CMYK"])
@pytest.mark.parametrize("pp", [IMAGENET, SHAPES], ids=["imagenet", "shapes"])
def test_grayscale_and_cmyk_jpegs_are_drafted(phone_image: Image.Image, mode: str, pp: Preprocess) -> None:
    data = encode(phone_image.resize((1600, 1200)).convert(mode), "JPEG", quality=90)
    header = probe_image(data)
    assert header.mode == mode
    assert header.decoded_pixels(pp) < header.pixels / 15  # 1/4 or 1/8 scale
    fast = decode_image(data, target=pp)
    assert fast.mode == "RGB"
    assert fast.size == (341, 256) if pp is IMAGENET else (96, 72)
    mean, peak = differences(load_tensor(data, pp), load_tensor(data, pp, exact=True))
    assert mean < 0.02
    assert peak < 0.5
    if mode == "L":
        pixels = np.asarray(fast)
        assert (pixels[..., 0] == pixels[..., 1]).all()
        assert (pixels[..., 0] == pixels[..., 2]).all()


def test_progressive_and_multi_picture_jpegs_are_drafted(odd_sized_photo: Image.Image) -> None:
    progressive = encode(odd_sized_photo, "JPEG", quality=90, progressive=True)
    mpo = encode(odd_sized_photo, "MPO", save_all=True, append_images=[odd_sized_photo.resize((300, 225))])
    for data in (progressive, mpo):
        assert probe_image(data).decoded_pixels(SHAPES) == 151 * 113  # 1/8 scale, sides rounded up
        mean, _ = differences(load_tensor(data, SHAPES), load_tensor(data, SHAPES, exact=True))
        assert mean < 0.025


@pytest.mark.parametrize(
    ("fmt", "short", "reduced"),
    [
        ("JPEG", 2 * SHAPES.resize - 1, False),
        ("JPEG", 2 * SHAPES.resize, True),  # 1/2 scale
        ("PNG", 2 * REDUCING_GAP * SHAPES.resize - 1, False),
        ("PNG", 2 * REDUCING_GAP * SHAPES.resize, True),  # reduced twice
    ],
)
def test_small_images_are_untouched_by_fast_mode(fmt: str, short: int, reduced: bool) -> None:
    data = encode(gradient(short + 37, short, seed=short), fmt, quality=90)
    fast, exact = decode_image(data, target=SHAPES), decode_image(data)
    if reduced:
        assert fast.size == (int(72 * (short + 37) / short), 72)
    else:
        assert fast.size == exact.size
        np.testing.assert_array_equal(np.asarray(fast), np.asarray(exact))
        np.testing.assert_array_equal(load_tensor(data, SHAPES), load_tensor(data, SHAPES, exact=True))


@pytest.mark.parametrize("size", [(160, 4000), (4000, 160)])
def test_extreme_aspect_ratio_in_fast_mode(size: tuple[int, int]) -> None:
    data = encode(gradient(*size, seed=5), "JPEG", quality=95)
    image = decode_image(data, target=SHAPES)
    assert min(image.size) == 72
    assert max(image.size) > MAX_WHOLE_RESIZE_ASPECT * 72
    mean, _ = differences(load_tensor(data, SHAPES), load_tensor(data, SHAPES, exact=True))
    assert mean < 0.1  # the gradient's random blue channel is noise at every scale


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A valid 16x16 baseline JPEG whose frame header (SOF0) is patched to claim ``width`` x ``height``."""
    data = bytearray(encode(gradient(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("data", [_png_claiming(9_000, 9_000), _jpeg_claiming(10_000, 9_000)],
                         ids=["png", "jpeg"])
def test_decompression_bomb_is_refused_in_fast_mode_too(data: bytes) -> None:
    header = probe_image(data)  # the header alone: no pixel is decoded
    assert header.pixels > DEFAULT_MAX_PIXELS
    for exact in (False, True):
        with pytest.raises(InvalidImageError, match="decompression bomb"):
            load_tensor(data, IMAGENET, exact=exact)


def test_pixel_limit_counts_the_full_size_even_when_decoded_smaller(phone_jpeg: bytes) -> None:
    with pytest.raises(InvalidImageError, match="4032x3024"):
        load_tensor(phone_jpeg, IMAGENET, max_pixels=10_000_000)


def test_probe_reads_the_header_only() -> None:
    assert probe_image(encode(gradient(40, 30), "PNG")) == ImageHeader(40, 30, "PNG", "RGB")
    assert probe_image(encode(gradient(40, 30).convert("L"), "JPEG")).to_dict() == {
        "width": 40, "height": 30, "format": "JPEG", "mode": "L"}
    assert probe_image(_png_claiming(9_000, 9_000)).pixels == 81_000_000  # its pixels are never read
    with pytest.raises(InvalidImageError, match="decompression bomb"):  # Pillow refuses past 2x its limit
        probe_image(_png_claiming(50_000, 40_000))
    with pytest.raises(InvalidImageError, match="empty"):
        probe_image(b"")
    with pytest.raises(InvalidImageError) as info:
        probe_image(b"%PDF-1.4 not an image" * 10)
    assert info.value.unsupported


def test_load_image_and_load_tensor_take_the_target(phone_jpeg: bytes, tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(phone_jpeg)
    assert load_image(path, target=IMAGENET).size == (341, 256)
    assert load_image(path, target=IMAGENET, exact=True).size == (4032, 3024)
    assert load_image(path).size == (4032, 3024)
    np.testing.assert_array_equal(preprocess(load_image(path, target=SHAPES), SHAPES),
                                  load_tensor(phone_jpeg, SHAPES))


# --- shrinking before upload: what `deploykit predict --shrink` sends ---------------------------------------


@pytest.mark.parametrize("pp", FAST_PREPROCESS, ids=FAST_IDS)
def test_a_shrunk_png_gives_the_server_the_tensor_of_the_original(phone_jpeg: bytes, pp: Preprocess) -> None:
    shrunk = shrink_image(phone_jpeg, pp, image_format="PNG")
    assert shrunk is not None
    header = probe_image(shrunk)
    resized = (pp.width, pp.height) if pp.resize is None else (int(pp.resize * 4032 / 3024), pp.resize)
    assert (header.format, header.width, header.height) == ("PNG", *resized), "resized, not cropped"
    # What the server computes from it (only a crop is left to do) is what it computes from the original.
    np.testing.assert_array_equal(load_tensor(shrunk, pp), load_tensor(phone_jpeg, pp))


@pytest.mark.parametrize("pp", FAST_PREPROCESS, ids=FAST_IDS)
def test_a_shrunk_jpeg_is_tens_of_kilobytes_and_close(phone_jpeg: bytes, pp: Preprocess) -> None:
    shrunk = shrink_image(phone_jpeg, pp)
    assert shrunk is not None
    assert probe_image(shrunk).format == "JPEG"
    assert len(shrunk) < 60_000 < 2_000_000 < len(phone_jpeg)
    mean, peak = differences(load_tensor(shrunk, pp), load_tensor(phone_jpeg, pp))
    level = pp.scale / min(pp.std)  # one 8-bit level in the model's input units
    # One to two levels on average (JPEG quality 95 of a grainy photo), about 15 at worst.
    assert 0 < mean < 2.5 * level
    assert peak < 20 * level


def test_a_shrunk_portrait_photo_is_upright(phone_image: Image.Image) -> None:
    data = with_orientation(phone_image.transpose(Image.Transpose.ROTATE_90), 6)
    shrunk = shrink_image(data, IMAGENET, image_format="PNG")
    assert shrunk is not None
    assert decode_image(shrunk).size == (256, 341)
    assert "exif" not in Image.open(io.BytesIO(shrunk)).info
    np.testing.assert_array_equal(load_tensor(shrunk, IMAGENET), load_tensor(data, IMAGENET))


def test_a_png_too_small_to_be_reduced_in_decoding_is_resized_by_the_client() -> None:
    # 4x the target: over the 2x that makes it worth shrinking, under the 6x that reduces a PNG when decoded.
    data = encode(phone_photo((400, 300), seed=3), "PNG")
    shrunk = shrink_image(data, SHAPES, image_format="PNG")
    assert shrunk is not None
    assert probe_image(shrunk).width == 96
    np.testing.assert_array_equal(load_tensor(shrunk, SHAPES), load_tensor(data, SHAPES, exact=True))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_images_under_twice_the_target_are_not_shrunk(fmt: str) -> None:
    short = SHRINK_MIN_FACTOR * SHAPES.resize
    assert shrink_image(encode(gradient(short + 10, short - 1), fmt), SHAPES) is None
    assert shrink_image(encode(gradient(short + 10, short), fmt), SHAPES) is not None
    # An extreme aspect ratio goes as it is: the server resizes only the part under its crop.
    assert shrink_image(encode(gradient(160, 4000), fmt), SHAPES) is None


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_shrinking_refuses_what_decoding_refuses() -> None:
    with pytest.raises(InvalidImageError, match="empty"):
        shrink_image(b"", IMAGENET)
    with pytest.raises(InvalidImageError, match="decompression bomb"):
        shrink_image(_jpeg_claiming(10_000, 9_000), IMAGENET)
