"""Reading HDF5 feature shards: random access by image id and batches for the trainer.

The shard format is :mod:`tasks.feature_shards`'s (the writer, :mod:`tasks.feature_worker`, uses
the same module). The manifest is the only way in: a shard the manifest does not list does not
exist, and a listed shard that is missing or whose
size, shape, dtype or id count differs from its manifest row is an error, never silently skipped.
(The sha256 is checked by extraction's rerun, not on every read: hashing a full feature set
would cost minutes each time training opens it.)

Memory stays bounded: :class:`FeatureStore` reads only the rows asked for, and
:class:`FeatureBatches` either loads the training features once, when they fit the reader's
memory budget, or streams them a few shuffle windows at a time, so a 50 GB feature set trains
on a laptop (docs/ARCHITECTURE.md, "Training input").
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import h5py
import numpy as np
import pandas as pd
import psutil
import torch

from lesa_model.config import ReaderConfig
from lesa_model.data import Prefetch, WindowedOrder, windowed_order
from tasks import schemas
from tasks.feature_shards import (
    FEATURES_DATASET,
    IMAGE_IDS_DATASET,
    FeatureStoreError,
    open_shard,
)
from tasks.storage import Storage

MAX_OPEN_SHARDS = 64
"""Open HDF5 handles kept per store (each holds a small metadata cache, not the data); a
shuffle window touches up to ``window_chunks`` shards."""
BLOCK_STRIDE = 1 << 32
"""Block id = shard index x BLOCK_STRIDE + chunk number within the shard."""


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
        self._lock = threading.RLock()  # a reader's prefetch thread shares the open handles
        self._index: pd.DataFrame | None = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every open shard file."""
        with self._lock:
            while self._open:
                _, handle = self._open.popitem()
                handle.close()

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

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
        with self._lock:
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
        with self._lock:
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
        """An open shard file, checked against the manifest on first open (callers hold the
        lock while they use it: another thread's open may close the oldest handle)."""
        with self._lock:
            return self._open_handle(shard_index)

    def _open_handle(self, shard_index: int) -> h5py.File:
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
        with self._lock:
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

    def chunk_rows(self, shard_index: int) -> int:
        """Rows per stored chunk of one shard's features (all rows when it is not chunked)."""
        with self._lock:
            dataset = self._handle(shard_index)[FEATURES_DATASET]
            return int(dataset.chunks[0]) if dataset.chunks else max(int(dataset.shape[0]), 1)

    def read_slice(self, shard_index: int, start: int, stop: int) -> np.ndarray:
        """Features of rows ``start:stop`` of one shard (a contiguous, chunk-aligned read)."""
        with self._lock:
            return self._handle(shard_index)[FEATURES_DATASET][start:stop]

    def read_into(self, shard_index: int, start: int, stop: int, out: np.ndarray) -> None:
        """Rows ``start:stop`` of one shard written into ``out`` (C-contiguous, no copy)."""
        with self._lock:
            dataset = self._handle(shard_index)[FEATURES_DATASET]
            dataset.read_direct(out, source_sel=np.s_[start:stop])

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

    Features come in their stored dtype (float16 on the wire; the trainer widens them on the
    device). The order of an epoch is :func:`lesa_model.data.windowed_order` over the stored
    chunks of these images (block = one HDF5 chunk of one shard; window =
    ``reader.window_chunks`` chunks): a permutation of every chunk of every shard, rows shuffled
    within each window. Both modes replay that one order, so they give identical batches:

    - ``memory``: the features are read once (chunk by chunk) into one array and each batch is
      gathered from it (on the device after :meth:`place_on` moved it there);
    - ``stream``: a background thread reads the next ``reader.prefetch`` windows (whole chunks,
      then the rows of these images) while batches are cut from the current one; memory holds
      a few windows, whatever the number of shards.

    ``auto`` picks ``memory`` when the features fit ``reader.memory_budget_gb`` (None: half of
    the host memory available when the first epoch starts). Without a ``reader`` the source
    streams (evaluation reads it once). Inputs are checked here, once: labels, ids, each shard
    against its manifest row.
    """

    def __init__(
        self,
        store: FeatureStore,
        image_ids: Sequence[str],
        labels: np.ndarray,
        *,
        reader: ReaderConfig | None = None,
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
        self.store = store
        self.image_ids = ids
        self.labels = labels
        self.reader = reader or ReaderConfig(mode="stream")
        self._shards, self._rows = store.locate(ids)
        self._blocks = self._shards * BLOCK_STRIDE + self._rows // self._chunk_rows()
        self._memory: tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor] | None = None
        self._mode: str | None = None

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_memory"] = None  # loaded features are reloaded where the copy runs, not pickled
        return state

    def _chunk_rows(self) -> np.ndarray:
        """Rows per stored chunk of each image's shard (the unit a read decodes)."""
        per_shard = {
            int(shard): self.store.chunk_rows(int(shard)) for shard in np.unique(self._shards)
        }
        return np.array([per_shard[int(s)] for s in self._shards], dtype=np.int64).reshape(-1)

    @property
    def num_images(self) -> int:
        """Number of images this source yields per epoch."""
        return len(self.image_ids)

    @property
    def nbytes(self) -> int:
        """Bytes of these images' features in the stored dtype (what ``memory`` mode holds)."""
        return self.num_images * self.store.regions * self.store.dim * self.store.dtype.itemsize

    @property
    def mode(self) -> str:
        """``memory`` or ``stream``: the reader's mode, ``auto`` resolved by the budget once."""
        if self._mode is None:
            budget = self.reader.memory_budget_gb
            limit = budget * 1e9 if budget is not None else psutil.virtual_memory().available / 2
            auto = "memory" if self.nbytes <= limit else "stream"
            self._mode = auto if self.reader.mode == "auto" else self.reader.mode
        return self._mode

    def place_on(self, device: torch.device) -> None:
        """In ``memory`` mode on CUDA, load the features onto the device when they take at most
        half of its free memory, so batches are gathered there (no host copy per step)."""
        if device.type != "cuda" or self.mode != "memory":
            return
        free, _ = torch.cuda.mem_get_info(device)
        if self.nbytes <= free / 2:
            features, labels = self._loaded()
            self._memory = (
                torch.as_tensor(features).to(device),
                torch.as_tensor(labels).to(device),
            )

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0
    ) -> Iterator[tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]]:
        """Yield ``(features (B, R, D) stored dtype, labels int8 (B, C))``, every image once."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        plan = windowed_order(
            self._blocks, self.reader.window_chunks, shuffle=shuffle, seed=seed, epoch=epoch
        )
        if self.mode == "memory":
            return self._from_memory(plan.order, batch_size)
        return self._streamed(plan, batch_size)

    # -- memory mode ---------------------------------------------------------------------------

    def _loaded(self) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
        """Every image's features, in position order, read once (one pass over the chunks)."""
        if self._memory is None:
            plan = windowed_order(self._blocks, self.reader.window_chunks, shuffle=False)
            features = np.empty(
                (self.num_images, self.store.regions, self.store.dim), dtype=self.store.dtype
            )
            for positions in plan.windows():
                features[positions] = self._read_window(positions)
            self._memory = (features, self.labels)
        return self._memory

    def _from_memory(
        self, order: np.ndarray, batch_size: int
    ) -> Iterator[tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]]:
        features, labels = self._loaded()
        if isinstance(features, torch.Tensor):
            index = torch.from_numpy(order).to(features.device)
            for start in range(0, len(order), batch_size):
                take = index[start : start + batch_size]
                yield features.index_select(0, take), labels.index_select(0, take)
            return
        for start in range(0, len(order), batch_size):
            take = order[start : start + batch_size]
            yield features[take], labels[take]

    # -- stream mode ---------------------------------------------------------------------------

    def _read_window(self, positions: np.ndarray) -> np.ndarray:
        """Features of ``positions`` (in that order). Each chunk they touch is read once, its
        rows straight into a staging array in (chunk, row) order (one contiguous read when the
        rows are a run, as a whole split's are); one scatter then puts them in window order."""
        blocks, rows = self._blocks[positions], self._rows[positions]
        by_place = np.lexsort((rows, blocks))
        blocks, rows = blocks[by_place], rows[by_place]
        staged = np.empty((len(positions), self.store.regions, self.store.dim), self.store.dtype)
        cuts = np.flatnonzero(np.diff(blocks)) + 1
        for start, stop in zip(np.r_[0, cuts], np.r_[cuts, len(positions)], strict=True):
            shard, wanted = int(blocks[start] // BLOCK_STRIDE), rows[start:stop]
            first, last = int(wanted[0]), int(wanted[-1]) + 1
            if last - first == stop - start:
                self.store.read_into(shard, first, last, staged[start:stop])
            else:
                staged[start:stop] = self.store.read_slice(shard, first, last)[wanted - first]
        out = np.empty_like(staged)
        out[by_place] = staged
        return out

    def _streamed(
        self, plan: WindowedOrder, batch_size: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        def windows() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for positions in plan.windows():
                yield self._read_window(positions), self.labels[positions]

        carry: tuple[np.ndarray, np.ndarray] | None = None
        with Prefetch(windows, self.reader.prefetch, name="feature-windows") as loaded:
            for features, labels in loaded:
                if carry is not None:
                    features = np.concatenate([carry[0], features])
                    labels = np.concatenate([carry[1], labels])
                full = len(features) - len(features) % batch_size
                for start in range(0, full, batch_size):
                    yield features[start : start + batch_size], labels[start : start + batch_size]
                carry = (features[full:], labels[full:]) if full < len(features) else None
        if carry is not None:
            yield carry
