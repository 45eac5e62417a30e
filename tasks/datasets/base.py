"""What every dataset source produces, and the shared write/skip logic that makes them idempotent.

A source turns raw files into two validated tables (label table, vocabulary) plus optional boxes
and rejects, all under ``datasets/<name>/`` in storage. ``dataset.json`` is written last and
records the source config's fingerprint: a rerun with the same config whose tables still exist
and validate is skipped; a changed config rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Annotated

import pandas as pd
from pydantic import BaseModel, ConfigDict, StringConstraints

from tasks import schemas
from tasks.embeddings import tokenize_label
from tasks.storage import Storage

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
    """Stable hash of a source config and the checksums of its input files (URL -> SHA-256).

    Any change to either means the dataset must be rebuilt: a user's label table rewritten in
    place under the same URL is a new dataset version, not a finished one.
    """
    payload = json.dumps(
        {"config": config.model_dump(mode="json"), "inputs": dict(inputs or {})},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def input_checksums(storage: Storage, files: Mapping[str, str]) -> dict[str, str]:
    """SHA-256 of each input file (``{what: url}``) by URL, for :func:`config_fingerprint`."""
    checksums = {}
    for what, url in files.items():
        if not storage.exists(url):
            raise DatasetError(f"missing {what}: {url} does not exist")
        checksums[url] = storage.sha256(url)
    return checksums


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
    storage: Storage, name: str, config: BaseModel, inputs: Mapping[str, str] | None = None
) -> DatasetArtifacts | None:
    """Return the artifacts of an earlier run with the same config and inputs if still valid.

    Anything missing, stale or invalid returns ``None`` (and is logged), so the caller rebuilds.
    """
    marker_url = dataset_url(storage, name, MARKER_FILE)
    if not storage.exists(marker_url):
        return None
    try:
        marker = storage.read_json(marker_url)
    except ValueError as error:
        logger.warning("dataset %s: %s is unreadable (%s); rebuilding", name, MARKER_FILE, error)
        return None
    if not isinstance(marker, dict) or marker.get("config_sha256") != config_fingerprint(
        config, inputs
    ):
        logger.info(
            "dataset %s: config or input files changed since the last run; rebuilding", name
        )
        return None
    try:
        artifacts = DatasetArtifacts.model_validate(marker["artifacts"])
        vocabulary = schemas.validate(
            storage.read_parquet(artifacts.vocabulary_url), schemas.Vocabulary, stage="dataset"
        )
        schemas.validate(
            storage.read_parquet(artifacts.label_table_url),
            schemas.LabelTable,
            stage="dataset",
            vocabulary=vocabulary,
        )
        for url, model in (
            (artifacts.boxes_url, schemas.ObjectBoxes),
            (artifacts.rejects_url, schemas.Rejects),
        ):
            if url is not None:
                schemas.validate(storage.read_parquet(url), model, stage="dataset")
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
) -> DatasetArtifacts:
    """Validate every table, write them atomically, then commit ``dataset.json`` last.

    Validation happens before anything is written, so bad input never replaces good output.
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
