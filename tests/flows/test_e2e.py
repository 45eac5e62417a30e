"""End to end on real services: a Prefect server and moto's S3 server on 127.0.0.1.

The deployments are served by ``python -m flows.deployments`` exactly as a user would, runs are
started with the ``prefect`` CLI, the new-labels event comes from ``python -m flows.watch``,
and everything the pipeline writes goes to ``s3://``. The tests share one storage prefix and one
finished deployment run (the ``finished_run`` fixture, started once for the module): the event
test reuses its features and model, the evaluate test scores its checkpoint. Each test asks for
that fixture, so any one of them runs alone or in any order.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pandas as pd
import pytest

from tasks.storage import Storage, StorageConfig
from tests.helpers.services import S3Server, free_port

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 420
PNG = b"\x89PNG"
NEW_UNSEEN = ["chandelier", "wardrobe", "harpsichord", "stapler", "lampshade", "sofa"]

pytestmark = pytest.mark.slow


def stop(process: subprocess.Popen[Any], timeout: float = 60) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Services:
    """Where the services are and the environment that points a process at them."""

    def __init__(self, api_url: str, env: dict[str, str], root: str, logs: Path) -> None:
        self.api_url = api_url
        self.env = env
        self.root = root
        self.logs = logs
        self.http = httpx.Client(base_url=api_url, timeout=30)

    def run(self, *args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def flow_run(self, run_id: str) -> dict[str, Any]:
        return self.http.get(f"/flow_runs/{run_id}").raise_for_status().json()

    def deployment(self) -> dict[str, Any] | None:
        response = self.http.get("/deployments/name/lesa/full-pipeline")
        return response.json() if response.status_code == 200 else None

    def deployment_runs(self, deployment_id: str) -> list[dict[str, Any]]:
        body = {
            "flow_runs": {"deployment_id": {"any_": [deployment_id]}},
            "sort": "START_TIME_DESC",
        }
        return self.http.post("/flow_runs/filter", json=body).raise_for_status().json()

    def artifacts(self, run_id: str) -> dict[str, dict[str, Any]]:
        body = {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
        found = self.http.post("/artifacts/filter", json=body).raise_for_status().json()
        return {artifact["key"]: artifact for artifact in found if artifact["key"]}

    def storage(self) -> Storage:
        return Storage(StorageConfig(root=self.root, endpoint_url=self.env["AWS_ENDPOINT_URL"]))


@pytest.fixture(scope="module")
def services(s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """A Prefect server (local stack, temporary home) and a serve process for the deployments."""
    home = tmp_path_factory.mktemp("prefect-home")
    logs = tmp_path_factory.mktemp("logs")
    port = free_port()
    state_file = home / "stack.json"
    base_env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    stack = subprocess.Popen(
        [
            *(sys.executable, "-m", "infra.local_stack", "--services", "prefect"),
            *("--prefect-port", str(port), "--home", str(home / "server")),
            *("--state-file", str(state_file)),
        ],
        cwd=REPO,
        env=base_env,
        stdout=open(logs / "stack.log", "w"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
    )
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **base_env,
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home / "client"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache")),
    }
    root = f"s3://{s3_server.bucket}/e2e-{uuid.uuid4().hex[:8]}"
    serve = None
    try:
        deadline = time.monotonic() + 120
        while not state_file.exists():
            assert stack.poll() is None, (logs / "stack.log").read_text()
            assert time.monotonic() < deadline, "Prefect server did not start"
            time.sleep(0.5)
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.deployments", "--limit", "2"],
            cwd=REPO,
            env=env,
            stdout=open(logs / "serve.log", "w"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
        )
        found = Services(api_url, env, root, logs)
        while found.deployment() is None:
            assert serve.poll() is None, (logs / "serve.log").read_text()
            assert time.monotonic() < deadline + 60, "deployment was not registered"
            time.sleep(1)
        yield found
    finally:
        if serve is not None:
            stop(serve)
        stack.send_signal(signal.SIGTERM)
        stack.wait(60)


def wait_for_final_state(services: Services, run_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        run = services.flow_run(run_id)
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        assert time.monotonic() < deadline, f"run {run_id} still {run['state_type']}"
        time.sleep(2)


@dataclass(frozen=True)
class FinishedRun:
    """The module's first deployment run of the tiny config, completed."""

    run_id: str
    seconds: float


