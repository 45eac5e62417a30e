"""Model selection that serves zero-shot: pseudo-unseen labels and the validation metrics.

Selecting ``best.pt`` on seen-label validation F1 picks the checkpoint that fits the seen labels
best, which is often not the one that transfers best to labels no image carried (on the embedded
default, the last and worst for ZSL). Validation cannot score the real unseen labels (no
training-side image may carry them), so a seeded share of the *seen* labels is held out as
pseudo-unseen: their annotations are removed from every training batch (set to 0, "not
annotated", which takes part in no loss term), and on the validation split they are ranked
zero-shot, exactly as the unseen labels will be on test. ``TrainerConfig.select = "mix"`` then
keeps the checkpoint with the best ``w * pseudo-unseen mAP + (1 - w) * seen metric``.

Everything here is a pure function of its arguments (the held-out labels of the seed), so an
interrupted run resumes with the same split, and a baseline tuned with the same config meets the
same held-out labels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from lesa_model.config import TrainerConfig
from lesa_model.data import Batch, BatchSource
from lesa_model.metrics import average_precision, precision_recall_f1_at_k


def holdout_columns(num_labels: int, share: float, seed: int) -> np.ndarray:
    """Sorted indices of the ``round(share * num_labels)`` pseudo-unseen labels of ``seed``.

    At least one label is held out when ``share > 0`` and at least one is kept for training;
    ``share == 0`` holds out nothing.
    """
    if not 0 <= share < 1:
        raise ValueError(f"holdout share must be in [0, 1), got {share}")
    if share == 0:
        return np.zeros(0, dtype=np.int64)
    if num_labels < 2:
        raise ValueError(
            f"holding out pseudo-unseen labels needs at least 2 training labels, got {num_labels}"
        )
    count = min(max(1, round(share * num_labels)), num_labels - 1)
    chosen = np.random.default_rng([seed, num_labels]).choice(num_labels, count, replace=False)
    return np.sort(chosen).astype(np.int64)


def kept_columns(num_labels: int, holdout: np.ndarray) -> np.ndarray:
    """The training labels that are not held out, in column order."""
    return np.setdiff1d(np.arange(num_labels), holdout).astype(np.int64)


class HoldoutBatches:
    """A :class:`BatchSource` whose held-out label columns read 0 (not annotated) in every batch.

    The images stay (they carry other labels); only the annotations of the pseudo-unseen labels
    are removed, so no loss term sees them.
    """

    def __init__(self, source: BatchSource, holdout: np.ndarray) -> None:
        self.source = source
        self.holdout = torch.as_tensor(np.asarray(holdout, dtype=np.int64))

    @property
    def num_images(self) -> int:
        return self.source.num_images

    def batches(
        self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0
    ) -> Iterator[Batch]:
        for features, labels in self.source.batches(
            batch_size, shuffle=shuffle, seed=seed, epoch=epoch
        ):
            labels = torch.as_tensor(labels).clone()
            labels[:, self.holdout] = 0
            yield features, labels


def validation_metrics(
    scores: np.ndarray, labels: np.ndarray, holdout: np.ndarray, ks: Sequence[int]
) -> dict[str, float]:
    """Validation mAP and F1@K on the kept labels, and mAP of the pseudo-unseen ones.

    Keys: ``val_mAP``, ``val_F1@k`` for each k, and ``val_holdout_mAP`` when labels are held out
    (each label's AP depends on its own column only, so ranking the held-out labels "alone" is
    their plain AP on the validation images).
    """
    if labels.shape != scores.shape:
        raise ValueError(f"validation labels have shape {labels.shape}, the scores {scores.shape}")
    kept = kept_columns(scores.shape[1], holdout)
    seen_scores, seen_labels = scores[:, kept], labels[:, kept]
    metrics = {"val_mAP": float(average_precision(seen_scores, seen_labels).mean())}
    for k in ks:
        metrics[f"val_F1@{k}"] = precision_recall_f1_at_k(seen_scores, seen_labels, k)[2]
    if holdout.size:
        metrics["val_holdout_mAP"] = float(
            average_precision(scores[:, holdout], labels[:, holdout]).mean()
        )
    return metrics


def selection_value(metrics: dict[str, float], cfg: TrainerConfig) -> float:
    """The number that keeps ``best.pt`` and feeds the schedule: ``cfg.select`` of ``metrics``."""
    if cfg.select != "mix":
        return metrics[f"val_{cfg.select}"]
    weight = cfg.select_weight
    return weight * metrics["val_holdout_mAP"] + (1 - weight) * metrics[f"val_{cfg.select_seen}"]
