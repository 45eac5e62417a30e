"""The local stack: ready only when its own services answer, restarts a dead one, keeps its
data across restarts, and points the README's server commands at its S3 and Dask."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from distributed import Client

from tasks.storage import Storage, StorageConfig
from tests.helpers.stacks import (
    REPO,
    StackProcess,
    free_port,
    port_open,
    read_env_file,
    start_stack,
    wait_for,
)

BIN = Path(sys.executable).parent


def run_stack(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra.local_stack", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stack_storage(stack: StackProcess, monkeypatch: pytest.MonkeyPatch) -> Storage:
    """Storage as a shell that sourced the stack's stack.env sees it."""
    env = read_env_file(stack.env_file)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, env[name])
    return Storage(
        StorageConfig(root=env["LESA_STORAGE_ROOT"], endpoint_url=env["AWS_ENDPOINT_URL"])
    )


def test_unknown_service_is_refused_before_starting_anything(tmp_path: Path) -> None:
    done = run_stack("--services", "prefect,kafka", "--home", str(tmp_path / "home"))
    assert done.returncode == 1
    assert "unknown services ['kafka']" in done.stderr


def test_a_taken_port_is_an_error_not_someone_elses_service_taken_for_ready(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_stack("--services", "s3", "--s3-port", str(port), "--home", str(tmp_path / "h"))
    assert done.returncode == 1
    assert f"s3: port {port} on 127.0.0.1 is already in use" in done.stderr
    assert "choose another port with --s3-port" in done.stderr
    assert not (tmp_path / "h" / "stack.env").exists()


def test_s3_data_survives_a_dead_server_and_a_restart_of_the_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    stack = start_stack(home, "s3")
    env = read_env_file(stack.env_file)
    assert env["LESA_STORAGE_ROOT"] == "s3://lesa"
    assert env["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{stack.ports['s3']}"
    assert len(env["AWS_SECRET_ACCESS_KEY"]) >= 24
    assert (home / "s3-credentials.json").stat().st_mode & 0o077 == 0
    assert stack.env_file.stat().st_mode & 0o077 == 0
    storage = stack_storage(stack, monkeypatch)
    url = storage.url("runs", "x", "training.json")
    storage.write_json(url, {"step": 100})
    assert (home / "s3" / "lesa" / "runs" / "x" / "training.json").is_file()

    second = run_stack("--services", "s3", "--home", str(home), "--s3-port", str(free_port()))
    assert second.returncode == 1
    assert f"a stack already runs from {home}" in second.stderr

    stack.child("nanio").kill()
    wait_for(lambda: "stack: s3 restarted" in stack.log(), 60, "the dead S3 server restarted")
    assert "stack: s3 exited with -9" in stack.log()
    assert storage.read_json(url) == {"step": 100}

    assert stack.stop() == 0
    assert not stack.env_file.exists()
    assert not port_open(stack.ports["s3"])
    again = start_stack(home, "s3", ports=stack.ports)
    try:
        assert read_env_file(again.env_file) == env
        assert stack_storage(again, monkeypatch).read_json(url) == {"step": 100}
    finally:
        assert again.stop() == 0


def test_a_service_that_keeps_dying_stops_the_stack_with_status_1(tmp_path: Path) -> None:
    stack = start_stack(tmp_path / "home", "s3", "--max-restarts", "0")
    stack.child("nanio").kill()
    assert stack.process.wait(60) == 1
    assert "error: s3 died 1 times within 600s; stopping the stack" in stack.log()
    assert not port_open(stack.ports["s3"])


@pytest.mark.slow
def test_the_readme_server_section_runs_on_the_stacks_s3_and_dask(
    full_stack: StackProcess, tmp_path: Path
) -> None:
    """As written: source stack.env, serve, `prefect deployment run ... -p config=tiny.yaml`."""
    env = full_stack.client_env(tmp_path)
    api = httpx.Client(base_url=env["PREFECT_API_URL"], timeout=30)
    assert api.get("/health").status_code == 200
    with Client(env["DASK_SCHEDULER_ADDRESS"], timeout=10) as client:
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 1
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.deployments", "--config", "configs/default.yaml"],
        cwd=REPO,
        env=env,
        stdout=open(tmp_path / "serve.log", "w"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: api.get("/deployments/name/lesa/full-pipeline").status_code == 200,
            120,
            "the deployment was not registered",
        )
        started = time.monotonic()
        done = subprocess.run(
            [
                *(str(BIN / "prefect"), "deployment", "run", "lesa/full-pipeline"),
                *("-p", "config=configs/tiny.yaml", "--watch", "--watch-timeout", "420"),
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=480,
        )
        run_id = (done.stdout + done.stderr).split("UUID:")[1].split()[0]
        run = api.get(f"/flow_runs/{run_id}").json()
        assert run["state_type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-5000:]
        print(f"deployment run on the stack: {time.monotonic() - started:.0f} s")
    finally:
        serve.terminate()
        serve.wait(60)
    bucket = full_stack.home / "s3" / "lesa"
    assert json.loads((bucket / "runs" / "tiny" / "reports" / "metrics.json").read_text())
    assert (bucket / "runs" / "tiny" / "models" / "v0001" / "checkpoints" / "best.pt").is_file()
    assert (bucket / "datasets" / "emoji-tiny" / "labels.parquet").is_file()
    assert list((bucket / "features" / "emoji-tiny").rglob("shard-*.h5"))
    with Client(env["DASK_SCHEDULER_ADDRESS"], timeout=10) as client:
        # a lambda travels by value (this test module is not importable on the scheduler)
        prefixes = client.run_on_scheduler(
            lambda dask_scheduler: list(dask_scheduler.task_prefixes)
        )
    assert "extract_shard_on_worker" in prefixes
