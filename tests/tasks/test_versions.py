"""Content versions: local files by cached SHA-256, S3 objects by ETag, many objects by stamp."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tasks import versions
from tasks.storage import Storage, StorageConfig
from tasks.versions import (
    ABSENT,
    RecordingStorage,
    content_sha256,
    file_version,
    stamp_size,
    stamps,
)

if TYPE_CHECKING:
    from tests.conftest import S3Server


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(StorageConfig(root=str(tmp_path / "store"), cache_dir=str(tmp_path / "cache")))


def _count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    hashed: list[str] = []
    original = versions._sha256

    def counting(storage: Storage, url: str) -> str:
        hashed.append(url)
        return original(storage, url)

    monkeypatch.setattr(versions, "_sha256", counting)
    return hashed


def test_local_version_is_the_content_hash_computed_once_per_stat(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed = _count_hashing(monkeypatch)
    path = tmp_path / "labels.csv"
    path.write_bytes(b"uri,split\na.jpg,train\n")
    first = file_version(storage, str(path))
    assert first == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_version(storage, str(path)) == first
    assert hashed == [str(path)], "an unchanged file is not hashed again"

    # Touched, same bytes: hashed again (the stat changed) but the version stays.
    os.utime(path, ns=(1, 1))
    assert file_version(storage, str(path)) == first
    assert len(hashed) == 2

    # Same size, other bytes, and even the old mtime restored (the ctime tells): a new version.
    path.write_bytes(b"uri,split\nb.jpg,train\n")
    os.utime(path, ns=(1, 1))
    assert file_version(storage, str(path)) != first


def test_missing_objects_are_absent(storage: Storage, tmp_path: Path) -> None:
    assert file_version(storage, str(tmp_path / "nope.csv")) == ABSENT
    assert stamps(storage, [str(tmp_path / "nope.jpg")]) == [ABSENT]
    assert content_sha256(storage, [str(tmp_path / "nope.jpg")]) == [None]


def test_stamps_change_with_every_rewrite_and_record_the_size(
    storage: Storage, tmp_path: Path
) -> None:
    paths = [tmp_path / f"{name}.jpg" for name in "abc"]
    for path in paths:
        path.write_bytes(b"x" * 10)
    before = stamps(storage, [str(p) for p in paths])
    assert [stamp_size(s) for s in before] == [10, 10, 10]
    os.utime(paths[1], ns=(5, 5))
    after = stamps(storage, [str(p) for p in paths])
    assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1]


def test_a_broken_hash_cache_is_replaced(storage: Storage, tmp_path: Path) -> None:
    cache = Path(storage.cache_dir) / versions.CACHE_FILE
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"not a database at all, just garbage bytes" * 10)
    path = tmp_path / "f.txt"
    path.write_text("hello")
    assert file_version(storage, str(path)) == "sha256:" + hashlib.sha256(b"hello").hexdigest()


def test_recording_storage_records_reads_and_absent_probes(
    storage: Storage, tmp_path: Path
) -> None:
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    reads = RecordingStorage(storage)
    assert reads.read_bytes(str(tmp_path / "a.txt")) == b"a"
    with reads.open(str(tmp_path / "b.txt")) as handle:
        handle.read()
    assert not reads.exists(str(tmp_path / "c.txt"))
    assert reads.inputs == {
        str(tmp_path / "a.txt"): file_version(storage, str(tmp_path / "a.txt")),
        str(tmp_path / "b.txt"): file_version(storage, str(tmp_path / "b.txt")),
        str(tmp_path / "c.txt"): ABSENT,
    }
    # Writes are outputs, not inputs.
    reads.write_bytes(storage.url("out.txt"), b"x")
    assert storage.url("out.txt") not in reads.inputs


@pytest.mark.slow
def test_s3_version_changes_when_an_object_is_replaced_by_one_of_the_same_size(
    s3_server: S3Server, tmp_path: Path
) -> None:
    storage = Storage(
        StorageConfig(
            root=f"s3://{s3_server.bucket}/{uuid.uuid4().hex}",
            endpoint_url=s3_server.endpoint_url,
            cache_dir=str(tmp_path / "cache"),
        )
    )
    url = storage.url("raw", "AllTags1k.txt")
    storage.write_bytes(url, b"1\t0\t\n")
    first = file_version(storage, url)
    assert first == file_version(storage, url)
    listed = stamps(storage, [url, storage.url("raw", "missing.txt")])
    assert listed[1] == ABSENT and stamp_size(listed[0]) == 5
    storage.write_bytes(url, b"0\t1\t\n")
    assert file_version(storage, url) != first
    assert stamps(storage, [url])[0] != listed[0]
