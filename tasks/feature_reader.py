"""Reading HDF5 feature shards: random access by image id and batches for the trainer.

The shard format is :mod:`tasks.feature_shards`'s (the writer, :mod:`tasks.feature_worker`, uses
the same module). The manifest is the only way in: a shard the manifest does not list does not
exist, and a listed shard that is missing or whose
size, shape, dtype or id count differs from its manifest row is an error, never silently skipped.
(The sha256 is checked by extraction's rerun, not on every read: hashing a full feature set
would cost minutes each time training opens it.)

Memory stays bounded: :class:`FeatureStore` reads only the rows asked for, and
:class:`FeatureBatches` holds at most ``buffer_shards`` shards' worth of selected rows while it
shuffles, so a 50 GB feature set trains on a laptop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

import h5py
import numpy as np
import pandas as pd

from tasks import schemas
from tasks.feature_shards import (
    FEATURES_DATASET,
    IMAGE_IDS_DATASET,
    FeatureStoreError,
    open_shard,
)
from tasks.storage import Storage

MAX_OPEN_SHARDS = 8
"""Open HDF5 handles kept per store (each holds a small metadata cache, not the data)."""


class FeatureStore:
    """Random access to the features of a committed feature set, by image id.

    Shards are opened through ``storage.local_copy``: in place when local, downloaded once into
    the storage cache when remote (training reads every shard each epoch, so a whole-file copy
    is cheaper than range requests). Each shard is checked against its manifest row (size,
    shape, dtype, id count) when first opened.
    """

    def __init__(self, manifest_url: str, storage: Storage) -> None:
        self.manifest_url = manifest_url
        self.storage = storage
        if not storage.exists(manifest_url):
            raise FeatureStoreError(f"no feature manifest at {manifest_url}")
        manifest = schemas.validate(
            storage.read_parquet(manifest_url), schemas.FeatureManifest, stage="feature reader"
        )
        self.manifest = manifest.sort_values("shard_index").reset_index(drop=True)
        for column in ("backbone", "preprocessing", "regions", "dim", "dtype"):
            values = self.manifest[column].unique()
            if len(values) > 1:
                raise FeatureStoreError(
                    f"{manifest_url} mixes shards with different {column}: {sorted(values)}"
                )
        self._open: OrderedDict[int, h5py.File] = OrderedDict()
        self._index: pd.DataFrame | None = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every open shard file."""
        while self._open:
            _, handle = self._open.popitem()
            handle.close()

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    # -- description ---------------------------------------------------------------------------

    def _single(self, column: str) -> object:
        if self.manifest.empty:
            raise FeatureStoreError(f"{self.manifest_url} lists no shards")
        return self.manifest[column].iloc[0]

    @property
    def regions(self) -> int:
        """Regions per image (R)."""
        return int(self._single("regions"))

    @property
    def dim(self) -> int:
        """Feature dimension (D)."""
        return int(self._single("dim"))

    @property
    def dtype(self) -> np.dtype:
        """Stored feature dtype (float16 or float32)."""
        return np.dtype(str(self._single("dtype")))

    @property
    def backbone(self) -> str:
        """Backbone name the features came from."""
        return str(self._single("backbone"))

    @property
    def preprocessing(self) -> str:
        """Preprocessing identifier the features came from."""
        return str(self._single("preprocessing"))

    @property
    def grid(self) -> tuple[int, int]:
        """Region grid (h, w), from the first shard's attributes."""
        h, w = self._handle(int(self._single("shard_index"))).attrs["grid"]
        return int(h), int(w)

    @property
    def num_images(self) -> int:
        """Images in the feature set (rejected images are not in it)."""
        return int(self.manifest["num_images"].sum())

    @property
    def image_ids(self) -> np.ndarray:
        """All image ids, in shard order."""
        return self.index.index.to_numpy(dtype=object)

    # -- lookup --------------------------------------------------------------------------------

    @property
    def index(self) -> pd.DataFrame:
        """image_id -> (``shard``, ``row``), built once from the shards' id lists."""
        if self._index is None:
            parts = []
            for shard_index in self.manifest["shard_index"].astype(int):
                ids = self._shard_ids(shard_index)
                parts.append(
                    pd.DataFrame(
                        {"shard": shard_index, "row": np.arange(len(ids))},
                        index=pd.Index(ids, dtype=object, name="image_id"),
                    )
                )
            index = pd.concat(parts) if parts else pd.DataFrame({"shard": [], "row": []})
            duplicated = index.index[index.index.duplicated()]
            if len(duplicated):
                raise FeatureStoreError(
                    f"{self.manifest_url}: image ids in more than one shard, e.g. "
                    f"{list(duplicated[:3])}"
                )
            self._index = index
        return self._index

    def _shard_ids(self, shard_index: int) -> list[str]:
        """The ids stored in one shard (its row count is checked when the shard is opened)."""
        return list(self._handle(shard_index)[IMAGE_IDS_DATASET].asstr()[:])

    def locate(self, image_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, row) of each id; unknown ids raise, naming a few of them."""
        wanted = pd.Index(list(image_ids), dtype=object)
        found = self.index.reindex(wanted)
        missing = wanted[found["shard"].isna().to_numpy()]
        if len(missing):
            raise FeatureStoreError(
                f"{len(missing)} image id(s) have no features in {self.manifest_url}, e.g. "
                f"{list(missing[:3])} (rejected at extraction, or from another dataset)"
            )
        return found["shard"].to_numpy(dtype=np.int64), found["row"].to_numpy(dtype=np.int64)

    # -- reading -------------------------------------------------------------------------------

    def _handle(self, shard_index: int) -> h5py.File:
        """An open shard file, checked against the manifest on first open."""
        if shard_index in self._open:
            self._open.move_to_end(shard_index)
            return self._open[shard_index]
        rows = self.manifest[self.manifest["shard_index"] == shard_index]
        if rows.empty:
            raise FeatureStoreError(f"shard {shard_index} is not in {self.manifest_url}")
        row = rows.iloc[0]
        try:
            path = self.storage.local_copy(str(row["shard_uri"]))
        except FileNotFoundError:
            raise FeatureStoreError(
                f"{self.manifest_url} lists shard {row['shard_uri']}, which is missing; rerun "
                "feature extraction to recompute it"
            ) from None
        handle = open_shard(
            path,
            uri=str(row["shard_uri"]),
            size_bytes=int(row["size_bytes"]),
            num_images=int(row["num_images"]),
            regions=int(row["regions"]),
            dim=int(row["dim"]),
            dtype=str(row["dtype"]),
        )
        self._open[shard_index] = handle
        while len(self._open) > MAX_OPEN_SHARDS:
            _, oldest = self._open.popitem(last=False)
            oldest.close()
        return handle

    def read_rows(self, shard_index: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Features of ``rows`` (any order, repeats allowed) of one shard; all rows if None."""
        dataset = self._handle(shard_index)[FEATURES_DATASET]
        if rows is None:
            return dataset[:]
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.empty((0, *dataset.shape[1:]), dtype=dataset.dtype)
        if len(rows) * 4 >= dataset.shape[0]:
            return dataset[:][rows]
        unique, inverse = np.unique(rows, return_inverse=True)
        return dataset[unique][inverse]

    def read(self, image_ids: Sequence[str]) -> np.ndarray:
        """Features (N, R, D) of ``image_ids`` in the given order, in the stored dtype."""
        shards, rows = self.locate(image_ids)
        out = np.empty((len(shards), self.regions, self.dim), dtype=self.dtype)
        for shard in np.unique(shards):
            where = np.flatnonzero(shards == shard)
            out[where] = self.read_rows(int(shard), rows[where])
        return out


