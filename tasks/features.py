"""Region-feature extraction: label table -> sharded HDF5 features, in parallel on Dask.

Each shard (``shard_size`` consecutive images of the label table) is one Dask task: read the
images through :class:`~tasks.storage.Storage`, decode them with
:func:`tasks.images.decode_image` (failures become rejects rows; the shard still completes),
run the backbone in batches, write the HDF5 file locally, upload it verified, and return its
manifest row. The driver commits rows as shards finish, rewriting the manifest atomically each
time, so a crash or a killed worker leaves only verified shards listed.

A rerun skips every listed shard whose file still matches its row (size, sha256), whose image
ids are still the ones the table puts in that shard and whose images are still the files it read
(their stamps, :func:`tasks.versions.stamps`: an image fixed or replaced in place, or one that
was missing and now exists, recomputes its shard), and recomputes the rest. Features never
depend on labels: the feature key names everything that changes the features, and nothing else.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import importlib.util
import logging
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import h5py
import numpy as np
import pandas as pd
import torch
from distributed import Client, LocalCluster, as_completed, get_worker
from PIL import Image
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from lesa_common import StrictModel
from tasks import backbones, schemas
from tasks.backbones import Backbone, BackboneName, PreprocessingName
from tasks.feature_reader import (
    FEATURES_DATASET,
    FORMAT_VERSION,
    IMAGE_IDS_DATASET,
    MANIFEST_NAME,
    REJECTS_NAME,
    FeatureBatches,
    FeatureStore,
    ids_sha256,
    shard_name,
)
from tasks.hashing import content_hash
from tasks.images import DEFAULT_MAX_PIXELS, ImageRejected, decode_image
from tasks.progress import RunProgress
from tasks.retries import is_transient, retrying_task
from tasks.storage import Storage
from tasks.versions import digest, stamps

__all__ = [
    "DaskConfig",
    "ExtractionError",
    "FeatureBatches",
    "FeatureSet",
    "FeatureStore",
    "FeaturesConfig",
    "ShardPlan",
    "dask_client",
    "extract_features",
    "extract_features_task",
    "extract_shard",
    "feature_key",
    "features_prefix",
    "plan_shards",
    "region_features",
    "resolve_uri",
]

log = logging.getLogger(__name__)

REJECT_STAGE = "features"
IO_THREADS = 4
"""Threads per shard task that read and decode images while the backbone runs."""


class ExtractionError(RuntimeError):
    """Some shards failed; the others are committed and a rerun retries only the failed ones.

    ``transient`` says whether every failure was transient (then the task retries)."""

    transient = False


class DaskConfig(StrictModel):
    """Where shards run: a LocalCluster (default) or any running scheduler by address."""

    address: str | None = None
    """``tcp://host:8786`` of a running scheduler (Kubernetes, HPC, ...); None starts a
    LocalCluster on 127.0.0.1 with the settings below."""
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    processes: bool = True
    dashboard: bool = True
    """Serve (and print the link to) the Dask dashboard; needs the ``bokeh`` package."""


class FeaturesConfig(StrictModel):
    """How features are computed and stored. Everything that changes the numbers is hashed into
    the feature key; ``shard_size``, ``batch_size``, ``torch_threads`` and ``dask`` only change
    speed, and ``device`` only the last bits (CUDA runs the backbone in half precision)."""

    backbone: BackboneName = "efficientnet-lite0"
    weights: str = backbones.PRETRAINED
    """``imagenet``, ``none`` (random; tests only) or a weights file path/URL."""
    image_size: int = Field(224, ge=16)
    preprocessing: PreprocessingName | None = None
    """None: the backbone's default for its weights (torchvision for vgg19)."""
    shard_size: int = Field(1024, ge=1)
    dtype: str = "float16"
    batch_size: int = Field(32, ge=1)
    """Images per backbone forward pass, and HDF5 chunk rows (one training batch per chunk)."""
    torch_threads: int | None = Field(None, ge=1)
    """Intra-op threads per task; None: the host's cores / (worker threads on that host)."""
    device: str = "auto"
    """``auto`` (CUDA when the worker has it, with half precision), ``cpu`` or ``cuda``."""
    dask: DaskConfig = Field(default_factory=DaskConfig)

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in schemas.FEATURE_DTYPES:
            raise ValueError(f"dtype must be one of {schemas.FEATURE_DTYPES}, got {value!r}")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {value!r}")
        return value

    @model_validator(mode="after")
    def _backbone_fits(self) -> FeaturesConfig:
        backbones.preprocessing_id(self.backbone, self.preprocessing, self.image_size)
        return self

    @property
    def preprocessing_id(self) -> str:
        """The resolved preprocessing identifier written into shards and the manifest."""
        return backbones.preprocessing_id(self.backbone, self.preprocessing, self.image_size)

    @property
    def grid(self) -> tuple[int, int]:
        """Region grid (h, w) the backbone gives at ``image_size``."""
        return backbones.get_spec(self.backbone).grid(self.image_size)


