"""Zero-shot tagging of new images with a trained checkpoint and any list of labels.

A checkpoint's metadata names the features it was trained on (backbone, weights, input size,
preprocessing, dtype) and the word vectors of its labels, so new images go through the very same
backbone and new labels through the very same embedding: a label nobody trained on is scored by
the same forward pass as a seen one, without retraining. Images stream through in batches
(features are never held for the whole set); unreadable ones are skipped with a reason.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from prefect import task
from prefect.cache_policies import NO_CACHE
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from tqdm.auto import tqdm

from lesa_model import backbones
from lesa_model.attention import attention_grid_figure, centre_crop_box, heatmap_overlay
from lesa_model.backbones import Backbone, region_features
from lesa_model.calibration import Thresholds
from lesa_model.config import BACKBONE_BATCH
from lesa_model.inference import attention_for, select_tags
from lesa_model.model import LESA
from tasks.checkpoints import CheckpointMetadata, load_trained_model
from tasks.embeddings import EmbeddingConfig, OOVError, embed_words
from tasks.feature_config import FeatureIdentity
from tasks.images import ImageRejected, read_image
from tasks.storage import Storage
from tasks.tag_options import CALIBRATED, DEFAULT_TOP_K, PredictionError, parse_threshold
from tasks.thresholds import ThresholdsError, read_thresholds

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(Image.registered_extensions())
"""File endings Pillow can open; a folder or prefix is searched for these only."""
PREDICTIONS_CSV = "predictions.csv"
PREDICTIONS_JSON = "predictions.json"
ATTENTION_DIR = "attention"
PRINTED_ROWS = 50
"""Images shown in the console table; the files hold every image."""


@dataclass(frozen=True)
class Predictor:
    """A trained model plus what its checkpoint says it was trained on."""

    model: LESA
    metadata: CheckpointMetadata
    checkpoint_url: str

    @property
    def features(self) -> FeatureIdentity:
        """The features the model was trained on, which new images must be turned into."""
        return self.metadata.features

    @property
    def embeddings(self) -> EmbeddingConfig:
        """The model's word vectors; a label they cannot embed is an error, not dropped."""
        return EmbeddingConfig(source=self.metadata.embedding_source, oov="fail", cache=False)

    @property
    def grid(self) -> tuple[int, int]:
        """Region grid (h, w) of the backbone at the checkpoint's input size."""
        return self.features.grid

    @property
    def seen_labels(self) -> list[str]:
        """Labels the model was trained on."""
        return self.metadata.seen_labels

    @property
    def known_labels(self) -> list[str]:
        """Seen then unseen labels recorded at training time: the default label list."""
        return self.metadata.known_labels


@dataclass(frozen=True)
class SkippedImage:
    """An input that could not be tagged, and why (``reason`` is a short code)."""

    uri: str
    reason: str
    detail: str


@dataclass
class Predictions:
    """Scores of every kept image for every label, its top-K, and optionally their attention."""

    uris: list[str]
    image_sizes: list[tuple[int, int]]
    labels: list[str]
    seen: np.ndarray
    """(C,) bool: label was trained on."""
    scores: np.ndarray
    """(N, C) float32."""
    top: np.ndarray
    """(N, K) column indices, best first."""
    kept: np.ndarray
    """(N, K) bool: which of ``top`` are tags (all of them without a threshold)."""
    attention: np.ndarray | None
    """(N, K, R) float32: the selected module's weights for each top label, or None."""
    grid: tuple[int, int]
    crop_fraction: float
    skipped: list[SkippedImage] = field(default_factory=list)
    threshold: str | None = None
    """How tags were cut: None (top-K), ``calibrated`` or the number given."""

    def tags(self, index: int) -> list[int]:
        """Columns of image ``index``'s tags, best first."""
        return [int(c) for c, kept in zip(self.top[index], self.kept[index], strict=True) if kept]

    def table(self) -> pd.DataFrame:
        """Long format: one row per (image, rank) with label, score and whether it was seen."""
        rows = [
            {
                "image": uri,
                "rank": rank + 1,
                "label": self.labels[column],
                "score": float(self.scores[index, column]),
                "seen": bool(self.seen[column]),
            }
            for index, uri in enumerate(self.uris)
            for rank, column in enumerate(self.tags(index))
        ]
        return pd.DataFrame(rows, columns=["image", "rank", "label", "score", "seen"])

    def document(self) -> dict[str, Any]:
        """JSON form: every image's top labels, the label list and the skipped inputs."""
        return {
            "labels": [
                {"label": label, "seen": bool(seen)}
                for label, seen in zip(self.labels, self.seen, strict=True)
            ],
            "top_k": int(self.top.shape[1]),
            "threshold": self.threshold,
            "images": [
                {
                    "image": uri,
                    "width": size[0],
                    "height": size[1],
                    "top": [
                        {
                            "label": self.labels[column],
                            "score": float(self.scores[index, column]),
                            "seen": bool(self.seen[column]),
                        }
                        for column in self.tags(index)
                    ],
                }
                for index, (uri, size) in enumerate(zip(self.uris, self.image_sizes, strict=True))
            ],
            "skipped": [
                {"image": item.uri, "reason": item.reason, "detail": item.detail}
                for item in self.skipped
            ],
        }


