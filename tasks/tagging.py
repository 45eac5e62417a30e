"""Batch tagging: every image under a folder or prefix, in shards on the Dask cluster, resumable.

The driver lists the images and their content versions (:func:`tasks.versions.stamps`: the
stat locally, ETag/VersionId on S3), resolves the request once (labels and their word vectors,
top-K and thresholds) and sends shards of images not yet tagged to the workers. Each worker
loads the checkpoint once (:class:`lesa_model.Tagger`), tags its shard and writes one part:

    <out>/parts/<request-key>/<part-id>.tags.parquet    image, label, score, rank, module,
                                                        seen, version
    <out>/parts/<request-key>/<part-id>.images.parquet   image, version, status, reason, detail

(the images file last: a part without it does not exist). The request key hashes the
checkpoint's version, the labels and their vectors, top-K and the thresholds, so a rerun of
the same request tags only images whose (image, version) no part holds: new images, and images
changed since. The driver then writes ``<out>/tags.parquet`` and ``<out>/rejects.parquet`` from
the parts, for the images present now at their current version, and ``<out>/summary.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import torch
from distributed import as_completed, get_worker
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict
from tqdm.auto import tqdm

from lesa_model.config import BACKBONE_BATCH
from lesa_model.images import ImageRejected
from lesa_model.inference import select_tags
from lesa_model.tagger import Tagger
from tasks.feature_config import DaskConfig
from tasks.features import _threads_by_host, dask_client
from tasks.hashing import array_digest, content_hash
from tasks.images import read_image
from tasks.prediction import (
    PredictionError,
    check_request,
    find_images,
    label_vectors,
    load_predictor,
    resolve_threshold,
)
from tasks.progress import RunProgress
from tasks.retries import retrying_task
from tasks.storage import Storage
from tasks.tag_options import DEFAULT_SHARD_SIZE
from tasks.versions import ABSENT, file_version, stamps

logger = logging.getLogger(__name__)

FORMAT = 1
READ_THREADS = 8
"""Images read and decoded at once on a worker: reads from S3 wait on the network, and
Pillow's decoding releases the GIL."""
PARTS_DIR = "parts"
TAGS_FILE = "tags.parquet"
REJECTS_FILE = "rejects.parquet"
SUMMARY_FILE = "summary.json"
TAG_COLUMNS = ["image", "label", "score", "rank", "module", "seen", "version"]
IMAGE_COLUMNS = ["image", "version", "status", "reason", "detail"]


@dataclass(frozen=True)
class TagRequest:
    """What every shard is tagged with, resolved once on the driver."""

    checkpoint: str
    checkpoint_version: str
    labels: list[str]
    vectors: np.ndarray
    """(C, d) word vectors of ``labels`` (embedded on the driver with the checkpoint's source)."""
    top_k: int | None
    thresholds: np.ndarray | None
    """(C,) score cut of each label, or None (top-K only)."""
    threshold: str | None
    batch_size: int = BACKBONE_BATCH

    @property
    def key(self) -> str:
        """Everything that changes the tags of an image (batch size does not)."""
        cut = None if self.thresholds is None else array_digest(self.thresholds)
        return content_hash(
            {
                "format": FORMAT,
                "checkpoint": self.checkpoint_version,
                "labels": self.labels,
                "vectors": array_digest(self.vectors),
                "top_k": self.top_k,
                "thresholds": cut,
            },
            16,
        )

    def vectors_for(self, labels: Sequence[str]) -> np.ndarray:
        row = {label: index for index, label in enumerate(self.labels)}
        return self.vectors[[row[label] for label in labels]]


@dataclass(frozen=True)
class TagShard:
    """Images one worker tags, with the versions they were listed at."""

    index: int
    images: list[str]
    versions: list[str]

    @property
    def part_id(self) -> str:
        return content_hash([self.images, self.versions], 16)


class TaggingSummary(BaseModel):
    """What a tagging run did (``summary.json`` and the run's artifact)."""

    model_config = ConfigDict(frozen=True)

    request_key: str
    images: int
    tagged_now: int
    reused: int
    rejected: int
    tags: int
    labels: int
    shards_run: int
    seconds: float
    tags_url: str
    rejects_url: str
    rejects_by_reason: dict[str, int]


@dataclass
class _Done:
    """(image, version) pairs some part of this request already holds."""

    pairs: set[tuple[str, str]] = field(default_factory=set)
    parts: list[str] = field(default_factory=list)


# -- driver ------------------------------------------------------------------------------------


def resolve_request(
    checkpoint: str,
    labels: Sequence[str] | None,
    storage: Storage,
    *,
    top_k: int | None,
    threshold: str | None,
    batch_size: int = BACKBONE_BATCH,
) -> TagRequest:
    """Labels (default: the checkpoint's), their vectors, and the cut, checked once."""
    predictor = load_predictor(checkpoint, storage)
    names = list(dict.fromkeys(labels or predictor.known_labels))
    cut = None if threshold is None else resolve_threshold(threshold, checkpoint, storage)
    check_request(names, top_k, cut, batch_size)
    if isinstance(cut, float):
        thresholds = np.full(len(names), cut, dtype=np.float32)
    else:
        thresholds = None if cut is None else cut.for_labels(names)
    return TagRequest(
        checkpoint=checkpoint,
        checkpoint_version=file_version(storage, checkpoint),
        labels=names,
        vectors=label_vectors(names, predictor, storage),
        top_k=top_k,
        thresholds=thresholds,
        threshold=threshold,
        batch_size=batch_size,
    )