@pytest.fixture(scope="module")
def finished_run(services: Services) -> FinishedRun:
    """Run the deployment once on the module's S3 prefix, with presigned report links; every
    test builds on this run."""
    presigning = {"root": services.root, "presign_expiry_s": 3600}
    started = time.monotonic()
    done = services.run(
        str(BIN / "prefect"),
        *("deployment", "run", "lesa/full-pipeline"),
        *("-p", f"config={TINY}"),
        *("-p", "overrides=" + json.dumps({"storage": presigning})),
        *("--watch", "--watch-timeout", str(RUN_TIMEOUT_S)),
    )
    output = done.stdout + done.stderr
    run_id = output.split("UUID:")[1].split()[0]
    run = wait_for_final_state(services, run_id, 30)
    assert run["state_type"] == "COMPLETED", (services.logs / "serve.log").read_text()[-5000:]
    return FinishedRun(run_id, time.monotonic() - started)


def test_deployment_run_on_s3_completes_with_metrics_artifact(
    services: Services, finished_run: FinishedRun
) -> None:
    print(f"deployment run completed in {finished_run.seconds:.0f} s")
    artifacts = services.artifacts(finished_run.run_id)
    assert {"lesa-metrics", "lesa-summary", "lesa-report"} <= set(artifacts)
    rows = artifacts["lesa-metrics"]["data"]
    rows = json.loads(rows) if isinstance(rows, str) else rows
    settings = {(row["method"], row["setting"]) for row in rows}
    assert {("LESA", "ZSL"), ("LESA", "GZSL"), ("random", "ZSL")} <= settings
    assert all(0 <= row["mAP"] <= 100 for row in rows)
    pictures = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", artifacts["lesa-report"]["data"])
    assert len(pictures) == 2, "both plots are shown in the report artifact"
    for url in pictures:
        assert base64.b64decode(url.removeprefix("data:image/png;base64,")).startswith(PNG)
    link = re.findall(r"\((http[^)\s]+)\)", artifacts["lesa-report-prf-vs-k-png"]["data"])
    assert link and link[0].startswith(services.env["AWS_ENDPOINT_URL"] + "/"), link
    assert httpx.get(link[0]).raise_for_status().content.startswith(PNG), "presigned link"

    bucket, prefix = services.root.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=services.env["AWS_ENDPOINT_URL"])
    keys = {
        item["Key"].removeprefix(prefix + "/")
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for item in page.get("Contents", [])
    }
    assert {
        "runs/tiny/models/v0001/checkpoints/final.pt",
        "runs/tiny/models/v0001/checkpoints/best.pt",
        "runs/tiny/models/v0001/checkpoints/training.json",
        "runs/tiny/models/v0001/version.json",
        "runs/tiny/models/latest.json",
        "runs/tiny/models/best.json",
        "runs/tiny/reports/metrics.json",
        "datasets/emoji-tiny/labels.parquet",
    } <= keys
    assert any(key.startswith("features/emoji-tiny/") and key.endswith(".h5") for key in keys)


def test_a_failing_stage_fails_the_run_with_its_reason(
    services: Services, finished_run: FinishedRun
) -> None:
    storage = services.storage()
    manifests = [
        url
        for url in storage.ls(storage.url("features"), recursive=True)
        if url.endswith("manifest.parquet")
    ]
    kept = {
        url: storage.sha256(url)
        for url in [*manifests, storage.url("datasets", "emoji-tiny", "dataset.json")]
    }
    missing = f"{services.root}/no-such-glove.txt"
    overrides = {
        "storage": {"root": services.root},
        "embeddings": {"source": {"kind": "glove-file", "url": missing}},
    }
    done = services.run(
        str(BIN / "prefect"),
        *("deployment", "run", "lesa/full-pipeline"),
        *("-p", f"config={TINY}", "-p", "overrides=" + json.dumps(overrides)),
        *("--watch", "--watch-timeout", str(RUN_TIMEOUT_S)),
    )
    run_id = (done.stdout + done.stderr).split("UUID:")[1].split()[0]
    run = wait_for_final_state(services, run_id, 60)
    assert run["state_type"] == "FAILED"
    assert "no-such-glove.txt" in run["state"]["message"]
    body = {"task_runs": {"flow_run_id": {"any_": [run_id]}}}
    states = {
        task_run["name"].rsplit("-", 1)[0]: task_run["state_type"]
        for task_run in services.http.post("/task_runs/filter", json=body).json()
    }
    assert states["prepare-dataset"] == states["extract-features"] == "COMPLETED"
    assert states["embed-labels"] == "FAILED"
    assert "train" not in states
    assert {url: storage.sha256(url) for url in kept} == kept


