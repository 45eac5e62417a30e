"""Shared fixtures: a real S3 API server (moto) on 127.0.0.1."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import boto3
import pytest
from moto.server import ThreadedMotoServer

from tasks.settings import ENVIRONMENT_SETTINGS

# A shell that sourced a local stack's stack.env must not point the tests at that stack.
for _name in ENVIRONMENT_SETTINGS:
    os.environ.pop(_name, None)


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 server listens and a bucket created on it."""

    endpoint_url: str
    bucket: str
    key: str = "testing"
    secret: str = "testing"
    region: str = "us-east-1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(monkeypatch_session: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """moto's S3 server over HTTP on loopback (s3fs cannot use moto's in-process mock)."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    info = S3Server(endpoint_url=f"http://127.0.0.1:{port}", bucket="lesa-test")
    for name, value in {
        "AWS_ACCESS_KEY_ID": info.key,
        "AWS_SECRET_ACCESS_KEY": info.secret,
        "AWS_DEFAULT_REGION": info.region,
    }.items():
        monkeypatch_session.setenv(name, value)
    boto3.client(
        "s3",
        endpoint_url=info.endpoint_url,
        aws_access_key_id=info.key,
        aws_secret_access_key=info.secret,
        region_name=info.region,
    ).create_bucket(Bucket=info.bucket)
    yield info
    server.stop()


@pytest.fixture(scope="session")
def monkeypatch_session() -> Iterator[pytest.MonkeyPatch]:
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()
