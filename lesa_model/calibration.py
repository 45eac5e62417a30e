"""Per-label score thresholds fitted on validation, and the P/R/F1 they give.

Top-K tags every image with exactly K labels whatever its content; a threshold tags what scores
high enough. LESA's scores are not probabilities and their scale differs between labels, so one
threshold per label is fitted where there is evidence for it:

- a label with at least ``min_positives`` positive validation images gets the threshold that
  maximises its own F1 on validation (predict positive when ``score >= threshold``);
- every other label (too few positives, an unseen label, a label never seen before) gets the
  **global threshold**: the one value that maximises micro-F1 over all annotated validation
  entries pooled (every (image, label) pair with a +1 or -1 annotation).

Annotations read 0 (unknown) are left out of every count, as in the ranking metrics. Among
equally good thresholds the highest is kept (fewer tags for the same F1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lesa_model.validation import check_label_values

MIN_POSITIVES = 3
"""Positive validation images a label needs for a threshold of its own."""
FORMAT = "lesa-thresholds/1"


@dataclass(frozen=True)
class Thresholds:
    """Fitted thresholds: one per known label plus the global fallback."""

    labels: list[str]
    values: list[float]
    """Threshold of each label in ``labels`` (the global one where ``fitted`` is False)."""
    fitted: list[bool]
    """Whether the label had enough positives for a threshold of its own."""
    global_threshold: float
    min_positives: int = MIN_POSITIVES

    def for_labels(self, names: Sequence[str]) -> np.ndarray:
        """(C,) thresholds of ``names``: a fitted label's own, the global one for any other."""
        own = {
            label: value
            for label, value, fitted in zip(self.labels, self.values, self.fitted, strict=True)
            if fitted
        }
        return np.array([own.get(name, self.global_threshold) for name in names], np.float32)

    def document(self) -> dict[str, Any]:
        """JSON form (stored with the checkpoint and in the model card)."""
        return {
            "format": FORMAT,
            "rule": (
                f"per-label F1-maximising threshold on validation for labels with >= "
                f"{self.min_positives} positives; otherwise the global threshold maximising "
                "micro-F1 over all annotated validation entries"
            ),
            "min_positives": self.min_positives,
            "global_threshold": self.global_threshold,
            "labels": [
                {"label": label, "threshold": value, "fitted": fitted}
                for label, value, fitted in zip(self.labels, self.values, self.fitted, strict=True)
            ],
        }

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> Thresholds:
        """Read :meth:`document`'s form back; a wrong format is an error naming it."""
        if document.get("format") != FORMAT:
            raise ValueError(f"not a thresholds document ({FORMAT}): {document.get('format')!r}")
        rows = document["labels"]
        return cls(
            labels=[str(row["label"]) for row in rows],
            values=[float(row["threshold"]) for row in rows],
            fitted=[bool(row["fitted"]) for row in rows],
            global_threshold=float(document["global_threshold"]),
            min_positives=int(document["min_positives"]),
        )


def best_threshold(scores: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """The threshold maximising F1 of ``score >= threshold`` against ``positive``, and that F1.

    Sorting once gives every cut: predicting the top ``n`` positive has ``TP = cumsum`` and
    ``F1 = 2 TP / (n + P)``; only cuts between distinct scores are real thresholds.

    Raises:
        ValueError: when there is no positive (F1 is 0 for every threshold).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    total = int(positive.sum())
    if total == 0:
        raise ValueError("no positive example: no threshold maximises F1")
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    true_positives = np.cumsum(positive[order])
    predicted = np.arange(1, ranked.size + 1)
    f1 = 2.0 * true_positives / (predicted + total)
    last_of_tie = np.append(ranked[1:] < ranked[:-1], True)
    f1 = np.where(last_of_tie, f1, -1.0)
    best = int(np.argmax(f1))
    return float(ranked[best]), float(f1[best])


def fit_thresholds(
    scores: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    *,
    min_positives: int = MIN_POSITIVES,
) -> Thresholds:
    """Fit the thresholds of ``names`` (the columns of ``scores``) on validation ``labels``.

    Args:
        scores: (N, C) scores of the validation images.
        labels: (N, C) annotations in {1, -1, 0} (0: unknown, ignored).
        names: the C label names.
        min_positives: positives a label needs for its own threshold.

    Raises:
        ValueError: shapes that differ, or no positive annotation at all.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 2 or scores.shape[1] != len(names):
        raise ValueError(
            f"scores {scores.shape}, labels {labels.shape} and {len(names)} names do not match"
        )
    check_label_values(labels)
    known = labels != 0
    global_threshold, _ = best_threshold(scores[known], labels[known] == 1)
    values, fitted = [], []
    for column in range(scores.shape[1]):
        mask = known[:, column]
        positives = int((labels[mask, column] == 1).sum())
        if positives >= min_positives:
            value, _ = best_threshold(scores[mask, column], labels[mask, column] == 1)
            values.append(value)
            fitted.append(True)
        else:
            values.append(global_threshold)
            fitted.append(False)
    return Thresholds(list(names), values, fitted, global_threshold, min_positives)


def precision_recall_f1_at_threshold(
    scores: np.ndarray, labels: np.ndarray, thresholds: np.ndarray | float
) -> tuple[float, float, float]:
    """Micro precision, recall and F1 of tagging ``score >= threshold`` (per column or one).

    Counts run over the annotated entries (labels +1 / -1); a split with no prediction has
    precision 0, one with no positive recall 0.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    check_label_values(labels)
    predicted = scores >= np.asarray(thresholds, dtype=np.float64)
    known = labels != 0
    positive = labels == 1
    true_positives = int((predicted & positive).sum())
    predicted_count = int((predicted & known).sum())
    positive_count = int(positive.sum())
    precision = true_positives / predicted_count if predicted_count else 0.0
    recall = true_positives / positive_count if positive_count else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1
