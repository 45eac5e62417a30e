"""New-labels watcher: notice a new version of the label table or vocabulary and say what changed.

The watched objects are the files a run's labels come from: for a ``table`` dataset the user's
label table and vocabulary files (local or S3), for the other sources the prepared tables under
``datasets/<name>/``. A version is the object's SHA-256, so a rewrite with identical content is
not a change. The last version seen is kept in storage (``watch/<dataset>.json``), so the
watcher is stateless between polls and survives restarts; its first poll records a baseline.

A change is published as the Prefect event ``lesa.labels.updated``; the full-pipeline
deployment has a trigger on it. When only unseen labels were added, the pipeline reuses the
trained model and scores the new labels zero-shot (``tasks.training`` recognises the unchanged
training inputs); the event says which case it expects.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from pydantic import BaseModel, ConfigDict

from tasks.config import PipelineConfig
from tasks.datasets.base import LABELS_FILE, VOCABULARY_FILE, dataset_url
from tasks.datasets.table import TableConfig, parse_vocabulary, read_user_table
from tasks.storage import Storage

LABELS_UPDATED_EVENT = "lesa.labels.updated"
"""Name of the Prefect event emitted when a dataset's labels change."""

RESOURCE_PREFIX = "lesa.dataset."


class LabelVersion(BaseModel):
    """What the watcher remembers of one poll: object versions and the vocabulary's labels."""

    model_config = ConfigDict(frozen=True)

    sources: dict[str, str]
    versions: dict[str, str]
    seen: dict[str, bool]


class LabelsUpdate(BaseModel):
    """The difference between two label versions of one dataset."""

    model_config = ConfigDict(frozen=True)

    dataset: str
    changed: list[Literal["labels", "vocabulary"]]
    added_seen: list[str]
    added_unseen: list[str]
    removed: list[str]
    changed_flag: list[str]
    versions: dict[str, str]

    @property
    def unseen_only(self) -> bool:
        """Only unseen labels were added: no retraining needed, just zero-shot scoring."""
        return bool(self.added_unseen) and not (
            self.added_seen or self.removed or self.changed_flag
        )

    @property
    def kind(self) -> Literal["unseen-only", "retrain"]:
        return "unseen-only" if self.unseen_only else "retrain"

    def describe(self) -> str:
        """One line for logs and run summaries."""
        parts = [f"dataset {self.dataset}: new {' and '.join(self.changed)}"]
        for name, labels in (
            ("seen labels added", self.added_seen),
            ("unseen labels added", self.added_unseen),
            ("labels removed", self.removed),
            ("seen/unseen flag changed", self.changed_flag),
        ):
            if labels:
                parts.append(
                    f"{len(labels)} {name} ({', '.join(labels[:5])}{', …' * (len(labels) > 5)})"
                )
        return "; ".join(parts)


def label_sources(config: PipelineConfig, storage: Storage) -> dict[str, str]:
    """URLs of the label table and the vocabulary a run of ``config`` reads its labels from."""
    dataset = config.dataset
    if isinstance(dataset, TableConfig):
        return {"labels": dataset.labels, "vocabulary": dataset.vocabulary}
    return {
        "labels": dataset_url(storage, dataset.name, LABELS_FILE),
        "vocabulary": dataset_url(storage, dataset.name, VOCABULARY_FILE),
    }


def state_url(storage: Storage, dataset: str) -> str:
    """Where the watcher keeps the last version it saw of ``dataset``."""
    return storage.url("watch", f"{dataset}.json")


def _read_vocabulary(config: PipelineConfig, storage: Storage, url: str) -> pd.DataFrame:
    if isinstance(config.dataset, TableConfig):
        return parse_vocabulary(*read_user_table(storage, url, config.dataset.format, "vocabulary"))
    return storage.read_parquet(url)


