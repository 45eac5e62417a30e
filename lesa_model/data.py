"""What the trainer and inference consume: batches of region features and labels.

Any object with ``num_images`` and ``batches(...)`` is a :class:`BatchSource`, so the trainer can
stream from memory (:class:`TensorBatchSource`) or from HDF5 shards
(``tasks.feature_reader.FeatureBatches``) alike. The shuffled order is a pure function of
(seed, epoch) via :func:`epoch_order`, which is what makes an interrupted run resumable exactly:
the trainer replays the epoch's order and skips the batches it already consumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from lesa_model.validation import check_label_values

Batch = tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]
"""(features float (B, R, D), labels int8 (B, C) in {1, -1, 0}); numpy or torch."""


@runtime_checkable
class BatchSource(Protocol):
    """A dataset of (region features, labels) that yields batches in a reproducible order."""

    @property
    def num_images(self) -> int:
        """Number of images the source holds."""
        ...

    def batches(
        self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0
    ) -> Iterator[Batch]:
        """Yield consecutive batches covering every image once, the last one possibly smaller.

        With ``shuffle`` the images come in ``epoch_order(num_images, seed, epoch)``; without it
        in storage order (what inference relies on to align scores with image ids). A
        ``batch_size`` below 1 is a ``ValueError``.
        """
        ...


def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled image order of one epoch: the same (seed, epoch) always gives the same order."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def batch_count(num_images: int, batch_size: int) -> int:
    """Batches per epoch (the last one may be partial)."""
    return -(-num_images // batch_size)


class TensorBatchSource:
    """In-memory :class:`BatchSource` over a features tensor (N, R, D) and labels (N, C)."""

    def __init__(self, features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor):
        features = torch.as_tensor(features)
        labels = torch.as_tensor(labels)
        if features.ndim != 3:
            raise ValueError(f"features must be (N, R, D), got shape {tuple(features.shape)}")
        if not features.is_floating_point():
            raise ValueError(f"features must be floating point, got dtype {features.dtype}")
        if labels.ndim != 2:
            raise ValueError(f"labels must be (N, C), got shape {tuple(labels.shape)}")
        if labels.shape[0] != features.shape[0]:
            raise ValueError(
                f"features hold {features.shape[0]} images but labels {labels.shape[0]}"
            )
        check_label_values(labels)
        self.features = features
        self.labels = labels.to(torch.int8)

    @property
    def num_images(self) -> int:
        return int(self.features.shape[0])

    def batches(
        self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        order = (
            torch.from_numpy(epoch_order(self.num_images, seed, epoch))
            if shuffle
            else torch.arange(self.num_images)
        )
        for start in range(0, self.num_images, batch_size):
            index = order[start : start + batch_size]
            yield self.features[index], self.labels[index]
