"""New-labels watcher: which objects are watched, what counts as a change, what it says."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from flows.watch_flow import backoff_delay, poll_forever
from tasks.config import PipelineConfig, load_config
from tasks.events import (
    LabelsUpdate,
    check_labels,
    event_payload,
    label_sources,
    record_version,
)
from tasks.storage import Storage

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def prepared_config(tmp_path: Path) -> PipelineConfig:
    return load_config(CONFIGS / "tiny.yaml", {"storage.root": str(tmp_path / "store")})


def write_prepared(storage: Storage, vocabulary: pd.DataFrame, positives: list[list[str]]) -> None:
    """Prepared tables as the dataset stage leaves them under datasets/<name>/."""
    storage.write_parquet(storage.url("datasets", "emoji-tiny", "vocabulary.parquet"), vocabulary)
    table = pd.DataFrame(
        {
            "image_id": [f"i{n}" for n in range(len(positives))],
            "uri": [f"i{n}.jpg" for n in range(len(positives))],
            "split": "test",
            "positives": positives,
            "negatives": [[] for _ in positives],
            "complete": True,
        }
    )
    storage.write_parquet(storage.url("datasets", "emoji-tiny", "labels.parquet"), table)


VOCABULARY = pd.DataFrame(
    {"label": ["cat", "dog", "fox"], "seen": [True, True, False], "tokens": ["cat", "dog", "fox"]}
)


def add(vocabulary: pd.DataFrame, label: str, seen: bool) -> pd.DataFrame:
    row = pd.DataFrame({"label": [label], "seen": [seen], "tokens": [label]})
    return pd.concat([vocabulary, row], ignore_index=True)


def poll(config: PipelineConfig, storage: Storage) -> LabelsUpdate | None:
    """One watcher poll: check, then record what was seen (as the watch flow does)."""
    update, version, _ = check_labels(config, storage)
    if version is not None:
        record_version(config, storage, version)
    return update


def test_nothing_to_watch_until_the_tables_exist(tmp_path: Path) -> None:
    config = prepared_config(tmp_path)
    assert check_labels(config, Storage(config.storage)) == (None, None, False)


def test_first_poll_is_a_baseline_then_only_real_changes_count(tmp_path: Path) -> None:
    config = prepared_config(tmp_path)
    storage = Storage(config.storage)
    write_prepared(storage, VOCABULARY, [["cat"], ["fox"]])
    first = check_labels(config, storage)
    assert first.baseline and first.update is None and first.version is not None
    record_version(config, storage, first.version)
    assert not check_labels(config, storage).baseline
    assert poll(config, storage) is None
    write_prepared(storage, VOCABULARY, [["cat"], ["fox"]])  # same content rewritten
    assert poll(config, storage) is None


def test_added_unseen_labels_need_no_retraining(tmp_path: Path) -> None:
    config = prepared_config(tmp_path)
    storage = Storage(config.storage)
    write_prepared(storage, VOCABULARY, [["cat"], ["fox"]])
    poll(config, storage)
    write_prepared(storage, add(add(VOCABULARY, "owl", False), "yak", False), [["cat"], ["owl"]])
    update = poll(config, storage)
    assert update is not None
    assert update.changed == ["labels", "vocabulary"]
    assert update.added_unseen == ["owl", "yak"]
    assert update.unseen_only
    assert update.kind == "unseen-only"
    assert "2 unseen labels added (owl, yak)" in update.describe()
    assert poll(config, storage) is None


@pytest.mark.parametrize(
    ("vocabulary", "field", "labels"),
    [
        (add(VOCABULARY, "owl", True), "added_seen", ["owl"]),
        (VOCABULARY[VOCABULARY["label"] != "dog"], "removed", ["dog"]),
        (VOCABULARY.assign(seen=[True, True, True]), "changed_flag", ["fox"]),
    ],
)
def test_other_vocabulary_changes_mean_retraining(
    tmp_path: Path, vocabulary: pd.DataFrame, field: str, labels: list[str]
) -> None:
    config = prepared_config(tmp_path)
    storage = Storage(config.storage)
    write_prepared(storage, VOCABULARY, [["cat"]])
    poll(config, storage)
    write_prepared(storage, vocabulary.reset_index(drop=True), [["cat"]])
    update = poll(config, storage)
    assert getattr(update, field) == labels
    assert update.kind == "retrain"


def test_a_changed_label_table_alone_is_reported(tmp_path: Path) -> None:
    config = prepared_config(tmp_path)
    storage = Storage(config.storage)
    write_prepared(storage, VOCABULARY, [["cat"]])
    poll(config, storage)
    write_prepared(storage, VOCABULARY, [["cat", "dog"]])
    update = poll(config, storage)
    assert update.changed == ["labels"]
    assert update.added_seen == update.added_unseen == update.removed == []
    assert update.kind == "retrain"


def test_table_datasets_watch_the_users_own_files(tmp_path: Path) -> None:
    labels_csv, vocabulary_csv = tmp_path / "labels.csv", tmp_path / "vocabulary.csv"
    labels_csv.write_text("uri,split,positives\na.jpg,train,cat\nb.jpg,test,fox\n")
    vocabulary_csv.write_text("label,seen\ncat,yes\nfox,no\n")
    data = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    data["storage"] = {"root": str(tmp_path / "store")}
    data["dataset"] = {
        "source": "table",
        "name": "mine",
        "labels": str(labels_csv),
        "vocabulary": str(vocabulary_csv),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    storage = Storage(config.storage)
    assert label_sources(config, storage) == {
        "labels": str(labels_csv),
        "vocabulary": str(vocabulary_csv),
    }
    assert poll(config, storage) is None
    vocabulary_csv.write_text("label,seen\ncat,yes\nfox,no\nowl,unseen\n")
    update = poll(config, storage)
    assert update.dataset == "mine"
    assert update.changed == ["vocabulary"]
    assert update.added_unseen == ["owl"]
    assert storage.exists(storage.url("watch", "mine.json"))


def test_event_payload_carries_config_and_change(tmp_path: Path) -> None:
    update = LabelsUpdate(
        dataset="d",
        changed=["vocabulary"],
        added_seen=[],
        added_unseen=["owl"],
        removed=[],
        changed_flag=[],
        versions={"labels": "a", "vocabulary": "b"},
    )
    payload = event_payload(update, config_source="configs/x.yaml", overrides=None)
    assert payload["config"] == "configs/x.yaml"
    assert payload["overrides"] == {}
    assert payload["update"]["kind"] == "unseen-only"
    assert payload["update"]["added_unseen"] == ["owl"]
    assert "owl" in payload["summary"]


@pytest.mark.parametrize(
    ("failures", "expected"),
    [(0, 60), (1, 120), (2, 240), (3, 480), (4, 600), (30, 600)],
)
def test_backoff_doubles_per_failure_up_to_the_cap(failures: int, expected: float) -> None:
    assert backoff_delay(60, failures, 600) == expected


def test_backoff_never_polls_faster_than_the_interval() -> None:
    assert backoff_delay(60, 3, max_backoff=10) == 60


class Stop(Exception):
    """Ends poll_forever in a test."""


def test_poll_forever_survives_failures_and_resets_after_a_success(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outcomes = iter([OSError("S3 down"), TimeoutError("hung"), OSError("down"), None, None])
    waits: list[float] = []

    def poll() -> None:
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 5:
            raise Stop

    with caplog.at_level("INFO", logger="prefect.lesa.watch"), pytest.raises(Stop):
        poll_forever(poll, every=5, max_backoff=30, sleep=sleep)
    assert waits == [10, 20, 30, 5, 5]
    assert "poll failed (3 in a row): OSError: down; next poll in 30 s" in caplog.text
    assert "poll succeeded again after 3 failed poll(s)" in caplog.text
