"""Stage progress on a Prefect run: one progress artifact following the work; elsewhere a no-op."""

from __future__ import annotations

from collections.abc import Iterator
from uuid import UUID

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from tasks import progress
from tasks.progress import RunProgress


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_outside_a_run_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[object] = []
    monkeypatch.setattr(progress, "create_progress_artifact", lambda *a, **k: sent.append(a))
    bar = RunProgress("feature shards")
    bar(1, 2)
    assert sent == [] and bar.artifact_id is None


@pytest.mark.slow
def test_one_artifact_per_stage_ends_at_100_percent(prefect_api: None) -> None:
    @task
    def extract() -> set[UUID | None]:
        bar = RunProgress("feature shards")
        ids = set()
        for done in range(5):
            bar(done, 4)
            ids.add(bar.artifact_id)
        return ids

    @flow
    def stage() -> set[UUID | None]:
        return extract()

    ids = stage()
    assert len(ids) == 1 and None not in ids
    with get_client(sync_client=True) as client:
        artifacts = {artifact.id: artifact for artifact in client.read_artifacts()}
    artifact = artifacts[ids.pop()]
    assert artifact.type == "progress"
    assert artifact.data == 100.0
    assert artifact.description == "feature shards"
