"""What the real test services are: where the S3 server listens, and free loopback ports."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import boto3


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 server (the ``s3_server`` fixture) listens and a bucket created on it."""

    endpoint_url: str
    bucket: str
    key: str = "testing"
    secret: str = "testing"
    region: str = "us-east-1"

    def client(self) -> Any:
        """A boto3 S3 client for the server, with its test credentials."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name=self.region,
        )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
