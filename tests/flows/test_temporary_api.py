"""The temporary Prefect API: started before the flow, retried once, an actionable failure."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers.stacks import wait_for

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


def without_api(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect"), **extra}


def test_an_entry_point_starts_it_once_and_the_flow_uses_it(tmp_path: Path) -> None:
    script = (
        "from prefect import flow\n"
        "from prefect.client.orchestration import get_client\n"
        "from flows.temporary_api import start_temporary_api\n"
        "url = start_temporary_api()\n"
        "@flow\n"
        "def where() -> str:\n"
        "    with get_client(sync_client=True) as client:\n"
        "        return client.api_url\n"
        "print(url, where())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=without_api(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    started, used = done.stdout.split()[-2:]
    assert started.startswith("http://127.0.0.1:")
    assert used.rstrip("/") == started.rstrip("/")


def test_a_configured_server_starts_nothing(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from flows.temporary_api import *; print(start_temporary_api())"],
        cwd=REPO,
        env=without_api(tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"


def test_when_it_cannot_start_the_entry_point_says_what_to_do(tmp_path: Path) -> None:
    broken = f"sqlite+aiosqlite:///{tmp_path}/missing-folder/sub/prefect.db"
    env = without_api(
        tmp_path,
        PREFECT_API_DATABASE_CONNECTION_URL=broken,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="3",
    )
    done = subprocess.run(
        [sys.executable, "-m", "flows.watch", "--config", TINY],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 1
    assert "error: the temporary Prefect API did not start (2 tries of 3 s each" in done.stderr
    assert "python -m infra.local_stack --services prefect" in done.stderr
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in done.stderr
    assert "Traceback" not in done.stderr
    assert f"the server's log: {tmp_path / 'prefect' / 'temporary-api.log'}" in done.stderr


def test_a_run_killed_with_its_process_group_is_crashed_and_exits(tmp_path: Path) -> None:
    """``timeout``, a job scheduler or a closed terminal signal the whole process group: the
    temporary API, in its own session, survives long enough to record the crash."""
    log = tmp_path / "run.log"
    env = without_api(tmp_path, LESA_STORAGE_ROOT=str(tmp_path / "store"))
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.full_pipeline", "--config", TINY],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: "validate-label-table" in log.read_text(), 240, "a stage finished")
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(90) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert re.search(r"Flow run '[^']+' - Finished in state Crashed", log.read_text())
