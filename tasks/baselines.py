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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from prefect.cache_policies import NO_CACHE
from pydantic import Field, NonNegativeFloat, PositiveFloat

from lesa_common import StrictModel
from lesa_model.baselines import (
    EszslFit,
    MeanPoolCandidate,
    mean_pool_grid,
    pool_regions,
    tune_eszsl,
    tune_mean_pool,
)
from lesa_model.checkpoint import save_checkpoint
from lesa_model.config import LossConfig, ModelConfig, TrainerConfig
from tasks.checkpoints import (
    CHECKPOINT_NAMES,
    CheckpointMetadata,
    checkpoint_url,
    read_metadata,
    run_prefix,
)
from tasks.claims import claimed
from tasks.hashing import content_hash
from tasks.retries import retrying_task
from tasks.stage_inputs import StageInputs
from tasks.storage import Storage
from tasks.training import (
    RECORD_FILE,
    TrainingData,
    TrainingProgress,
    training_data,
    training_key,
)

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
    return {which: checkpoint_url(storage, run_name, which, name) for which in CHECKPOINT_NAMES}


class _Inputs:
    """The seen labels, their vectors and the pooled train/val features of a run, the key of
    LESA's training on them, and the metadata every baseline checkpoint carries."""

    def __init__(
        self,
        storage: Storage,
        inputs: StageInputs,
        *,
        run_name: str,
        model: ModelConfig,
        loss: LossConfig,
        trainer: TrainerConfig,
    ) -> None:
        self.data: TrainingData = training_data(inputs, storage)
        if self.data.val is None:
            raise ValueError(
                f"dataset {inputs.tables.name}: the baselines need val images with features"
            )
        self.key = training_key(
            model, loss, trainer, inputs.features.key, inputs.embeddings.source, self.data
        )
        self.run_name = run_name
        self.stage_inputs = inputs
        self.model = model
        self.loss = loss

    @property
    def vectors(self) -> np.ndarray:
        return self.data.vectors

    def pooled(self) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        return pool_regions(self.data.train), pool_regions(self.data.val)

    def metadata(self, name: str, key: str) -> CheckpointMetadata:
        """What evaluation checks before scoring the baseline (as for LESA's checkpoints)."""
        inputs = self.stage_inputs
        return CheckpointMetadata(
            run_name=self.run_name,
            baseline=name,
            training_key=key,
            dataset=inputs.tables.name,
            seen_labels=self.data.seen,
            unseen_labels=self.data.unseen,
            embedding_source=inputs.embeddings.source,
            embedding_dim=int(self.vectors.shape[1]),
            label_text=inputs.embeddings.text,
            feature_key=inputs.features.key,
            features=inputs.features.identity,
        )


def _reusable(storage: Storage, record_url: str, key: str) -> bool:
    if not storage.exists(record_url):
        return False
    record = storage.read_json(record_url)
    return record.get("key") == key and all(
        storage.exists(url) for url in record.get("checkpoints", {}).values()
    )


Fit = Callable[[_Inputs, str, dict[str, str]], dict[str, Any]]
"""Fits a baseline on a run's inputs under its key, uploads its checkpoints to the URLs, and
returns what its record says about the choice it made."""


def _fit_once(
    storage: Storage,
    inputs: StageInputs,
    name: BaselineName,
    grid: Sequence[object],
    fit: Fit,
    *,
    run_name: str,
    model: ModelConfig,
    loss: LossConfig,
    trainer: TrainerConfig,
) -> dict[str, str]:
    """A trained baseline's checkpoint URLs: fitted under the baseline's claim, or reused when
    its record holds the same key (LESA's training key on these inputs and the tuning grid)."""
    run = _Inputs(storage, inputs, run_name=run_name, model=model, loss=loss, trainer=trainer)
    key = content_hash([name, run.key, *grid], 16)
    urls = checkpoint_urls(storage, run_name, name)
    record_url = urls["best"].rsplit("/", 1)[0] + f"/{RECORD_FILE}"
    with claimed(storage, run_prefix(storage, run_name, name), f"{name} baseline"):
        if not _reusable(storage, record_url, key):
            record = fit(run, key, urls)
            storage.write_json(record_url, {"key": key, "checkpoints": urls, **record})
    return urls


