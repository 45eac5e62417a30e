"""Storage round-trips on a local folder, a file:// URL and a real S3 API server (moto)."""

from __future__ import annotations

import hashlib
import json
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
import pandas as pd
import pytest
from botocore.exceptions import NoCredentialsError
from prefect.blocks.system import Secret
from prefect.testing.utilities import prefect_test_harness
from pydantic import ValidationError

from tasks.storage import CredentialsError, Storage, StorageConfig, StorageError

if TYPE_CHECKING:
    from tests.conftest import S3Server

SECRET = "s3cr3t-value-never-shown"


@pytest.fixture(params=["path", "file-url", pytest.param("s3", marks=pytest.mark.slow)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """A storage rooted in a fresh location of each supported kind."""
    if request.param == "path":
        return Storage(StorageConfig(root=str(tmp_path / "root"), cache_dir=str(tmp_path / "c")))
    if request.param == "file-url":
        return Storage(StorageConfig(root=f"file://{tmp_path}/root", cache_dir=str(tmp_path / "c")))
    server = request.getfixturevalue("s3_server")  # its credentials are in the environment
    return Storage(
        StorageConfig(
            root=f"s3://{server.bucket}/{uuid.uuid4().hex}",
            endpoint_url=server.endpoint_url,
            region=server.region,
            cache_dir=str(tmp_path / "cache"),
        )
    )


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": ["a", "b", "c"],
            "positives": [["cat", "dog"], [], ["sky"]],
            "vector": [[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]],
            "complete": [True, False, True],
        }
    )


def test_url_joins_under_root_and_rejects_parent_parts(storage: Storage) -> None:
    assert storage.url("datasets", "x", "labels.parquet") == (
        f"{storage.root}/datasets/x/labels.parquet"
    )
    with pytest.raises(ValueError, match=r"\.\."):
        storage.url("datasets", "../escape")


def test_parquet_round_trip_restores_list_columns(storage: Storage) -> None:
    url = storage.url("datasets", "t", "labels.parquet")
    frame = _frame()
    storage.write_parquet(url, frame)
    back = storage.read_parquet(url)
    assert back["positives"].tolist() == frame["positives"].tolist()
    assert all(type(v) is list for v in back["positives"])
    assert back["vector"].tolist() == frame["vector"].tolist()
    assert back["image_id"].tolist() == ["a", "b", "c"]
    assert back["complete"].tolist() == [True, False, True]


def test_json_and_bytes_round_trip(storage: Storage) -> None:
    document = {"mAP": 0.25, "labels": ["a", "b"], "nested": {"k": 1}}
    storage.write_json(storage.url("runs", "r", "metrics.json"), document)
    assert storage.read_json(storage.url("runs", "r", "metrics.json")) == document
    payload = bytes(range(256)) * 10
    url = storage.url("blob.bin")
    storage.write_bytes(url, payload)
    assert storage.read_bytes(url) == payload
    assert storage.exists(url)
    assert storage.size(url) == len(payload)
    assert storage.sha256(url) == hashlib.sha256(payload).hexdigest()
    with storage.open(url) as handle:
        assert handle.read(3) == bytes([0, 1, 2])


def test_upload_verify_download_and_local_copy(storage: Storage, tmp_path: Path) -> None:
    local = tmp_path / "shard.h5"
    local.write_bytes(b"\x89HDF" + b"x" * 5000)
    url = storage.url("features", "n", "k", "shard-00000.h5")
    digest = storage.upload_file(local, url)
    assert digest == hashlib.sha256(local.read_bytes()).hexdigest()
    assert storage.sha256(url) == digest
    assert storage.ls(storage.url("features", "n", "k")) == [url]

    target = storage.download_file(url, tmp_path / "down" / "copy.h5")
    assert target.read_bytes() == local.read_bytes()
    copy = storage.local_copy(url)
    assert copy.read_bytes() == local.read_bytes()
    assert storage.local_copy(url) == copy


def test_local_copy_refreshes_when_object_changes(storage: Storage) -> None:
    url = storage.url("m.bin")
    storage.write_bytes(url, b"first")
    assert storage.local_copy(url).read_bytes() == b"first"
    storage.write_bytes(url, b"second, longer")
    assert storage.local_copy(url).read_bytes() == b"second, longer"


def test_ls_rm_and_missing_prefix(storage: Storage) -> None:
    assert storage.ls(storage.url("nothing", "here")) == []
    storage.write_bytes(storage.url("d", "a.txt"), b"a")
    storage.write_bytes(storage.url("d", "sub", "b.txt"), b"b")
    assert storage.ls(storage.url("d")) == [storage.url("d", "a.txt")]
    assert storage.ls(storage.url("d"), recursive=True) == [
        storage.url("d", "a.txt"),
        storage.url("d", "sub", "b.txt"),
    ]
    storage.rm(storage.url("d", "a.txt"))
    assert not storage.exists(storage.url("d", "a.txt"))
    storage.rm(storage.url("d", "a.txt"))
    storage.rm(storage.url("d"), recursive=True)
    assert storage.ls(storage.url("d"), recursive=True) == []


def _raw_objects(storage: Storage) -> list[str]:
    """Every object under the root, temporaries included, listed without going through Storage."""
    config = storage.config
    if storage.root.startswith("s3://"):
        fs = fsspec.filesystem(
            "s3", client_kwargs={"endpoint_url": config.endpoint_url}, skip_instance_cache=True
        )
        return sorted(fs.find(storage.root))
    root = Path(storage.root.removeprefix("file://"))
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


class _Crash(RuntimeError):
    """Stands in for a process dying half-way through writing a file."""


