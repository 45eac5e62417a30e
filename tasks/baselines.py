"""Baselines scored on the same data as LESA, so the report can say what attention buys.

Every baseline sees the run's features, label vectors and splits, and every choice it makes
is made on validation by ``train.select`` (with ``train.holdout_share``'s pseudo-unseen labels
when the rule needs them), the rule that picks LESA's ``best.pt``:

- ``mean-pool`` (Fast0Tag-style): LESA with the attention replaced by the mean of the regions,
  trained on the rank loss alone (its other terms are dead for one pooled feature), tuned over
  ``evaluation.tuning``'s learning rates and L2 weights for ``train.steps`` steps
  (``lesa_model.baselines.tune_mean_pool``, on mean-pooled features read once).
- ``eszsl``: the closed-form ESZSL map from mean-pooled features to word vectors
  (``lesa_model.baselines.tune_eszsl``), its two ridge weights chosen on validation.
- ``random``: uniformly random scores from a seeded generator; its mAP is about each label's
  positive rate, the floor any ranking must beat.

The trained baselines live under ``runs/<run>/baselines/<name>/checkpoints/`` (``best.pt`` and
``final.pt``, plus ``training.json`` with the key of their inputs, so a rerun reuses them).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from prefect.cache_policies import NO_CACHE
from pydantic import Field, NonNegativeFloat, PositiveFloat

from lesa_common import StrictModel
from lesa_model.baselines import (
    EszslFit,
    mean_pool_grid,
    pool_regions,
    tune_eszsl,
    tune_mean_pool,
)
from lesa_model.checkpoint import save_checkpoint
from tasks.embeddings import EmbeddingResult
from tasks.feature_config import feature_key
from tasks.feature_reader import FeatureStore
from tasks.features import FeatureSet
from tasks.hashing import content_hash
from tasks.retries import retrying_task
from tasks.storage import Storage
from tasks.training import (
    CHECKPOINTS_DIR,
    RECORD_FILE,
    DatasetTables,
    embedded,
    run_prefix,
    split_source,
    training_key,
)

if TYPE_CHECKING:
    from tasks.config import PipelineConfig

BaselineName = Literal["mean-pool", "eszsl", "random"]
TRAINED_BASELINES: tuple[BaselineName, ...] = ("mean-pool", "eszsl")
ESZSL_FORMAT = "eszsl-1"


class BaselineTuning(StrictModel):
    """The grids the trained baselines are tuned over (each candidate judged on validation)."""

    mean_pool_lr: list[PositiveFloat] = Field(default_factory=lambda: [1e-3, 3e-3])
    mean_pool_l2: list[NonNegativeFloat] = Field(
        default_factory=lambda: [0.0, 1.0],
        description="L2 weight on the label and input projections (loss.l2 of the baseline)",
    )
    """On the default data a 3 x 3 grid (lr 1e-3, 3e-3, 1e-2; L2 0, 0.1, 1) ranked lr 1e-2 last
    and L2 within 0.1 points of validation F1@5 (experiments/zsl_default.py), hence this 2 x 2."""
    eszsl_gamma: list[PositiveFloat] = Field(default_factory=lambda: [10.0**k for k in range(7)])
    eszsl_lam: list[PositiveFloat] = Field(default_factory=lambda: [10.0**k for k in range(-3, 4)])


def random_ranking(num_images: int, num_labels: int, *, seed: int = 0) -> np.ndarray:
    """Seeded uniform scores ``(num_images, num_labels)`` float32: a ranking that knows nothing."""
    if num_images < 1 or num_labels < 1:
        raise ValueError(
            f"random ranking needs at least one image and one label, got {num_images}x{num_labels}"
        )
    return np.random.default_rng(seed).random((num_images, num_labels), dtype=np.float32)


def checkpoint_urls(storage: Storage, run_name: str, name: str) -> dict[str, str]:
    """``best`` and ``final`` checkpoint URLs of a trained baseline."""
    prefix = f"{run_prefix(storage, run_name, name)}/{CHECKPOINTS_DIR}"
    return {which: f"{prefix}/{which}.pt" for which in ("best", "final")}


class _Inputs:
    """The seen labels, their vectors and the pooled train/val features of a run."""

    def __init__(
        self,
        config: PipelineConfig,
        storage: Storage,
        tables: DatasetTables,
        features: FeatureSet,
        embeddings: EmbeddingResult,
    ) -> None:
        self.seen = embedded(tables.seen_labels, embeddings)
        if not self.seen:
            raise ValueError("no seen label has a word vector: nothing to train on")
        self.vectors = embeddings.vectors(self.seen)
        store = FeatureStore(features.manifest_url, storage)
        train = split_source(tables, store, "train", self.seen)
        val = split_source(tables, store, "val", self.seen)
        if train is None or val is None:
            raise ValueError(
                f"dataset {tables.name}: the baselines need train and val images with features"
            )
        self.key = training_key(config, config.model, self.seen, self.vectors, train, val)
        self.sources = train, val

    def pooled(self) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        train, val = self.sources
        return pool_regions(train), pool_regions(val)


def _reusable(storage: Storage, record_url: str, key: str) -> bool:
    if not storage.exists(record_url):
        return False
    record = storage.read_json(record_url)
    return record.get("key") == key and all(
        storage.exists(url) for url in record.get("checkpoints", {}).values()
    )


def _metadata(config: PipelineConfig, name: str, key: str) -> dict[str, Any]:
    """What evaluation checks before scoring a baseline (``tasks.evaluation.expected_metadata``)."""
    return {
        "run_name": config.run_name,
        "baseline": name,
        "training_key": key,
        "feature_key": feature_key(config.features),
        "embedding_source": config.embeddings.source.identity,
    }


def train_mean_pool(
    config: PipelineConfig,
    storage: Storage,
    *,
    tables: DatasetTables,
    features: FeatureSet,
    embeddings: EmbeddingResult,
) -> dict[str, str]:
    """Tune and train the mean-pool baseline (or reuse an identical finished one); its URLs."""
    inputs = _Inputs(config, storage, tables, features, embeddings)
    tuning = config.evaluation.tuning
    key = content_hash(["mean-pool", inputs.key, tuning.mean_pool_lr, tuning.mean_pool_l2], 16)
    urls = checkpoint_urls(storage, config.run_name, "mean-pool")
    record_url = urls["best"].rsplit("/", 1)[0] + f"/{RECORD_FILE}"
    if _reusable(storage, record_url, key):
        return urls
    train, val = inputs.pooled()
    candidates = mean_pool_grid(tuning.mean_pool_lr, [config.train.steps], tuning.mean_pool_l2)
    with tempfile.TemporaryDirectory(prefix="mean-pool-") as workdir:
        fit = tune_mean_pool(
            train,
            val,
            inputs.vectors,
            model_cfg=config.model,
            loss_cfg=config.loss,
            trainer_cfg=config.train.model_copy(update={"epochs": None}),
            candidates=candidates,
            checkpoint_root=workdir,
            ks=config.evaluation.ks,
            metadata=_metadata(config, "mean-pool", key),
        )
        result = fit.result
        storage.upload_file(result.best_checkpoint or result.final_checkpoint, urls["best"])
        storage.upload_file(result.final_checkpoint, urls["final"])
    storage.write_json(
        record_url,
        {
            "key": key,
            "checkpoints": urls,
            "chosen": fit.candidate.name,
            "best_step": result.best_step,
            "trials": fit.trials,
        },
    )
    return urls


def fit_eszsl_baseline(
    config: PipelineConfig,
    storage: Storage,
    *,
    tables: DatasetTables,
    features: FeatureSet,
    embeddings: EmbeddingResult,
) -> dict[str, str]:
    """Fit ESZSL with ridge weights chosen on validation (or reuse an identical fit); its URLs."""
    inputs = _Inputs(config, storage, tables, features, embeddings)
    tuning = config.evaluation.tuning
    key = content_hash(["eszsl", inputs.key, tuning.eszsl_gamma, tuning.eszsl_lam], 16)
    urls = checkpoint_urls(storage, config.run_name, "eszsl")
    record_url = urls["best"].rsplit("/", 1)[0] + f"/{RECORD_FILE}"
    if _reusable(storage, record_url, key):
        return urls
    train, val = inputs.pooled()
    fit = tune_eszsl(
        train,
        val,
        inputs.vectors,
        config.train,
        gammas=tuning.eszsl_gamma,
        lams=tuning.eszsl_lam,
        ks=config.evaluation.ks,
    )
    payload = {
        "format": ESZSL_FORMAT,
        "weights": torch.from_numpy(fit.weights),
        "feature_mean": torch.from_numpy(fit.feature_mean),
        "gamma": fit.gamma,
        "lam": fit.lam,
        "validation": fit.validation,
        "metadata": _metadata(config, "eszsl", key),
    }
    with tempfile.TemporaryDirectory(prefix="eszsl-") as workdir:
        local = save_checkpoint(Path(workdir) / "eszsl.pt", payload)
        for url in urls.values():
            storage.upload_file(local, url)
    storage.write_json(
        record_url,
        {"key": key, "checkpoints": urls, "chosen": {"gamma": fit.gamma, "lam": fit.lam}},
    )
    return urls


def load_eszsl(storage: Storage, url: str) -> tuple[EszslFit, dict[str, Any]]:
    """An ESZSL fit written by :func:`fit_eszsl_baseline` and its metadata."""
    payload = torch.load(storage.local_copy(url), map_location="cpu", weights_only=True)
    if payload.get("format") != ESZSL_FORMAT:
        raise ValueError(f"{url} is not an ESZSL baseline file ({ESZSL_FORMAT})")
    fit = EszslFit(
        weights=payload["weights"].numpy(),
        feature_mean=payload["feature_mean"].numpy(),
        gamma=float(payload["gamma"]),
        lam=float(payload["lam"]),
        validation=dict(payload["validation"]),
    )
    return fit, dict(payload["metadata"])


train_mean_pool_task = retrying_task("train-mean-pool-baseline", retries=1, cache_policy=NO_CACHE)(
    train_mean_pool
)
fit_eszsl_task = retrying_task("fit-eszsl-baseline", retries=1, cache_policy=NO_CACHE)(
    fit_eszsl_baseline
)
