"""One storage layer for plain paths, ``file://`` URLs and ``s3://`` buckets.

Every pipeline step reads and writes through :class:`Storage`, so a run can move from a laptop
folder to an S3 bucket by changing ``storage.root`` only. Writes are atomic: data goes to a
temporary file or key first and is only committed under its final name once complete (and, for
uploads, verified), so a crash never leaves an object that looks finished but is not.

Credentials never come from a config file, a ``--set`` override or a deployment's parameters,
where Prefect would keep them in plain text: they come from the environment of the process that
runs the flow (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``) or from a
Prefect Secret block named by ``storage.credentials_block``, loaded where the flow runs. They
never appear in ``repr``, logs or errors.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import boto3
import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError, ConnectTimeoutError, ReadTimeoutError
from fsspec.callbacks import DEFAULT_CALLBACK, Callback, TqdmCallback
from fsspec.core import split_protocol
from fsspec.exceptions import FSTimeoutError
from fsspec.implementations.local import LocalFileSystem
from pydantic import ConfigDict, Field, SecretStr, model_validator

from lesa_common import StrictModel

_CHUNK = 8 * 1024 * 1024
_PROGRESS_BYTES = 64 * 1024 * 1024
_TMP_MARKER = ".tmp-"
PRESIGN_MAX_S = 7 * 24 * 3600
_EXISTS_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})
"""S3's answers to a conditional create of a key that exists (or is being written)."""


class StorageError(ValueError):
    """A storage operation failed verification (size or checksum mismatch)."""


class StorageTimeoutError(TimeoutError):
    """The object store did not answer in time: transient, so the task's retry rule applies."""


SECRET_NAMES = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "passwd",
        "credentials",
        "access_key",
        "access_key_id",
        "secret_key",
        "secret_access_key",
        "session_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
    }
)
"""Config keys that hold a secret (compared case-insensitively with the last part of a key)."""

SECRETS_HELP = (
    "secrets are not accepted in a config file, a --set override or a deployment's overrides "
    "(Prefect keeps run parameters in plain text); export AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) where the flow runs, or store them in a "
    "Prefect Secret block and name it: storage.credentials_block=<block name>"
)


class CredentialsError(ValueError):
    """Credentials that cannot be used (a missing or malformed Secret block); never echoes one."""


def secret_keys(data: Any, parents: tuple[str, ...] = ()) -> list[str]:
    """Dotted paths of the keys in nested config data (dotted keys or sections) that name a
    secret, e.g. ``storage.secret`` for ``{"storage": {"secret": ...}}``."""
    found: list[str] = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            path = (*parents, *str(key).split("."))
            if path[-1].strip().lower() in SECRET_NAMES:
                found.append(".".join(path))
            else:
                found.extend(secret_keys(value, path))
    return found


def _any_case(name: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in name)


def _no_secret_level(depth: int) -> dict[str, Any]:
    names = "|".join(_any_case(name) for name in sorted(SECRET_NAMES))
    pattern = f"^(.*\\.)?\\s*({names})\\s*$"
    level: dict[str, Any] = {"propertyNames": {"not": {"pattern": pattern}}}
    if depth:
        level["additionalProperties"] = {
            "if": {"type": "object"},
            "then": _no_secret_level(depth - 1),
        }
    return level


OVERRIDES_JSON_SCHEMA: dict[str, Any] = {
    "type": ["object", "null"],
    "description": "config values to replace, as dotted keys or nested sections, e.g. "
    '{"storage.root": "s3://bucket/lesa", "train": {"steps": 200}}; never a secret: '
    + SECRETS_HELP,
    **_no_secret_level(3),
}
"""The JSON schema of a flow's ``overrides`` parameter: the Prefect server refuses to create a
run whose overrides name a secret key, so the secret is never stored with the run."""


