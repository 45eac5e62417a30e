"""Ranking metrics written out the slow, obvious way, as independent references for tests."""

from __future__ import annotations

import numpy as np


def loop_prf_at_k(scores: np.ndarray, labels: np.ndarray, k: int) -> tuple[float, float, float]:
    """Overall precision, recall and F1 at ``k`` (REFERENCE.md section 3), one image at a time.

    An image's top ``k`` are its highest-scoring columns (random scores: no ties at the K-th);
    a hit is a top column whose label is 1. F1 is 0 without any hit.
    """
    hits = 0
    for row, truth in zip(scores, labels, strict=True):
        top = sorted(range(len(row)), key=lambda column: -row[column])[:k]
        hits += sum(1 for column in top if truth[column] == 1)
    precision = hits / (len(scores) * k)
    recall = hits / int((labels == 1).sum())
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return precision, recall, f1
