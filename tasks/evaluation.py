"""Evaluation stage: score a checkpoint on the test split, ZSL and GZSL, and write the report.

The checkpoint is scored with the *current* vocabulary's label vectors, so labels added after
training (unseen ones) are evaluated zero-shot without retraining. Baselines are scored on the
same images and labels: random ranking, and the mean-pool model and the ESZSL map when their
checkpoints are given (trained and tuned by ``tasks.baselines``). When the dataset records
object boxes, the pointing game measures whether each present label's attention peaks inside
its box.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from lesa_common import StrictModel
from lesa_model.attention import PointingGameResult, centre_crop_box, pointing_game
from lesa_model.baselines import pool_regions
from lesa_model.checkpoint import load_model
from lesa_model.inference import attention_for, score
from lesa_model.metrics import evaluate_zero_shot
from lesa_model.model import LESA
from tasks import reports
from tasks.backbones import resize_side
from tasks.baselines import BaselineName, BaselineTuning, load_eszsl, random_ranking
from tasks.embeddings import EmbeddingResult
from tasks.feature_config import feature_key
from tasks.feature_reader import FeatureBatches, FeatureStore
from tasks.features import FeatureSet
from tasks.images import resolve_uri
from tasks.retries import retrying_task
from tasks.storage import Storage
from tasks.training import DatasetTables, embedded, split_source

if TYPE_CHECKING:
    from tasks.config import PipelineConfig

REPORTS_DIR = "reports"


class EvaluationConfig(StrictModel):
    """What to report: top-K cut-offs, which checkpoint, and the baselines scored beside LESA.

    ``ks`` follow the paper: 3 and 5 on NUS-WIDE, 10 and 20 on Open Images. ``pointing_pairs``
    caps the (image, label) pairs of the pointing game (0 turns it off). ``tuning`` holds the
    grids the trained baselines are chosen from on validation (``tasks.baselines``).
    """

    ks: list[PositiveInt] = Field(default_factory=lambda: [3, 5], min_length=1)
    checkpoint: Literal["best", "final"] = "best"
    baselines: list[BaselineName] = Field(default_factory=lambda: ["mean-pool", "eszsl", "random"])
    tuning: BaselineTuning = Field(default_factory=BaselineTuning)
    batch_size: PositiveInt = 256
    seed: int = 0
    pointing_pairs: int = Field(default=5000, ge=0)

    def check_ks(self, num_unseen: int, dataset: str) -> None:
        """Fail unless every K can be scored: ZSL ranks only the unseen labels, so K must not
        exceed their number (never clamped silently; checked as soon as the dataset is known).

        Raises:
            ValueError: naming the setting, the dataset's unseen-label count and the fix.
        """
        too_large = [k for k in self.ks if k > num_unseen]
        if too_large:
            raise ValueError(
                f"evaluation.ks = {self.ks}: ZSL ranks only the {num_unseen} unseen labels of "
                f"dataset {dataset}, so top-K needs K <= {num_unseen} ({too_large} too large); "
                f"set evaluation.ks, e.g. --set 'evaluation.ks=[{num_unseen}]'"
            )


class EvaluationResult(BaseModel):
    """Metrics of every method (fractions in [0, 1]) and where the report files are."""

    model_config = ConfigDict(frozen=True)

    checkpoint_url: str
    metrics: dict[str, dict[str, dict[str, float]]]
    report_urls: dict[str, str]
    report_markdown: str
    num_images: int
    seen_labels: list[str]
    unseen_labels: list[str]
    pointing: dict[str, float | int] | None = None
    rejects: reports.RejectSummary | None = None
    """The images extraction could not use, by reason."""

    def describe(self) -> list[str]:
        """Human-readable lines for the run summary."""
        lesa = self.metrics[reports.LESA_METHOD]
        lines = [
            f"Evaluation: {self.num_images} test images, {len(self.seen_labels)} seen + "
            f"{len(self.unseen_labels)} unseen labels, checkpoint `{self.checkpoint_url}`",
            f"LESA ZSL mAP {100 * lesa['zsl']['mAP']:.2f}%, GZSL mAP "
            f"{100 * lesa['gzsl']['mAP']:.2f}%",
        ]
        for name, values in self.metrics.items():
            if name != reports.LESA_METHOD:
                lines.append(
                    f"{name} baseline: ZSL mAP {100 * values['zsl']['mAP']:.2f}%, "
                    f"GZSL mAP {100 * values['gzsl']['mAP']:.2f}%"
                )
        if self.rejects is not None:
            lines.append(self.rejects.describe())
        if self.pointing:
            lines.append(
                f"Pointing game: {100 * self.pointing['hit_rate']:.1f}% of "
                f"{self.pointing['pairs']} (image, label) pairs "
                f"(chance {100 * self.pointing['chance']:.1f}%)"
            )
        if "report.md" in self.report_urls:
            lines.append(f"Report: `{self.report_urls['report.md']}`")
        return lines


class CheckpointMismatchError(ValueError):
    """A checkpoint was trained on other features or word vectors than the run provides."""


def _load_checkpoint(
    storage: Storage, url: str, expected: Mapping[str, object] | None = None
) -> LESA:
    """Load a checkpoint, refusing one whose metadata contradicts ``expected``.

    A model trained on other features (backbone, preprocessing) or other word vectors would
    score, but meaninglessly; the metadata written at training time makes that detectable.
    """
    if not storage.exists(url):
        raise FileNotFoundError(f"checkpoint not found: {url}")
    model, metadata = load_model(storage.local_copy(url))
    _check_metadata(url, metadata, expected)
    return model


def _check_metadata(
    url: str, metadata: Mapping[str, object], expected: Mapping[str, object] | None
) -> None:
    for key, value in (expected or {}).items():
        if key in metadata and metadata[key] != value:
            raise CheckpointMismatchError(
                f"checkpoint {url} was trained with {key} = {metadata[key]!r}, but this run "
                f"has {value!r}; evaluate it with the config it was trained with"
            )


def _image_size(storage: Storage, url: str) -> tuple[int, int]:
    with storage.open(url, "rb") as handle, Image.open(handle) as image:
        return image.size


def pointing_for(
    model: LESA,
    store: FeatureStore,
    tables: DatasetTables,
    features: FeatureSet,
    storage: Storage,
    *,
    image_size: int,
    label_names: Sequence[str],
    label_vectors: np.ndarray,
    max_pairs: int,
    seed: int = 0,
    batch_size: int = 64,
) -> PointingGameResult | None:
    """Pointing game over test (image, present label) pairs that have a box.

    The region grid covers the centre crop the backbone saw (resize to ``resize_side``, then
    crop ``image_size``), so that rectangle is passed as each pair's region box. Attention is
    computed a batch of images at a time for every label, then picked per pair.
    """
    if tables.boxes is None or tables.boxes.empty or max_pairs == 0:
        return None
    test = tables.split("test")
    column = {label: index for index, label in enumerate(label_names)}
    boxes = tables.boxes[
        tables.boxes["image_id"].isin(test["image_id"])
        & tables.boxes["image_id"].isin(store.index.index)
        & tables.boxes["label"].isin(list(column))
    ]
    if boxes.empty:
        return None
    if len(boxes) > max_pairs:
        boxes = boxes.sample(n=max_pairs, random_state=seed)
    boxes = boxes.sort_values(["image_id", "label"]).reset_index(drop=True)
    image_ids = boxes["image_id"].unique().tolist()
    weights = np.empty((len(boxes), features.grid[0] * features.grid[1]), dtype=np.float32)
    for start in range(0, len(image_ids), batch_size):
        chunk = image_ids[start : start + batch_size]
        _, chunk_weights = attention_for(model, store.read(chunk), label_vectors)
        rows = boxes.index[boxes["image_id"].isin(chunk)]
        position = {image_id: index for index, image_id in enumerate(chunk)}
        images = [position[image_id] for image_id in boxes.loc[rows, "image_id"]]
        labels = [column[label] for label in boxes.loc[rows, "label"]]
        weights[rows] = chunk_weights[images, labels]
    uris = test.set_index("image_id")["uri"]
    urls = [resolve_uri(str(uris[image_id]), tables.images_prefix) for image_id in image_ids]
    with ThreadPoolExecutor(max_workers=8) as pool:
        size_of = dict(
            zip(image_ids, pool.map(lambda url: _image_size(storage, url), urls), strict=True)
        )
    sizes = np.array([size_of[image_id] for image_id in boxes["image_id"]], dtype=np.float64)
    crop = image_size / resize_side(image_size)
    region_boxes = np.array([centre_crop_box((w, h), crop) for w, h in sizes])
    return pointing_game(
        weights,
        features.grid,
        boxes[["x0", "y0", "x1", "y1"]].to_numpy(dtype=np.float64),
        sizes,
        region_boxes=region_boxes,
    )


def evaluate_checkpoint(
    config: EvaluationConfig,
    storage: Storage,
    *,
    checkpoint_url: str,
    tables: DatasetTables,
    features: FeatureSet,
    embeddings: EmbeddingResult,
    image_size: int,
    report_prefix: str,
    baseline_checkpoints: Mapping[str, str] | None = None,
    expected_metadata: Mapping[str, object] | None = None,
) -> EvaluationResult:
    """Score the test split with a checkpoint, compute ZSL/GZSL metrics, write the report.

    ``baseline_checkpoints`` maps a model baseline (``mean-pool``) to its checkpoint URL;
    ``random`` needs none. ``image_size`` is the backbone input size (for the pointing game).
    ``expected_metadata`` (e.g. ``feature_key``, ``embedding_source``) must match what the
    checkpoint recorded at training time.
    """
    seen = embedded(tables.seen_labels, embeddings)
    unseen = embedded(tables.unseen_labels, embeddings)
    if not unseen:
        raise ValueError("no unseen label has a word vector: zero-shot cannot be evaluated")
    config.check_ks(len(unseen), tables.name)
    names = seen + unseen
    vectors = embeddings.vectors(names)
    store = FeatureStore(features.manifest_url, storage)
    test = split_source(tables, store, "test", names)
    if test is None:
        raise ValueError(f"dataset {tables.name}: no test image has features")
    seen_columns = np.arange(len(seen))
    unseen_columns = np.arange(len(seen), len(names))
    is_seen = np.arange(len(names)) < len(seen)

    model = _load_checkpoint(storage, checkpoint_url, expected_metadata)
    scores = score(model, test, vectors, batch_size=config.batch_size)
    metrics = evaluate_zero_shot(scores, test.labels, seen_columns, unseen_columns, config.ks)
    baselines = _baseline_metrics(
        config,
        storage,
        test=test,
        vectors=vectors,
        columns=(seen_columns, unseen_columns),
        ks=config.ks,
        checkpoints=baseline_checkpoints or {},
        expected=expected_metadata,
    )
    label_ap = reports.label_ap_table(scores, test.labels, names, is_seen)
    curve = reports.topk_curve(scores, test.labels, is_seen)
    pointing = pointing_for(
        model,
        store,
        tables,
        features,
        storage,
        image_size=image_size,
        label_names=names,
        label_vectors=vectors,
        max_pairs=config.pointing_pairs,
        seed=config.seed,
    )
    rejects = reports.reject_summary(storage, features.rejects_url)
    artifacts = reports.write_report(
        metrics,
        label_ap=label_ap,
        curve=curve,
        storage=storage,
        prefix=report_prefix,
        baselines=baselines,
        pointing=pointing,
        rejects=rejects,
    )
    return EvaluationResult(
        checkpoint_url=checkpoint_url,
        metrics={reports.LESA_METHOD: metrics, **baselines},
        report_urls=artifacts.urls(),
        report_markdown=reports.report_markdown(
            metrics, baselines=baselines, label_ap=label_ap, pointing=pointing, rejects=rejects
        ),
        num_images=test.num_images,
        seen_labels=seen,
        unseen_labels=unseen,
        pointing=None if pointing is None else reports.pointing_summary(pointing),
        rejects=rejects,
    )


def _baseline_metrics(
    config: EvaluationConfig,
    storage: Storage,
    *,
    test: FeatureBatches,
    vectors: np.ndarray,
    columns: tuple[np.ndarray, np.ndarray],
    ks: Sequence[int],
    checkpoints: Mapping[str, str],
    expected: Mapping[str, object] | None,
) -> dict[str, dict[str, dict[str, float]]]:
    results = {}
    for name in config.baselines:
        if name == "random":
            scores = random_ranking(test.num_images, len(vectors), seed=config.seed)
        elif name == "eszsl" and name in checkpoints:
            fit, metadata = load_eszsl(storage, checkpoints[name])
            _check_metadata(checkpoints[name], metadata, expected)
            scores = fit.scores(pool_regions(test, config.batch_size)[0], vectors)
        elif name in checkpoints:
            model = _load_checkpoint(storage, checkpoints[name], expected)
            scores = score(model, test, vectors, batch_size=config.batch_size)
        else:
            raise ValueError(f"baseline {name!r} needs a trained checkpoint; none was given")
        results[name] = evaluate_zero_shot(scores, test.labels, *columns, ks)
    return results


evaluate_checkpoint_task = retrying_task("evaluate", retries=1, cache_policy=NO_CACHE)(
    evaluate_checkpoint
)


def report_prefix(storage: Storage, run_name: str) -> str:
    """``runs/<run>/reports`` under the storage root."""
    return storage.url("runs", run_name, REPORTS_DIR)


def expected_metadata(config: PipelineConfig) -> dict[str, object]:
    """What a checkpoint must have been trained on to be scored with ``config``'s inputs."""
    return {
        "feature_key": feature_key(config.features),
        "embedding_source": config.embeddings.source.identity,
    }
