"""Content versions of the files a stage reads, so a rerun can tell cheaply whether they changed.

A stage that reuses earlier output must know that its inputs are still the ones it read. The
version of an object is:

- local file: its SHA-256, computed once per (path, size, mtime_ns, ctime_ns) and kept in a
  small SQLite cache under the storage cache folder, so a rerun stats its inputs instead of
  re-hashing gigabytes, and a file touched or copied without changing its bytes keeps its
  version (the ctime, which no tool can set back, catches an edit that restores the mtime);
- S3 (and any store that reports one): its VersionId and ETag with its size, from one metadata
  request, without reading the object;
- missing: :data:`ABSENT` (a file that appears later is a change too).

For many objects at once (every image of a dataset) :func:`stamps` gives a cheaper identity:
size, mtime_ns and ctime_ns locally, ETag and size from one listing per folder remotely.
:class:`RecordingStorage` records the version of everything a dataset source reads, so the
source need not list its inputs in advance.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from tasks.storage import Storage, is_local, local_path

ABSENT = "absent"
"""The version of an object that does not exist."""

CACHE_FILE = "sha256-cache.sqlite"
"""The hash cache under ``Storage.cache_dir``."""

_CHUNK = 8 * 1024 * 1024
_THREADS = 16
_REMOTE_TAGS = ("VersionId", "ETag", "etag", "md5Hash", "LastModified", "last_modified", "mtime")


def remote_stamp(info: Mapping[str, Any]) -> str:
    """Identity of a remote object from its metadata: VersionId and ETag (or what the store
    has instead: an MD5, a modification time) plus its size."""
    tags = [f"{name}={info[name]}" for name in _REMOTE_TAGS if info.get(name)]
    return ";".join([*tags[:2], f"size={info.get('size')}"])


def _local_stamp(path: Path) -> str | None:
    try:
        stat = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return f"size={stat.st_size};mtime_ns={stat.st_mtime_ns};ctime_ns={stat.st_ctime_ns}"


def stamp(storage: Storage, url: str) -> str:
    """A cheap identity of one object (size + mtime_ns + ctime_ns locally, ETag + size
    remotely), or :data:`ABSENT`; it changes whenever the object is rewritten."""
    if is_local(url):
        return _local_stamp(local_path(url)) or ABSENT
    try:
        return remote_stamp(storage.info(url))
    except FileNotFoundError:
        return ABSENT


def stamp_size(object_stamp: str) -> int | None:
    """The size in bytes a stamp records (None for :data:`ABSENT` or a store without sizes)."""
    for field in object_stamp.split(";"):
        name, _, value = field.partition("=")
        if name == "size" and value.isdigit():
            return int(value)
    return None


def stamps(storage: Storage, urls: Sequence[str]) -> list[str]:
    """:func:`stamp` of many objects: local files are stat-ed in threads, remote ones come from
    one listing of each folder they are in (not one request per object)."""
    result = [ABSENT] * len(urls)
    local = [index for index, url in enumerate(urls) if is_local(url)]
    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        paths = [local_path(urls[index]) for index in local]
        for index, found in zip(local, pool.map(_local_stamp, paths), strict=True):
            result[index] = found or ABSENT
        folders: dict[str, list[int]] = {}
        for index, url in enumerate(urls):
            if not is_local(url):
                folders.setdefault(url.rsplit("/", 1)[0], []).append(index)
        listings = dict(zip(folders, pool.map(storage.list_info, folders), strict=True))
    for folder, indices in folders.items():
        for index in indices:
            info = listings[folder].get(urls[index])
            result[index] = ABSENT if info is None else remote_stamp(info)
    return result


def digest(values: Iterable[str]) -> str:
    """SHA-256 of a sequence of strings (order matters), e.g. the stamps of a shard's images."""
    hasher = hashlib.sha256()
    for value in values:
        hasher.update(value.encode())
        hasher.update(b"\0")
    return hasher.hexdigest()


