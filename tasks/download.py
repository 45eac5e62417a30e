"""Concurrent, retried, resumable downloads into storage, and a safe, cached archive extractor.

Dataset URL lists are long and full of dead links, so a download run must survive both: each item
is retried with exponential backoff (urllib3's ``Retry``: connection errors, 429 and 5xx,
honouring ``Retry-After``), falls back to its next URL on a dead link, and ends either written to
storage or as a row in the rejects table saying why. Items whose target already exists are
skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tarfile
import threading
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import pandas as pd
import requests
from pydantic import Field
from requests.adapters import HTTPAdapter
from tqdm.auto import tqdm
from urllib3.util import Retry

from lesa_common import StrictModel
from tasks.images import ImageRejected
from tasks.storage import Storage
from tasks.versions import file_version

logger = logging.getLogger(__name__)

REJECT_STAGE = "download"
PLACEHOLDER_REASON = "placeholder"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class DownloadConfig(StrictModel):
    """How hard to try: parallel connections, attempts per URL and the backoff between them."""

    workers: int = Field(16, ge=1, le=256)
    retries: int = Field(3, ge=0, le=20)
    backoff_s: float = Field(0.5, ge=0.0, le=60.0)
    timeout_s: float = Field(30.0, gt=0.0)
    user_agent: str = "lesa-dataset-downloader/0.1"
    placeholder_redirects: list[str] = Field(
        default_factory=lambda: ["photo_unavailable"],
        description="a URL redirected to a location containing one of these is a placeholder "
        "(Flickr sends removed photos to its photo_unavailable image), whatever its bytes",
    )


@dataclass(frozen=True)
class DownloadItem:
    """One file to fetch: ``urls`` are alternatives tried in order, ``target`` a storage URL."""

    key: str
    urls: tuple[str, ...]
    target: str


@dataclass
class DownloadResult:
    """Keys fetched now, keys already present (resumed), and a Rejects-shaped table."""

    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rejects: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["image_id", "uri", "stage", "reason"])
    )


@dataclass(frozen=True)
class _Outcome:
    key: str
    status: str
    uri: str = ""
    reason: str = ""


class _Fetcher:
    """Thread-local ``requests`` sessions sharing one retry policy (sessions are not
    thread-safe, connection pools per thread keep keep-alive working)."""

    def __init__(self, config: DownloadConfig) -> None:
        self._config = config
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            retry = Retry(
                total=self._config.retries,
                connect=self._config.retries,
                read=self._config.retries,
                status=self._config.retries,
                backoff_factor=self._config.backoff_s,
                status_forcelist=RETRY_STATUSES,
                allowed_methods=frozenset({"GET"}),
                raise_on_status=False,
                respect_retry_after_header=True,
            )
            adapter = HTTPAdapter(max_retries=retry)
            session = requests.Session()
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = self._config.user_agent
            self._local.session = session
        return session

    def get(self, url: str) -> tuple[bytes | None, str]:
        """Fetch ``url``; returns (bytes, "") or (None, reason). A body cut off mid-transfer is
        retried here because urllib3 only retries up to the response headers."""
        for attempt in range(self._config.retries + 1):
            try:
                response = self._session().get(url, timeout=self._config.timeout_s)
            except requests.Timeout:
                return None, "timeout"
            except requests.exceptions.ChunkedEncodingError:
                if attempt < self._config.retries:
                    time.sleep(self._config.backoff_s * 2**attempt)
                    continue
                return None, "truncated"
            except requests.ConnectionError:
                return None, "connection-error"
            except requests.RequestException:
                return None, "bad-url"
            if response.status_code != 200:
                return None, f"http-{response.status_code}"
            if response.history and any(
                marker in response.url for marker in self._config.placeholder_redirects
            ):
                return None, PLACEHOLDER_REASON
            return response.content, ""
        return None, "truncated"


def _bounded_map(
    pool: ThreadPoolExecutor,
    function: Callable[[DownloadItem], _Outcome],
    items: Sequence[DownloadItem],
    *,
    window: int,
) -> Iterator[_Outcome]:
    """Results in completion order, with at most ``window`` items queued at a time (submitting
    269,648 futures up front would hold them all in memory)."""
    pending: set[Future[_Outcome]] = set()
    for item in items:
        if len(pending) >= window:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            yield from (future.result() for future in done)
        pending.add(pool.submit(function, item))
    for future in as_completed(pending):
        yield future.result()


def _fetch_one(url: str, fetcher: _Fetcher, storage: Storage) -> tuple[bytes | None, str]:
    """HTTP(S) through the retrying session; any other URL (path, ``s3://``) through storage."""
    if url.startswith(("http://", "https://")):
        return fetcher.get(url)
    if not storage.exists(url):
        return None, "missing"
    return storage.read_bytes(url), ""


def download_many(
    items: Sequence[DownloadItem],
    storage: Storage,
    config: DownloadConfig | None = None,
    *,
    check: Callable[[bytes], None] | None = None,
    description: str = "download",
) -> DownloadResult:
    """Fetch every item into storage concurrently; never raises for a single bad item.

    ``check`` validates the bytes (e.g. :func:`tasks.images.check_download`) and rejects by
    raising :class:`~tasks.images.ImageRejected`; a rejected file is never written. Dead links
    (HTTP 4xx) fall through to the item's next URL; a placeholder (by redirect or by ``check``)
    or a file that fails ``check`` does not, since all sizes of a removed photo are the same
    placeholder.
    """
    config = config or DownloadConfig()
    duplicated = sorted(key for key, n in Counter(item.key for item in items).items() if n > 1)
    if duplicated:
        raise ValueError(f"download_many: duplicate item keys, e.g. {duplicated[:5]}")
    fetcher = _Fetcher(config)

    def fetch(item: DownloadItem) -> _Outcome:
        if storage.exists(item.target):
            return _Outcome(item.key, "skipped")
        if not item.urls:
            return _Outcome(item.key, "rejected", "", "no-url")
        uri, reason = "", ""
        for uri in item.urls:
            data, reason = _fetch_one(uri, fetcher, storage)
            if reason == PLACEHOLDER_REASON:
                break
            if data is None:
                continue
            try:
                if check is not None:
                    check(data)
            except ImageRejected as rejected:
                return _Outcome(item.key, "rejected", uri, rejected.reason)
            storage.write_bytes(item.target, data)
            return _Outcome(item.key, "downloaded", uri)
        return _Outcome(item.key, "rejected", uri, reason)

    result = DownloadResult()
    rejected: list[_Outcome] = []
    with (
        ThreadPoolExecutor(max_workers=config.workers) as pool,
        tqdm(total=len(items), desc=description, unit="file") as progress,
    ):
        for outcome in _bounded_map(pool, fetch, items, window=4 * config.workers):
            if outcome.status == "downloaded":
                result.downloaded.append(outcome.key)
            elif outcome.status == "skipped":
                result.skipped.append(outcome.key)
            else:
                rejected.append(outcome)
            progress.update()
    if rejected:
        result.rejects = pd.DataFrame(
            {
                "image_id": [outcome.key for outcome in rejected],
                "uri": [outcome.uri for outcome in rejected],
                "stage": REJECT_STAGE,
                "reason": [outcome.reason for outcome in rejected],
            }
        ).sort_values("image_id", ignore_index=True)
    logger.info(
        "%s: %d downloaded, %d already present, %d rejected",
        description,
        len(result.downloaded),
        len(result.skipped),
        len(rejected),
    )
    return result


class UnsafeArchiveError(ValueError):
    """An archive entry would land outside the target folder (zip-slip) or is a link/device."""


def _check_member_name(name: str, target: Path) -> None:
    """Refuse absolute paths, drive letters and ``..`` escapes, in POSIX or Windows spelling."""
    windows = PureWindowsPath(name)
    if PurePosixPath(name).is_absolute() or windows.is_absolute() or windows.drive:
        raise UnsafeArchiveError(f"archive entry {name!r} is an absolute path")
    destination = (target / name.replace("\\", "/")).resolve()
    if not destination.is_relative_to(target):
        raise UnsafeArchiveError(f"archive entry {name!r} escapes the target folder {target}")


def extract_archive(archive: str | Path, target: str | Path) -> list[Path]:
    """Extract a zip or tar(.gz/.bz2/.xz) archive into ``target``; return the extracted files.

    Every entry is checked before anything is written, so an unsafe archive leaves the target
    untouched. Tar links and device files are refused outright (datasets never need them);
    tar extraction additionally uses Python's ``data`` filter as a second line of defence.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {archive} does not exist")
    target.mkdir(parents=True, exist_ok=True)
    target = target.resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            members = bundle.infolist()
            for member in members:
                _check_member_name(member.filename, target)
            bundle.extractall(target)
            names = [member.filename for member in members if not member.is_dir()]
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as bundle:
            members = bundle.getmembers()
            for member in members:
                _check_member_name(member.name, target)
                if not (member.isfile() or member.isdir()):
                    raise UnsafeArchiveError(
                        f"archive entry {member.name!r} is a link or special file; refused"
                    )
            bundle.extractall(target, filter="data")
            names = [member.name for member in members if member.isfile()]
    else:
        raise ValueError(f"{archive} is neither a zip nor a tar archive")
    return [target / name for name in names]


def unpacked_archive(storage: Storage, url: str, folder: str) -> Path:
    """The content of the archive at ``url`` (local or remote) unpacked under
    ``<cache_dir>/archives/``, holding everything inside a top-level ``folder/``.

    The cache is keyed by the archive's content version (:func:`tasks.versions.file_version`:
    SHA-256 locally, ETag/VersionId remotely), so an archive replaced in place, even by one of
    the same size, is unpacked afresh, and an unchanged one is reused. An archive whose entries
    are not all under ``folder/`` is unpacked into it. Extraction goes to a staging folder renamed
    into place, so a crash never leaves a half-unpacked folder that looks finished.
    """
    version = file_version(storage, url)
    local = storage.local_copy(url)  # also when cached: a RecordingStorage records the read
    key = hashlib.sha256(f"{url}\0{version}".encode()).hexdigest()[:16]
    target = Path(storage.cache_dir) / "archives" / f"{folder}-{key}"
    if target.is_dir():
        return target
    try:
        with zipfile.ZipFile(local) as bundle:
            names = [name for name in bundle.namelist() if not name.endswith("/")]
    except zipfile.BadZipFile:
        if not tarfile.is_tarfile(local):
            raise ValueError(f"{url} ({local}) is not a valid zip or tar archive") from None
        with tarfile.open(local) as bundle:
            names = [member.name for member in bundle.getmembers() if member.isfile()]
    nested = all(name.startswith(f"{folder}/") for name in names)
    staging = target.with_name(f".tmp-{uuid.uuid4().hex}")
    logger.info("unpacking %s", url)
    try:
        extract_archive(local, staging if nested else staging / folder)
        staging.rename(target)
    except OSError:
        if not target.is_dir():  # another process may have unpacked the same version first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