@dataclass(frozen=True)
class PredictionArtifacts:
    """Where the outputs went."""

    csv_url: str
    json_url: str
    attention_urls: list[str]


# -- inputs ------------------------------------------------------------------------------------


def load_predictor(checkpoint: str, storage: Storage) -> Predictor:
    """Load a checkpoint (path or URL) and what its metadata says it was trained on."""
    try:
        model, metadata = load_trained_model(storage, checkpoint)
    except (FileNotFoundError, ValueError) as error:
        raise PredictionError(str(error)) from error
    grid = metadata.features.grid
    if model.grid is not None and tuple(model.grid) != grid:
        raise PredictionError(
            f"checkpoint {checkpoint}: model grid {model.grid} differs from the backbone's "
            f"grid {grid}"
        )
    return Predictor(model, metadata, checkpoint)


def resolve_threshold(text: str, checkpoint: str, storage: Storage) -> float | Thresholds:
    """The cut ``text`` names: a checkpoint's calibrated thresholds or one number."""
    value = parse_threshold(text)
    if value != CALIBRATED:
        return float(value)
    try:
        return read_thresholds(storage, checkpoint)
    except ThresholdsError as error:
        raise PredictionError(str(error)) from error


def parse_labels(spec: str, storage: Storage) -> list[str]:
    """Labels from a file (one per line, ``#`` comments) or a comma-separated list.

    Order is kept and duplicates dropped; an empty result is an error.
    """
    text = spec.strip()
    is_file = bool(text) and "," not in text and "\n" not in text and storage.exists(text)
    if is_file:
        content = storage.read_bytes(text).decode("utf-8")
        items = [line.split("#", 1)[0] for line in content.splitlines()]
        where = f"label file {text}"
    else:
        items = text.split(",")
        where = "--labels"
    labels = list(dict.fromkeys(item.strip() for item in items if item.strip()))
    if not labels:
        raise PredictionError(f"{where} holds no labels: give at least one label to score")
    return labels


def find_images(inputs: Sequence[str], storage: Storage) -> tuple[list[str], list[SkippedImage]]:
    """Expand files, folders and ``s3://`` prefixes into image URLs (sorted within a folder).

    A named file is always tried (its content decides); inside a folder only files with an
    image ending are taken. A name that matches nothing is skipped with reason ``missing``.
    """
    if not inputs:
        raise PredictionError("no images given")
    found: list[str] = []
    skipped: list[SkippedImage] = []
    for item in inputs:
        listed = storage.ls(item, recursive=True)
        if _same_object(listed, item):
            found.append(item)
        elif listed:
            images = [url for url in listed if PurePosixPath(url).suffix.lower() in IMAGE_SUFFIXES]
            if not images:
                skipped.append(SkippedImage(item, "no-images", "folder holds no image files"))
            found.extend(images)
        elif storage.exists(item):
            skipped.append(SkippedImage(item, "no-images", "empty folder"))
        else:
            skipped.append(SkippedImage(item, "missing", "no such file, folder or prefix"))
    return list(dict.fromkeys(found)), skipped