class HashCache:
    """SHA-256 of objects by (URL, stamp): a hash is computed once per version of a file.

    Safe across threads and processes (SQLite locking); a broken cache file is replaced, since
    it only ever saves work.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            connection = self._open()
        except sqlite3.DatabaseError:
            self.path.unlink(missing_ok=True)
            connection = self._open()
        try:
            with connection:
                yield connection
        finally:
            connection.close()

    def _open(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=60)
        connection.execute(
            "CREATE TABLE IF NOT EXISTS sha256 (url TEXT PRIMARY KEY, stamp TEXT, digest TEXT)"
        )
        return connection

    def lookup(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """Cached digests of the (url, stamp) pairs that have one."""
        found: dict[tuple[str, str], str] = {}
        with self._lock, self._connection() as connection:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = connection.execute(
                    f"SELECT url, stamp, digest FROM sha256 WHERE url IN ({marks})",
                    [url for url, _ in chunk],
                )
                wanted = set(chunk)
                found.update({(url, st): value for url, st, value in rows if (url, st) in wanted})
        return found

    def store(self, entries: Mapping[tuple[str, str], str]) -> None:
        """Remember digests by (url, stamp), replacing older versions of the same URLs."""
        if not entries:
            return
        with self._lock, self._connection() as connection:
            connection.executemany(
                "INSERT OR REPLACE INTO sha256 (url, stamp, digest) VALUES (?, ?, ?)",
                [(url, st, value) for (url, st), value in entries.items()],
            )


def hash_cache(storage: Storage) -> HashCache:
    """The hash cache of ``storage`` (in its cache folder)."""
    return HashCache(Path(storage.cache_dir) / CACHE_FILE)


def _sha256(storage: Storage, url: str) -> str:
    if is_local(url):
        hasher = hashlib.sha256()
        with open(local_path(url), "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                hasher.update(chunk)
        return hasher.hexdigest()
    return storage.sha256(url)


def content_sha256(
    storage: Storage,
    urls: Sequence[str],
    object_stamps: Sequence[str] | None = None,
    *,
    description: str | None = None,
) -> list[str | None]:
    """SHA-256 of each object (``None`` where it is missing or unreadable), read only when the
    hash cache has no entry for its current stamp; ``description`` shows a progress bar while
    hashing."""
    object_stamps = list(object_stamps) if object_stamps is not None else stamps(storage, urls)
    keys = [(url, st) for url, st in zip(urls, object_stamps, strict=True) if st != ABSENT]
    cache = hash_cache(storage)
    known = cache.lookup(keys)
    todo = [key for key in dict.fromkeys(keys) if key not in known]

    def compute(key: tuple[str, str]) -> tuple[tuple[str, str], str | None]:
        try:
            return key, _sha256(storage, key[0])
        except OSError:  # gone meanwhile, a folder, or not readable: no content to hash
            return key, None

    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        results = pool.map(compute, todo)
        if description:
            results = tqdm(results, total=len(todo), desc=description, unit="file")
        fresh = {key: value for key, value in results if value is not None}
    cache.store(fresh)
    known.update(fresh)
    return [
        known.get((url, st)) if st != ABSENT else None
        for url, st in zip(urls, object_stamps, strict=True)
    ]


def file_version(storage: Storage, url: str) -> str:
    """The content version of one object: ``sha256:<hex>`` for a local file (hash cached by
    stamp), the store's VersionId/ETag + size for a remote one, :data:`ABSENT` if missing."""
    current = stamp(storage, url)
    if current == ABSENT:
        return ABSENT
    if not is_local(url):
        return current
    value = content_sha256(storage, [url], [current])[0]
    return ABSENT if value is None else f"sha256:{value}"


def file_versions(storage: Storage, urls: Iterable[str]) -> dict[str, str]:
    """:func:`file_version` of each URL."""
    return {url: file_version(storage, url) for url in urls}


class RecordingStorage(Storage):
    """The same storage, recording the version of every object read through it.

    ``inputs`` maps each URL read (``read_bytes``, ``open`` for reading, ``size``,
    ``local_copy``, ``sha256``) to its version taken *before* the read, so a file rewritten
    while it is read shows up as changed on the next run, never the other way round. A probe
    that finds nothing (``exists`` is false) is recorded as :data:`ABSENT`: a file appearing
    later may change what the source reads. Objects read under the cache folder are copies of
    recorded inputs (unpacked archives) and are not recorded themselves, unless named with
    :meth:`record`.
    """

    def __init__(self, storage: Storage) -> None:
        self.__dict__.update(storage.__getstate__())
        self.inputs: dict[str, str] = {}
        self._record_lock = threading.Lock()

    def record(self, *urls: str) -> None:
        """Record the version of objects read some other way (a font a library opens itself)."""
        for url in urls:
            self._record(url, explicit=True)

    def _record(self, url: str, *, explicit: bool = False) -> None:
        url = str(url)
        if url in self.inputs or (self._in_cache(url) and not explicit):
            return
        version = file_version(self, url)
        with self._record_lock:
            self.inputs.setdefault(url, version)

    def _in_cache(self, url: str) -> bool:
        if not is_local(url):
            return False
        path = os.path.abspath(local_path(url))
        return path.startswith(os.path.abspath(self.cache_dir) + os.sep)

    def exists(self, url: str) -> bool:
        found = super().exists(url)
        if not found and not self._in_cache(str(url)):
            with self._record_lock:
                self.inputs.setdefault(str(url), ABSENT)
        return found

    def size(self, url: str) -> int:
        self._record(url)
        return super().size(url)

    def read_bytes(self, url: str) -> bytes:
        self._record(url)
        return super().read_bytes(url)

    def open(self, url: str, mode: str = "rb") -> IO[Any]:
        if "r" in mode:
            self._record(url)
        return super().open(url, mode)

    def sha256(self, url: str) -> str:
        self._record(url)
        return super().sha256(url)

    def local_copy(self, url: str) -> Path:
        self._record(url)
        return super().local_copy(url)