def _read_done(storage: Storage, prefix: str) -> _Done:
    done = _Done()
    for url in storage.ls(prefix):
        if url.endswith(".images.parquet"):
            frame = storage.read_parquet(url)
            done.pairs.update(zip(frame["image"], frame["version"], strict=True))
            done.parts.append(url.removesuffix(".images.parquet"))
    return done


def plan_shards(
    images: Sequence[str], versions: Sequence[str], done: set[tuple[str, str]], shard_size: int
) -> list[TagShard]:
    """Shards of the images whose current version no part holds, in listing order."""
    todo = [
        (image, version)
        for image, version in zip(images, versions, strict=True)
        if (image, version) not in done and version != ABSENT
    ]
    return [
        TagShard(
            index=start // shard_size,
            images=[image for image, _ in todo[start : start + shard_size]],
            versions=[version for _, version in todo[start : start + shard_size]],
        )
        for start in range(0, len(todo), shard_size)
    ]


def _run(
    shards: list[TagShard], request: TagRequest, storage: Storage, prefix: str, dask: DaskConfig
) -> None:
    """Tag ``shards`` on the cluster; a shard that fails is named and the others are kept."""
    if not shards:
        return
    failures: list[str] = []
    progress = tqdm(total=len(shards), desc="tagging shards", unit="shard")
    on_run = RunProgress("tagging shards")
    with dask_client(dask) as client:
        threads = _threads_by_host(client)
        futures = {
            client.submit(
                tag_shard_on_worker, shard, request, storage, prefix, threads, pure=False
            ): shard
            for shard in shards
        }
        for finished, future in enumerate(as_completed(futures), start=1):
            try:
                future.result()
            except Exception as error:  # one shard's failure must not lose the others
                shard = futures[future]
                failures.append(f"shard {shard.index} ({shard.images[0]} ...): {error}")
                logger.error("tagging shard %d failed: %s", shard.index, error)
            progress.update()
            on_run(finished, len(shards))
    progress.close()
    if failures:
        raise PredictionError(
            f"{len(failures)} of {len(shards)} shards failed (the others are kept; rerun to "
            "retry them):\n" + "\n".join(failures)
        )


def tag_images(
    checkpoint: str,
    images: Sequence[str],
    out: str,
    storage: Storage,
    *,
    labels: Sequence[str] | None = None,
    top_k: int | None = None,
    threshold: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = BACKBONE_BATCH,
    dask: DaskConfig | None = None,
) -> TaggingSummary:
    """Tag every image under ``images`` (files, folders, prefixes) into tables under ``out``.

    Resumable and idempotent: rerunning the same request tags only images not tagged at their
    current version, and rewrites the tables from the parts.
    """
    started = time.perf_counter()
    if shard_size < 1:
        raise PredictionError(f"shard_size must be positive, got {shard_size}")
    request = resolve_request(
        checkpoint, labels, storage, top_k=top_k, threshold=threshold, batch_size=batch_size
    )
    found, missing = find_images(images, storage)
    versions = stamps(storage, found)
    base = out.rstrip("/")
    prefix = f"{base}/{PARTS_DIR}/{request.key}"
    done = _read_done(storage, prefix)
    shards = plan_shards(found, versions, done.pairs, shard_size)
    logger.info(
        "%d image(s): %d to tag in %d shard(s), %d already tagged",
        len(found),
        sum(len(shard.images) for shard in shards),
        len(shards),
        len(found) - sum(len(shard.images) for shard in shards),
    )
    _run(shards, request, storage, prefix, dask or DaskConfig())
    tags, rejects = _assemble(storage, prefix, dict(zip(found, versions, strict=True)))
    missing_rows = pd.DataFrame(
        [(item.uri, ABSENT, "rejected", item.reason, item.detail) for item in missing],
        columns=IMAGE_COLUMNS,
    )
    rejects = pd.concat([rejects, missing_rows], ignore_index=True)
    storage.write_parquet(f"{base}/{TAGS_FILE}", tags)
    storage.write_parquet(f"{base}/{REJECTS_FILE}", rejects)
    tagged_now = sum(len(shard.images) for shard in shards)
    summary = TaggingSummary(
        request_key=request.key,
        images=len(found),
        tagged_now=tagged_now,
        reused=len(found) - tagged_now,
        rejected=len(rejects),
        tags=len(tags),
        labels=len(request.labels),
        shards_run=len(shards),
        seconds=round(time.perf_counter() - started, 3),
        tags_url=f"{base}/{TAGS_FILE}",
        rejects_url=f"{base}/{REJECTS_FILE}",
        rejects_by_reason=rejects["reason"].value_counts().sort_index().to_dict(),
    )
    storage.write_json(f"{base}/{SUMMARY_FILE}", summary.model_dump())
    return summary


