"""Baselines LESA's zero-shot scores are measured against, on the same features and label vectors.

- **mean-pool** (Fast0Tag-style): the LESA model with the attention replaced by the mean of the
  regions. With one pooled feature its div term is 0, its rel term 0 (the mean score *is* the
  score) and its dist term a constant, so it trains on the rank loss alone
  (:func:`mean_pool_setup`). Because the input projection is linear, pooling the regions first
  gives the same model, so :func:`pool_regions` turns a feature set into one vector per image
  once and the tuning grid (:func:`tune_mean_pool`) trains on that: each candidate costs what a
  linear model costs, and the winner scores the full region features unchanged.
- **ESZSL** (Romera-Paredes & Torr, "An embarrassingly simple approach to zero-shot learning",
  ICML 2015): the bilinear map ``V`` minimising
  ``|X V S^T - Y|^2 + gamma |V S^T|^2 + lam |X V|^2 + gamma lam |V|^2`` has the closed form
  ``V = (X^T X + gamma I)^-1 X^T Y S (S^T S + lam I)^-1`` (X: pooled features, Y: labels in
  {1, -1, 0}, S: word vectors); an unseen label with vector ``s`` scores ``(x - mu)^T V s``.
  The features are centred on their training mean ``mu`` first: the closed form has no
  intercept, and uncentred (all-positive, post-ReLU) features spend the map on the constant
  part of Y (on the default data: seen validation F1@5 3% uncentred, 37% centred).
  :func:`tune_eszsl` picks the two ridge weights on validation with the trainer's selection rule.

Both are chosen with :func:`lesa_model.selection.selection_value`, the rule that picks LESA's
``best.pt``, and see the same pseudo-unseen labels, so every method is selected alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lesa_model.checkpoint import load_model
from lesa_model.config import LossConfig, ModelConfig, TrainerConfig
from lesa_model.data import BatchSource, TensorBatchSource
from lesa_model.model import LESA
from lesa_model.selection import (
    holdout_columns,
    kept_columns,
    selection_value,
    validation_metrics,
)
from lesa_model.trainer import Trainer, TrainResult, validation_ks
from lesa_model.validation import as_float_features


def pool_regions(source: BatchSource, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Mean region feature (N, D) float32 and labels (N, C) int8 of a source, in storage order."""
    pooled, labels = [], []
    for features, batch_labels in source.batches(batch_size, shuffle=False):
        pooled.append(as_float_features(features, torch.device("cpu")).mean(dim=1).numpy())
        labels.append(np.asarray(torch.as_tensor(batch_labels), dtype=np.int8))
    if not pooled:
        raise ValueError("the source holds no images to pool")
    return np.concatenate(pooled), np.concatenate(labels)


# -- ESZSL -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EszslFit:
    """A fitted ESZSL map, its ridge weights and the validation metrics that chose them."""

    weights: np.ndarray
    """(D, d) float64: image feature x and label vector s score ``(x - mu)^T V s``."""
    feature_mean: np.ndarray
    """(D,) float64: ``mu``, the mean training feature."""
    gamma: float
    lam: float
    validation: dict[str, float]
    """Validation metrics (``selection.validation_metrics``) of the chosen weights, held-out
    labels excluded from the fit; empty when the weights were given rather than chosen."""

    def scores(self, features: np.ndarray, label_vectors: np.ndarray) -> np.ndarray:
        """(N, C) float32 scores of pooled ``features`` (N, D) for ``label_vectors`` (C, d)."""
        centred = np.asarray(features, np.float64) - self.feature_mean
        return (centred @ self.weights @ label_vectors.T).astype(np.float32)


