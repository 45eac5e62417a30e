"""Evaluation stage: score a checkpoint on the test split, ZSL and GZSL, and write the report.

The checkpoint is scored with the *current* vocabulary's label vectors, so labels added after
training (unseen ones) are evaluated zero-shot without retraining. Baselines are scored on the
same images and labels: random ranking, and the mean-pool model and the ESZSL map when their
checkpoints are given (trained and tuned by ``tasks.baselines``). When the dataset records
object boxes, the pointing game measures whether each present label's attention peaks inside
its box.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from lesa_common import StrictModel
from lesa_model.attention import (
    PointingGameResult,
    attention_grid_figure,
    centre_crop_box,
    pointing_game,
)
from lesa_model.backbones import resize_side
from lesa_model.baselines import pool_regions
from lesa_model.calibration import Thresholds, precision_recall_f1_at_threshold
from lesa_model.inference import SCORE_BATCH, attention_for, score
from lesa_model.metrics import evaluate_zero_shot
from lesa_model.model import LESA
from tasks import reports
from tasks.baselines import BaselineName, BaselineTuning, load_eszsl, random_ranking
from tasks.checkpoints import CheckpointMetadata, load_trained_model
from tasks.feature_reader import FeatureBatches, FeatureStore
from tasks.images import ImageRejected, read_image, resolve_uri
from tasks.provenance import Provenance, checkpoint_sha256, code_version
from tasks.retries import retrying_task
from tasks.stage_inputs import StageInputs, split_source
from tasks.storage import Storage
from tasks.thresholds import calibrate

logger = logging.getLogger(__name__)

REPORTS_DIR = "reports"
EVALUATIONS_DIR = "evaluations"
POINTING_BATCH = 64
"""Images whose attention over every label is computed at once for the pointing game: smaller
than ``evaluation.batch_size`` because it holds (images, labels, regions) weights, ~380 MB at
Open Images' 7,586 labels and 196 regions."""


