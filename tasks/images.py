"""Image files through storage -> clean RGB picture, or a rejection (decoding:
:mod:`lesa_model.images`), and the download rules for bytes fetched from the web.

Every stage that reads image files (downloads, feature extraction, prediction) goes through this
module, so one set of rules decides which images are usable and the rejects tables share one
vocabulary of reasons: ``missing``, ``unreadable`` (storage could not return the bytes),
``empty``, ``truncated``, ``corrupt``, ``too-large`` (decompression bomb, or a resize too big for
the backbone), ``placeholder`` and ``too-small-file``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection

from PIL import Image

from lesa_model.images import ImageRejected, decode_image
from tasks.storage import Storage

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