class _EszslSolver:
    """ESZSL for many ridge weights at once: both Gram matrices are diagonalised once."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, label_vectors: np.ndarray):
        x = np.asarray(features, dtype=np.float64)
        self.feature_mean = x.mean(axis=0)
        x = x - self.feature_mean
        y = np.asarray(labels, dtype=np.float64)
        s = np.asarray(label_vectors, dtype=np.float64)
        if x.ndim != 2 or y.shape != (x.shape[0], s.shape[0]) or s.ndim != 2:
            raise ValueError(
                f"ESZSL needs features (N, D), labels (N, C), label vectors (C, d); got "
                f"{x.shape}, {y.shape}, {s.shape}"
            )
        self.feature_values, self.feature_basis = np.linalg.eigh(x.T @ x)
        self.label_values, self.label_basis = np.linalg.eigh(s.T @ s)
        # X^T Y S in both eigenbases: V = U diag(1/(e+g)) [U^T X^T Y S W] diag(1/(f+l)) W^T.
        self.core = self.feature_basis.T @ (x.T @ y @ s) @ self.label_basis

    def fit(self, gamma: float, lam: float) -> EszslFit:
        scaled = self.core / np.outer(self.feature_values + gamma, self.label_values + lam)
        weights = self.feature_basis @ scaled @ self.label_basis.T
        return EszslFit(weights, self.feature_mean, gamma, lam, {})


def fit_eszsl(
    features: np.ndarray, labels: np.ndarray, label_vectors: np.ndarray, gamma: float, lam: float
) -> EszslFit:
    """The closed-form ESZSL map for ridge weights ``gamma`` (features) and ``lam`` (labels).

    Labels are {1, -1, 0}; an unannotated 0 pulls the score neither way. The features are
    centred on their mean first (kept in the fit, and subtracted again when scoring).
    """
    if gamma <= 0 or lam <= 0:
        raise ValueError(f"ESZSL ridge weights must be positive, got gamma={gamma}, lam={lam}")
    return _EszslSolver(features, labels, label_vectors).fit(gamma, lam)


def tune_eszsl(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    label_vectors: np.ndarray,
    cfg: TrainerConfig,
    *,
    gammas: Sequence[float],
    lams: Sequence[float],
    ks: Sequence[int] = (),
) -> EszslFit:
    """ESZSL with the (gamma, lam) that maximise ``cfg``'s selection value on validation.

    ``train`` and ``val`` are (pooled features, labels) over the training labels. With
    ``cfg.holdout_share`` the pseudo-unseen labels of ``cfg.holdout_seed`` are left out of the
    fits that are compared (columns and word vectors both), as LESA's trainer leaves them out of
    its batches; the chosen weights are then refitted on every training label (the closed form
    makes that free). Ties keep the later candidate, as the trainer's ``>=`` does.
    """
    if not gammas or not lams:
        raise ValueError("tune_eszsl needs at least one gamma and one lam")
    num_labels = label_vectors.shape[0]
    holdout = holdout_columns(num_labels, cfg.holdout_share, cfg.holdout_seed)
    kept = kept_columns(num_labels, holdout)
    solver = _EszslSolver(train[0], train[1][:, kept], label_vectors[kept])
    val_ks = validation_ks(cfg, ks)
    best: tuple[float, float, float, dict[str, float]] | None = None
    for gamma in gammas:
        for lam in lams:
            fit = solver.fit(gamma, lam)
            metrics = validation_metrics(fit.scores(val[0], label_vectors), val[1], holdout, val_ks)
            value = selection_value(metrics, cfg)
            if best is None or value >= best[0]:
                best = (value, gamma, lam, metrics)
    assert best is not None
    _, gamma, lam, metrics = best
    final = fit_eszsl(train[0], train[1], label_vectors, gamma, lam)
    return EszslFit(final.weights, final.feature_mean, gamma, lam, metrics)


# -- mean-pool -------------------------------------------------------------------------------


def mean_pool_setup(model_cfg: ModelConfig, loss_cfg: LossConfig) -> tuple[ModelConfig, LossConfig]:
    """LESA's model and loss sections for the mean-pool baseline: mean pooling, rank loss only.

    Only the pooling differs from LESA's architecture (projection and sizes are kept), so the
    gap between the two is attention's. The loss keeps LESA's normalisation and L2 penalties and
    drops the three attention terms, which are dead for one pooled feature.
    """
    return (
        model_cfg.model_copy(update={"pooling": "mean"}),
        loss_cfg.model_copy(update={"div": 0.0, "rel": 0.0, "dist": 0.0, "rel_margin": 0.0}),
    )


@dataclass(frozen=True)
class MeanPoolCandidate:
    """One setting of the mean-pool tuning grid."""

    lr: float
    steps: int
    l2: float
    """L2 weight on the label and input projections (``loss.l2``), the ridge of this model."""

    @property
    def name(self) -> str:
        return f"lr{self.lr:g}-steps{self.steps}-l2{self.l2:g}"


def mean_pool_grid(
    lrs: Sequence[float], steps: Sequence[int], l2s: Sequence[float]
) -> list[MeanPoolCandidate]:
    """Every (lr, steps, l2) combination, in that nesting order."""
    return [MeanPoolCandidate(lr, n, l2) for lr in lrs for n in steps for l2 in l2s]


@dataclass(frozen=True)
class MeanPoolFit:
    """The chosen candidate, its training result, and every candidate's selection value."""

    candidate: MeanPoolCandidate
    result: TrainResult
    model: LESA
    trials: dict[str, float]


