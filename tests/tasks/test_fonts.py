"""Tests for locating and downloading the Noto Color Emoji font (a real local HTTP server)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from tasks import fonts


@pytest.fixture()
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Serve ``tmp_path / 'www'`` over HTTP on loopback; yields (base URL, folder)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def test_installed_font_is_found_and_renders_in_colour() -> None:
    path = fonts.find_emoji_font(download=False)
    assert path.name == fonts.FONT_FILENAME
    font = ImageFont.truetype(str(path), 109)
    image = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(image).text((0, 0), "\U0001f34e", font=font, embedded_color=True)
    pixels = np.asarray(image, dtype=np.float64)
    opaque = pixels[pixels[..., 3] == 255]
    assert len(opaque) > 1000
    # A red apple: its opaque pixels are far redder than green, which a monochrome glyph is not.
    assert opaque[:, 0].mean() > 1.5 * opaque[:, 1].mean()


def test_installed_font_matches_pinned_sha256() -> None:
    installed = fonts.find_installed_font()
    if installed is None:
        pytest.skip("fonts-noto-color-emoji is not installed here")
    assert fonts.sha256_of(installed) == fonts.NOTO_COLOR_EMOJI_SHA256


def test_explicit_path_wins_and_missing_explicit_path_is_named(tmp_path: Path) -> None:
    given = tmp_path / "MyEmoji.ttf"
    given.write_bytes(b"x")
    assert fonts.find_emoji_font(given) == given
    with pytest.raises(fonts.FontNotFoundError, match=r"does-not-exist\.ttf"):
        fonts.find_emoji_font(tmp_path / "does-not-exist.ttf")


def test_env_var_points_at_font(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    given = tmp_path / "env.ttf"
    given.write_bytes(b"x")
    monkeypatch.setenv(fonts.FONT_ENV_VAR, str(given))
    assert fonts.find_emoji_font() == given


def test_download_verifies_checksum(http_root: tuple[str, Path], tmp_path: Path) -> None:
    base, root = http_root
    payload = b"not really a font, but bytes with a known hash" * 1000
    (root / "font.ttf").write_bytes(payload)
    good = hashlib.sha256(payload).hexdigest()
    target = tmp_path / "cache" / "font.ttf"

    assert fonts.download_font(target, url=f"{base}/font.ttf", sha256=good) == target
    assert target.read_bytes() == payload

    other = tmp_path / "cache2" / "font.ttf"
    with pytest.raises(fonts.FontChecksumError, match="expected 0000"):
        fonts.download_font(other, url=f"{base}/font.ttf", sha256="0" * 64)
    assert not other.exists()
    assert list(other.parent.iterdir()) == []  # the temporary file is gone too


def test_a_failed_write_leaves_no_temporary_file(
    http_root: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, root = http_root
    (root / "font.ttf").write_bytes(b"font bytes" * 1000)
    target = tmp_path / "cache" / "font.ttf"

    real_temporary_file = tempfile.NamedTemporaryFile

    def on_a_full_disk(*args: Any, **kwargs: Any) -> Any:
        handle = real_temporary_file(*args, **kwargs)

        def write(data: bytes) -> int:
            raise OSError(28, "No space left on device")

        handle.write = write
        return handle

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", on_a_full_disk)
    with pytest.raises(OSError, match="No space left"):
        fonts.download_font(target, url=f"{base}/font.ttf", sha256="0" * 64)
    assert list(target.parent.iterdir()) == []


def test_download_failure_says_what_to_install(http_root: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = http_root
    with pytest.raises(fonts.FontNotFoundError, match="fonts-noto-color-emoji"):
        fonts.download_font(tmp_path / "f.ttf", url=f"{base}/missing.ttf", sha256="0" * 64)
    # Nothing listens on port 9 of loopback: the offline case.
    with pytest.raises(fonts.FontNotFoundError, match="downloading it from"):
        fonts.download_font(
            tmp_path / "f.ttf", url="http://127.0.0.1:9/font.ttf", sha256="0" * 64, timeout_s=2
        )


def test_without_font_and_without_download_the_error_is_clear(tmp_path: Path) -> None:
    with pytest.raises(fonts.FontNotFoundError, match="not installed"):
        fonts.find_emoji_font(cache_dir=tmp_path, download=False, search_dirs=[tmp_path])


def test_verified_cached_copy_is_used(tmp_path: Path) -> None:
    installed = fonts.find_installed_font()
    if installed is None:
        pytest.skip("fonts-noto-color-emoji is not installed here")
    cached = tmp_path / fonts.FONT_FILENAME
    cached.symlink_to(installed)
    empty = tmp_path / "no-fonts"
    empty.mkdir()
    assert fonts.find_emoji_font(cache_dir=tmp_path, download=False, search_dirs=[empty]) == cached
