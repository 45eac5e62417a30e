"""Locate the Noto Color Emoji font that the emoji-scenes dataset renders its objects with.

The font is a system package on Debian (``fonts-noto-color-emoji``). Where it is missing we
download the upstream release file once into a user cache, verify it against a pinned sha256 (a
different file would silently change every rendered image), and fail with a message that says
what to install when the machine is offline.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import requests
from tqdm import tqdm

FONT_FILENAME = "NotoColorEmoji.ttf"
NOTO_COLOR_EMOJI_VERSION = "v2.042"
NOTO_COLOR_EMOJI_URL = (
    "https://raw.githubusercontent.com/googlefonts/noto-emoji/"
    f"{NOTO_COLOR_EMOJI_VERSION}/fonts/{FONT_FILENAME}"
)
NOTO_COLOR_EMOJI_SHA256 = "e5899ed38b8ed83e08bd3ac5de09791e9d19d288333a796de1d35ad17396f1ec"
FONT_ENV_VAR = "LESA_EMOJI_FONT"

SYSTEM_FONT_DIRS: tuple[Path, ...] = (
    Path("/usr/share/fonts"),
    Path("/usr/local/share/fonts"),
    Path.home() / ".local/share/fonts",
    Path.home() / ".fonts",
    Path("/Library/Fonts"),
    Path.home() / "Library/Fonts",
)
DOWNLOAD_TIMEOUT_S = 30.0
_CHUNK_BYTES = 1 << 20


class FontNotFoundError(FileNotFoundError):
    """The emoji font is neither installed nor cached, and downloading it failed."""


class FontChecksumError(ValueError):
    """A downloaded font does not match its pinned sha256."""


def default_cache_dir() -> Path:
    """Where a downloaded font is kept: ``$XDG_CACHE_HOME/lesa/fonts`` (``~/.cache`` default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lesa" / "fonts"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so a 10 MB font never sits in memory twice."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_installed_font(
    filename: str = FONT_FILENAME, search_dirs: Iterable[Path] = SYSTEM_FONT_DIRS
) -> Path | None:
    """The first installed copy of ``filename`` under the usual font folders, or None."""
    for folder in search_dirs:
        if folder.is_dir():
            for candidate in sorted(folder.rglob(filename)):
                if candidate.is_file():
                    return candidate
    return None


def download_font(
    destination: Path,
    url: str = NOTO_COLOR_EMOJI_URL,
    sha256: str = NOTO_COLOR_EMOJI_SHA256,
    timeout_s: float = DOWNLOAD_TIMEOUT_S,
) -> Path:
    """Download ``url`` to ``destination`` atomically, keeping it only if its sha256 matches.

    The bytes go to a temporary file next to the destination and are renamed into place after
    verification, so an interrupted or tampered download never looks like a usable font.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        response = requests.get(url, stream=True, timeout=timeout_s)
        response.raise_for_status()
    except requests.RequestException as error:
        raise FontNotFoundError(
            f"Noto Color Emoji is not installed and downloading it from {url} failed ({error}). "
            "Install the Debian package fonts-noto-color-emoji, or set "
            f"{FONT_ENV_VAR} to the path of {FONT_FILENAME}."
        ) from error
    total = int(response.headers.get("content-length", 0)) or None
    digest = hashlib.sha256()
    with (
        response,
        tempfile.NamedTemporaryFile(
            dir=destination.parent, prefix=f".{destination.name}.", delete=False
        ) as tmp,
        tqdm(total=total, unit="B", unit_scale=True, desc=f"download {destination.name}") as bar,
    ):
        tmp_path = Path(tmp.name)
        try:
            for chunk in response.iter_content(_CHUNK_BYTES):
                tmp.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        except requests.RequestException as error:
            tmp_path.unlink(missing_ok=True)
            raise FontNotFoundError(f"downloading {url} was interrupted: {error}") from error
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
    actual = digest.hexdigest()
    if actual != sha256:
        tmp_path.unlink(missing_ok=True)
        raise FontChecksumError(f"{url} has sha256 {actual}, expected {sha256}; refusing to use it")
    tmp_path.replace(destination)
    return destination


def find_emoji_font(
    font_path: str | Path | None = None,
    *,
    cache_dir: Path | None = None,
    download: bool = True,
    search_dirs: Iterable[Path] = SYSTEM_FONT_DIRS,
) -> Path:
    """Path of a usable Noto Color Emoji font.

    Order: an explicit ``font_path``, then ``$LESA_EMOJI_FONT``, then an installed system font,
    then a verified copy in the cache, then (if ``download``) the pinned upstream release.
    """
    explicit = font_path or os.environ.get(FONT_ENV_VAR)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FontNotFoundError(f"emoji font {path} does not exist")
        return path
    installed = find_installed_font(search_dirs=search_dirs)
    if installed is not None:
        return installed
    cached = (cache_dir or default_cache_dir()) / FONT_FILENAME
    if cached.is_file() and sha256_of(cached) == NOTO_COLOR_EMOJI_SHA256:
        return cached
    if not download:
        raise FontNotFoundError(
            f"Noto Color Emoji is not installed (looked under {[str(d) for d in search_dirs]} "
            f"and {cached}); install fonts-noto-color-emoji or allow the download"
        )
    return download_font(cached)