class EvaluationConfig(StrictModel):
    """What to report: top-K cut-offs, which checkpoint, and the baselines scored beside LESA.

    ``ks`` follow the paper: 3 and 5 on NUS-WIDE, 10 and 20 on Open Images. ``pointing_pairs``
    caps the (image, label) pairs of the pointing game (0 turns it off). ``tuning`` holds the
    grids the trained baselines are chosen from on validation (``tasks.baselines``).
    ``batch_size`` is the number of images scored per forward pass (speed and memory only).
    """

    ks: list[PositiveInt] = Field(default_factory=lambda: [3, 5], min_length=1)
    checkpoint: Literal["best", "final"] = "best"
    baselines: list[BaselineName] = Field(default_factory=lambda: ["mean-pool", "eszsl", "random"])
    tuning: BaselineTuning = Field(default_factory=BaselineTuning)
    batch_size: PositiveInt = SCORE_BATCH
    seed: int = 0
    pointing_pairs: int = Field(default=5000, ge=0)
    attention_images: int = Field(default=4, ge=0)
    """Test images drawn as the paper's Figure 1 (each one's top labels and the attention that
    scored them) in the report and on the run (0 turns it off)."""

    def check_ks(self, num_unseen: int, dataset: str, num_seen: int | None = None) -> None:
        """Fail unless every K can be scored: ZSL ranks only the unseen labels, and validation
        (the F1@K training selects on) only the seen ones, so K must exceed neither count
        (never clamped silently; checked as soon as the dataset is known).

        Raises:
            ValueError: naming the setting, the dataset's label count and the fix.
        """
        counts = [("unseen", num_unseen, "ZSL ranks only")]
        if num_seen is not None:
            counts.append(("seen", num_seen, "validation ranks only"))
        for kind, count, ranks in counts:
            too_large = [k for k in self.ks if k > count]
            if too_large:
                raise ValueError(
                    f"evaluation.ks = {self.ks}: {ranks} the {count} {kind} labels of dataset "
                    f"{dataset}, so top-K needs K <= {count} ({too_large} too large); set "
                    f"evaluation.ks, e.g. --set 'evaluation.ks=[{count}]'"
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
    attention_urls: dict[str, str] = Field(default_factory=dict)
    """Figure-1 grids of a few test images: caption -> PNG URL."""
    provenance: Provenance | None = None
    """The checkpoint, dataset and code versions the numbers come from."""

    def describe(self) -> list[str]:
        """Human-readable lines for the run summary."""
        lesa = self.metrics[reports.LESA_METHOD]
        lines = [
            f"Evaluation: {self.num_images} test images, {len(self.seen_labels)} seen + "
            f"{len(self.unseen_labels)} unseen labels, checkpoint `{self.checkpoint_url}`",
            *(
                [
                    f"Provenance: checkpoint sha256 {self.provenance.checkpoint_sha256[:16]}, "
                    f"dataset version {self.provenance.dataset_version}, code "
                    f"{self.provenance.code_version}"
                ]
                if self.provenance
                else []
            ),
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


@dataclass(frozen=True)
class ZeroShotSplit:
    """The test images that have features, scored against the seen then the unseen labels."""

    source: FeatureBatches
    store: FeatureStore
    seen: list[str]
    unseen: list[str]
    vectors: np.ndarray
    """(C, d) word vectors of ``names``."""

    @property
    def names(self) -> list[str]:
        return self.seen + self.unseen

    @property
    def columns(self) -> tuple[np.ndarray, np.ndarray]:
        """Column indices of the seen and of the unseen labels."""
        return np.arange(len(self.seen)), np.arange(len(self.seen), len(self.names))

    @property
    def is_seen(self) -> np.ndarray:
        return np.arange(len(self.names)) < len(self.seen)


def zero_shot_split(inputs: StageInputs, storage: Storage) -> ZeroShotSplit:
    """The test split of ``inputs``; an error when zero-shot cannot be evaluated on it."""
    seen, unseen = inputs.seen_labels, inputs.unseen_labels
    if not unseen:
        raise ValueError("no unseen label has a word vector: zero-shot cannot be evaluated")
    store = inputs.feature_store(storage)
    source = split_source(inputs.tables, store, "test", seen + unseen)
    if source is None:
        raise ValueError(f"dataset {inputs.tables.name}: no test image has features")
    return ZeroShotSplit(source, store, seen, unseen, inputs.embeddings.vectors(seen + unseen))


def _scoring_model(
    storage: Storage, url: str, inputs: StageInputs
) -> tuple[LESA, CheckpointMetadata]:
    """A checkpoint's model, refused unless it was trained on these features and vectors."""
    model, metadata = load_trained_model(storage, url)
    metadata.check_trained_on(url, inputs.features.key, inputs.embeddings.source)
    return model, metadata


def provenance_of(
    storage: Storage,
    url: str,
    metadata: CheckpointMetadata,
    inputs: StageInputs,
    model_version: str | None = None,
) -> Provenance:
    """What an evaluation of checkpoint ``url`` on ``inputs`` is made from."""
    return Provenance(
        checkpoint=url,
        checkpoint_sha256=checkpoint_sha256(storage, url),
        training_key=metadata.training_key,
        model_version=model_version,
        dataset=inputs.tables.name,
        dataset_version=inputs.tables.version,
        feature_key=inputs.features.key,
        code_version=code_version(),
    )


def _image_size(storage: Storage, url: str) -> tuple[int, int]:
    with storage.open(url, "rb") as handle, Image.open(handle) as image:
        return image.size


def pointing_for(
    model: LESA,
    inputs: StageInputs,
    test: ZeroShotSplit,
    storage: Storage,
    *,
    max_pairs: int,
    seed: int = 0,
) -> PointingGameResult | None:
    """Pointing game over test (image, present label) pairs that have a box.

    The region grid covers the centre crop the backbone saw (resize to ``resize_side``, then
    crop the image size), so that rectangle is passed as each pair's region box. Attention is
    computed a batch of images at a time for every label, then picked per pair.
    """
    tables, grid = inputs.tables, inputs.features.grid
    if tables.boxes is None or tables.boxes.empty or max_pairs == 0:
        return None
    images = tables.split("test")
    column = {label: index for index, label in enumerate(test.names)}
    boxes = tables.boxes[
        tables.boxes["image_id"].isin(images["image_id"])
        & tables.boxes["image_id"].isin(test.store.index.index)
        & tables.boxes["label"].isin(list(column))
    ]
    if boxes.empty:
        return None
    if len(boxes) > max_pairs:
        boxes = boxes.sample(n=max_pairs, random_state=seed)
    boxes = boxes.sort_values(["image_id", "label"]).reset_index(drop=True)
    image_ids = boxes["image_id"].unique().tolist()
    weights = np.empty((len(boxes), grid[0] * grid[1]), dtype=np.float32)
    for start in range(0, len(image_ids), POINTING_BATCH):
        chunk = image_ids[start : start + POINTING_BATCH]
        _, chunk_weights = attention_for(model, test.store.read(chunk), test.vectors)
        rows = boxes.index[boxes["image_id"].isin(chunk)]
        position = {image_id: index for index, image_id in enumerate(chunk)}
        pairs = [position[image_id] for image_id in boxes.loc[rows, "image_id"]]
        labels = [column[label] for label in boxes.loc[rows, "label"]]
        weights[rows] = chunk_weights[pairs, labels]
    uris = images.set_index("image_id")["uri"]
    urls = [resolve_uri(str(uris[image_id]), tables.images_prefix) for image_id in image_ids]
    with ThreadPoolExecutor(max_workers=8) as pool:
        size_of = dict(
            zip(image_ids, pool.map(lambda url: _image_size(storage, url), urls), strict=True)
        )
    sizes = np.array([size_of[image_id] for image_id in boxes["image_id"]], dtype=np.float64)
    image_size = inputs.features.identity.image_size
    crop = image_size / resize_side(image_size)
    region_boxes = np.array([centre_crop_box((w, h), crop) for w, h in sizes])
    return pointing_game(
        weights,
        grid,
        boxes[["x0", "y0", "x1", "y1"]].to_numpy(dtype=np.float64),
        sizes,
        region_boxes=region_boxes,
    )


ATTENTION_LABELS = 3
"""Labels per attention grid: each image's best-scored ones (GZSL)."""


def attention_examples(
    model: LESA,
    inputs: StageInputs,
    test: ZeroShotSplit,
    storage: Storage,
    *,
    prefix: str,
    count: int,
) -> dict[str, str]:
    """Figure-1 grids of the first ``count`` test images with features, written under
    ``prefix/attention/``: each image's top labels (``*``: unseen) over seen and unseen ones,
    each drawn with the attention of the module that scored it, over the centre crop the
    backbone saw. Returns caption -> PNG URL."""
    rows = inputs.tables.split("test")
    rows = rows[rows["image_id"].isin(test.store.index.index)].head(count)
    if rows.empty:
        return {}
    features = test.store.read(rows["image_id"].tolist())
    _, weights = attention_for(model, features, test.vectors)
    with torch.inference_mode():
        vectors = torch.from_numpy(test.vectors)
        scores = model(torch.as_tensor(features, dtype=torch.float32), vectors).scores.numpy()
    image_size = inputs.features.identity.image_size
    crop = image_size / resize_side(image_size)
    urls = {}
    for index, (image_id, uri) in enumerate(zip(rows["image_id"], rows["uri"], strict=True)):
        try:
            image = read_image(resolve_uri(str(uri), inputs.tables.images_prefix), storage)
        except ImageRejected as error:
            logger.warning("attention grid of %s left out: %s", image_id, error)
            continue
        best = np.argsort(-scores[index], kind="stable")[:ATTENTION_LABELS]
        names = [test.names[c] + ("" if test.is_seen[c] else "*") for c in best]
        figure = attention_grid_figure(
            image,
            names,
            weights[index, best],
            inputs.features.grid,
            scores=[float(scores[index, c]) for c in best],
            region_box=centre_crop_box(image.size, crop),
        )
        url = f"{prefix}/attention/{index:02d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', image_id)}.png"
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=80)
        storage.write_bytes(url, buffer.getvalue())
        urls[f"{image_id}: {', '.join(names)}"] = url
    return urls


def evaluate_checkpoint(
    config: EvaluationConfig,
    storage: Storage,
    inputs: StageInputs,
    *,
    run_name: str,
    checkpoint_url: str,
    baseline_checkpoints: Mapping[str, str] | None = None,
    prefix: str | None = None,
    model_version: str | None = None,
) -> EvaluationResult:
    """Score the test split with a checkpoint, compute ZSL/GZSL metrics, write the report
    under ``prefix`` (default: the run's ``runs/<run_name>/reports``).

    ``baseline_checkpoints`` maps a model baseline (``mean-pool``) to its checkpoint URL;
    ``random`` needs none. Every checkpoint must have been trained on the features and word
    vectors of ``inputs`` (its metadata says). The report names the checkpoint (URL, sha256,
    ``model_version``), the dataset version and the code version.
    """
    test = zero_shot_split(inputs, storage)
    config.check_ks(len(test.unseen), inputs.tables.name)
    ks = config.ks
    model, metadata = _scoring_model(storage, checkpoint_url, inputs)
    provenance = provenance_of(storage, checkpoint_url, metadata, inputs, model_version)
    scores = score(model, test.source, test.vectors, batch_size=config.batch_size)
    metrics = evaluate_zero_shot(scores, test.source.labels, *test.columns, ks)
    thresholds = calibrate(model, inputs, storage, checkpoint_url, batch_size=config.batch_size)
    if thresholds is not None:
        _add_threshold_metrics(metrics, scores, test, thresholds)
    baselines = _baseline_metrics(
        config, storage, inputs, test, ks=ks, checkpoints=baseline_checkpoints or {}
    )
    label_ap = reports.label_ap_table(scores, test.source.labels, test.names, test.is_seen)
    pointing = pointing_for(
        model, inputs, test, storage, max_pairs=config.pointing_pairs, seed=config.seed
    )
    rejects = reports.reject_summary(storage, inputs.features.rejects_url)
    attention = attention_examples(
        model,
        inputs,
        test,
        storage,
        prefix=prefix or report_prefix(storage, run_name),
        count=config.attention_images,
    )
    artifacts = reports.write_report(
        metrics,
        label_ap=label_ap,
        curve=reports.topk_curve(scores, test.source.labels, test.is_seen),
        storage=storage,
        prefix=prefix or report_prefix(storage, run_name),
        baselines=baselines,
        pointing=pointing,
        rejects=rejects,
        provenance=provenance,
    )
    return EvaluationResult(
        checkpoint_url=checkpoint_url,
        metrics={reports.LESA_METHOD: metrics, **baselines},
        report_urls=artifacts.urls(),
        report_markdown=reports.report_markdown(
            metrics,
            baselines=baselines,
            label_ap=label_ap,
            pointing=pointing,
            rejects=rejects,
            provenance=provenance,
        ),
        num_images=test.source.num_images,
        seen_labels=test.seen,
        unseen_labels=test.unseen,
        pointing=None if pointing is None else reports.pointing_summary(pointing),
        rejects=rejects,
        attention_urls=attention,
        provenance=provenance,
    )


def _add_threshold_metrics(
    metrics: dict[str, dict[str, float]],
    scores: np.ndarray,
    test: ZeroShotSplit,
    thresholds: Thresholds,
) -> None:
    """P/R/F1 of tagging by the calibrated thresholds (``P@thr``...), beside P/R/F1@K: ZSL
    over the unseen labels (the global threshold), GZSL over all of them."""
    cut = thresholds.for_labels(test.names)
    for setting, columns in (("zsl", test.columns[1]), ("gzsl", np.arange(len(test.names)))):
        precision, recall, f1 = precision_recall_f1_at_threshold(
            scores[:, columns], test.source.labels[:, columns], cut[columns]
        )
        metrics[setting] |= {"P@thr": precision, "R@thr": recall, "F1@thr": f1}


def _baseline_metrics(
    config: EvaluationConfig,
    storage: Storage,
    inputs: StageInputs,
    test: ZeroShotSplit,
    *,
    ks: Sequence[int],
    checkpoints: Mapping[str, str],
) -> dict[str, dict[str, dict[str, float]]]:
    results = {}
    for name in config.baselines:
        if name == "random":
            scores = random_ranking(test.source.num_images, len(test.names), seed=config.seed)
        elif name == "eszsl" and name in checkpoints:
            fit, metadata = load_eszsl(storage, checkpoints[name])
            metadata.check_trained_on(
                checkpoints[name], inputs.features.key, inputs.embeddings.source
            )
            scores = fit.scores(pool_regions(test.source, config.batch_size)[0], test.vectors)
        elif name in checkpoints:
            model, _ = _scoring_model(storage, checkpoints[name], inputs)
            scores = score(model, test.source, test.vectors, batch_size=config.batch_size)
        else:
            raise ValueError(f"baseline {name!r} needs a trained checkpoint; none was given")
        results[name] = evaluate_zero_shot(scores, test.source.labels, *test.columns, ks)
    return results


evaluate_checkpoint_task = retrying_task("evaluate", retries=1, cache_policy=NO_CACHE)(
    evaluate_checkpoint
)


def report_prefix(storage: Storage, run_name: str) -> str:
    """``runs/<run>/reports`` under the storage root: the pipeline run's own report."""
    return storage.url("runs", run_name, REPORTS_DIR)


def evaluation_prefix(
    storage: Storage, run_name: str, checkpoint_sha: str, dataset_version: str | None
) -> str:
    """``runs/<run>/evaluations/<checkpoint sha256[:16]>-<dataset version>``: where a separate
    evaluation of one checkpoint on one dataset version writes its report (never over the
    run's own report, nor over another checkpoint's or data version's)."""
    name = f"{checkpoint_sha[:16]}-{dataset_version or 'unversioned'}"
    return storage.url("runs", run_name, EVALUATIONS_DIR, name)