FEATURE_IDENTITY = frozenset({"backbone", "weights", "image_size", "preprocessing", "dtype"})
"""The FeaturesConfig fields that change a feature set's numbers; checkpoints record them so that
prediction recomputes exactly the features the model was trained on."""


def feature_key(config: FeaturesConfig) -> str:
    """``<backbone>-<hash>`` naming a feature set by everything that changes its numbers."""
    identity = {
        "backbone": config.backbone,
        "weights": config.weights,
        "image_size": config.image_size,
        "preprocessing": config.preprocessing_id,
        "dtype": config.dtype,
        "format_version": FORMAT_VERSION,
    }
    return f"{config.backbone}-{content_hash(identity, 10)}"


def features_prefix(storage: Storage, dataset_name: str, config: FeaturesConfig) -> str:
    """The folder of a dataset's feature set: ``features/<name>/<feature-key>``."""
    return storage.url("features", dataset_name, feature_key(config))


@dataclass(frozen=True)
class FeatureSet:
    """Where an extracted feature set lives and what shape its features have."""

    manifest_url: str
    rejects_url: str
    regions: int
    dim: int
    grid: tuple[int, int]
    num_images: int


@dataclass(frozen=True)
class ShardPlan:
    """One shard's work: which images (ids and resolved URLs) and where the shard goes."""

    index: int
    image_ids: tuple[str, ...]
    uris: tuple[str, ...]
    shard_uri: str
    images_sha256: str = ""
    """Digest of the images' stamps when planned (see :func:`with_image_versions`)."""

    @property
    def ids_sha256(self) -> str:
        """Digest of the ids the table assigns to this shard (rejected ones included)."""
        return ids_sha256(self.image_ids)


@dataclass
class ShardResult:
    """What a shard task returns: its manifest row and its rejected images."""

    manifest_row: dict[str, Any]
    rejects: list[dict[str, str]] = field(default_factory=list)


def resolve_uri(uri: str, images_prefix: str) -> str:
    """An image's URL: absolute URLs and paths as they are, others under ``images_prefix``."""
    if "://" in uri or uri.startswith("/"):
        return uri
    return f"{images_prefix.rstrip('/')}/{uri.lstrip('/')}"


def plan_shards(
    label_table: pd.DataFrame, images_prefix: str, shard_size: int, out_prefix: str
) -> list[ShardPlan]:
    """Cut the table (in its row order) into shards of ``shard_size`` images."""
    ids = label_table["image_id"].astype(str).tolist()
    uris = [resolve_uri(str(u), images_prefix) for u in label_table["uri"]]
    return [
        ShardPlan(
            index=number,
            image_ids=tuple(ids[start : start + shard_size]),
            uris=tuple(uris[start : start + shard_size]),
            shard_uri=f"{out_prefix.rstrip('/')}/{shard_name(number)}",
        )
        for number, start in enumerate(range(0, len(ids), shard_size))
    ]


def with_image_versions(plans: list[ShardPlan], storage: Storage) -> list[ShardPlan]:
    """``plans`` with each shard's ``images_sha256``: the digest of its images' stamps, taken
    before extraction reads them (so a file rewritten meanwhile shows as changed next time)."""
    uris = [uri for plan in plans for uri in plan.uris]
    found = iter(stamps(storage, uris))
    return [
        dataclasses.replace(
            plan, images_sha256=digest(f"{uri}\t{next(found)}" for uri in plan.uris)
        )
        for plan in plans
    ]