def label_vectors(labels: Sequence[str], predictor: Predictor, storage: Storage) -> np.ndarray:
    """(C, d) word vectors of ``labels`` from the checkpoint's embedding source.

    Every label must be embeddable: a misspelt label would otherwise vanish from the output.
    """
    if predictor.metadata.label_text != "label":
        logger.warning(
            "the model was trained on %s vectors; labels given here are embedded from their "
            "words only, so scores of labels with a description may differ from evaluation's",
            predictor.metadata.label_text,
        )
    try:
        result = embed_words(labels, predictor.embeddings, storage)
    except OOVError as error:
        unknown = error.oov["label"].astype(str).tolist()
        raise PredictionError(
            f"cannot embed {len(unknown)} label(s) with {predictor.embeddings.source.identity!r}: "
            f"{unknown[:20]} (no word of theirs is in the vocabulary; check the spelling)"
        ) from error
    vectors = result.vectors(list(labels))
    if vectors.shape[1] != predictor.model.label_dim:
        raise PredictionError(
            f"word vectors have {vectors.shape[1]} dimensions but the model expects "
            f"{predictor.model.label_dim}"
        )
    return vectors


# -- work --------------------------------------------------------------------------------------


def load_backbone_for(predictor: Predictor, storage: Storage) -> Backbone:
    """The checkpoint's backbone, in eval mode on the CPU."""
    return predictor.features.build_backbone(storage.local_copy)


def image_features(
    backbone: Backbone, images: Sequence[Image.Image], dtype: str = "float32"
) -> np.ndarray:
    """(B, R, D) float32 region features of decoded images, rounded through ``dtype``.

    The layout is extraction's (:func:`lesa_model.backbones.region_features`), and rounding through
    the stored feature dtype (float16 by default) gives the model exactly the kind of numbers it
    was trained on.
    """
    return _as_trained(backbone, [backbone.preprocess(image) for image in images], dtype)


def _as_trained(backbone: Backbone, inputs: Sequence[torch.Tensor], dtype: str) -> np.ndarray:
    return region_features(backbone, torch.stack(list(inputs))).astype(dtype).astype(np.float32)


@dataclass
class _Scored:
    """What the batch loop collects: the kept images, their scores and optional attention."""

    uris: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    attention: list[np.ndarray] = field(default_factory=list)
    skipped: list[SkippedImage] = field(default_factory=list)


def _score_images(
    predictor: Predictor,
    backbone: Backbone,
    vectors: torch.Tensor,
    uris: Sequence[str],
    storage: Storage,
    *,
    batch_size: int,
    attention_top_k: int | None,
) -> _Scored:
    """Score the readable images batch by batch; with ``attention_top_k``, keep the selected
    module's region weights of each image's top labels too."""
    scored = _Scored()
    progress = tqdm(total=len(uris), desc="tagging", unit="image")
    for batch_uris, sizes, inputs, skipped in _decoded_batches(uris, storage, batch_size, backbone):
        scored.skipped.extend(skipped)
        progress.update(len(batch_uris) + len(skipped))
        if not inputs:
            continue
        features = _as_trained(backbone, inputs, predictor.features.dtype)
        with torch.inference_mode():
            batch_scores = predictor.model(torch.from_numpy(features), vectors).scores.numpy()
        scored.uris.extend(batch_uris)
        scored.sizes.extend(sizes)
        scored.scores.append(batch_scores.astype(np.float32))
        if attention_top_k is not None:
            best, _ = select_tags(batch_scores, attention_top_k)
            _, weights = attention_for(predictor.model, features, vectors)
            scored.attention.append(np.take_along_axis(weights, best[:, :, None], axis=1))
    progress.close()
    return scored