def add_unseen_labels(storage: Storage, count: int) -> list[str]:
    """A new vocabulary version: ``count`` new unseen labels, present in a few test images."""
    vocabulary_url = storage.url("datasets", "emoji-tiny", "vocabulary.parquet")
    labels_url = storage.url("datasets", "emoji-tiny", "labels.parquet")
    vocabulary = storage.read_parquet(vocabulary_url)
    new = [label for label in NEW_UNSEEN if label not in set(vocabulary["label"])][:count]
    extra = vocabulary.iloc[: len(new)].copy()
    extra["label"], extra["seen"], extra["tokens"] = new, False, new
    storage.write_parquet(vocabulary_url, pd.concat([vocabulary, extra], ignore_index=True))
    table = storage.read_parquet(labels_url)
    test_rows = table.index[table["split"] == "test"][:3]
    for row in test_rows:
        table.at[row, "positives"] = [*table.at[row, "positives"], *new]
    storage.write_parquet(labels_url, table)
    return new


def test_new_labels_event_triggers_a_zero_shot_run(
    services: Services, finished_run: FinishedRun
) -> None:
    watch = (sys.executable, "-m", "flows.watch", "--config", TINY)
    watch += ("--set", f"storage.root={services.root}")
    baseline = services.run(*watch, timeout=180)
    assert baseline.returncode == 0, baseline.stderr[-3000:]

    new = add_unseen_labels(services.storage(), 2)
    deployment_id = services.deployment()["id"]
    before = {run["id"] for run in services.deployment_runs(deployment_id)}
    emitted = services.run(*watch, timeout=180)
    assert emitted.returncode == 0, emitted.stderr[-3000:]
    assert "unseen labels added" in emitted.stdout + emitted.stderr

    deadline = time.monotonic() + RUN_TIMEOUT_S
    triggered: list[dict[str, Any]] = []
    while not triggered:
        assert time.monotonic() < deadline, "no run was triggered by lesa.labels.updated"
        time.sleep(2)
        triggered = [r for r in services.deployment_runs(deployment_id) if r["id"] not in before]
    run = wait_for_final_state(services, triggered[0]["id"], RUN_TIMEOUT_S)
    assert run["state_type"] == "COMPLETED", (services.logs / "serve.log").read_text()[-5000:]
    update = run["parameters"]["labels_update"]["update"]
    assert update["added_unseen"] == new
    assert update["kind"] == "unseen-only"
    summary = services.artifacts(run["id"])["lesa-summary"]["data"]
    assert "reused the finished run" in summary
    assert "scored zero-shot without retraining" in summary
    for label in new:
        assert label in summary


