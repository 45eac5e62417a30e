"""decode_image / check_download: every mode decodes to upright RGB, every bad input is named."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from tasks.images import (
    MIN_DOWNLOAD_BYTES,
    ImageRejected,
    check_download,
    decode_image,
    sha256_hex,
)


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_rgb_png_round_trips_exactly() -> None:
    pixels = _noise(20, 30)
    image = decode_image(_encode(Image.fromarray(pixels), "PNG"))
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_grayscale_becomes_three_equal_channels() -> None:
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = np.asarray(decode_image(_encode(Image.fromarray(gray, mode="L"), "PNG")))
    assert rgb.shape == (16, 16, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], gray)


def test_sixteen_bit_grayscale_keeps_its_range() -> None:
    deep = (np.arange(64, dtype=np.uint16) * 1024).reshape(8, 8)
    rgb = np.asarray(decode_image(_encode(Image.fromarray(deep), "PNG")))
    np.testing.assert_array_equal(rgb[..., 0], (deep >> 8).astype(np.uint8))
    assert rgb.max() == 252


def test_cmyk_jpeg_decodes_to_rgb_colours() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    rgb = np.asarray(decode_image(_encode(cmyk, "JPEG", quality=95)))
    assert rgb.shape == (16, 16, 3)
    red, green, blue = rgb[8, 8].astype(int)
    assert red > 200 and green < 60 and blue < 60


def test_alpha_is_composited_on_white() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:2] = (255, 0, 0, 255)
    rgb = np.asarray(decode_image(_encode(Image.fromarray(rgba, mode="RGBA"), "PNG")))
    np.testing.assert_array_equal(rgb[0, 0], (255, 0, 0))
    np.testing.assert_array_equal(rgb[3, 3], (255, 255, 255))


def test_palette_with_transparency_is_composited_on_white() -> None:
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    palette.putpixel((0, 0), 1)
    data = _encode(palette, "PNG", transparency=0)
    rgb = np.asarray(decode_image(data))
    np.testing.assert_array_equal(rgb[0, 0], (0, 255, 0))
    np.testing.assert_array_equal(rgb[2, 2], (255, 255, 255))


def test_exif_orientation_is_applied() -> None:
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, :10] = (255, 0, 0)
    source = Image.fromarray(pixels)
    exif = source.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = decode_image(_encode(source, "JPEG", quality=95, exif=exif))
    assert image.size == (10, 20)
    upright = np.asarray(image).astype(int)
    # The left (red) half of the stored image ends up on top after a clockwise turn.
    assert upright[2, 5, 0] > 200 and upright[17, 5, 0] < 60


def test_empty_bytes_rejected() -> None:
    with pytest.raises(ImageRejected) as caught:
        decode_image(b"")
    assert caught.value.reason == "empty"


def test_garbage_rejected_as_corrupt() -> None:
    with pytest.raises(ImageRejected) as caught:
        decode_image(b"this is an html error page, not a picture" * 10)
    assert caught.value.reason == "corrupt"
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("fmt", "kept"),
    # A JPEG cut inside its header metadata fails with Pillow's "Truncated File Read".
    [("JPEG", 0.5), ("JPEG", 0.05), ("PNG", 0.5), ("PNG", 0.05), ("GIF", 0.5), ("TIFF", 0.5)],
)
def test_truncated_file_rejected(fmt: str, kept: float) -> None:
    data = _encode(Image.fromarray(_noise(64, 64)), fmt)
    with pytest.raises(ImageRejected) as caught:
        decode_image(data[: int(len(data) * kept)])
    assert caught.value.reason == "truncated"


@pytest.mark.parametrize("side", [8000, 14000])  # over our limit; over Pillow's hard limit too
def test_decompression_bomb_refused_before_decoding(side: int) -> None:
    bomb = _encode(Image.new("1", (side, side)), "PNG")
    assert len(bomb) < 200_000
    started = time.perf_counter()
    with pytest.raises(ImageRejected) as caught:
        decode_image(bomb)
    assert caught.value.reason == "too-large"
    assert time.perf_counter() - started < 1.0


def test_max_pixels_is_configurable() -> None:
    data = _encode(Image.fromarray(_noise(20, 20)), "PNG")
    assert decode_image(data, max_pixels=400).size == (20, 20)
    with pytest.raises(ImageRejected, match="400 pixels > 399") as caught:
        decode_image(data, max_pixels=399)
    assert caught.value.reason == "too-large"


def test_check_download_size_rule_boundary() -> None:
    with pytest.raises(ImageRejected) as caught:
        check_download(b"x" * 4000)
    assert caught.value.reason == "too-small-file"
    assert MIN_DOWNLOAD_BYTES == 4001
    check_download(b"x" * 4001)


def test_check_download_placeholder_and_empty() -> None:
    placeholder = b"placeholder-bytes" * 1000
    with pytest.raises(ImageRejected) as caught:
        check_download(placeholder, placeholder_sha256={sha256_hex(placeholder)})
    assert caught.value.reason == "placeholder"
    check_download(placeholder + b"!", placeholder_sha256={sha256_hex(placeholder)})
    with pytest.raises(ImageRejected) as caught:
        check_download(b"")
    assert caught.value.reason == "empty"
