"""download_many against a real HTTP server on 127.0.0.1; archive extraction refuses zip-slip."""

from __future__ import annotations

import io
import tarfile
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tasks.download import (
    DownloadConfig,
    DownloadItem,
    UnsafeArchiveError,
    download_many,
    extract_archive,
    unpacked_archive,
)
from tasks.images import check_download, sha256_hex
from tasks.storage import Storage, StorageConfig

PHOTO = bytes(range(256)) * 40  # 10,240 bytes: passes the size rule
SMALL = b"s" * 4000  # exactly at the limit: rejected
PLACEHOLDER = b"flickr-photo-unavailable" * 300  # 7,200 bytes, rejected by hash


class _Server:
    """A real loopback HTTP server whose routes exercise every download outcome."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                """Keep test output quiet."""

            def do_GET(self) -> None:
                with owner.lock:
                    owner.hits[self.path] += 1
                    count = owner.hits[self.path]
                status, body = owner.route(self.path, count)
                self.send_response(status)
                if status == 302:
                    self.send_header("Location", body.decode())
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def route(self, path: str, count: int) -> tuple[int, bytes]:
        if path.startswith("/ok/"):
            return 200, PHOTO + path.encode()
        if path == "/flaky.jpg":  # two server errors, then the photo
            return (503, b"busy") if count <= 2 else (200, PHOTO)
        if path == "/down.jpg":
            return 503, b"busy"
        if path == "/small.jpg":
            return 200, SMALL
        if path == "/placeholder.jpg":
            return 200, PLACEHOLDER
        if path == "/removed.jpg":  # how Flickr answers for a deleted photo
            return 302, b"/images/photo_unavailable.png"
        if path == "/moved.jpg":  # an ordinary redirect to a real photo
            return 302, b"/ok/moved.jpg"
        if path == "/images/photo_unavailable.png":
            return 200, b"a placeholder whose digest nobody configured" * 200
        return 404, b"not found"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server() -> Iterator[_Server]:
    running = _Server()
    running.thread.start()
    yield running
    running.httpd.shutdown()
    running.httpd.server_close()


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(StorageConfig(root=str(tmp_path / "store"), cache_dir=str(tmp_path / "c")))


FAST = DownloadConfig(workers=4, retries=3, backoff_s=0.01, timeout_s=5)


def _check(data: bytes) -> None:
    check_download(data, placeholder_sha256={sha256_hex(PLACEHOLDER)})


def test_download_outcomes_retries_and_rejects(server: _Server, storage: Storage) -> None:
    target = storage.url("images")
    items = [
        DownloadItem("a", (server.url("/ok/a.jpg"),), f"{target}/a.jpg"),
        DownloadItem("flaky", (server.url("/flaky.jpg"),), f"{target}/flaky.jpg"),
        DownloadItem("fallback", (server.url("/gone.jpg"), server.url("/ok/b.jpg")), f"{target}/b"),
        DownloadItem("gone", (server.url("/gone.jpg"),), f"{target}/gone.jpg"),
        DownloadItem("down", (server.url("/down.jpg"),), f"{target}/down.jpg"),
        DownloadItem("small", (server.url("/small.jpg"),), f"{target}/small.jpg"),
        DownloadItem("ph", (server.url("/placeholder.jpg"),), f"{target}/ph.jpg"),
        DownloadItem("nourl", (), f"{target}/nourl.jpg"),
    ]
    result = download_many(items, storage, FAST, check=_check)

    assert sorted(result.downloaded) == ["a", "fallback", "flaky"]
    assert storage.read_bytes(f"{target}/a.jpg") == PHOTO + b"/ok/a.jpg"
    assert storage.read_bytes(f"{target}/flaky.jpg") == PHOTO
    assert storage.read_bytes(f"{target}/b") == PHOTO + b"/ok/b.jpg"
    assert server.hits["/flaky.jpg"] == 3  # two 503s retried, then success
    assert server.hits["/down.jpg"] == FAST.retries + 1
    reasons = dict(zip(result.rejects["image_id"], result.rejects["reason"], strict=True))
    assert reasons == {
        "down": "http-503",
        "gone": "http-404",
        "nourl": "no-url",
        "ph": "placeholder",
        "small": "too-small-file",
    }
    assert set(result.rejects["stage"]) == {"download"}
    for key in reasons:
        assert not storage.exists(f"{target}/{key}.jpg")


def test_redirect_to_the_unavailable_image_is_a_placeholder(
    server: _Server, storage: Storage
) -> None:
    target = storage.url("images")
    items = [
        DownloadItem(
            "removed", (server.url("/removed.jpg"), server.url("/ok/r.jpg")), f"{target}/r"
        ),
        DownloadItem("moved", (server.url("/moved.jpg"),), f"{target}/m"),
    ]
    result = download_many(items, storage, FAST, check=_check)

    assert result.downloaded == ["moved"]
    assert storage.read_bytes(f"{target}/m") == PHOTO + b"/ok/moved.jpg"
    assert result.rejects[["image_id", "reason"]].values.tolist() == [["removed", "placeholder"]]
    assert not storage.exists(f"{target}/r")
    assert server.hits["/ok/r.jpg"] == 0, "every size of a removed photo is the placeholder"


def test_download_resumes_without_refetching(server: _Server, storage: Storage) -> None:
    target = storage.url("images")
    items = [DownloadItem(k, (server.url(f"/ok/{k}.jpg"),), f"{target}/{k}.jpg") for k in "xyz"]
    first = download_many(items[:2], storage, FAST, check=_check)
    assert sorted(first.downloaded) == ["x", "y"]
    hits_before = sum(server.hits.values())
    second = download_many(items, storage, FAST, check=_check)
    assert sorted(second.skipped) == ["x", "y"] and second.downloaded == ["z"]
    assert sum(server.hits.values()) == hits_before + 1


def test_many_items_through_a_small_window(server: _Server, storage: Storage) -> None:
    items = [
        DownloadItem(f"k{i}", (server.url(f"/ok/{i}.jpg"),), storage.url(f"many/{i}.jpg"))
        for i in range(25)
    ]
    result = download_many(items, storage, FAST.model_copy(update={"workers": 2}))
    assert sorted(result.downloaded) == sorted(item.key for item in items)
    assert storage.read_bytes(storage.url("many/24.jpg")) == PHOTO + b"/ok/24.jpg"


def test_unreachable_host_is_a_connection_error(storage: Storage) -> None:
    items = [DownloadItem("dead", ("http://127.0.0.1:9/x.jpg",), storage.url("dead.jpg"))]
    result = download_many(items, storage, DownloadConfig(retries=1, backoff_s=0.01))
    assert result.rejects["reason"].tolist() == ["connection-error"]


def test_duplicate_keys_refused(storage: Storage) -> None:
    items = [DownloadItem("k", ("http://x/1",), "a"), DownloadItem("k", ("http://x/2",), "b")]
    with pytest.raises(ValueError, match="duplicate item keys"):
        download_many(items, storage)


def _zip(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as bundle:
        for name in names:
            bundle.writestr(name, b"data:" + name.encode())
    return path


def _tar(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w:gz") as bundle:
        for member in members:
            data = b"payload" if member.isfile() else None
            if data is not None:
                member.size = len(data)
            bundle.addfile(member, io.BytesIO(data) if data is not None else None)
    return path


def test_zip_extracts_safe_entries(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "ok.zip", ["ImageList/Imagelist.txt", "a/b/c.txt"])
    files = extract_archive(archive, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in files) == [
        "ImageList/Imagelist.txt",
        "a/b/c.txt",
    ]
    assert (tmp_path / "out/a/b/c.txt").read_bytes() == b"data:a/b/c.txt"


@pytest.mark.parametrize(
    "name", ["../evil.txt", "a/../../evil.txt", "/etc/evil.txt", "C:\\evil.txt", "..\\evil.txt"]
)
def test_zip_slip_refused_before_writing_anything(tmp_path: Path, name: str) -> None:
    archive = _zip(tmp_path / "evil.zip", ["good.txt", name])
    out = tmp_path / "deep/out"
    with pytest.raises(UnsafeArchiveError, match="evil"):
        extract_archive(archive, out)
    assert list(out.iterdir()) == []
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "deep/evil.txt").exists()


def test_tar_extracts_and_refuses_escapes_and_links(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "ok.tar.gz", [tarfile.TarInfo("x/y.txt")])
    assert [p.name for p in extract_archive(archive, tmp_path / "ok")] == ["y.txt"]
    assert (tmp_path / "ok/x/y.txt").read_bytes() == b"payload"

    escape = _tar(tmp_path / "escape.tar.gz", [tarfile.TarInfo("../escape.txt")])
    with pytest.raises(UnsafeArchiveError, match="escapes"):
        extract_archive(escape, tmp_path / "t1")
    link = tarfile.TarInfo("innocent")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(UnsafeArchiveError, match="link"):
        extract_archive(_tar(tmp_path / "link.tar.gz", [link]), tmp_path / "t2")
    assert not (tmp_path / "escape.txt").exists()


def test_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a zip nor a tar"):
        extract_archive(tmp_path / "plain.txt", tmp_path / "out")


def test_unpacked_archive_cache_is_keyed_by_content(tmp_path: Path) -> None:
    """A replaced archive of the same size was served stale (the key was URL + size)."""
    storage = Storage(StorageConfig(root=str(tmp_path / "s"), cache_dir=str(tmp_path / "c")))
    archive = tmp_path / "ConceptsList.zip"

    def write(text: str) -> None:
        with zipfile.ZipFile(archive, "w") as bundle:
            bundle.writestr("Concepts81.txt", text)

    write("animal\nbeach\n")
    first = unpacked_archive(storage, str(archive), "ConceptsList")
    assert (first / "ConceptsList" / "Concepts81.txt").read_text() == "animal\nbeach\n"
    assert unpacked_archive(storage, str(archive), "ConceptsList") == first
    size = archive.stat().st_size
    write("lamina\nhcaeb\n")
    assert archive.stat().st_size == size
    second = unpacked_archive(storage, str(archive), "ConceptsList")
    assert second != first
    assert (second / "ConceptsList" / "Concepts81.txt").read_text() == "lamina\nhcaeb\n"