# -- worker side -------------------------------------------------------------------------------

_BACKBONES: dict[tuple[Any, ...], Backbone] = {}
_BACKBONES_LOCK = threading.Lock()


def _worker_backbone(config: FeaturesConfig, device: torch.device, storage: Storage) -> Backbone:
    """The backbone for ``config`` on ``device``, built once per worker process (tasks running
    in parallel threads of one worker share it; inference does not mutate it)."""
    key = (config.backbone, config.weights, config.image_size, config.preprocessing, str(device))
    with _BACKBONES_LOCK:
        if key not in _BACKBONES:
            backbone = backbones.load_backbone(
                config.backbone,
                weights=config.weights,
                image_size=config.image_size,
                preprocessing=config.preprocessing,
                open_weights=storage.local_copy,
            )
            backbone.module.to(device, memory_format=torch.channels_last)
            if device.type == "cuda":
                backbone.module.half()
            _BACKBONES.clear()
            _BACKBONES[key] = backbone
        return _BACKBONES[key]


def _device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("features.device is 'cuda' but this worker has no CUDA device")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def check_resized(image: Image.Image, image_size: int) -> None:
    """Reject an image whose short-side resize would exceed the decoder's pixel limit: the
    decompression-bomb guard counts decoded pixels, but a sliver (say 2x60000) passes it and
    then resizes to gigabytes, which would kill the worker on every rerun."""
    width, height = backbones.resized_size(image.width, image.height, image_size)
    if width * height > DEFAULT_MAX_PIXELS:
        raise ImageRejected(
            "too-large",
            f"{image.width}x{image.height} resizes to {width}x{height} before the crop "
            f"(> {DEFAULT_MAX_PIXELS} pixels)",
        )


def _load_image(uri: str, storage: Storage, backbone: Backbone) -> torch.Tensor | tuple[str, str]:
    """Read, decode and preprocess one image, or return ``(reason, detail)`` if it is unusable."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as error:
        return "missing", str(error) or uri
    except (OSError, ValueError) as error:
        return "unreadable", f"{type(error).__name__}: {error}"
    try:
        image = decode_image(data)
        check_resized(image, backbone.image_size)
        return backbone.transform(image)
    except ImageRejected as error:
        return error.reason, error.detail


def region_features(
    backbone: Backbone, batch: torch.Tensor, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Preprocessed images (B, 3, S, S) -> float32 regions (B, R, D), row-major over the grid
    (region r = cell (r // w, r % w)); the one definition of the region layout.

    Channels-last layout on every device: oneDNN's CPU convolutions run VGG-19 ~1.3x faster in
    it, and CUDA tensor cores need it for half precision.
    """
    device = torch.device(device)
    batch = batch.to(device).contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        batch = batch.half()
    with torch.inference_mode():
        maps = backbone.module(batch)
    return maps.flatten(2).transpose(1, 2).float().cpu().numpy()


def _prefetched(
    plan: ShardPlan, storage: Storage, backbone: Backbone, batch_size: int
) -> Iterator[list[tuple[int, torch.Tensor | tuple[str, str]]]]:
    """The shard's images in batches of ``(position, tensor or (reason, detail))``; a thread
    pool reads and decodes the next batch while the caller runs the backbone on this one."""
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


