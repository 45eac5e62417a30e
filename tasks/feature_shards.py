"""The HDF5 shard format, shared by the writer (:mod:`tasks.feature_worker`) and the reader
(:mod:`tasks.feature_reader`); docs/ARCHITECTURE.md, "HDF5 shard format", describes it.

A feature-set folder holds ``shard-00000.h5 ...``, ``manifest.parquet`` (one row per committed
shard) and ``rejects.parquet``. A shard holds ``features`` (N, R, D), chunked one backbone batch
per chunk, and ``image_ids`` (N,) utf-8, with the attributes ``backbone``, ``preprocessing``,
``grid`` (h, w), ``format_version``, ``weights`` and ``image_size``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tasks.hashing import content_hash

FORMAT_VERSION = 1
FEATURES_DATASET = "features"
IMAGE_IDS_DATASET = "image_ids"
MANIFEST_NAME = "manifest.parquet"
REJECTS_NAME = "rejects.parquet"
SHARD_NAME = "shard-{index:05d}.h5"


class FeatureStoreError(ValueError):
    """A feature set that cannot be read as its manifest describes it."""


def shard_name(index: int) -> str:
    """File name of shard ``index`` inside a feature-set folder."""
    return SHARD_NAME.format(index=index)


def ids_sha256(image_ids: Sequence[str]) -> str:
    """Digest of an ordered list of image ids (unambiguous even if ids contain newlines)."""
    return content_hash(list(image_ids))


class ShardWriter:
    """Write one shard: feature batches appended as they are computed, then ids and attributes.

    Use as a context manager; :meth:`finish` must be called before it closes.
    """

    def __init__(self, path: Path, *, regions: int, dim: int, chunk_rows: int, dtype: str) -> None:
        self._file = h5py.File(path, "w")
        self._features = self._file.create_dataset(
            FEATURES_DATASET,
            shape=(0, regions, dim),
            maxshape=(None, regions, dim),
            chunks=(chunk_rows, regions, dim),
            dtype=dtype,
        )

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()

    def append(self, values: np.ndarray) -> None:
        """Add (B, R, D) features (already in the stored dtype) after the ones written so far."""
        start = self._features.shape[0]
        self._features.resize(start + len(values), axis=0)
        self._features[start:] = values

    def finish(self, image_ids: Sequence[str], attrs: Mapping[str, Any]) -> None:
        """Write the ids of the rows written, in order, and the shard's attributes."""
        self._file.create_dataset(
            IMAGE_IDS_DATASET,
            data=np.array(list(image_ids), dtype=object),
            dtype=h5py.string_dtype(),
        )
        self._file.attrs.update({**attrs, "format_version": FORMAT_VERSION})


def open_shard(
    path: Path, *, uri: str, size_bytes: int, num_images: int, regions: int, dim: int, dtype: str
) -> h5py.File:
    """Open a shard for reading, checking it against its manifest row (size, ids, shape, dtype).

    Raises:
        FeatureStoreError: naming the shard and what differs.
    """
    if path.stat().st_size != size_bytes:
        raise FeatureStoreError(
            f"shard {uri} has {path.stat().st_size} bytes, its manifest row says {size_bytes}: "
            "it was changed after it was committed"
        )
    handle = h5py.File(path, "r")
    features = handle[FEATURES_DATASET]
    ids = handle[IMAGE_IDS_DATASET]
    if ids.shape != (num_images,):
        handle.close()
        raise FeatureStoreError(
            f"shard {uri} holds {ids.shape[0]} image ids, its manifest row says {num_images}"
        )
    expected = (num_images, regions, dim)
    if features.shape != expected or features.dtype != np.dtype(dtype):
        handle.close()
        raise FeatureStoreError(
            f"shard {uri} holds {features.dtype} {features.shape}, its manifest row says "
            f"{dtype} {expected}"
        )
    return handle
