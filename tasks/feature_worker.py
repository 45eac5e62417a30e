"""The worker side of feature extraction: one shard of images -> one verified HDF5 file.

A shard task (:func:`extract_shard`, run on a Dask worker by :mod:`tasks.features`) reads its
images through :class:`~tasks.storage.Storage` and :func:`tasks.images.read_image` (failures
become rejects rows; the shard still completes), runs the backbone in batches while a thread
pool decodes the next batch, writes the HDF5 file locally (:class:`tasks.feature_shards.
ShardWriter`), uploads it verified, and returns its manifest row.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from distributed import get_worker

from lesa_model.backbones import Backbone, region_features
from lesa_model.trainer import resolve_device
from tasks.feature_config import FeaturesConfig
from tasks.feature_shards import ShardWriter, ids_sha256, shard_name
from tasks.images import ImageRejected, read_image
from tasks.storage import Storage

log = logging.getLogger(__name__)

REJECT_STAGE = "features"
IO_THREADS = 4
"""Threads per shard task that read and decode images while the backbone runs."""


class ExtractionError(RuntimeError):
    """Some shards failed; the others are committed and a rerun retries only the failed ones.

    ``transient`` says whether every failure was transient (then the task retries)."""

    transient = False


@dataclass(frozen=True)
class ShardPlan:
    """One shard's work: which images (ids and resolved URLs) and where the shard goes."""

    index: int
    image_ids: tuple[str, ...]
    uris: tuple[str, ...]
    shard_uri: str
    images_sha256: str = ""
    """Digest of the images' stamps when planned (:func:`tasks.features.with_image_versions`)."""

    @property
    def ids_sha256(self) -> str:
        """Digest of the ids the table assigns to this shard (rejected ones included)."""
        return ids_sha256(self.image_ids)


@dataclass
class ShardResult:
    """What a shard task returns: its manifest row and its rejected images."""

    manifest_row: dict[str, Any]
    rejects: list[dict[str, str]] = field(default_factory=list)


_BACKBONES: dict[tuple[Any, ...], Backbone] = {}
_BACKBONES_LOCK = threading.Lock()


def _worker_backbone(config: FeaturesConfig, device: torch.device, storage: Storage) -> Backbone:
    """The backbone for ``config`` on ``device``, built once per worker process (tasks running
    in parallel threads of one worker share it; inference does not mutate it)."""
    key = (config.backbone, config.weights, config.image_size, config.preprocessing, str(device))
    with _BACKBONES_LOCK:
        if key not in _BACKBONES:
            backbone = config.build_backbone(storage.local_copy)
            backbone.module.to(device, memory_format=torch.channels_last)
            if device.type == "cuda":
                backbone.module.half()
            _BACKBONES.clear()
            _BACKBONES[key] = backbone
        return _BACKBONES[key]


def _load_image(uri: str, storage: Storage, backbone: Backbone) -> torch.Tensor | ImageRejected:
    """One image read, decoded and preprocessed, or why it is unusable."""
    try:
        return backbone.preprocess(read_image(uri, storage))
    except ImageRejected as error:
        return error


def _prefetched(
    plan: ShardPlan, storage: Storage, backbone: Backbone, batch_size: int
) -> Iterator[list[tuple[int, torch.Tensor | ImageRejected]]]:
    """The shard's images in batches of ``(position, tensor or rejection)``; a thread pool reads
    and decodes the next batch while the caller runs the backbone on this one."""
    positions = range(len(plan.image_ids))
    batches = [positions[start : start + batch_size] for start in positions[::batch_size]]
    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:

        def submit(batch: Sequence[int]) -> list[tuple[int, Future]]:
            return [(p, pool.submit(_load_image, plan.uris[p], storage, backbone)) for p in batch]

        pending = submit(batches[0]) if batches else []
        for number in range(len(batches)):
            loaded = [(position, future.result()) for position, future in pending]
            if number + 1 < len(batches):
                pending = submit(batches[number + 1])
            yield loaded


def _checked(values: np.ndarray, dtype: str, shard_index: int) -> np.ndarray:
    """``values`` in the storage dtype, refusing overflow (a silently wrong shard)."""
    with np.errstate(over="ignore"):  # overflow is reported below, as an error
        stored = values.astype(dtype)
    if not np.isfinite(stored).all():
        raise ExtractionError(
            f"shard {shard_index}: non-finite features in {dtype} (overflow or broken weights); "
            "use dtype float32 or check the weights"
        )
    return stored