def predict_images(
    predictor: Predictor,
    uris: Sequence[str],
    labels: Sequence[str],
    storage: Storage,
    *,
    top_k: int | None = DEFAULT_TOP_K,
    threshold: float | Thresholds | None = None,
    attention: bool = False,
    batch_size: int = BACKBONE_BATCH,
    backbone: Backbone | None = None,
    skipped: Sequence[SkippedImage] = (),
) -> Predictions:
    """Score every readable image of ``uris`` for every label and pick its tags.

    Tags are the ``top_k`` best labels, or with ``threshold`` (one number, or calibrated
    :class:`~lesa_model.calibration.Thresholds`: a label's own, the global one for labels
    without) the labels scoring at least it, best first and at most ``top_k`` when given.
    With ``attention`` the selected module's region weights of each candidate are kept too.
    ``skipped`` lists inputs already dropped (e.g. by :func:`find_images`); the ones skipped here
    are added to it. This is where the request is checked.
    """
    check_request(labels, top_k, threshold, batch_size)
    vectors = torch.from_numpy(label_vectors(labels, predictor, storage))
    backbone = backbone or load_backbone_for(predictor, storage)
    width = top_k or len(labels)
    scored = _score_images(
        predictor,
        backbone,
        vectors,
        uris,
        storage,
        batch_size=batch_size,
        attention_top_k=width if attention else None,
    )
    for item in scored.skipped:
        logger.warning("skipped %s: %s (%s)", item.uri, item.reason, item.detail)
    dropped = [*skipped, *scored.skipped]
    if not scored.uris:
        reasons = "; ".join(f"{item.uri}: {item.reason}" for item in dropped[:10])
        raise PredictionError(f"no image could be read ({reasons or 'no images given'})")
    scores = np.concatenate(scored.scores)
    cut = threshold.for_labels(labels) if isinstance(threshold, Thresholds) else threshold
    top, kept = select_tags(scores, width, cut)
    seen = set(predictor.seen_labels)
    image_size = predictor.features.image_size
    return Predictions(
        uris=scored.uris,
        image_sizes=scored.sizes,
        labels=list(labels),
        seen=np.array([label in seen for label in labels], dtype=bool),
        scores=scores,
        top=top,
        kept=kept,
        attention=np.concatenate(scored.attention) if attention else None,
        grid=predictor.grid,
        crop_fraction=image_size / backbones.resize_side(image_size),
        skipped=dropped,
        threshold=_threshold_name(threshold),
    )


def check_request(
    labels: Sequence[str],
    top_k: int | None,
    threshold: float | Thresholds | None,
    batch_size: int,
) -> None:
    if not labels:
        raise PredictionError("the label list is empty: give at least one label to score")
    if top_k is None and threshold is None:
        raise PredictionError("give --top-k, --threshold or both")
    if top_k is not None and not 1 <= top_k <= len(labels):
        raise PredictionError(f"--top-k must be between 1 and the number of labels ({len(labels)})")
    if batch_size < 1:
        raise PredictionError(f"batch_size must be positive, got {batch_size}")


def _threshold_name(threshold: float | Thresholds | None) -> str | None:
    if threshold is None:
        return None
    return "calibrated" if isinstance(threshold, Thresholds) else f"{threshold:g}"


def write_predictions(
    predictions: Predictions, storage: Storage, out: str, *, attention_maps: bool = False
) -> PredictionArtifacts:
    """Write predictions.csv and predictions.json under ``out``; with ``attention_maps`` also a
    heatmap PNG per (image, top label) and a Figure-1-style grid per image under attention/."""
    base = out.rstrip("/")
    csv_url = f"{base}/{PREDICTIONS_CSV}"
    json_url = f"{base}/{PREDICTIONS_JSON}"
    storage.write_bytes(csv_url, predictions.table().to_csv(index=False).encode("utf-8"))
    storage.write_json(json_url, predictions.document())
    written: list[str] = []
    if attention_maps:
        if predictions.attention is None:
            raise PredictionError("attention maps were asked for but not computed")
        written = _write_attention_maps(
            predictions, predictions.attention, storage, f"{base}/{ATTENTION_DIR}"
        )
    return PredictionArtifacts(csv_url=csv_url, json_url=json_url, attention_urls=written)


def print_predictions(
    predictions: Predictions, console: Console | None = None, *, max_rows: int = PRINTED_ROWS
) -> None:
    """A rich table: one row per image, its top labels best first (unseen ones marked *).

    Only the first ``max_rows`` images are shown (the CSV and JSON hold all of them).
    """
    folder, names = _short_names(predictions.uris[:max_rows])
    tags = [predictions.tags(index) for index in range(len(names))]
    cut = f"score >= the {predictions.threshold} threshold" if predictions.threshold else "top"
    table = Table(
        title=f"Labels per image, {cut}, best first (* = not trained on)",
        caption=f"images under {folder}" if folder else None,
    )
    table.add_column("image", overflow="fold")
    for rank in range(max([1, *map(len, tags)])):
        table.add_column(f"#{rank + 1}", overflow="fold")
    for index, name in enumerate(names):
        cells = [
            f"{predictions.labels[c]}{'' if predictions.seen[c] else '*'}\n"
            f"{predictions.scores[index, c]:.3g}"
            for c in tags[index]
        ]
        table.add_row(escape(name), *(escape(cell) for cell in cells or ["(none)"]))
    console = console or Console()
    console.print(table)
    hidden = len(predictions.uris) - max_rows
    if hidden > 0:
        console.print(f"... and {hidden} more image(s); see the CSV/JSON output", markup=False)
    for item in predictions.skipped:
        console.print(f"skipped {item.uri}: {item.reason} ({item.detail})", markup=False)


