"""What training and evaluation consume, in one place: the validated tables of a prepared
dataset, the feature set and the label vectors (:class:`StageInputs`), and the per-split batch
sources cut from them.

Labels enter the stages only if they have a word vector (``embeddings.oov: drop`` may have
dropped some); :attr:`StageInputs.seen_labels` and :attr:`StageInputs.unseen_labels` apply that
rule once for both stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
from prefect.cache_policies import NO_CACHE

from lesa_model.config import ReaderConfig
from tasks import schemas, versions
from tasks.datasets import DatasetArtifacts
from tasks.datasets.base import check_usable
from tasks.embeddings import EmbeddingResult
from tasks.feature_reader import FeatureBatches, FeatureStore
from tasks.features import FeatureSet
from tasks.retries import retrying_task
from tasks.storage import Storage


@dataclass(frozen=True)
class DatasetTables:
    """A prepared dataset's validated tables."""

    name: str
    labels: pd.DataFrame
    vocabulary: pd.DataFrame
    images_prefix: str
    boxes: pd.DataFrame | None = None
    version: str | None = None
    """Content version of the stored tables (``tasks.versions`` of the label table, vocabulary
    and boxes files), recorded in every report; None for tables built in memory."""

    @property
    def seen_labels(self) -> list[str]:
        return self.vocabulary.loc[self.vocabulary["seen"], "label"].astype(str).tolist()

    @property
    def unseen_labels(self) -> list[str]:
        return self.vocabulary.loc[~self.vocabulary["seen"], "label"].astype(str).tolist()

    def split(self, name: str) -> pd.DataFrame:
        """Rows of one split (``train``, ``val``, ``test``), in table order."""
        return self.labels[self.labels["split"] == name]


def load_tables(storage: Storage, dataset: DatasetArtifacts) -> DatasetTables:
    """Read and validate the label table, vocabulary and boxes of a prepared dataset.

    This is the stage boundary before features and training: a table that does not match its
    schema, or a dataset a run cannot use (no seen or unseen labels, no train or test images),
    stops the run here, naming the file, column, rule and example rows.
    """
    vocabulary = schemas.read_validated(
        storage, dataset.vocabulary_url, schemas.Vocabulary, stage="label table"
    )
    labels = schemas.read_validated(
        storage,
        dataset.label_table_url,
        schemas.LabelTable,
        stage="label table",
        vocabulary=vocabulary,
    )
    check_usable(dataset.name, labels, vocabulary)
    files = [dataset.label_table_url, dataset.vocabulary_url, *filter(None, [dataset.boxes_url])]
    boxes = None
    if dataset.boxes_url is not None:
        boxes = schemas.read_validated(
            storage, dataset.boxes_url, schemas.ObjectBoxes, stage="label table"
        )
    return DatasetTables(
        name=dataset.name,
        labels=labels.reset_index(drop=True),
        vocabulary=vocabulary.reset_index(drop=True),
        images_prefix=dataset.images_prefix,
        boxes=boxes,
        version=versions.digest(versions.file_versions(storage, files).values())[:16],
    )


load_tables_task = retrying_task("validate-label-table", retries=2, cache_policy=NO_CACHE)(
    load_tables
)


@dataclass(frozen=True)
class StageInputs:
    """Validated tables, features and label vectors: the inputs of training and evaluation."""

    tables: DatasetTables
    features: FeatureSet
    embeddings: EmbeddingResult

    @property
    def seen_labels(self) -> list[str]:
        """Seen labels that have a word vector, in vocabulary order."""
        return self.embeddings.embedded(self.tables.seen_labels)

    @property
    def unseen_labels(self) -> list[str]:
        """Unseen labels that have a word vector, in vocabulary order."""
        return self.embeddings.embedded(self.tables.unseen_labels)

    def feature_store(self, storage: Storage) -> FeatureStore:
        """Random access to the feature set."""
        return FeatureStore(self.features.manifest_url, storage)


def split_source(
    tables: DatasetTables,
    store: FeatureStore,
    split: str,
    labels: Sequence[str],
    reader: ReaderConfig | None = None,
) -> FeatureBatches | None:
    """Batches of one split's images that have features (rejected images are skipped), with
    their annotations of ``labels``, read as ``reader`` says (None: streamed); None when no
    image of the split has features."""
    rows = tables.split(split)
    rows = rows[rows["image_id"].isin(store.index.index)]
    if rows.empty:
        return None
    matrix = schemas.label_matrix(rows, labels)
    ids = rows["image_id"].astype(str).tolist()
    return FeatureBatches(store, ids, matrix, reader=reader)