class FeatureBatches:
    """A ``lesa_model.data.BatchSource`` over HDF5 shards: (features, labels) batches.

    Shuffled batches mix images across shards while holding at most ``buffer_shards`` shards of
    selected rows in memory: the shard order is shuffled, then each group of ``buffer_shards``
    shards is loaded and shuffled as a whole (rows left over from a group carry into the next so
    every batch but the last is full). The same ``(seed, epoch)`` gives the same batches.
    Unshuffled batches follow ``image_ids`` order, for evaluation.
    """

    def __init__(
        self,
        store: FeatureStore,
        image_ids: Sequence[str],
        labels: np.ndarray,
        *,
        buffer_shards: int = 4,
    ) -> None:
        ids = list(image_ids)
        labels = np.asarray(labels)
        if labels.ndim != 2 or labels.shape[0] != len(ids):
            raise ValueError(
                f"labels must be (num images, num labels) = ({len(ids)}, C), got {labels.shape}"
            )
        if labels.dtype != np.int8:
            raise ValueError(f"labels must be int8 in {{1, -1, 0}}, got dtype {labels.dtype}")
        if not np.isin(labels, (-1, 0, 1)).all():
            raise ValueError("labels must only hold 1 (positive), -1 (negative) or 0 (unknown)")
        if len(set(ids)) != len(ids):
            raise ValueError("image_ids must be unique")
        if buffer_shards < 1:
            raise ValueError(f"buffer_shards must be >= 1, got {buffer_shards}")
        self.store = store
        self.image_ids = ids
        self.labels = labels
        self.buffer_shards = buffer_shards
        self._shards, self._rows = store.locate(ids)

    @property
    def num_images(self) -> int:
        """Number of images this source yields per epoch."""
        return len(self.image_ids)

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(features float32 (B, R, D), labels int8 (B, C))`` covering every image once."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle:
            yield from self._shuffled(batch_size, np.random.default_rng([seed, epoch]))
        else:
            yield from self._ordered(batch_size)

    def _ordered(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, self.num_images, batch_size):
            positions = np.arange(start, min(start + batch_size, self.num_images))
            yield self._gather(positions), self.labels[positions]

    def _gather(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty((len(positions), self.store.regions, self.store.dim), dtype=np.float32)
        shards = self._shards[positions]
        for shard in np.unique(shards):
            where = np.flatnonzero(shards == shard)
            out[where] = self.store.read_rows(int(shard), self._rows[positions[where]])
        return out

    def _shuffled(
        self, batch_size: int, rng: np.random.Generator
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        shard_order = rng.permutation(np.unique(self._shards))
        carry_features = np.empty((0, self.store.regions, self.store.dim), dtype=np.float32)
        carry_positions = np.empty(0, dtype=np.int64)
        for start in range(0, len(shard_order), self.buffer_shards):
            group = shard_order[start : start + self.buffer_shards]
            positions = np.concatenate([np.flatnonzero(self._shards == s) for s in group])
            features = np.concatenate(
                [carry_features, self._gather(positions)], axis=0, dtype=np.float32
            )
            positions = np.concatenate([carry_positions, positions])
            order = rng.permutation(len(positions))
            full = len(order) - len(order) % batch_size
            for begin in range(0, full, batch_size):
                take = order[begin : begin + batch_size]
                yield features[take], self.labels[positions[take]]
            carry_features = features[order[full:]]
            carry_positions = positions[order[full:]]
        if len(carry_positions):
            yield carry_features, self.labels[carry_positions]