def _reject_row(plan: ShardPlan, position: int, rejected: ImageRejected) -> dict[str, str]:
    log.info("rejected %s: %s (%s)", plan.uris[position], rejected.reason, rejected.detail)
    return {
        "image_id": plan.image_ids[position],
        "uri": plan.uris[position],
        "stage": REJECT_STAGE,
        "reason": rejected.reason,
    }


def _write_shard(
    local: Path,
    plan: ShardPlan,
    config: FeaturesConfig,
    backbone: Backbone,
    storage: Storage,
    device: torch.device,
) -> tuple[list[str], list[dict[str, str]]]:
    """Fill the local HDF5 file; return the kept image ids and the rejects rows."""
    kept: list[str] = []
    rejects: list[dict[str, str]] = []
    with ShardWriter(
        local,
        regions=backbone.regions,
        dim=backbone.dim,
        chunk_rows=config.batch_size,
        dtype=config.dtype,
    ) as shard:
        for loaded in _prefetched(plan, storage, backbone, config.batch_size):
            tensors = []
            for position, result in loaded:
                if isinstance(result, ImageRejected):
                    rejects.append(_reject_row(plan, position, result))
                else:
                    tensors.append(result)
                    kept.append(plan.image_ids[position])
            if tensors:
                values = region_features(backbone, torch.stack(tensors), device)
                shard.append(_checked(values, config.dtype, plan.index))
        shard.finish(
            kept,
            {
                "backbone": backbone.name,
                "preprocessing": backbone.preprocessing,
                "grid": np.array(backbone.grid, dtype=np.int64),
                "weights": config.weights,
                "image_size": config.image_size,
            },
        )
    return kept, rejects


def extract_shard(
    plan: ShardPlan, config: FeaturesConfig, storage: Storage, torch_threads: int | None = None
) -> ShardResult:
    """Compute, write, upload and verify one shard; return its manifest row and rejects.

    The HDF5 file is written in a private temporary folder and committed by ``upload_file``
    (temporary key, size + sha256 check, rename), so an interrupted task leaves no visible
    shard. Unusable images become rejects rows; the shard completes without them.
    """
    if torch_threads:
        torch.set_num_threads(torch_threads)
    device = resolve_device(config.device)
    backbone = _worker_backbone(config, device, storage)
    with tempfile.TemporaryDirectory(prefix="lesa-shard-") as folder:
        local = Path(folder) / shard_name(plan.index)
        kept, rejects = _write_shard(local, plan, config, backbone, storage, device)
        sha256 = storage.upload_file(local, plan.shard_uri)
        size = local.stat().st_size
    row = {
        "shard_index": plan.index,
        "shard_uri": plan.shard_uri,
        "num_images": len(kept),
        "backbone": backbone.name,
        "preprocessing": backbone.preprocessing,
        "regions": backbone.regions,
        "dim": backbone.dim,
        "dtype": config.dtype,
        "sha256": sha256,
        "size_bytes": size,
        "ids_sha256": plan.ids_sha256,
        "images_sha256": plan.images_sha256,
    }
    return ShardResult(manifest_row=row, rejects=rejects)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc ``mallopt`` parameters (malloc.h)."""


@functools.cache
def _keep_freed_memory() -> None:
    """Undo Dask's ``MALLOC_TRIM_THRESHOLD_=65536`` for this worker process.

    Dask's nanny sets it so idle workers hand memory back to the OS, but any fixed trim
    threshold also switches off glibc's adaptive mmap threshold, so every large activation
    buffer of every conv layer becomes a fresh mmap with page faults: measured 2-3x slower
    CNN inference. Large trim and mmap thresholds (1 GiB) keep freed activation buffers in the
    heap for the next batch instead (a worker extracting features reuses the same sizes all
    the time): faster than even a plain process. No-op without glibc's ``mallopt``.
    """
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)


def extract_shard_on_worker(
    plan: ShardPlan, config: FeaturesConfig, storage: Storage, threads_by_host: dict[str, int]
) -> ShardResult:
    """Dask task: tune the worker's allocator, pick this host's torch thread count, then
    extract the shard."""
    _keep_freed_memory()
    host = urlparse(get_worker().address).hostname or ""
    return extract_shard(plan, config, storage, config.torch_threads or threads_by_host.get(host))
