"""A synthetic feature set in the real shard format, for the training-input benchmarks.

Shards are written with :class:`tasks.feature_shards.ShardWriter` (the extraction worker's
writer) and listed in a validated manifest, so :class:`tasks.feature_reader.FeatureStore` reads
them exactly as it reads extracted features.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.feature_shards import MANIFEST_NAME, ShardWriter, ids_sha256, shard_name
from tasks.storage import Storage, StorageConfig


@dataclass(frozen=True)
class FeatureSet:
    storage: Storage
    manifest_url: str
    image_ids: list[str]
    labels: np.ndarray
    """(N, C) int8 in {1, -1}: about 2% positives, as NUS-WIDE's 925 seen labels."""


def write_feature_set(
    folder: Path,
    *,
    images: int,
    shard_size: int,
    regions: int = 196,
    dim: int = 512,
    labels: int = 925,
    chunk_rows: int = 32,
    seed: int = 0,
) -> FeatureSet:
    """``images`` float16 feature maps (ReLU'd normals) in shards of ``shard_size`` under
    ``folder``, chunked ``chunk_rows`` rows per chunk as extraction writes them."""
    storage = Storage(StorageConfig(root=str(folder), cache_dir=str(folder / "cache")))
    rng = np.random.default_rng(seed)
    rows, ids = [], []
    for index, start in enumerate(range(0, images, shard_size)):
        count = min(shard_size, images - start)
        shard_ids = [f"img-{start + k:07d}" for k in range(count)]
        path = folder / shard_name(index)
        with ShardWriter(
            path, regions=regions, dim=dim, chunk_rows=chunk_rows, dtype="float16"
        ) as shard:
            for begin in range(0, count, chunk_rows):
                size = min(chunk_rows, count - begin)
                values = rng.standard_normal((size, regions, dim), dtype=np.float32)
                shard.append(np.maximum(values, 0).astype(np.float16))
            shard.finish(
                shard_ids, {"backbone": "vgg19", "preprocessing": "bench", "grid": [14, 14]}
            )
        data = path.read_bytes()
        rows.append(
            {
                "shard_index": index,
                "shard_uri": str(path),
                "num_images": count,
                "backbone": "vgg19",
                "preprocessing": "bench",
                "regions": regions,
                "dim": dim,
                "dtype": "float16",
                "sha256": hashlib.sha256(data).hexdigest(),
                "size_bytes": len(data),
                "ids_sha256": ids_sha256(shard_ids),
            }
        )
        ids += shard_ids
    manifest_url = str(folder / MANIFEST_NAME)
    storage.write_parquet(manifest_url, pd.DataFrame(rows))
    matrix = np.where(rng.random((images, labels)) < 0.02, 1, -1).astype(np.int8)
    return FeatureSet(storage, manifest_url, ids, matrix)