def _assemble(
    storage: Storage, prefix: str, current: dict[str, str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tags and rejects of the images present now, at their current version."""
    done = _read_done(storage, prefix)
    tag_frames, image_frames = [], []
    for part in done.parts:
        listed = storage.read_parquet(f"{part}.images.parquet")
        keep = listed[
            [
                current.get(image) == version
                for image, version in zip(listed["image"], listed["version"], strict=True)
            ]
        ]
        if keep.empty:
            continue
        image_frames.append(keep)
        if (keep["status"] == "tagged").any():
            tags = storage.read_parquet(f"{part}.tags.parquet")
            tag_frames.append(tags[tags["image"].map(current).eq(tags["version"])])
    images = (
        pd.concat(image_frames, ignore_index=True)
        if image_frames
        else pd.DataFrame(columns=IMAGE_COLUMNS)
    )
    images = images.drop_duplicates(subset=["image"], keep="last")
    tags = pd.concat(tag_frames, ignore_index=True) if tag_frames else _empty_tags()
    tags = tags.drop_duplicates(subset=["image", "rank"], keep="last")
    tags = tags.sort_values(["image", "rank"], kind="stable").reset_index(drop=True)
    rejects = images[images["status"] == "rejected"].sort_values("image").reset_index(drop=True)
    return tags, rejects


def _empty_tags() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image": pd.Series(dtype=str),
            "label": pd.Series(dtype=str),
            "score": pd.Series(dtype=np.float32),
            "rank": pd.Series(dtype=np.int32),
            "module": pd.Series(dtype=np.int32),
            "seen": pd.Series(dtype=bool),
            "version": pd.Series(dtype=str),
        }
    )


tag_images_task = retrying_task("tag-images", retries=1, cache_policy=NO_CACHE)(tag_images)


# -- worker ------------------------------------------------------------------------------------

_TAGGERS: dict[str, Tagger] = {}
"""One loaded model per worker process and request (checkpoint version + labels)."""


def _tagger(request: TagRequest, storage: Storage) -> Tagger:
    if request.key not in _TAGGERS:
        _TAGGERS.clear()
        local = storage.local_copy(request.checkpoint)
        _TAGGERS[request.key] = Tagger.from_checkpoint(local, word_vectors=request.vectors_for)
    return _TAGGERS[request.key]


def tag_shard(shard: TagShard, request: TagRequest, storage: Storage, prefix: str) -> int:
    """Tag one shard and write its part (tags first, the images file last); returns the
    number of images tagged."""
    tagger = _tagger(request, storage)
    backbone = tagger.backbone

    def prepared(image: str) -> torch.Tensor | ImageRejected:
        try:
            return backbone.preprocess(read_image(image, storage))
        except ImageRejected as error:
            return error

    kept, inputs, rows = [], [], []
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        decoded = pool.map(prepared, shard.images)
        for image, version, result in zip(shard.images, shard.versions, decoded, strict=True):
            if isinstance(result, ImageRejected):
                rows.append((image, version, "rejected", result.reason, result.detail))
                continue
            inputs.append(result)
            kept.append((image, version))
            rows.append((image, version, "tagged", "", ""))
    tags = [_empty_tags()]
    for start in range(0, len(kept), request.batch_size):
        batch = kept[start : start + request.batch_size]
        features = tagger.region_features(inputs[start : start + request.batch_size])
        scores, selected = tagger.score_features(features, request.labels)
        tags.append(_tag_rows(batch, scores, selected, request, set(tagger.seen_labels)))
    part = f"{prefix}/{shard.part_id}"
    storage.write_parquet(f"{part}.tags.parquet", pd.concat(tags, ignore_index=True))
    storage.write_parquet(f"{part}.images.parquet", pd.DataFrame(rows, columns=IMAGE_COLUMNS))
    return len(kept)


def _tag_rows(
    batch: list[tuple[str, str]],
    scores: np.ndarray,
    selected: np.ndarray,
    request: TagRequest,
    seen: set[str],
) -> pd.DataFrame:
    top, kept = select_tags(scores, request.top_k, request.thresholds)
    rows: list[dict[str, Any]] = []
    for index, (image, version) in enumerate(batch):
        columns = top[index][kept[index]]
        rows.extend(
            {
                "image": image,
                "label": request.labels[column],
                "score": np.float32(scores[index, column]),
                "rank": np.int32(rank + 1),
                "module": np.int32(selected[index, column]),
                "seen": request.labels[column] in seen,
                "version": version,
            }
            for rank, column in enumerate(columns)
        )
    return pd.DataFrame(rows, columns=TAG_COLUMNS).astype(_empty_tags().dtypes.to_dict())


def tag_shard_on_worker(
    shard: TagShard,
    request: TagRequest,
    storage: Storage,
    prefix: str,
    threads_by_host: dict[str, int],
) -> int:
    """Dask task: this host's share of torch threads, then :func:`tag_shard`."""
    host = urlparse(get_worker().address).hostname or ""
    torch.set_num_threads(threads_by_host.get(host, 1))
    return tag_shard(shard, request, storage, prefix)