load_predictor_task = task(name="load-predictor", cache_policy=NO_CACHE)(load_predictor)


predict_images_task = task(name="predict-images", cache_policy=NO_CACHE)(predict_images)


write_predictions_task = task(name="write-predictions", cache_policy=NO_CACHE)(write_predictions)


# -- helpers -----------------------------------------------------------------------------------


def _same_object(listed: list[str], item: str) -> bool:
    """Whether a recursive listing of ``item`` is just ``item`` itself (it is a file).

    Storage lists plain paths as absolute paths and URLs as URLs of the same protocol.
    """
    target = item if "://" in item else os.path.abspath(item)
    return len(listed) == 1 and listed[0].rstrip("/") == target.rstrip("/")


def _short_names(uris: Sequence[str]) -> tuple[str, list[str]]:
    """The folder all ``uris`` share and each one's path below it (for a narrow console)."""
    if not uris:
        return "", []
    folders = [uri.split("/")[:-1] for uri in uris]
    shared = 0
    while all(len(parts) > shared for parts in folders) and (
        len({parts[shared] for parts in folders}) == 1
    ):
        shared += 1
    folder = "".join(f"{part}/" for part in folders[0][:shared])
    return folder, [uri[len(folder) :] for uri in uris]


def _decoded_batches(
    uris: Sequence[str], storage: Storage, batch_size: int, backbone: Backbone
) -> Iterator[tuple[list[str], list[tuple[int, int]], list[torch.Tensor], list[SkippedImage]]]:
    """Per batch: the usable images' URLs, sizes and backbone inputs, and the skipped inputs."""
    for start in range(0, len(uris), batch_size):
        kept: list[str] = []
        sizes: list[tuple[int, int]] = []
        inputs: list[torch.Tensor] = []
        skipped: list[SkippedImage] = []
        for uri in uris[start : start + batch_size]:
            try:
                image = read_image(uri, storage)
                inputs.append(backbone.preprocess(image))
            except ImageRejected as error:
                skipped.append(SkippedImage(uri, error.reason, error.detail))
                continue
            kept.append(uri)
            sizes.append(image.size)
        yield kept, sizes, inputs, skipped


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_attention_maps(
    predictions: Predictions, attention: np.ndarray, storage: Storage, prefix: str
) -> list[str]:
    """Per image: ``<n>-<name>/<rank>-<label>.png`` overlays and ``<n>-<name>/grid.png``."""
    written = []
    for index, uri in enumerate(tqdm(predictions.uris, desc="attention maps", unit="image")):
        try:
            image = read_image(uri, storage)
        except ImageRejected as error:
            logger.warning("attention maps for %s skipped: %s", uri, error.detail)
            continue
        folder = f"{prefix}/{index:04d}-{_safe_name(PurePosixPath(uri).stem)}"
        region = centre_crop_box(image.size, predictions.crop_fraction)
        ranks = np.flatnonzero(predictions.kept[index])
        if not ranks.size:
            continue
        columns = predictions.top[index][ranks]
        maps = attention[index][ranks]
        for rank, column in enumerate(columns):
            overlay = heatmap_overlay(image, maps[rank], predictions.grid, region_box=region)
            url = f"{folder}/{rank + 1:02d}-{_safe_name(predictions.labels[column])}.png"
            storage.write_bytes(url, _png(overlay))
            written.append(url)
        figure = attention_grid_figure(
            image,
            [predictions.labels[column] for column in columns],
            maps,
            predictions.grid,
            scores=[float(predictions.scores[index, column]) for column in columns],
            region_box=region,
        )
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        storage.write_bytes(f"{folder}/grid.png", buffer.getvalue())
        written.append(f"{folder}/grid.png")
    return written
