"""Image bytes -> clean RGB picture, or a rejection with a machine-readable reason.

Every stage that touches image files (downloads, feature extraction, prediction) goes through this
module, so one set of rules decides which images are usable and the rejects tables share one
vocabulary of reasons: ``missing``, ``unreadable`` (storage could not return the bytes),
``empty``, ``truncated``, ``corrupt``, ``too-large`` (decompression bomb, or a resize too big for
the backbone), ``placeholder`` and ``too-small-file``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Collection
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tasks.storage import Storage

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

MIN_DOWNLOAD_BYTES = 4001
"""NUS-WIDE rule (authors' release): downloaded files of 4000 bytes or less are error pages or
stubs, not photos."""

FLICKR_PLACEHOLDER_SHA256: frozenset[str] = frozenset()
"""SHA-256 digests of Flickr's "photo unavailable" placeholder image.

The real digest could not be obtained offline, so this default is empty and callers pass the
digests they know (``NusWideConfig.placeholder_sha256``). Flickr answers a removed photo's URL
with a redirect to its ``photo_unavailable`` image, which :func:`tasks.download.download_many`
rejects by that redirect (``DownloadConfig.placeholder_redirects``) whatever its bytes; the
digests catch a placeholder served or stored without one."""


class ImageRejected(ValueError):
    """An image that cannot be used; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"image rejected ({reason}): {detail}")
        self.reason: RejectReason = reason
        self.detail = detail


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (the identity used for placeholder detection)."""
    return hashlib.sha256(data).hexdigest()


def check_download(
    data: bytes,
    *,
    placeholder_sha256: Collection[str] = FLICKR_PLACEHOLDER_SHA256,
    min_bytes: int = MIN_DOWNLOAD_BYTES,
) -> None:
    """Apply the NUS-WIDE download rules to raw bytes; raise :class:`ImageRejected` if they fail.

    The placeholder check runs before the size check so a known placeholder is reported as such
    even when it is also small.
    """
    if not data:
        raise ImageRejected("empty", "no bytes received")
    if placeholder_sha256 and sha256_hex(data) in placeholder_sha256:
        raise ImageRejected("placeholder", "byte-identical to the Flickr 'photo unavailable' image")
    if len(data) < min_bytes:
        raise ImageRejected("too-small-file", f"{len(data)} bytes (need at least {min_bytes})")


def resolve_uri(uri: str, images_prefix: str) -> str:
    """An image's URL: absolute URLs and paths as they are, others under ``images_prefix``."""
    if "://" in uri or uri.startswith("/"):
        return uri
    return f"{images_prefix.rstrip('/')}/{uri.lstrip('/')}"


def read_image(uri: str, storage: Storage) -> Image.Image:
    """Read ``uri`` through storage and decode it (:func:`decode_image`).

    Raises:
        ImageRejected: ``missing`` when there is no such object, ``unreadable`` when storage
            fails to return it, or a decoding reason.
    """
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as error:
        raise ImageRejected("missing", str(error) or uri) from error
    except (OSError, ValueError) as error:
        raise ImageRejected("unreadable", f"{type(error).__name__}: {error}") from error
    return decode_image(data)


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
    return _to_rgb(image)


def _decode_failure(error: Exception) -> RejectReason:
    """Pillow says "image file is truncated" or "Truncated File Read" for a cut-off file."""
    return "truncated" if "truncated" in str(error).lower() else "corrupt"


def _to_rgb(image: Image.Image) -> Image.Image:
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
        return _to_rgb(image.convert("LA"))
    return image.convert("RGB") if image.mode != "RGB" else image
