"""Calibrated thresholds against a brute-force search scored by sklearn's f1_score."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_fscore_support

from lesa_model.calibration import (
    Thresholds,
    best_threshold,
    fit_thresholds,
    precision_recall_f1_at_threshold,
)


def _problem(seed: int, ties: bool, n: int = 120, c: int = 12):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((n, c))
    if ties:
        scores = np.round(scores * 2) / 2
    labels = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=(n, c), p=[0.6, 0.15, 0.25])
    labels[:, 0] = np.where(labels[:, 0] == 1, -1, labels[:, 0])  # no positive
    labels[:, 1] = -1
    labels[:2, 1] = 1  # two positives: below MIN_POSITIVES
    return scores, labels


def _brute_force(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Every distinct score as threshold, F1 by sklearn; the highest threshold among the best."""
    best = (-np.inf, -1.0)
    for candidate in np.unique(scores):
        f1 = f1_score(truth, scores >= candidate, zero_division=0.0)
        if f1 > best[1] + 1e-12 or (abs(f1 - best[1]) <= 1e-12 and candidate > best[0]):
            best = (float(candidate), float(f1))
    return best


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_label_threshold_is_the_brute_force_f1_maximum(seed: int, ties: bool) -> None:
    scores, labels = _problem(seed, ties)
    fitted = fit_thresholds(scores, labels, [f"l{c}" for c in range(scores.shape[1])])
    for column in range(2, scores.shape[1]):
        known = labels[:, column] != 0
        expected = _brute_force(scores[known, column], labels[known, column] == 1)
        assert fitted.fitted[column]
        assert fitted.values[column] == pytest.approx(expected[0])
        achieved = f1_score(
            labels[known, column] == 1, scores[known, column] >= fitted.values[column]
        )
        assert achieved == pytest.approx(expected[1])


def test_labels_with_too_few_positives_take_the_global_micro_f1_threshold() -> None:
    scores, labels = _problem(3, ties=False)
    fitted = fit_thresholds(scores, labels, [f"l{c}" for c in range(scores.shape[1])])
    known = labels != 0
    expected, _ = _brute_force(scores[known], labels[known] == 1)
    assert fitted.global_threshold == pytest.approx(expected)
    assert fitted.fitted[:2] == [False, False]
    assert fitted.values[:2] == [fitted.global_threshold] * 2
    unseen = fitted.for_labels(["l5", "never-seen"])
    assert unseen[0] == pytest.approx(fitted.values[5])
    assert unseen[1] == pytest.approx(fitted.global_threshold)


def test_hand_computed_threshold() -> None:
    # scores 0.9 0.8 0.7 0.1 with truth 1 0 1 0: cut at 0.7 -> TP 2, FP 1, F1 = 4/5.
    assert best_threshold(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == (
        pytest.approx(0.7),
        pytest.approx(0.8),
    )
    with pytest.raises(ValueError, match="no positive"):
        best_threshold(np.array([0.1, 0.2]), np.array([0, 0]))


def test_threshold_prf_equals_sklearn_micro_on_annotated_entries() -> None:
    scores, labels = _problem(4, ties=True)
    thresholds = np.linspace(-0.5, 0.5, scores.shape[1])
    p, r, f1 = precision_recall_f1_at_threshold(scores, labels, thresholds)
    known = labels != 0
    predicted = np.broadcast_to(scores >= thresholds, scores.shape)
    expected = precision_recall_fscore_support(
        (labels == 1)[known], predicted[known], average="binary"
    )
    assert (p, r, f1) == pytest.approx(expected[:3])


def test_thresholds_round_trip_through_their_document() -> None:
    scores, labels = _problem(5, ties=False)
    fitted = fit_thresholds(scores, labels, [f"l{c}" for c in range(scores.shape[1])])
    assert Thresholds.from_document(fitted.document()) == fitted
    with pytest.raises(ValueError, match="not a thresholds document"):
        Thresholds.from_document({"format": "other"})