def train_mean_pool(
    storage: Storage,
    inputs: StageInputs,
    *,
    run_name: str,
    model: ModelConfig,
    loss: LossConfig,
    trainer: TrainerConfig,
    val_ks: Sequence[int],
    tuning: BaselineTuning,
) -> dict[str, str]:
    """Tune and train the mean-pool baseline (or reuse an identical finished one); its URLs."""

    def fit(run: _Inputs, key: str, urls: dict[str, str]) -> dict[str, Any]:
        candidates = mean_pool_grid(tuning.mean_pool_lr, [trainer.steps], tuning.mean_pool_l2)
        train, val = run.pooled()
        with tempfile.TemporaryDirectory(prefix="mean-pool-") as workdir:
            tuned = tune_mean_pool(
                train,
                val,
                run.vectors,
                model_cfg=run.model,
                loss_cfg=run.loss,
                trainer_cfg=trainer.model_copy(update={"epochs": None}),
                candidates=candidates,
                checkpoint_root=workdir,
                ks=val_ks,
                metadata=run.metadata("mean-pool", key).model_dump(mode="json"),
                progress=candidate_progress(f"training {run.run_name} mean-pool"),
            )
            result = tuned.result
            storage.upload_file(result.best_checkpoint or result.final_checkpoint, urls["best"])
            storage.upload_file(result.final_checkpoint, urls["final"])
        return {
            "chosen": tuned.candidate.name,
            "best_step": result.best_step,
            "trials": tuned.trials,
        }

    grid = [tuning.mean_pool_lr, tuning.mean_pool_l2]
    return _fit_once(
        storage,
        inputs,
        "mean-pool",
        grid,
        fit,
        run_name=run_name,
        model=model,
        loss=loss,
        trainer=trainer,
    )


def candidate_progress(
    description: str,
) -> Callable[[MeanPoolCandidate, dict[str, float]], None]:
    """Progress of a tuning grid on the Prefect run: one bar and log line per candidate."""
    bars: dict[str, TrainingProgress] = {}

    def report(candidate: MeanPoolCandidate, record: dict[str, float]) -> None:
        if candidate.name not in bars:
            bars[candidate.name] = TrainingProgress(f"{description} {candidate.name}")
            bars[candidate.name].total = candidate.steps
        bars[candidate.name](record)

    return report


def fit_eszsl_baseline(
    storage: Storage,
    inputs: StageInputs,
    *,
    run_name: str,
    model: ModelConfig,
    loss: LossConfig,
    trainer: TrainerConfig,
    val_ks: Sequence[int],
    tuning: BaselineTuning,
) -> dict[str, str]:
    """Fit ESZSL with ridge weights chosen on validation (or reuse an identical fit); its URLs.

    ``model`` and ``loss`` only enter the key (LESA's training key on these inputs), so a
    change of the run's inputs refits it.
    """

    def fit(run: _Inputs, key: str, urls: dict[str, str]) -> dict[str, Any]:
        train, val = run.pooled()
        gammas, lams = tuning.eszsl_gamma, tuning.eszsl_lam
        fitted = tune_eszsl(train, val, run.vectors, trainer, gammas=gammas, lams=lams, ks=val_ks)
        payload = {
            "format": ESZSL_FORMAT,
            "weights": torch.from_numpy(fitted.weights),
            "feature_mean": torch.from_numpy(fitted.feature_mean),
            "gamma": fitted.gamma,
            "lam": fitted.lam,
            "validation": fitted.validation,
            "metadata": run.metadata("eszsl", key).model_dump(mode="json"),
        }
        with tempfile.TemporaryDirectory(prefix="eszsl-") as workdir:
            local = save_checkpoint(Path(workdir) / "eszsl.pt", payload)
            for url in urls.values():
                storage.upload_file(local, url)
        return {"chosen": {"gamma": fitted.gamma, "lam": fitted.lam}}

    grid = [tuning.eszsl_gamma, tuning.eszsl_lam]
    return _fit_once(
        storage,
        inputs,
        "eszsl",
        grid,
        fit,
        run_name=run_name,
        model=model,
        loss=loss,
        trainer=trainer,
    )


def load_eszsl(storage: Storage, url: str) -> tuple[EszslFit, CheckpointMetadata]:
    """An ESZSL fit written by :func:`fit_eszsl_baseline` and its metadata."""
    if not storage.exists(url):
        raise FileNotFoundError(f"checkpoint not found: {url}")
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
    return fit, read_metadata(dict(payload["metadata"]), url)


train_mean_pool_task = retrying_task("train-mean-pool-baseline", retries=1, cache_policy=NO_CACHE)(
    train_mean_pool
)
fit_eszsl_task = retrying_task("fit-eszsl-baseline", retries=1, cache_policy=NO_CACHE)(
    fit_eszsl_baseline
)
