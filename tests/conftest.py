"""Shared fixtures: a real S3 API server (moto) on 127.0.0.1 and storage on it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from moto.server import ThreadedMotoServer

from tasks.settings import ENVIRONMENT_SETTINGS
from tasks.storage import Storage, StorageConfig
from tests.helpers.services import S3Server, free_port

# A shell that sourced a local stack's stack.env must not point the tests at that stack.
for _name in ENVIRONMENT_SETTINGS:
    os.environ.pop(_name, None)


@pytest.fixture(scope="session")
def s3_server(monkeypatch_session: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """moto's S3 server over HTTP on loopback (s3fs cannot use moto's in-process mock)."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    info = S3Server(endpoint_url=f"http://127.0.0.1:{port}", bucket="lesa-test")
    for name, value in {
        "AWS_ACCESS_KEY_ID": info.key,
        "AWS_SECRET_ACCESS_KEY": info.secret,
        "AWS_DEFAULT_REGION": info.region,
    }.items():
        monkeypatch_session.setenv(name, value)
    info.client().create_bucket(Bucket=info.bucket)
    yield info
    server.stop()


@pytest.fixture(scope="session")
def monkeypatch_session() -> Iterator[pytest.MonkeyPatch]:
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


@pytest.fixture
def s3_storage(s3_server: S3Server, tmp_path: Path) -> Storage:
    """Storage on a fresh prefix of the test S3 server, with its own local cache."""
    return Storage(
        StorageConfig(
            root=f"s3://{s3_server.bucket}/{uuid.uuid4().hex}",
            endpoint_url=s3_server.endpoint_url,
            cache_dir=str(tmp_path / "cache"),
        )
    )
