"""Baselines scored on the same data as LESA, so the report can say what attention buys.

- ``mean-pool`` (Fast0Tag-style): the same model, trainer, losses and settings, except that the
  attention modules are replaced by the plain mean of the region features
  (``ModelConfig(pooling="mean")``). Only the pooling differs, so the gap is attention's.
- ``random``: uniformly random scores from a seeded generator; its mAP is about each label's
  positive rate, the floor any ranking must beat.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from prefect import task

from lesa_model.config import LossConfig, ModelConfig, TrainerConfig
from lesa_model.data import BatchSource
from lesa_model.inference import score
from lesa_model.model import LESA
from lesa_model.trainer import Trainer

BaselineName = Literal["mean-pool", "random"]


def mean_pool_config(model_cfg: ModelConfig) -> ModelConfig:
    """``model_cfg`` with the attention modules replaced by mean pooling, all else kept."""
    return model_cfg.model_copy(update={"pooling": "mean"})


def mean_pool_baseline(
    train: BatchSource,
    val: BatchSource | None,
    test: BatchSource,
    *,
    train_label_vectors: np.ndarray,
    test_label_vectors: np.ndarray,
    model_cfg: ModelConfig,
    trainer_cfg: TrainerConfig,
    loss_cfg: LossConfig,
    checkpoint_dir: str | Path,
    grid: tuple[int, int] | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Train the mean-pool model like LESA and return its test scores ``(N, C_test)``.

    ``train_label_vectors`` are the seen labels' vectors (the columns of ``train``'s labels);
    ``test_label_vectors`` the labels to rank on ``test`` (seen and unseen). The feature size is
    read from the first training batch.
    """
    feature_dim = _feature_dim(train)
    train_vectors = _as_tensor(train_label_vectors, "train_label_vectors")
    model = LESA(feature_dim, train_vectors.shape[1], mean_pool_config(model_cfg), grid=grid)
    trainer = Trainer(model, train_vectors, trainer_cfg, loss_cfg, Path(checkpoint_dir))
    trainer.fit(train, val)
    return score(
        model, test, _as_tensor(test_label_vectors, "test_label_vectors"), batch_size=batch_size
    )


def random_ranking(num_images: int, num_labels: int, *, seed: int = 0) -> np.ndarray:
    """Seeded uniform scores ``(num_images, num_labels)`` float32: a ranking that knows nothing."""
    if num_images < 1 or num_labels < 1:
        raise ValueError(
            f"random ranking needs at least one image and one label, got {num_images}x{num_labels}"
        )
    return np.random.default_rng(seed).random((num_images, num_labels), dtype=np.float32)


@task(name="mean-pool-baseline")
def mean_pool_baseline_task(
    train: BatchSource,
    val: BatchSource | None,
    test: BatchSource,
    *,
    train_label_vectors: np.ndarray,
    test_label_vectors: np.ndarray,
    model_cfg: ModelConfig,
    trainer_cfg: TrainerConfig,
    loss_cfg: LossConfig,
    checkpoint_dir: str | Path,
    grid: tuple[int, int] | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Prefect wrapper of :func:`mean_pool_baseline`."""
    return mean_pool_baseline(
        train,
        val,
        test,
        train_label_vectors=train_label_vectors,
        test_label_vectors=test_label_vectors,
        model_cfg=model_cfg,
        trainer_cfg=trainer_cfg,
        loss_cfg=loss_cfg,
        checkpoint_dir=checkpoint_dir,
        grid=grid,
        batch_size=batch_size,
    )


@task(name="random-ranking")
def random_ranking_task(num_images: int, num_labels: int, *, seed: int = 0) -> np.ndarray:
    """Prefect wrapper of :func:`random_ranking`."""
    return random_ranking(num_images, num_labels, seed=seed)


def _feature_dim(source: BatchSource) -> int:
    """D of a batch source's features, from its first batch (sources do not state it)."""
    if source.num_images < 1:
        raise ValueError("the training source holds no images")
    features, _ = next(iter(source.batches(1, shuffle=False, seed=0, epoch=0)))
    return int(features.shape[-1])


def _as_tensor(vectors: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    if tensor.ndim != 2 or tensor.shape[0] < 1:
        raise ValueError(
            f"{name} must be a non-empty (C, d) array, got shape {tuple(tensor.shape)}"
        )
    return tensor