class StorageConfig(StrictModel):
    """Where run artefacts live and how to reach them.

    ``region``/``endpoint_url`` fall back to ``AWS_DEFAULT_REGION`` or ``AWS_REGION`` and
    ``AWS_ENDPOINT_URL``. There is no key or secret setting: see the module docstring.
    Validation errors name the key but never echo its value, so a misspelt secret is not
    printed.
    """

    model_config = ConfigDict(hide_input_in_errors=True)

    root: str = ".lesa-data"
    endpoint_url: str | None = None
    region: str | None = None
    credentials_block: str | None = Field(
        None,
        min_length=1,
        description="name of a Prefect Secret block holding a JSON object with "
        "aws_access_key_id, aws_secret_access_key and optionally aws_session_token",
    )
    cache_dir: str | None = None
    connect_timeout: float = Field(10.0, gt=0)
    """Seconds to wait for a connection to the object store (s3://)."""
    read_timeout: float = Field(60.0, gt=0)
    """Seconds to wait for any answer on an open connection; a hung store fails a call after
    about ``attempts`` x this, with a :class:`StorageTimeoutError` naming the URL."""
    attempts: int = Field(2, ge=1)
    """Tries per call (botocore's standard retry mode: timeouts, throttling, 5xx)."""
    anonymous: bool = False
    """Reach ``s3://`` without credentials (unsigned requests), e.g. the public Open Images
    bucket; no credential is read or sent. Writes then need a store that accepts them, so an
    anonymous run usually keeps ``root`` local."""
    presign_expiry_s: int = Field(0, ge=0, le=PRESIGN_MAX_S)
    """Seconds the presigned links to ``s3://`` files that the Prefect UI shows stay valid (at
    most 7 days, S3's limit for a signature); 0, the default, makes no presigned links. Opt-in
    because a presigned URL names the access key ID (never the secret) and lets whoever holds
    it download the object until it expires."""
    public_endpoint_url: str | None = None
    """The S3 endpoint as a browser reaches it, for presigned links (default: the endpoint the
    flows use; set it when they reach S3 by an address the browser cannot, e.g. a compose
    service name)."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_secrets(cls, data: Any) -> Any:
        found = secret_keys(data)
        if found:
            raise ValueError(f"{', '.join(found)}: {SECRETS_HELP}")
        return data

    @model_validator(mode="after")
    def _anonymous_without_credentials(self) -> StorageConfig:
        if self.anonymous and self.credentials_block:
            raise ValueError(
                "storage.anonymous sends no credentials, so storage.credentials_block cannot "
                "apply; set one or the other"
            )
        return self


def _env_secret(name: str) -> SecretStr | None:
    value = os.environ.get(name)
    return SecretStr(value) if value else None


_BLOCK_FIELDS = {
    "key": ("aws_access_key_id", "key"),
    "secret": ("aws_secret_access_key", "secret"),
    "token": ("aws_session_token", "token"),
}


def block_credentials(name: str) -> dict[str, SecretStr]:
    """``key``, ``secret`` (and ``token``) from the Prefect Secret block ``name``.

    Raises:
        CredentialsError: the block is missing or does not hold the expected JSON object (the
            message names the block and the fields, never a value).
    """
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError as error:
        raise CredentialsError(
            f"storage.credentials_block {name!r}: no Prefect Secret block of that name on this "
            f"Prefect API ({type(error).__name__})"
        ) from None
    if not isinstance(value, Mapping):
        value = {}
    found = {
        field: SecretStr(str(value[name]))
        for field, names in _BLOCK_FIELDS.items()
        for name in reversed(names)  # the AWS spelling wins when a block has both
        if value.get(name)
    }
    if "key" not in found or "secret" not in found:
        raise CredentialsError(
            f"storage.credentials_block {name!r}: the Secret block must hold a JSON object with "
            "aws_access_key_id and aws_secret_access_key (and optionally aws_session_token)"
        )
    return found


def _credentials(config: StorageConfig) -> dict[str, SecretStr]:
    """The S3 credentials: none when anonymous, the named Secret block, else the AWS
    environment variables."""
    if config.anonymous:
        return {}
    if config.credentials_block:
        return block_credentials(config.credentials_block)
    found = {
        "key": _env_secret("AWS_ACCESS_KEY_ID"),
        "secret": _env_secret("AWS_SECRET_ACCESS_KEY"),
        "token": _env_secret("AWS_SESSION_TOKEN"),
    }
    return {field: value for field, value in found.items() if value is not None}


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lesa"


def _protocol(url: str) -> str:
    protocol, _ = split_protocol(str(url))
    return protocol or ""


def is_local(url: str) -> bool:
    """Whether ``url`` is a plain path or a ``file://`` URL (no network behind it)."""
    return _protocol(url) in ("", "file", "local")


