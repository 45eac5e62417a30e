"""What every dataset source produces, and the shared write/skip logic that makes them idempotent.

A source turns raw files into two validated tables (label table, vocabulary) plus optional boxes
and rejects, all under ``datasets/<name>/`` in storage. ``dataset.json`` is written last and
records the source config and the version of every file the source read (see
:mod:`tasks.versions`; a source reads through a :class:`~tasks.versions.RecordingStorage`): a
rerun with the same config, unchanged input files and tables that still exist and validate is
skipped; a changed config or any input rewritten in place (same name, new content) rebuilds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Annotated

import pandas as pd
from pydantic import BaseModel, ConfigDict, StringConstraints

from tasks import schemas
from tasks.embeddings import tokenize_label
from tasks.hashing import content_hash
from tasks.storage import Storage
from tasks.versions import file_versions

logger = logging.getLogger(__name__)

DatasetName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", strip_whitespace=True)
]
"""A dataset name is one safe path segment: it becomes ``datasets/<name>/`` in storage."""

LABELS_FILE = "labels.parquet"
VOCABULARY_FILE = "vocabulary.parquet"
BOXES_FILE = "boxes.parquet"
REJECTS_FILE = "rejects.parquet"
MARKER_FILE = "dataset.json"
IMAGES_DIR = "images"
FINGERPRINT_FORMAT = 3
"""Bumped when what the fingerprint covers or what a prepared dataset holds changes (2: the
versions of every file read; 3: vocabularies carry the label descriptions their source has), so
datasets prepared under an older rule are rebuilt once instead of trusted."""


class DatasetError(ValueError):
    """Raw dataset files are missing, malformed or inconsistent; the message names the file."""


class DatasetArtifacts(BaseModel):
    """Where a prepared dataset lives; the hand-off from the dataset stage to every later stage.

    ``images_prefix`` is the URL that relative ``uri`` values in the label table are joined to.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    label_table_url: str
    vocabulary_url: str
    images_prefix: str
    boxes_url: str | None = None
    rejects_url: str | None = None


def dataset_url(storage: Storage, name: str, *parts: str) -> str:
    """URL of ``datasets/<name>/<parts...>`` under the storage root."""
    return storage.url("datasets", name, *parts)


def config_fingerprint(config: BaseModel, inputs: Mapping[str, str] | None = None) -> str:
    """Stable hash of a source config and the versions of its input files (URL -> version).

    Any change to either means the dataset must be rebuilt: a user's label table rewritten in
    place under the same URL is a new dataset version, not a finished one.
    """
    payload = {"format": FINGERPRINT_FORMAT, "config": config, "inputs": dict(inputs or {})}
    return content_hash(payload)


def check_usable(name: str, labels: pd.DataFrame, vocabulary: pd.DataFrame) -> None:
    """What a pipeline run needs of a dataset, checked as soon as its tables are validated
    (before any feature is extracted): seen labels and train images to train on, unseen labels
    and test images to evaluate zero-shot on.

    Unseen labels listed on train or validation images are accepted (the data may well say so)
    but never trained on: that is logged as a warning with the count, not silently ignored.

    Raises:
        DatasetError: naming the dataset and what it lacks.
    """
    seen = vocabulary["seen"].astype(bool)
    splits = set(labels["split"])
    missing = [
        what
        for what, ok in (
            ("seen labels to train on", seen.any()),
            ("unseen labels to evaluate zero-shot", (~seen).any()),
            ("train images", "train" in splits),
            ("test images", "test" in splits),
        )
        if not ok
    ]
    if missing:
        raise DatasetError(f"dataset {name} has no {' and no '.join(missing)}")
    unseen = set(vocabulary.loc[~seen, "label"])
    training = labels[labels["split"] != "test"]
    listed = pd.concat([training["positives"].explode(), training["negatives"].explode()])
    listed = listed[listed.isin(unseen)]
    if len(listed):
        logger.warning(
            "dataset %s: %d train/val image(s) list unseen labels (%d annotations, e.g. %s); "
            "unseen labels are never trained on, so these annotations are ignored",
            name,
            listed.index.nunique(),
            len(listed),
            sorted(set(listed))[:5],
        )


def join_url(prefix: str, *parts: str) -> str:
    """Join URL/path segments with single slashes (works for local paths and ``s3://``)."""
    pieces = [prefix.rstrip("/")] + [part.strip("/") for part in parts if part]
    return "/".join(pieces)


def absolute_url(url: str) -> str:
    """URLs stay as they are; a relative local path becomes absolute, so Dask workers and later
    runs started elsewhere resolve it the same way."""
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


def label_tokens(label: str) -> str:
    """The vocabulary's ``tokens`` for a label: the words the embedding stage will look up."""
    return " ".join(tokenize_label(label))


