"""Dataset sources: each turns raw files into a validated label table and vocabulary.

``DatasetConfig`` is a discriminated union on ``source``, so a run config picks its source with
one key (``dataset.source: nus-wide``) and gets that source's own validated fields.
:func:`prepare_dataset` dispatches to the source; every source writes under
``datasets/<name>/`` through :class:`~tasks.storage.Storage` and skips work whose outputs exist
and validate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

from tasks.claims import claimed
from tasks.datasets.base import DatasetArtifacts, DatasetError, dataset_url
from tasks.datasets.emoji_scenes import EmojiScenesConfig, prepare_emoji_scenes
from tasks.datasets.nuswide import NusWideConfig, prepare_nuswide
from tasks.datasets.openimages import OpenImagesConfig, prepare_openimages
from tasks.datasets.table import TableConfig, prepare_table
from tasks.retries import retrying_task
from tasks.storage import Storage

__all__ = [
    "DatasetArtifacts",
    "DatasetConfig",
    "DatasetError",
    "EmojiScenesConfig",
    "NusWideConfig",
    "OpenImagesConfig",
    "TableConfig",
    "prepare_dataset",
    "prepare_dataset_task",
]

DatasetConfig = Annotated[
    NusWideConfig | OpenImagesConfig | TableConfig | EmojiScenesConfig,
    Field(discriminator="source"),
]

_PREPARERS: dict[str, Callable[[Any, Storage], DatasetArtifacts]] = {
    "nus-wide": prepare_nuswide,
    "open-images": prepare_openimages,
    "table": prepare_table,
    "emoji-scenes": prepare_emoji_scenes,
}


def prepare_dataset(config: DatasetConfig, storage: Storage) -> DatasetArtifacts:
    """Build (or reuse) the dataset described by ``config``; return where its tables are."""
    source = getattr(config, "source", None)
    if source not in _PREPARERS:
        raise ValueError(f"unknown dataset source {source!r}; expected one of {sorted(_PREPARERS)}")
    with claimed(storage, dataset_url(storage, config.name), f"dataset {config.name}"):
        return _PREPARERS[source](config, storage)


prepare_dataset_task = retrying_task("prepare-dataset", retries=2)(prepare_dataset)
