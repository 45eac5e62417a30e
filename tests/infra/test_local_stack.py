"""The local stack really starts Prefect, S3 and Dask on 127.0.0.1, and stops them all."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
from distributed import Client

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_unknown_service_is_refused_before_starting_anything() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "infra.local_stack", "--services", "prefect,kafka"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "unknown services ['kafka']" in done.stderr


@pytest.mark.slow
def test_stack_starts_answers_and_stops_cleanly(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("prefect", "s3", "dask", "dashboard")}
    state_file = tmp_path / "stack.json"
    process = subprocess.Popen(
        [
            sys.executable,
            *("-m", "infra.local_stack"),
            *("--prefect-port", str(ports["prefect"]), "--s3-port", str(ports["s3"])),
            *("--dask-port", str(ports["dask"])),
            *("--dask-dashboard-port", str(ports["dashboard"])),
            *("--state-file", str(state_file), "--bucket", "stack-test"),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"},
    )
    try:
        deadline = time.monotonic() + 120
        while not state_file.exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "stack did not come up in 120 s"
            time.sleep(0.5)
        state = json.loads(state_file.read_text())
        urls = state["urls"]
        assert urls["prefect_api"] == f"http://127.0.0.1:{ports['prefect']}/api"
        with urllib.request.urlopen(f"{urls['prefect_api']}/health", timeout=5) as response:
            assert response.status == 200
        s3 = boto3.client(
            "s3",
            endpoint_url=urls["s3_endpoint"],
            aws_access_key_id=state["env"]["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=state["env"]["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )
        assert "stack-test" in [bucket["Name"] for bucket in s3.list_buckets()["Buckets"]]
        with Client(urls["dask_scheduler"], timeout=10) as client:
            assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2
            assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
        home = Path(state["home"])
        assert home.is_dir()
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert f"export PREFECT_API_URL={urls['prefect_api']}" in out
    assert "stack stopped" in err
    assert not home.exists()
    assert not any(port_open(port) for port in ports.values())