def tune_mean_pool(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    label_vectors: np.ndarray,
    *,
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    trainer_cfg: TrainerConfig,
    candidates: Sequence[MeanPoolCandidate],
    checkpoint_root: str | Path,
    ks: Sequence[int] = (),
    metadata: dict[str, Any] | None = None,
    progress: Callable[[MeanPoolCandidate, dict[str, float]], None] | None = None,
) -> MeanPoolFit:
    """Train the mean-pool baseline for every candidate and keep the best on validation.

    ``train`` and ``val`` are pooled features (N, D) and labels (:func:`pool_regions`). Each
    candidate trains with ``trainer_cfg`` (seed, batch, validation schedule, selection rule,
    pseudo-unseen labels) except its own lr and steps, and with its L2 weight on both
    projections; its ``best.pt`` is chosen by the selection rule, and the candidate with the
    best selection value wins (the later on ties). Checkpoints go to
    ``checkpoint_root/<candidate>/``; the winner's model is returned loaded from its best (or,
    without validation, final) checkpoint, ready to score full region features. ``metadata``
    goes into every checkpoint, with the candidate's name. ``progress(candidate, record)``
    receives each candidate's trainer history records (the grid trains for minutes).
    """
    if not candidates:
        raise ValueError("tune_mean_pool needs at least one candidate")
    model_cfg, loss_cfg = mean_pool_setup(model_cfg, loss_cfg)
    train_source = TensorBatchSource(train[0][:, None, :], train[1])
    val_source = TensorBatchSource(val[0][:, None, :], val[1])
    trials: dict[str, float] = {}
    best: tuple[float, MeanPoolCandidate, TrainResult] | None = None
    for candidate in candidates:
        l2 = loss_cfg.l2.model_copy(
            update={"label_projection": candidate.l2, "input_projection": candidate.l2}
        )
        trainer_run = trainer_cfg.model_copy(
            update={"lr": candidate.lr, "steps": candidate.steps, "epochs": None}
        )
        with torch.random.fork_rng():
            torch.manual_seed(trainer_cfg.seed)
            model = LESA(train[0].shape[1], label_vectors.shape[1], model_cfg)
        trainer = Trainer(
            model,
            label_vectors,
            trainer_run,
            loss_cfg.model_copy(update={"l2": l2}),
            Path(checkpoint_root) / candidate.name,
            metadata={**(metadata or {}), "candidate": candidate.name},
            progress=None if progress is None else functools.partial(progress, candidate),
            val_ks=ks,
        )
        result = trainer.fit(train_source, val_source)
        value = result.best_metric if result.best_metric is not None else float("-inf")
        trials[candidate.name] = value
        if best is None or value >= best[0]:
            best = (value, candidate, result)
    assert best is not None
    _, candidate, result = best
    chosen, _ = load_model(result.best_checkpoint or result.final_checkpoint)
    return MeanPoolFit(candidate=candidate, result=result, model=chosen, trials=trials)