def _half_write(self: pd.DataFrame, path: object, **_: object) -> None:
    """Stand-in for DataFrame.to_parquet that writes half a file and then dies."""
    Path(str(path)).write_bytes(b"PAR1 half a footer")
    raise _Crash("killed mid-write")


def test_crash_mid_write_leaves_no_final_object(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = storage.url("datasets", "t", "labels.parquet")
    monkeypatch.setattr(pd.DataFrame, "to_parquet", _half_write)
    with pytest.raises(_Crash):
        storage.write_parquet(url, _frame())
    assert not storage.exists(url)
    assert _raw_objects(storage) == []


def test_crash_mid_write_keeps_previous_version(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = storage.url("labels.parquet")
    storage.write_parquet(url, _frame())
    monkeypatch.setattr(pd.DataFrame, "to_parquet", _half_write)
    with pytest.raises(_Crash):
        storage.write_parquet(url, _frame().head(1))
    assert storage.read_parquet(url)["image_id"].tolist() == ["a", "b", "c"]
    assert len(_raw_objects(storage)) == 1


def test_failed_upload_verification_commits_nothing(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = tmp_path / "shard.h5"
    local.write_bytes(b"payload" * 100)
    url = storage.url("features", "shard-00000.h5")
    monkeypatch.setattr(Storage, "sha256", lambda self, url: "0" * 64)
    with pytest.raises(StorageError, match="sha256 mismatch"):
        storage.upload_file(local, url)
    assert not storage.exists(url)
    assert _raw_objects(storage) == []


def test_storage_is_picklable(storage: Storage) -> None:
    url = storage.url("p.json")
    storage.write_json(url, {"x": 1})
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.read_json(url) == {"x": 1}
    assert clone.root == storage.root


def test_credentials_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    config = StorageConfig(root="s3://bucket/prefix")
    storage = Storage(config)
    for text in (repr(config), str(config), config.model_dump_json(), repr(storage)):
        assert SECRET not in text
        assert "AKIAEXAMPLE" not in text
    assert storage._options("s3")["secret"] == SECRET


def test_unknown_config_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="bucket"):
        StorageConfig(root="x", bucket="y")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "fields",
    [
        {"secret": SECRET},
        {"key": "AKIAEXAMPLE"},
        {"secret_access_key": SECRET},
        {"aws_session_token": SECRET},
        {"Token": ["AKIA", SECRET]},
    ],
    ids=["secret", "key", "misspelt", "session-token", "list"],
)
def test_secrets_in_a_storage_config_are_refused_saying_how_to_pass_them(
    fields: dict[str, object],
) -> None:
    with pytest.raises(ValidationError) as caught:
        StorageConfig(root="s3://bucket", **fields)  # type: ignore[arg-type]
    message = str(caught.value)
    assert next(iter(fields)) in message
    assert "AWS_SECRET_ACCESS_KEY" in message and "storage.credentials_block" in message
    assert SECRET not in message and "AKIAEXAMPLE" not in message


def test_config_errors_never_echo_the_value() -> None:
    with pytest.raises(ValidationError) as caught:
        StorageConfig(root="s3://bucket", region=12345678)  # type: ignore[arg-type]
    assert "region" in str(caught.value) and "12345678" not in str(caught.value)


@pytest.mark.slow
def test_s3_credentials_fall_back_to_environment(s3_server, tmp_path: Path) -> None:
    """With only root + endpoint in the config, AWS_* environment variables authenticate."""
    storage = Storage(
        StorageConfig(
            root=f"s3://{s3_server.bucket}/{uuid.uuid4().hex}",
            endpoint_url=s3_server.endpoint_url,
        )
    )
    url = storage.url("env.json")
    storage.write_json(url, {"ok": True})
    assert storage.read_json(url) == {"ok": True}


def test_local_copy_of_missing_local_file_names_it(tmp_path: Path) -> None:
    storage = Storage(StorageConfig(root=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"missing\.h5"):
        storage.local_copy(storage.url("missing.h5"))


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.mark.slow
def test_credentials_come_from_a_named_prefect_secret_block(
    s3_server: S3Server, prefect_api: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without AWS_* in the environment, S3 works with the block's credentials only."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    block = f"lesa-s3-{uuid.uuid4().hex[:8]}"
    Secret(
        value=json.dumps(
            {"aws_access_key_id": s3_server.key, "aws_secret_access_key": s3_server.secret}
        )
    ).save(block)
    settings = {
        "root": f"s3://{s3_server.bucket}/{uuid.uuid4().hex}",
        "endpoint_url": s3_server.endpoint_url,
        "cache_dir": str(tmp_path / "cache"),
    }
    without = Storage(StorageConfig(**settings))
    with pytest.raises(NoCredentialsError):
        without.write_json(without.url("x.json"), {"ok": True})

    storage = Storage(StorageConfig(**settings, credentials_block=block))
    storage.write_json(storage.url("x.json"), {"ok": True})
    assert storage.read_json(storage.url("x.json")) == {"ok": True}
    assert s3_server.secret not in repr(storage) + storage.config.model_dump_json()
    clone = pickle.loads(pickle.dumps(storage))  # what a Dask worker gets: no block lookup
    assert clone.read_json(storage.url("x.json")) == {"ok": True}

    with pytest.raises(CredentialsError, match="no Prefect Secret block"):
        Storage(StorageConfig(**settings, credentials_block="no-such-block"))
    Secret(value=json.dumps({"user": SECRET})).save(f"{block}-bad")
    with pytest.raises(CredentialsError, match="aws_access_key_id and aws_secret_access_key") as e:
        Storage(StorageConfig(**settings, credentials_block=f"{block}-bad"))
    assert SECRET not in str(e.value)