def _write_shard(
    local: Path,
    plan: ShardPlan,
    config: FeaturesConfig,
    backbone: Backbone,
    storage: Storage,
    device: torch.device,
) -> tuple[list[str], list[dict[str, str]]]:
    """Fill the local HDF5 file; return the kept image ids and the rejects rows."""
    h, w = backbone.grid
    kept: list[str] = []
    rejects: list[dict[str, str]] = []
    with h5py.File(local, "w") as shard:
        features = shard.create_dataset(
            FEATURES_DATASET,
            shape=(0, h * w, backbone.dim),
            maxshape=(None, h * w, backbone.dim),
            chunks=(config.batch_size, h * w, backbone.dim),
            dtype=config.dtype,
        )
        for loaded in _prefetched(plan, storage, backbone, config.batch_size):
            tensors = []
            for position, result in loaded:
                if isinstance(result, torch.Tensor):
                    tensors.append(result)
                    kept.append(plan.image_ids[position])
                    continue
                reason, detail = result
                log.info("rejected %s: %s (%s)", plan.uris[position], reason, detail)
                rejects.append(
                    {
                        "image_id": plan.image_ids[position],
                        "uri": plan.uris[position],
                        "stage": REJECT_STAGE,
                        "reason": reason,
                    }
                )
            if tensors:
                values = region_features(backbone, torch.stack(tensors), device)
                stored = _checked(values, config.dtype, plan.index)
                start = features.shape[0]
                features.resize(start + len(stored), axis=0)
                features[start:] = stored
        shard.create_dataset(
            IMAGE_IDS_DATASET, data=np.array(kept, dtype=object), dtype=h5py.string_dtype()
        )
        shard.attrs.update(
            {
                "backbone": backbone.name,
                "preprocessing": backbone.preprocessing,
                "grid": np.array([h, w], dtype=np.int64),
                "format_version": FORMAT_VERSION,
                "weights": config.weights,
                "image_size": config.image_size,
            }
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
    device = _device(config.device)
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


def _extract_shard_on_worker(
    plan: ShardPlan, config: FeaturesConfig, storage: Storage, threads_by_host: dict[str, int]
) -> ShardResult:
    """Dask task: tune the worker's allocator, pick this host's torch thread count, then
    extract the shard."""
    _keep_freed_memory()
    host = urlparse(get_worker().address).hostname or ""
    return extract_shard(plan, config, storage, config.torch_threads or threads_by_host.get(host))


# -- driver side -------------------------------------------------------------------------------


@contextlib.contextmanager
def dask_client(config: DaskConfig) -> Iterator[Client]:
    """A client for the configured scheduler, or for a LocalCluster started (and closed) here.

    The local scheduler's HTTP server always takes a free port (":0"), so two pipelines on one
    machine never fight over 8787; it serves the dashboard only when asked and bokeh is present.
    """
    if config.address:
        with Client(config.address) as client:
            yield client
        return
    dashboard = config.dashboard and importlib.util.find_spec("bokeh") is not None
    if config.dashboard and not dashboard:
        log.warning("Dask dashboard disabled: the bokeh package is not installed")
    with (
        LocalCluster(
            n_workers=config.n_workers,
            threads_per_worker=config.threads_per_worker,
            processes=config.processes,
            host="127.0.0.1" if config.processes else None,
            dashboard_address=":0",
            scheduler_kwargs={"dashboard": dashboard},
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity where the OS has one (Linux, so a
    container's CPU set counts), else every core (macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _threads_by_host(client: Client) -> dict[str, int]:
    """Torch threads per task on each host, so tasks together use the host's cores once."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    cores = client.run(usable_cores)
    task_slots: dict[str, int] = {}
    host_cores: dict[str, int] = {}
    for address, info in workers.items():
        host = urlparse(address).hostname or ""
        task_slots[host] = task_slots.get(host, 0) + int(info["nthreads"])
        host_cores[host] = int(cores.get(address, 1))
    return {host: max(1, host_cores[host] // slots) for host, slots in task_slots.items()}


def _dashboard_link(client: Client, config: DaskConfig) -> str | None:
    """The dashboard URL when the scheduler serves one (its HTTP port exists even without it,
    so ask the scheduler whether it has bokeh)."""
    if not config.dashboard:
        return None
    has_bokeh = client.run_on_scheduler(lambda: importlib.util.find_spec("bokeh") is not None)
    return client.dashboard_link if has_bokeh else None


def _shard_is_valid(
    row: pd.Series, plan: ShardPlan, config: FeaturesConfig, storage: Storage
) -> bool:
    """Whether a manifest row still describes this plan's shard, byte for byte."""
    expected = {
        "shard_uri": plan.shard_uri,
        "ids_sha256": plan.ids_sha256,
        "images_sha256": plan.images_sha256,
        "backbone": config.backbone,
        "preprocessing": config.preprocessing_id,
        "dtype": config.dtype,
    }
    if any(str(row.get(column)) != value for column, value in expected.items()):
        return False
    if not storage.exists(plan.shard_uri) or storage.size(plan.shard_uri) != row["size_bytes"]:
        return False
    return storage.sha256(plan.shard_uri) == row["sha256"]


def _read_table(storage: Storage, url: str, model: type) -> pd.DataFrame:
    """A validated table from storage, or an empty one of that schema if none exists yet."""
    if not storage.exists(url):
        return schemas.empty(model)
    return schemas.validate(storage.read_parquet(url), model, stage="features")


def _committed_shards(
    storage: Storage, manifest_url: str, plans: list[ShardPlan], config: FeaturesConfig
) -> dict[int, dict[str, Any]]:
    """Rows of the existing manifest that still verify, by shard index."""
    manifest = _read_table(storage, manifest_url, schemas.FeatureManifest)
    by_index = {plan.index: plan for plan in plans}
    rows = [row for _, row in manifest.iterrows() if int(row["shard_index"]) in by_index]

    def verify(row: pd.Series) -> bool:
        return _shard_is_valid(row, by_index[int(row["shard_index"])], config, storage)

    with ThreadPoolExecutor(max_workers=8) as pool:
        valid = list(
            tqdm(
                pool.map(verify, rows),
                total=len(rows),
                desc="verifying shards",
                unit="shard",
                disable=not rows,
            )
        )
    return {
        int(row["shard_index"]): row.to_dict() for row, ok in zip(rows, valid, strict=True) if ok
    }


def _committed_rejects(
    storage: Storage, rejects_url: str, plans: list[ShardPlan], committed: set[int]
) -> dict[int, list[dict[str, str]]]:
    """Existing rejects rows of the committed shards, by shard index."""
    previous = _read_table(storage, rejects_url, schemas.Rejects)
    shard_of = {i: plan.index for plan in plans if plan.index in committed for i in plan.image_ids}
    by_shard: dict[int, list[dict[str, str]]] = {}
    for row in previous.to_dict("records"):
        if row["image_id"] in shard_of:
            by_shard.setdefault(shard_of[row["image_id"]], []).append(row)
    return by_shard


def _frame(rows: list[dict[str, Any]], model: type) -> pd.DataFrame:
    """Validated table of ``rows`` (an empty, correctly typed table when there are none)."""
    frame = pd.DataFrame(rows) if rows else schemas.empty(model)
    return schemas.validate(frame, model, stage="features")


@dataclass
class _Committer:
    """Keeps the manifest and rejects tables in storage in step with finished shards."""

    storage: Storage
    manifest_url: str
    rejects_url: str
    rows: dict[int, dict[str, Any]]
    rejects: dict[int, list[dict[str, str]]]

    def commit(self, result: ShardResult | None = None) -> None:
        """Record ``result`` (if any), then rewrite rejects, then the manifest, atomically.

        Rejects go first: a crash in between leaves rejects of an unlisted shard, which the
        rerun replaces, never a listed shard with its rejects missing.
        """
        if result is not None:
            index = int(result.manifest_row["shard_index"])
            self.rows[index] = result.manifest_row
            self.rejects[index] = result.rejects
        rejects = [row for index in sorted(self.rejects) for row in self.rejects[index]]
        self.storage.write_parquet(self.rejects_url, _frame(rejects, schemas.Rejects))
        manifest = [self.rows[index] for index in sorted(self.rows)]
        self.storage.write_parquet(self.manifest_url, _frame(manifest, schemas.FeatureManifest))


def extract_features(
    label_table: pd.DataFrame,
    images_prefix: str,
    config: FeaturesConfig,
    storage: Storage,
    out_prefix: str,
) -> FeatureSet:
    """Extract (or finish extracting) the features of every image in ``label_table``.

    ``images_prefix`` is the URL relative image URIs hang under; ``out_prefix`` is the feature
    set's folder URL (see :func:`features_prefix`). Shards already committed and verified are
    kept; the others run as Dask tasks. Raises :class:`ExtractionError` after committing every
    shard that did finish, if any failed.
    """
    table = schemas.validate(label_table, schemas.LabelTable, stage="features")
    out_prefix = out_prefix.rstrip("/")
    manifest_url = f"{out_prefix}/{MANIFEST_NAME}"
    rejects_url = f"{out_prefix}/{REJECTS_NAME}"
    plans = plan_shards(table, images_prefix, config.shard_size, out_prefix)
    plans = with_image_versions(plans, storage)
    rows = _committed_shards(storage, manifest_url, plans, config)
    rejects = _committed_rejects(storage, rejects_url, plans, set(rows))
    committer = _Committer(storage, manifest_url, rejects_url, rows, rejects)
    committer.commit()
    todo = [plan for plan in plans if plan.index not in rows]
    if todo:
        _preflight(config, storage)
        log.info("extracting %d of %d shards into %s", len(todo), len(plans), out_prefix)
        _run_shards(todo, len(plans), config, storage, committer)
    _log_rejects(committer.rejects)
    grid = config.grid
    return FeatureSet(
        manifest_url=manifest_url,
        rejects_url=rejects_url,
        regions=grid[0] * grid[1],
        dim=backbones.get_spec(config.backbone).dim,
        grid=grid,
        num_images=sum(int(row["num_images"]) for row in committer.rows.values()),
    )


def _log_rejects(rejects: dict[int, list[dict[str, str]]]) -> None:
    """Say on the console (and the run's log) how many images have no features, and why."""
    reasons = Counter(row["reason"] for rows in rejects.values() for row in rows)
    if reasons:
        log.warning(
            "%d image(s) rejected, left out of training and evaluation: %s",
            sum(reasons.values()),
            ", ".join(f"{reason} {count}" for reason, count in reasons.most_common()),
        )


def _preflight(config: FeaturesConfig, storage: Storage) -> None:
    """Build the backbone once here before any task starts: bad or unobtainable weights fail
    with one clear error instead of one per shard, and a download (torchvision's VGG-19) lands
    in the shared cache once instead of racing in every local worker."""
    backbones.load_backbone(
        config.backbone,
        weights=config.weights,
        image_size=config.image_size,
        preprocessing=config.preprocessing,
        open_weights=storage.local_copy,
    )


def _run_shards(
    todo: list[ShardPlan],
    total: int,
    config: FeaturesConfig,
    storage: Storage,
    committer: _Committer,
) -> None:
    """Run ``todo`` as Dask tasks, committing each finished shard at once; progress counts every
    one of the feature set's ``total`` shards, those reused from earlier runs included."""
    failures: list[str] = []
    errors: list[BaseException] = []
    with dask_client(config.dask) as client:
        link = _dashboard_link(client, config.dask)
        if link:
            tqdm.write(f"Dask dashboard: {link}")
        threads = _threads_by_host(client)
        futures = {
            client.submit(
                _extract_shard_on_worker, plan, config, storage, threads, pure=False
            ): plan
            for plan in todo
        }
        finished = total - len(todo)
        progress = tqdm(total=total, initial=finished, desc="feature shards", unit="shard")
        on_run = RunProgress("feature shards")
        on_run(finished, total)
        for future in as_completed(futures):
            plan = futures[future]
            try:
                committer.commit(future.result())
            except Exception as error:  # one shard's failure must not lose the others
                errors.append(error)
                failures.append(
                    f"shard {plan.index} ({plan.shard_uri}): {type(error).__name__}: {error}"
                )
                log.error("shard %d failed: %s", plan.index, error)
            finished += 1
            progress.update()
            on_run(finished, total)
        progress.close()
    if failures:
        failed = ExtractionError(
            f"{len(failures)} of {len(todo)} shards failed (the rest are committed; rerun to "
            "retry):\n" + "\n".join(failures)
        )
        failed.transient = all(is_transient(error) for error in errors)
        raise failed


extract_features_task = retrying_task("extract-features", retries=1)(extract_features)