def test_evaluate_cli_scores_the_earlier_checkpoint(
    services: Services, finished_run: FinishedRun
) -> None:
    storage = services.storage()
    run_report = storage.url("runs", "tiny", "reports", "metrics.json")
    before = storage.read_bytes(run_report)
    done = services.run(
        sys.executable,
        *("-m", "flows.evaluate", "--config", TINY, "--checkpoint", "final"),
        *("--set", f"storage.root={services.root}"),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "runs/tiny/models/v0001/checkpoints/final.pt" in done.stdout
    lines = [line for line in done.stdout.splitlines() if "LESA" in line]
    assert any("ZSL" in line and "GZSL" not in line for line in lines)
    assert any("GZSL" in line for line in lines)
    assert storage.read_bytes(run_report) == before, "the run's own report is left alone"
    final = storage.url("runs", "tiny", "models", "v0001", "checkpoints", "final.pt")
    sha = storage.sha256(final)
    written = [
        url
        for url in storage.ls(storage.url("runs", "tiny", "evaluations"), recursive=True)
        if url.endswith("metrics.json")
    ]
    assert len(written) == 1 and f"/evaluations/{sha[:16]}-" in written[0], written
    provenance = storage.read_json(written[0])["provenance"]
    assert provenance["checkpoint"] == final and provenance["checkpoint_sha256"] == sha
    assert provenance["dataset_version"] and provenance["code_version"]
    assert provenance["model_version"] == "v0001", "the latest model version by default"
    run_provenance = storage.read_json(run_report)["provenance"]
    assert "/runs/tiny/models/v0001/" in run_provenance["checkpoint"]
    assert run_provenance["model_version"] == "v0001"


def test_no_secret_ever_reaches_the_run_record(services: Services) -> None:
    """Secrets given as overrides are refused before a run is stored; credentials from a Prefect
    Secret block reach S3 but no flow-run parameter, log or artifact on the server."""
    secret = f"wJalrXUtnFEMI-e2e-{uuid.uuid4().hex[:8]}"
    prefect = str(BIN / "prefect")
    for overrides in (
        {"storage": {"root": services.root, "secret": secret}},
        {"storage.root": services.root, "storage.secret": secret},
    ):
        done = services.run(
            prefect,
            *("deployment", "run", "lesa/full-pipeline", "-p", f"config={TINY}"),
            *("-p", "overrides=" + json.dumps(overrides)),
            timeout=120,
        )
        assert done.returncode != 0, done.stdout[-2000:]
        assert "Validation failed for field 'overrides" in done.stdout + done.stderr
    done = services.run(
        sys.executable,
        *("-m", "flows.full_pipeline", "--config", TINY),
        *("--set", f"storage.root={services.root}", "--set", f"storage.secret={secret}"),
        timeout=120,
    )
    assert done.returncode == 2 and "storage.credentials_block" in done.stderr

    block = f"lesa-e2e-{uuid.uuid4().hex[:8]}"
    key, block_secret = f"AKIAE2E{uuid.uuid4().hex[:8].upper()}", f"e2e-{uuid.uuid4().hex}"
    saved = services.run(
        sys.executable,
        "-c",
        "import json, sys; from prefect.blocks.system import Secret; "
        "Secret(value=json.dumps({'aws_access_key_id': sys.argv[1], "
        "'aws_secret_access_key': sys.argv[2]})).save(sys.argv[3])",
        *(key, block_secret, block),
        timeout=120,
    )
    assert saved.returncode == 0, saved.stderr[-2000:]
    overrides = {"storage": {"root": services.root, "credentials_block": block}}
    done = services.run(
        prefect,
        *("deployment", "run", "lesa/full-pipeline", "-p", f"config={TINY}"),
        *("-p", "overrides=" + json.dumps(overrides)),
        *("--watch", "--watch-timeout", str(RUN_TIMEOUT_S)),
    )
    run_id = (done.stdout + done.stderr).split("UUID:")[1].split()[0]
    run = wait_for_final_state(services, run_id, 60)
    assert run["state_type"] == "COMPLETED", (services.logs / "serve.log").read_text()[-5000:]
    assert run["parameters"]["overrides"] == overrides
    assert "Rejected images: none" in services.artifacts(run_id)["lesa-summary"]["data"]

    record = json.dumps(
        [
            everything(services, path)
            for path in (
                "/flow_runs/filter",
                "/task_runs/filter",
                "/logs/filter",
                "/artifacts/filter",
            )
        ]
    )
    assert block in record, "the records were read"
    for value in (secret, key, block_secret):
        assert value not in record


def everything(services: Services, path: str) -> list[dict[str, Any]]:
    """Every object a filter endpoint of the Prefect API returns, page by page."""
    found: list[dict[str, Any]] = []
    while True:
        page = services.http.post(path, json={"limit": 200, "offset": len(found)})
        items = page.raise_for_status().json()
        found.extend(items)
        if len(items) < 200:
            return found


def object_versions(client: Any, bucket: str) -> Counter[str]:
    """How many times each key was written (the bucket keeps every version)."""
    counts: Counter[str] = Counter()
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
        counts.update(item["Key"] for item in page.get("Versions", []))
    return Counter({key: n for key, n in counts.items() if ".tmp-" not in key})


def test_three_identical_runs_at_once_compute_everything_once(
    services: Services, s3_server: S3Server
) -> None:
    """Three CLI runs of the tiny config started together on a fresh versioned bucket: each
    feature shard and each checkpoint is uploaded once (one object version), one run trains and
    the others reuse its model (none resumes from it), and all three report the same metrics."""
    client = s3_server.client()
    bucket = f"lesa-three-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    command = [sys.executable, "-m", "flows.full_pipeline", "--config", TINY]
    command += ["--set", f"storage.root=s3://{bucket}/three"]
    runs = [
        subprocess.Popen(
            command, cwd=REPO, env=services.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]  # fmt: skip
    outputs = []
    for run in runs:
        stdout, stderr = run.communicate(timeout=3 * RUN_TIMEOUT_S)
        assert run.returncode == 0, stderr[-3000:]
        outputs.append(stdout)

    written = object_versions(client, bucket)
    shards = {key: n for key, n in written.items() if key.endswith(".h5")}
    checkpoints = {key: n for key, n in written.items() if key.endswith((".pt", "labels.parquet"))}
    assert shards and checkpoints
    assert set(shards.values()) == {1}, shards
    assert set(checkpoints.values()) == {1}, checkpoints
    trained = [out for out in outputs if "Training: " in out and "reused the finished" not in out]
    assert len(trained) == 1, outputs
    assert not any("resumed from" in out for out in outputs)
    metrics = [[line for line in out.splitlines() if "LESA ZSL mAP" in line] for out in outputs]
    assert metrics[0] and metrics[0] == metrics[1] == metrics[2]


def running(services: Services, path: str, **filters: Any) -> list[dict[str, Any]]:
    body = (
        {**filters, "sort": "EXPECTED_START_TIME_DESC"} if path == "/flow_runs/filter" else filters
    )
    return services.http.post(path, json=body).raise_for_status().json()


def test_a_killed_run_and_its_task_are_marked_crashed(services: Services) -> None:
    """SIGKILL a CLI run in the middle of a task (as the OOM killer would): the heartbeat
    sweep leaves it alone while it beats, then marks the run and its task Crashed."""
    env = {**services.env, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
    root = f"{services.root}-killed"
    command = [sys.executable, "-m", "flows.full_pipeline", "--config", TINY]
    process = subprocess.Popen(
        [*command, "--set", f"storage.root={root}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    state = {"state": {"type": {"any_": ["RUNNING"]}}}
    try:
        deadline = time.monotonic() + 180
        tasks: list[dict[str, Any]] = []
        while not tasks:
            assert process.poll() is None and time.monotonic() < deadline, "no task started"
            time.sleep(1)
            flows = running(services, "/flow_runs/filter", flow_runs=state)
            if flows:
                flow_run = flows[0]
                ours = {"flow_run_id": {"any_": [flow_run["id"]]}, **state}
                tasks = running(services, "/task_runs/filter", task_runs=ours)
        sweep = [sys.executable, "-m", "flows.stale_runs", "--stale-after", "90"]
        alive = services.run(*sweep, timeout=120)
        assert "crashed 0 flow run(s)" in alive.stdout, alive.stdout + alive.stderr
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
        assert services.flow_run(flow_run["id"])["state_type"] == "RUNNING", "nobody told it"
        time.sleep(3)
        swept = services.run(*sweep[:-1], "2", timeout=120)
        assert swept.returncode == 0, swept.stderr[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
    crashed = services.flow_run(flow_run["id"])
    assert crashed["state_type"] == "CRASHED"
    assert "no heartbeat" in crashed["state"]["message"]
    for task in tasks:
        task_run = services.http.get(f"/task_runs/{task['id']}").raise_for_status().json()
        assert task_run["state_type"] == "CRASHED", task_run["name"]
