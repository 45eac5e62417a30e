"""Image bytes -> clean upright RGB picture, or a rejection with a machine-readable reason.

The one decoder of the project: feature extraction, prediction and :class:`lesa_model.Tagger`
decode through it, so the same bytes give the same pixels everywhere (and so the same
features). Reasons: ``missing``, ``unreadable`` (storage could not return the bytes), ``empty``,
``truncated``, ``corrupt``, ``too-large`` (decompression bomb, or a resize too big for the
backbone), ``placeholder`` and ``too-small-file``; the last two come from the download rules in
:mod:`tasks.images`.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

RejectReason = Literal[
    "missing",
    "unreadable",
    "empty",
    "truncated",
    "corrupt",
    "too-large",
    "placeholder",
    "too-small-file",
]

DEFAULT_MAX_PIXELS = 40_000_000
"""Largest accepted image (width x height). Real photos in NUS-WIDE and Open Images are far
smaller; 40 MP decodes to ~120 MB of RGB, so anything bigger is treated as a decompression bomb."""


class ImageRejected(ValueError):
    """An image that cannot be used; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"image rejected ({reason}): {detail}")
        self.reason: RejectReason = reason
        self.detail = detail


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` into an upright RGB image.

    The pixel count is checked from the header before any pixel is decoded, so a decompression
    bomb costs nothing. EXIF orientation is applied; grayscale, 16-bit, CMYK and palette images
    are converted to RGB; transparent areas are composited onto white (not black, which would
    invent dark regions the attention could latch on to).
    """
    if not data:
        raise ImageRejected("empty", "no bytes")
    # No warnings.catch_warnings() here: it is not thread-safe and decoding runs in threads.
    # Pillow's own bomb warning only fires above its 89 MP limit, which max_pixels rejects anyway.
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageRejected("too-large", str(error)) from error
    except UnidentifiedImageError as error:
        raise ImageRejected("corrupt", "not a recognised image format") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageRejected(_decode_failure(error), str(error)) from error
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRejected("corrupt", f"invalid size {width}x{height}")
    if width * height > max_pixels:
        raise ImageRejected(
            "too-large", f"{width}x{height} = {width * height} pixels > {max_pixels}"
        )
    try:
        image.load()
    except Image.DecompressionBombError as error:
        raise ImageRejected("too-large", str(error)) from error
    except EOFError as error:
        raise ImageRejected("truncated", str(error) or "unexpected end of file") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageRejected(_decode_failure(error), str(error)) from error
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError) as error:
        raise ImageRejected("corrupt", f"unreadable EXIF: {error}") from error
    return to_rgb(image)


def _decode_failure(error: Exception) -> RejectReason:
    """Pillow says "image file is truncated" or "Truncated File Read" for a cut-off file."""
    return "truncated" if "truncated" in str(error).lower() else "corrupt"


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; 16-bit keeps its high byte, 32-bit/float is stretched
    to its own range (Pillow's ``convert`` would clip both to white)."""
    if image.mode.startswith("I;16"):
        pixels = np.asarray(image, dtype=np.uint16)
        image = Image.fromarray((pixels >> 8).astype(np.uint8), mode="L")
    elif image.mode in {"I", "F"}:
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        image = Image.fromarray(((pixels - low) * scale).round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "L" and "transparency" in image.info:
        return to_rgb(image.convert("LA"))
    return image.convert("RGB") if image.mode != "RGB" else image