def read_text(storage: Storage, url: str, *, what: str) -> str:
    """Read a UTF-8 metadata file, turning a missing or undecodable file into a DatasetError."""
    if not storage.exists(url):
        raise DatasetError(f"missing {what}: {url} does not exist")
    data = storage.read_bytes(url)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def load_prepared(
    storage: Storage,
    name: str,
    config: BaseModel,
    *,
    images_version: Callable[[], str] | None = None,
) -> DatasetArtifacts | None:
    """Return the artifacts of an earlier run with the same config and inputs if still valid.

    The input files recorded in ``dataset.json`` are versioned again (cheap: a stat, and a hash
    only for a file whose size or mtime changed); ``images_version``, for a source that checks
    its images, recomputes the version of the images it checked. Anything missing, changed or
    invalid returns ``None`` (and is logged), so the caller rebuilds.
    """
    marker_url = dataset_url(storage, name, MARKER_FILE)
    if not storage.exists(marker_url):
        return None
    try:
        marker = storage.read_json(marker_url)
    except ValueError as error:
        logger.warning("dataset %s: %s is unreadable (%s); rebuilding", name, MARKER_FILE, error)
        return None
    recorded = marker.get("inputs") if isinstance(marker, dict) else None
    if not isinstance(recorded, dict):
        logger.info("dataset %s: %s records no input versions; rebuilding", name, MARKER_FILE)
        return None
    current = file_versions(storage, recorded)
    changed = sorted(url for url, version in current.items() if recorded[url] != version)
    if changed:
        logger.info(
            "dataset %s: %d input file(s) changed since it was built (%s); rebuilding",
            name,
            len(changed),
            ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else ""),
        )
        return None
    if marker.get("config_sha256") != config_fingerprint(config, current):
        logger.info("dataset %s: the source config changed since the last run; rebuilding", name)
        return None
    if images_version is not None and marker.get("images_version") != images_version():
        logger.info(
            "dataset %s: images changed since they were checked (one added, fixed, replaced or "
            "removed); rebuilding",
            name,
        )
        return None
    try:
        artifacts = DatasetArtifacts.model_validate(marker["artifacts"])
        vocabulary = schemas.read_validated(
            storage, artifacts.vocabulary_url, schemas.Vocabulary, stage="dataset"
        )
        schemas.read_validated(
            storage,
            artifacts.label_table_url,
            schemas.LabelTable,
            stage="dataset",
            vocabulary=vocabulary,
        )
        for url, model in (
            (artifacts.boxes_url, schemas.ObjectBoxes),
            (artifacts.rejects_url, schemas.Rejects),
        ):
            if url is not None:
                schemas.read_validated(storage, url, model, stage="dataset")
    except (KeyError, ValueError, OSError) as error:
        logger.warning("dataset %s: earlier output is unusable (%s); rebuilding", name, error)
        return None
    logger.info("dataset %s: up to date, skipping", name)
    return artifacts


def write_dataset(
    storage: Storage,
    config: BaseModel,
    *,
    name: str,
    labels: pd.DataFrame,
    vocabulary: pd.DataFrame,
    images_prefix: str,
    boxes: pd.DataFrame | None = None,
    rejects: pd.DataFrame | None = None,
    inputs: Mapping[str, str] | None = None,
    images_version: str | None = None,
) -> DatasetArtifacts:
    """Validate every table, write them atomically, then commit ``dataset.json`` last.

    ``inputs`` are the versions of the files the source read (URL -> version, e.g.
    ``RecordingStorage.inputs``), ``images_version`` the version of the images it checked;
    :func:`load_prepared` compares both on the next run. Validation happens before anything is
    written, so bad input never replaces good output.
    """
    vocabulary = schemas.validate(vocabulary, schemas.Vocabulary, stage="dataset")
    labels = schemas.validate(labels, schemas.LabelTable, stage="dataset", vocabulary=vocabulary)
    if boxes is not None:
        boxes = schemas.validate(boxes, schemas.ObjectBoxes, stage="dataset")
    if rejects is not None:
        rejects = schemas.validate(rejects, schemas.Rejects, stage="dataset")
    artifacts = DatasetArtifacts(
        name=name,
        label_table_url=dataset_url(storage, name, LABELS_FILE),
        vocabulary_url=dataset_url(storage, name, VOCABULARY_FILE),
        images_prefix=images_prefix,
        boxes_url=None if boxes is None else dataset_url(storage, name, BOXES_FILE),
        rejects_url=None if rejects is None else dataset_url(storage, name, REJECTS_FILE),
    )
    storage.write_parquet(artifacts.vocabulary_url, vocabulary)
    storage.write_parquet(artifacts.label_table_url, labels)
    if boxes is not None:
        storage.write_parquet(artifacts.boxes_url, boxes)
    if rejects is not None:
        storage.write_parquet(artifacts.rejects_url, rejects)
    storage.write_json(
        dataset_url(storage, name, MARKER_FILE),
        {
            "source": getattr(config, "source", None),
            "config": config.model_dump(mode="json"),
            "config_sha256": config_fingerprint(config, inputs),
            "inputs": dict(inputs or {}),
            "images_version": images_version,
            "artifacts": artifacts.model_dump(),
            "num_images": len(labels),
            "num_labels": len(vocabulary),
            "num_rejects": 0 if rejects is None else len(rejects),
        },
    )
    logger.info(
        "dataset %s: %d images, %d labels (%d seen) written",
        name,
        len(labels),
        len(vocabulary),
        int(vocabulary["seen"].sum()),
    )
    return artifacts