def current_version(config: PipelineConfig, storage: Storage) -> LabelVersion | None:
    """The version of the labels now in storage, or None while they do not exist yet."""
    sources = label_sources(config, storage)
    if not all(storage.exists(url) for url in sources.values()):
        return None
    versions = {name: storage.sha256(url) for name, url in sources.items()}
    vocabulary = _read_vocabulary(config, storage, sources["vocabulary"])
    seen = dict(zip(vocabulary["label"].astype(str), vocabulary["seen"].astype(bool), strict=True))
    return LabelVersion(sources=sources, versions=versions, seen=seen)


def diff_versions(dataset: str, before: LabelVersion, after: LabelVersion) -> LabelsUpdate | None:
    """What changed from ``before`` to ``after``; None when nothing did."""
    changed = [
        name
        for name in ("labels", "vocabulary")
        if before.versions.get(name) != after.versions.get(name)
    ]
    if not changed:
        return None
    old, new = before.seen, after.seen
    added = [label for label in new if label not in old]
    return LabelsUpdate(
        dataset=dataset,
        changed=changed,
        added_seen=[label for label in added if new[label]],
        added_unseen=[label for label in added if not new[label]],
        removed=[label for label in old if label not in new],
        changed_flag=[label for label in new if label in old and old[label] != new[label]],
        versions=after.versions,
    )


class LabelCheck(NamedTuple):
    """One poll's finding."""

    update: LabelsUpdate | None
    """What changed since the recorded version; None when nothing did (or on a baseline)."""
    version: LabelVersion | None
    """The version now in storage (record it once the update is published); None while the
    label table or vocabulary does not exist yet."""
    baseline: bool
    """No version was recorded yet: this poll only records one, and emits nothing."""


def check_labels(config: PipelineConfig, storage: Storage) -> LabelCheck:
    """Compare the labels in storage with the last recorded version."""
    now = current_version(config, storage)
    if now is None:
        return LabelCheck(None, None, baseline=False)
    url = state_url(storage, config.dataset.name)
    if not storage.exists(url):
        return LabelCheck(None, now, baseline=True)
    before = LabelVersion.model_validate(storage.read_json(url))
    return LabelCheck(diff_versions(config.dataset.name, before, now), now, baseline=False)


def record_version(config: PipelineConfig, storage: Storage, version: LabelVersion) -> None:
    """Remember ``version`` as seen (after its event was emitted, so none is lost)."""
    storage.write_json(state_url(storage, config.dataset.name), version.model_dump(mode="json"))


def event_payload(
    update: LabelsUpdate, *, config_source: str, overrides: dict[str, Any] | None
) -> dict[str, Any]:
    """The event's payload: the watched config's location and overrides, and the change.

    The deployment trigger passes ``config`` and ``overrides`` on as the run's parameters, so
    the pipeline runs on exactly the configuration that was watched.
    """
    return {
        "config": config_source,
        "overrides": overrides or {},
        "update": {**update.model_dump(mode="json"), "kind": update.kind},
        "summary": update.describe(),
    }


def emit_labels_updated(
    update: LabelsUpdate, *, config_source: str, overrides: dict[str, Any] | None
) -> str | None:
    """Publish ``update`` as a ``lesa.labels.updated`` event; returns the event id."""
    event = emit_event(
        event=LABELS_UPDATED_EVENT,
        resource={
            "prefect.resource.id": f"{RESOURCE_PREFIX}{update.dataset}",
            "prefect.resource.name": update.dataset,
        },
        payload=event_payload(update, config_source=config_source, overrides=overrides),
    )
    return None if event is None else str(event.id)


# No task retries: a failed poll is retried by the watcher's next poll (with backoff, see
# flows.watch), so an outage costs polls, not a watcher.
check_labels_task = task(name="check-labels", cache_policy=NO_CACHE)(check_labels)


record_version_task = task(name="record-label-version", cache_policy=NO_CACHE)(record_version)


emit_labels_updated_task = task(name="emit-labels-updated", cache_policy=NO_CACHE)(
    emit_labels_updated
)