def local_path(url: str) -> Path:
    """The filesystem path behind a plain path or ``file://`` URL."""
    _, path = split_protocol(str(url))
    return Path(path)


_TIMEOUTS: tuple[type[BaseException], ...] = (
    ConnectTimeoutError,
    ReadTimeoutError,
    FSTimeoutError,
    TimeoutError,
)


def _named_timeouts(method: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a client timeout inside ``method`` into a :class:`StorageTimeoutError` that names
    the URL, the endpoint and the setting to change (botocore's own message names neither)."""
    signature = inspect.signature(method)
    name = "url" if "url" in signature.parameters else "prefix"

    @functools.wraps(method)
    def wrapper(self: Storage, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except StorageTimeoutError:
            raise
        except _TIMEOUTS as exc:
            url = signature.bind(self, *args, **kwargs).arguments[name]
            raise StorageTimeoutError(self.timeout_message(url, exc)) from exc

    return wrapper


class Storage:
    """fsspec-backed access to the storage root; picklable so it can be shipped to Dask workers.

    Methods take full URLs or paths as returned by :meth:`url` (or any other URL of a supported
    protocol). Filesystem clients are created lazily per process and never pickled; credentials
    are resolved once here (config first, then environment) and travel with the object.
    """

    def __init__(self, config: StorageConfig | None = None) -> None:
        self.config = config or StorageConfig()
        self._credentials = _credentials(self.config)
        self._region = (
            self.config.region
            or os.environ.get("AWS_DEFAULT_REGION")
            or os.environ.get("AWS_REGION")
        )
        self._endpoint_url = self.config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        root = self.config.root.rstrip("/")
        if not root:
            raise ValueError("storage.root must not be empty")
        if _protocol(root) == "":
            root = os.path.abspath(os.path.expanduser(root))
        self.root = root
        self.cache_dir = (
            Path(self.config.cache_dir).expanduser() if self.config.cache_dir else None
        ) or _default_cache_dir()
        self._filesystems: dict[str, fsspec.AbstractFileSystem] = {}
        self._clients: dict[str | None, Any] = {}

    def __repr__(self) -> str:
        return f"Storage(root={self.root!r})"

    def timeout_message(self, url: str, error: BaseException) -> str:
        """What a timed-out call on ``url`` says: where, which timeout, what to change."""
        endpoint = self._endpoint_url or "the default AWS endpoint"
        if isinstance(error, ConnectTimeoutError):
            kind, value = "connect_timeout", self.config.connect_timeout
        else:
            kind, value = "read_timeout", self.config.read_timeout
        return (
            f"{url}: no answer from {endpoint} within {kind} = {value:g} s "
            f"({self.config.attempts} attempt(s)); is the object store up? "
            f"(storage.{kind} and storage.attempts set the limits)"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_filesystems"] = {}
        state["_clients"] = {}
        return state

    # -- addressing ---------------------------------------------------------------------------

    def url(self, *parts: str) -> str:
        """The URL of ``parts`` joined under the storage root."""
        clean = [str(p).strip("/") for p in parts if str(p).strip("/")]
        if any(".." in p.split("/") for p in clean):
            raise ValueError(f"storage path parts must not contain '..': {parts!r}")
        return "/".join([self.root, *clean])

    def _filesystem(self, protocol: str) -> fsspec.AbstractFileSystem:
        protocol = protocol or "file"
        if protocol == "local":
            protocol = "file"
        if protocol not in self._filesystems:
            fs = fsspec.filesystem(protocol, skip_instance_cache=True, **self._options(protocol))
            if protocol in ("s3", "s3a"):
                # botocore retries, bounded by ``attempts``; s3fs's own loop would multiply them.
                fs.retries = 1
            self._filesystems[protocol] = fs
        return self._filesystems[protocol]

    def _options(self, protocol: str) -> dict[str, Any]:
        if protocol not in ("s3", "s3a"):
            return {}
        client_kwargs: dict[str, Any] = {}
        if self._endpoint_url:
            client_kwargs["endpoint_url"] = self._endpoint_url
        if self._region:
            client_kwargs["region_name"] = self._region
        options: dict[str, Any] = {
            "client_kwargs": client_kwargs,
            "use_listings_cache": False,
            "config_kwargs": {
                "connect_timeout": self.config.connect_timeout,
                "read_timeout": self.config.read_timeout,
                "retries": {"mode": "standard", "total_max_attempts": self.config.attempts},
            },
        }
        if self.config.anonymous:
            options["anon"] = True
        elif "key" in self._credentials and "secret" in self._credentials:
            options.update(
                {field: value.get_secret_value() for field, value in self._credentials.items()}
            )
        return options

    def _s3_client(self, endpoint_url: str | None) -> Any:
        """A boto3 S3 client with this storage's credentials, region and timeouts, for the
        calls s3fs does not offer (presigning, conditional writes)."""
        if endpoint_url not in self._clients:
            secrets = {
                option: self._credentials[field].get_secret_value()
                for field, option in (
                    ("key", "aws_access_key_id"),
                    ("secret", "aws_secret_access_key"),
                    ("token", "aws_session_token"),
                )
                if field in self._credentials
            }
            config = BotoConfig(
                signature_version="s3v4",
                connect_timeout=self.config.connect_timeout,
                read_timeout=self.config.read_timeout,
                retries={"mode": "standard", "total_max_attempts": self.config.attempts},
            )
            self._clients[endpoint_url] = boto3.client(
                "s3", endpoint_url=endpoint_url, region_name=self._region, config=config, **secrets
            )
        return self._clients[endpoint_url]

    @_named_timeouts
    def create_exclusive(self, url: str, data: bytes) -> bool:
        """Write ``data`` to ``url`` only if nothing is there; whether this call created it.

        Locally the file is written aside and hard-linked into place (the link fails if the name
        exists, and a reader never sees it half written). On S3 it is a ``PutObject`` with
        ``If-None-Match: *``: AWS S3, MinIO and moto refuse it when the key exists; a store
        that ignores the header (nanio) lets the last writer win, so callers that need one
        winner read the object back (see :mod:`tasks.claims`).
        """
        if is_local(url):
            target = local_path(url)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(_temporary_name(str(target)))
            try:
                tmp.write_bytes(data)
                os.link(tmp, target)
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
            return True
        if _protocol(url) not in ("s3", "s3a"):
            raise ValueError(f"exclusive create is supported on local paths and s3://, not {url}")
        bucket, _, key = str(url).split("://", 1)[1].partition("/")
        try:
            self._s3_client(self._endpoint_url).put_object(
                Bucket=bucket, Key=key, Body=data, IfNoneMatch="*"
            )
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in _EXISTS_CODES:
                return False
            raise
        return True

    def presign(self, url: str) -> str:
        """An HTTP URL that downloads the S3 object ``url`` without credentials, valid for
        ``storage.presign_expiry_s`` (signed offline: no request is made).

        Raises:
            ValueError: ``url`` is not an ``s3://`` URL, or presigning is off.
        """
        if _protocol(url) not in ("s3", "s3a"):
            raise ValueError(f"only s3:// objects can be presigned, not {url}")
        if not self.config.presign_expiry_s:
            raise ValueError(f"{url}: presigned links are off (storage.presign_expiry_s is 0)")
        bucket, _, key = str(url).split("://", 1)[1].partition("/")
        client = self._s3_client(self.config.public_endpoint_url or self._endpoint_url)
        return client.generate_presigned_url(
            "get_object",
            Params={"Bucket": bucket, "Key": key},
            ExpiresIn=self.config.presign_expiry_s,
        )

    def _resolve(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        url = str(url)
        protocol = _protocol(url)
        fs = self._filesystem(protocol)
        return fs, fs._strip_protocol(url)

    def _to_url(self, like: str, path: str) -> str:
        """Turn a filesystem path back into a URL of the same style as ``like``."""
        protocol = _protocol(like)
        if protocol == "":
            return path
        return f"{protocol}://{path.lstrip('/') if protocol != 'file' else path}"

    # -- queries -------------------------------------------------------------------------------

    @_named_timeouts
    def exists(self, url: str) -> bool:
        """Whether an object (or folder) exists at ``url``."""
        fs, path = self._resolve(url)
        return bool(fs.exists(path))

    @_named_timeouts
    def size(self, url: str) -> int:
        """Size of the object at ``url`` in bytes."""
        fs, path = self._resolve(url)
        return int(fs.size(path))

    @_named_timeouts
    def info(self, url: str) -> dict[str, Any]:
        """What the filesystem says about the object at ``url`` (size, mtime, ETag, ...)."""
        fs, path = self._resolve(url)
        return dict(fs.info(path))

    @_named_timeouts
    def list_info(self, prefix: str) -> dict[str, dict[str, Any]]:
        """The files directly under ``prefix`` with their :meth:`info`, by URL, in one listing
        (one request per thousand objects on S3 instead of one per object)."""
        fs, path = self._resolve(prefix)
        if not fs.isdir(path):
            return {}
        return {
            self._to_url(prefix, entry["name"]): dict(entry)
            for entry in fs.ls(path, detail=True)
            if entry.get("type") == "file" and _TMP_MARKER not in entry["name"]
        }

    @_named_timeouts
    def ls(self, prefix: str, *, recursive: bool = False) -> list[str]:
        """Sorted URLs of the files under ``prefix`` (children only unless ``recursive``).

        A missing prefix lists as empty rather than failing, since "nothing written yet" is the
        normal state of an output folder.
        """
        fs, path = self._resolve(prefix)
        if not fs.exists(path):
            return []
        try:
            if recursive:
                found = fs.find(path)
            else:
                found = [p for p in fs.ls(path, detail=False) if fs.isfile(p)]
        except FileNotFoundError:  # its last object was removed since the existence check
            return []
        return sorted(self._to_url(prefix, p) for p in found if _TMP_MARKER not in p)

    @_named_timeouts
    def sha256(self, url: str) -> str:
        """Hex SHA-256 of the object at ``url``, streamed in chunks."""
        digest = hashlib.sha256()
        with self.open(url, "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
        return digest.hexdigest()

    # -- raw I/O -------------------------------------------------------------------------------

    @_named_timeouts
    def open(self, url: str, mode: str = "rb") -> IO[Any]:
        """Open ``url`` like :func:`open`. Writing through this handle is *not* atomic."""
        fs, path = self._resolve(url)
        if "w" in mode or "a" in mode:
            fs.makedirs(fs._parent(path), exist_ok=True)
        return fs.open(path, mode)

    @_named_timeouts
    def read_bytes(self, url: str) -> bytes:
        """The whole object at ``url``."""
        fs, path = self._resolve(url)
        return fs.cat_file(path)

    @_named_timeouts
    def write_bytes(self, url: str, data: bytes) -> None:
        """Write ``data`` to ``url`` atomically."""
        self._write_atomic(url, lambda local: local.write_bytes(data))

    @_named_timeouts
    def rm(self, url: str, *, recursive: bool = False) -> None:
        """Remove the object (or, with ``recursive``, the folder) at ``url``; missing is fine."""
        fs, path = self._resolve(url)
        if fs.exists(path):
            fs.rm(path, recursive=recursive)

    # -- tables and documents ------------------------------------------------------------------

    @_named_timeouts
    def read_parquet(self, url: str) -> pd.DataFrame:
        """Read a parquet table; list columns come back as Python lists, not numpy arrays."""
        with self.open(url, "rb") as handle:
            table = pq.read_table(handle)
        frame = table.to_pandas()
        for field in table.schema:
            if pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
                frame[field.name] = pd.Series(
                    table.column(field.name).to_pylist(), index=frame.index, dtype=object
                )
        return frame

    @_named_timeouts
    def write_parquet(self, url: str, frame: pd.DataFrame) -> None:
        """Write ``frame`` (without its index) as parquet to ``url`` atomically."""
        self._write_atomic(url, lambda local: frame.to_parquet(local, index=False))

    @_named_timeouts
    def read_json(self, url: str) -> Any:
        """Parse the JSON document at ``url``."""
        return json.loads(self.read_bytes(url))

    @_named_timeouts
    def write_json(self, url: str, document: Any) -> None:
        """Write ``document`` as indented JSON to ``url`` atomically."""
        data = json.dumps(document, indent=2, sort_keys=True).encode()
        self.write_bytes(url, data + b"\n")

    # -- files ---------------------------------------------------------------------------------

    @_named_timeouts
    def upload_file(self, local_path: str | os.PathLike[str], url: str) -> str:
        """Copy a local file to ``url`` through a verified temporary object; return its sha256.

        The file goes to a temporary key next to the target, its size and sha256 are checked
        against the local file, and only then is it committed under the final name. A failed
        verification removes the temporary object and raises :class:`StorageError`.
        """
        local_path = Path(local_path)
        expected_size = local_path.stat().st_size
        expected_sha = _file_sha256(local_path)
        name = local_path.name
        fs, path = self._resolve(url)
        tmp_path = _temporary_name(path)
        fs.makedirs(fs._parent(path), exist_ok=True)
        try:
            fs.put_file(
                str(local_path), tmp_path, callback=_progress(f"upload {name}", expected_size)
            )
            tmp_url = self._to_url(url, tmp_path)
            actual_size = int(fs.size(tmp_path))
            if actual_size != expected_size:
                raise StorageError(
                    f"upload of {local_path.name} to {url}: size {actual_size} != {expected_size}"
                )
            actual_sha = self.sha256(tmp_url)
            if actual_sha != expected_sha:
                raise StorageError(f"upload of {local_path.name} to {url}: sha256 mismatch")
            self._commit(fs, tmp_path, path)
        finally:
            if fs.exists(tmp_path):
                fs.rm(tmp_path)
        return expected_sha

    @_named_timeouts
    def download_file(self, url: str, local_path: str | os.PathLike[str]) -> Path:
        """Copy ``url`` to ``local_path`` atomically (a partial download never has the name)."""
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        fs, path = self._resolve(url)
        tmp = Path(_temporary_name(str(local_path)))
        try:
            progress = _progress(f"download {Path(path).name}", int(fs.size(path) or 0))
            fs.get_file(path, str(tmp), callback=progress)
            os.replace(tmp, local_path)
        finally:
            tmp.unlink(missing_ok=True)
        return local_path

    @_named_timeouts
    def local_copy(self, url: str) -> Path:
        """A local file with the content of ``url`` (for libraries such as h5py that need one).

        Local objects are returned in place. Remote objects are downloaded once into
        ``cache_dir``, keyed by URL + ETag + size, so a changed object gets a fresh copy.
        """
        if is_local(url):
            path = local_path(url)
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {url}")
            return path
        fs, path = self._resolve(url)
        info = fs.info(path)
        tag = str(info.get("ETag") or info.get("etag") or info.get("mtime") or "")
        key = hashlib.sha256(f"{url}\0{tag}\0{info.get('size')}".encode()).hexdigest()
        suffix = "".join(Path(path).suffixes[-1:])
        target = self.cache_dir / key[:2] / f"{key}{suffix}"
        if not target.is_file():
            self.download_file(url, target)
        return target

    # -- atomic write machinery ----------------------------------------------------------------

    def _write_atomic(self, url: str, write: Callable[[Path], object]) -> None:
        """Let ``write`` fill a local temporary file, then commit it to ``url``."""
        if is_local(url):
            target = local_path(url)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(_temporary_name(str(target)))
            try:
                write(tmp)
                with open(tmp, "rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            return
        with _local_tempfile() as tmp:
            write(tmp)
            self.upload_file(tmp, url)

    def _commit(self, fs: fsspec.AbstractFileSystem, tmp_path: str, path: str) -> None:
        if isinstance(fs, LocalFileSystem):
            os.replace(tmp_path, path)
        else:
            fs.copy(tmp_path, path)


def _progress(description: str, size: int) -> Callback:
    """A byte progress bar for transfers big enough to be worth watching."""
    if size < _PROGRESS_BYTES:
        return DEFAULT_CALLBACK
    return TqdmCallback(
        tqdm_kwargs={"desc": description, "unit": "B", "unit_scale": True, "leave": False}
    )


def _temporary_name(path: str) -> str:
    parent, _, name = path.rpartition("/")
    tmp_name = f"{_TMP_MARKER}{uuid.uuid4().hex}-{name}"
    return f"{parent}/{tmp_name}" if parent else tmp_name


@contextlib.contextmanager
def _local_tempfile() -> Iterator[Path]:
    directory = tempfile.mkdtemp(prefix="lesa-")
    try:
        yield Path(directory) / "payload"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
