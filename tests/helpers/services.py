"""What the real test services are: where the S3 server listens, and free loopback ports."""

from __future__ import annotations

import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 server (the ``s3_server`` fixture) listens and a bucket created on it."""

    endpoint_url: str
    bucket: str
    key: str = "testing"
    secret: str = "testing"
    region: str = "us-east-1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
