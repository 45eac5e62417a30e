"""Operator drills on real services: a CLI run killed with SIGTERM or SIGHUP, an S3 outage under a
running label watcher."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from infra.local_stack import Stack
from tasks.storage import Storage, StorageConfig
from tests.helpers.stacks import REPO, StackProcess, free_port, wait_for

TINY = str(REPO / "configs" / "tiny.yaml")
ACTIVE = ("RUNNING", "PENDING")

pytestmark = pytest.mark.slow


def log_of(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_killed_cli_run_is_crashed_and_leaves_no_task_running(
    full_stack: StackProcess, tmp_path: Path, signum: signal.Signals
) -> None:
    """The process is killed mid-stage from outside (an operator, a closed SSH session)."""
    env = full_stack.client_env(tmp_path)
    api = httpx.Client(base_url=env["PREFECT_API_URL"], timeout=30)
    log = tmp_path / "run.log"
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "flows.full_pipeline", "--config", TINY),
            *("--set", f"storage.root=s3://lesa/crash-drill-{signum.name}"),
        ],
        cwd=REPO,
        env=env,
        stdout=open(log, "w"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
    )
    try:
        found = wait_for(
            lambda: re.search(r"/runs/flow-run/([0-9a-f-]{36})", log_of(log)), 180, "run started"
        )
        run_id = found.group(1)

        def task_runs() -> list[dict[str, Any]]:
            body = {"flow_runs": {"id": {"any_": [run_id]}}}
            return api.post("/task_runs/filter", json=body).raise_for_status().json()

        running = wait_for(
            lambda: [t["name"] for t in task_runs() if t["state_type"] == "RUNNING"],
            240,
            "a task of the run running",
            every=0.2,
        )
        process.send_signal(signum)
        assert process.wait(120) == 128 + signum
    finally:
        if process.poll() is None:
            process.kill()
    run = api.get(f"/flow_runs/{run_id}").raise_for_status().json()
    assert run["state_type"] == "CRASHED", log_of(log)[-3000:]
    states = {task["name"]: task["state_type"] for task in task_runs()}
    assert not [name for name, state in states.items() if state in ACTIVE], states
    assert states[running[0]] == "CRASHED"


VOCABULARY = pd.DataFrame(
    {"label": ["cat", "dog", "fox"], "seen": [True, True, False], "tokens": ["cat", "dog", "fox"]}
)


def write_prepared(storage: Storage, vocabulary: pd.DataFrame) -> None:
    """The prepared tables of the tiny config's dataset, as the dataset stage leaves them."""
    storage.write_parquet(storage.url("datasets", "emoji-tiny", "vocabulary.parquet"), vocabulary)
    table = pd.DataFrame(
        {
            "image_id": ["i0", "i1"],
            "uri": ["i0.jpg", "i1.jpg"],
            "split": "test",
            "positives": [["cat"], ["fox"]],
            "negatives": [[], []],
            "complete": True,
        }
    )
    storage.write_parquet(storage.url("datasets", "emoji-tiny", "labels.parquet"), table)


def labels_updated_events(api: httpx.Client, since: datetime) -> list[dict[str, Any]]:
    body = {
        "filter": {
            "event": {"name": ["lesa.labels.updated"]},
            "occurred": {"since": since.isoformat(), "until": datetime.now(UTC).isoformat()},
        },
        "limit": 10,
    }
    return api.post("/events/filter", json=body).raise_for_status().json()["events"]


def test_the_watcher_survives_an_s3_outage_and_emits_the_change_made_meanwhile(
    full_stack: StackProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = Stack(services=["s3"], home=tmp_path / "s3-home", s3_port=free_port())
    s3.start()
    watcher = None
    try:
        env = {
            **full_stack.client_env(tmp_path),
            **s3.client_env,
            "LESA_STORAGE_ROOT": "s3://lesa/watched",
        }
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            monkeypatch.setenv(name, env[name])
        storage = Storage(
            StorageConfig(root=env["LESA_STORAGE_ROOT"], endpoint_url=env["AWS_ENDPOINT_URL"])
        )
        write_prepared(storage, VOCABULARY)
        api = httpx.Client(base_url=env["PREFECT_API_URL"], timeout=30)
        log = tmp_path / "watch.log"
        watcher = subprocess.Popen(
            [
                *(sys.executable, "-m", "flows.watch", "--config", TINY, "--every", "1"),
                *("--max-backoff", "4", "--set", "storage.connect_timeout=2"),
            ],
            cwd=REPO,
            env=env,
            stdout=open(log, "w"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: "recorded the baseline label version" in log_of(log), 180, "baseline")
        assert "labels unchanged" not in log_of(log).split("recorded the baseline")[0]

        s3.stop()
        wait_for(lambda: "poll failed (2 in a row)" in log_of(log), 120, "failed polls logged")
        assert watcher.poll() is None, log_of(log)[-3000:]
        since = datetime.now(UTC) - timedelta(seconds=1)
        s3.start()
        owl = pd.DataFrame({"label": ["owl"], "seen": [False], "tokens": ["owl"]})
        write_prepared(storage, pd.concat([VOCABULARY, owl], ignore_index=True))

        events = wait_for(lambda: labels_updated_events(api, since), 120, "the event emitted")
        wait_for(lambda: "poll succeeded again after" in log_of(log), 60, "recovery logged")
        assert watcher.poll() is None
        assert len(events) == 1
        update = events[0]["payload"]["update"]
        assert update["added_unseen"] == ["owl"]
        assert update["kind"] == "unseen-only"
        assert events[0]["resource"]["prefect.resource.id"] == "lesa.dataset.emoji-tiny"
    finally:
        if watcher is not None:
            watcher.send_signal(signal.SIGTERM)
            watcher.wait(60)
        s3.stop()
