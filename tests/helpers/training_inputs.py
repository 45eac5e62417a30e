"""A complete, tiny set of training and evaluation inputs written to storage: labelled images
whose present labels plant a prototype in one region, train/val/test splits, unit label vectors,
and feature shards in the documented HDF5 format (what extraction writes)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from tasks import schemas
from tasks.config import PipelineConfig, load_config
from tasks.embeddings import EmbeddingResult, KumoGlove
from tasks.feature_shards import FEATURES_DATASET, IMAGE_IDS_DATASET, ids_sha256
from tasks.features import FeatureSet
from tasks.stage_inputs import DatasetTables, StageInputs
from tasks.storage import Storage
from tasks.training import TrainingOutcome, train_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
R, D, DIM = 4, 8, 6
"""Regions and feature dimension of the synthetic features; word-vector dimension."""
SEEN = ["cat", "dog", "car", "tree", "boat", "lamp"]
UNSEEN = ["bus", "fox"]


@dataclass
class Synthetic:
    """The run config, its storage and the stage inputs written there."""

    config: PipelineConfig
    storage: Storage
    inputs: StageInputs

    @property
    def tables(self) -> DatasetTables:
        return self.inputs.tables

    @property
    def features(self) -> FeatureSet:
        return self.inputs.features

    @property
    def embeddings(self) -> EmbeddingResult:
        return self.inputs.embeddings

    def with_tables(self, tables: DatasetTables) -> Synthetic:
        """The same inputs over other tables (vocabulary, boxes...)."""
        labels = tables.vocabulary["label"].tolist()
        inputs = StageInputs(tables, self.features, embedding_result(labels))
        return Synthetic(self.config, self.storage, inputs)

    def with_inputs(self, **changes: Any) -> Synthetic:
        """The same run with some stage inputs replaced (``features=``, ``embeddings=``)."""
        return Synthetic(self.config, self.storage, replace(self.inputs, **changes))


def unit_vectors(labels: list[str], seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((len(labels), DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return pd.DataFrame({"label": labels, "vector": [list(map(float, v)) for v in vectors]})


def embedding_result(labels: list[str]) -> EmbeddingResult:
    table = schemas.validate(unit_vectors(labels), schemas.LabelEmbeddings, stage="test")
    return EmbeddingResult(table, pd.DataFrame({"label": []}), 1.0, KumoGlove())


def write_feature_set(
    storage: Storage,
    prefix: str,
    ids: list[str],
    values: np.ndarray,
    shard_size: int,
    config: PipelineConfig,
) -> FeatureSet:
    """Shards + manifest in the documented HDF5 format (what extract_features writes)."""
    rows = []
    for index, start in enumerate(range(0, len(ids), shard_size)):
        local = Path(storage.cache_dir) / f"shard-{index}.h5"
        local.parent.mkdir(parents=True, exist_ok=True)
        chunk_ids = ids[start : start + shard_size]
        with h5py.File(local, "w") as shard:
            shard.create_dataset(FEATURES_DATASET, data=values[start : start + shard_size])
            shard.create_dataset(
                IMAGE_IDS_DATASET, data=np.array(chunk_ids, dtype=object), dtype=h5py.string_dtype()
            )
            shard.attrs.update({"backbone": "synthetic", "grid": np.array([2, 2])})
        uri = f"{prefix}/shard-{index:05d}.h5"
        rows.append(
            {
                "shard_index": index,
                "shard_uri": uri,
                "num_images": len(chunk_ids),
                "backbone": "synthetic",
                "preprocessing": "none",
                "regions": R,
                "dim": D,
                "dtype": "float32",
                "sha256": storage.upload_file(local, uri),
                "size_bytes": local.stat().st_size,
                "ids_sha256": ids_sha256(chunk_ids),
            }
        )
    manifest = schemas.validate(pd.DataFrame(rows), schemas.FeatureManifest, stage="test")
    storage.write_parquet(f"{prefix}/manifest.parquet", manifest)
    return FeatureSet(
        manifest_url=f"{prefix}/manifest.parquet",
        rejects_url=f"{prefix}/rejects.parquet",
        identity=config.features.identity(),
        regions=R,
        dim=D,
        grid=(2, 2),
        num_images=len(ids),
    )


def synthetic_tables(images_prefix: str) -> tuple[DatasetTables, np.ndarray]:
    """Two present labels per image (seen ones only outside the test split), each planting its
    prototype in one region of the image's (R, D) features; the tables and the features."""
    rng = np.random.default_rng(0)
    labels = SEEN + UNSEEN
    splits = ["train"] * 24 + ["val"] * 8 + ["test"] * 12
    ids = [f"img-{i:03d}" for i in range(len(splits))]
    prototypes = rng.standard_normal((len(labels), D)).astype(np.float32)
    values = 0.3 * rng.standard_normal((len(ids), R, D)).astype(np.float32)
    positives = []
    for i, split in enumerate(splits):
        pool = SEEN if split != "test" else labels
        chosen = sorted(rng.choice(pool, size=2, replace=False).tolist())
        positives.append(chosen)
        for label in chosen:
            values[i, rng.integers(R)] += prototypes[labels.index(label)]
    table = pd.DataFrame(
        {
            "image_id": ids,
            "uri": [f"{i}.jpg" for i in ids],
            "split": splits,
            "positives": positives,
            "negatives": [[] for _ in ids],
            "complete": True,
        }
    )
    vocabulary = pd.DataFrame(
        {"label": labels, "seen": [label in SEEN for label in labels], "tokens": labels}
    )
    tables = DatasetTables(
        name="synthetic",
        labels=schemas.validate(table, schemas.LabelTable, stage="test"),
        vocabulary=schemas.validate(vocabulary, schemas.Vocabulary, stage="test"),
        images_prefix=images_prefix,
    )
    return tables, values


def synthetic(root: str, *, cache_dir: Path, steps: int = 6, **storage_options: str) -> Synthetic:
    """The tiny run config (a few training steps) and synthetic inputs under ``root``."""
    config = load_config(
        CONFIGS / "tiny.yaml",
        {
            "storage": {"root": root, "cache_dir": str(cache_dir), **storage_options},
            "model": {"num_modules": 2, "input_projection": None, "hidden_dim": 8},
            "train": {
                "steps": steps,
                "batch_size": 8,
                "val_every": 3,
                "checkpoint_every": 2,
                "select": "mAP",
                "keep_checkpoints": 2,
            },
        },
    )
    storage = Storage(config.storage)
    tables, values = synthetic_tables(storage.url("images"))
    ids = tables.labels["image_id"].tolist()
    features = write_feature_set(
        storage, storage.url("features", "synthetic", "key"), ids, values, 16, config
    )
    inputs = StageInputs(tables, features, embedding_result(SEEN + UNSEEN))
    return Synthetic(config, storage, inputs)


def train(inputs: Synthetic, **kwargs: Any) -> TrainingOutcome:
    """The training stage on ``inputs`` with its config's sections (``kwargs`` replace them)."""
    sections = {
        "run_name": inputs.config.run_name,
        "model": inputs.config.model,
        "loss": inputs.config.loss,
        "trainer": inputs.config.train,
        "val_ks": inputs.config.evaluation.ks,
    }
    return train_model(inputs.storage, inputs.inputs, **(sections | kwargs))
