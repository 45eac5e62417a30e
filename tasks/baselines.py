"""Baselines scored on the same data as LESA, so the report can say what attention buys.

- ``mean-pool`` (Fast0Tag-style): the same model, trainer, losses and settings, except that the
  attention modules are replaced by the plain mean of the region features. Only the pooling
  differs, so the gap is attention's. The training stage trains it like LESA
  (``tasks.training.train_model(..., model_config=mean_pool_config(cfg.model))``).
- ``random``: uniformly random scores from a seeded generator; its mAP is about each label's
  positive rate, the floor any ranking must beat.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from prefect import task

from lesa_model.config import ModelConfig

BaselineName = Literal["mean-pool", "random"]


def mean_pool_config(model_cfg: ModelConfig) -> ModelConfig:
    """``model_cfg`` with the attention modules replaced by mean pooling, all else kept."""
    return model_cfg.model_copy(update={"pooling": "mean"})


def random_ranking(num_images: int, num_labels: int, *, seed: int = 0) -> np.ndarray:
    """Seeded uniform scores ``(num_images, num_labels)`` float32: a ranking that knows nothing."""
    if num_images < 1 or num_labels < 1:
        raise ValueError(
            f"random ranking needs at least one image and one label, got {num_images}x{num_labels}"
        )
    return np.random.default_rng(seed).random((num_images, num_labels), dtype=np.float32)


random_ranking_task = task(name="random-ranking")(random_ranking)
