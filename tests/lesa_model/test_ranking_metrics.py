"""Metrics against sklearn and hand-computed examples (REFERENCE.md section 3)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from lesa_model import metrics
from lesa_model.metrics import average_precision, evaluate_zero_shot, precision_recall_f1_at_k
from tests.helpers.reference_metrics import loop_prf_at_k


def _random_problem(seed: int, n: int = 200, c: int = 30, ties: bool = False):
    rng = np.random.default_rng(seed)
    if ties:
        scores = (rng.integers(-4, 4, size=(n, c)) * 0.5).astype(np.float32)
        scores[scores == 0] = -0.0
    else:
        scores = rng.standard_normal((n, c)).astype(np.float32)
    labels = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=(n, c), p=[0.6, 0.2, 0.2])
    labels[:, 0] = np.where(labels[:, 0] == 1, -1, labels[:, 0])  # a label without positives
    labels[:, 1] = 0  # a label nobody annotated
    labels[0] = np.where(labels[0] == 1, -1, labels[0])  # an image without positives
    return scores, labels


def _sklearn_ap(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    result = []
    for c in range(scores.shape[1]):
        annotated = labels[:, c] != 0
        truth = labels[annotated, c] == 1
        result.append(average_precision_score(truth, scores[annotated, c]) if truth.any() else 0.0)
    return np.array(result)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_average_precision_equals_sklearn(seed: int, ties: bool) -> None:
    scores, labels = _random_problem(seed, ties=ties)
    ap = average_precision(scores, labels)
    np.testing.assert_allclose(ap, _sklearn_ap(scores, labels), rtol=0, atol=1e-12)
    assert ap[0] == 0.0 and ap[1] == 0.0


def test_chunks_and_tiles_do_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    scores, labels = _random_problem(3)
    whole = average_precision(scores, labels), precision_recall_f1_at_k(scores, labels, 3)
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 7)
    monkeypatch.setattr(metrics, "TRANSPOSE_TILE_ROWS", 3)
    chunked = average_precision(scores, labels), precision_recall_f1_at_k(scores, labels, 3)
    np.testing.assert_array_equal(whole[0], chunked[0])
    assert whole[1] == chunked[1]


def test_inputs_are_not_modified_whatever_their_layout() -> None:
    scores, labels = _random_problem(6, c=8)
    expected = evaluate_zero_shot(scores, labels, [0, 1, 2, 3], [4, 5, 6, 7], ks=(2,))
    fortran = np.asfortranarray(scores)
    assert evaluate_zero_shot(fortran, labels, [0, 1, 2, 3], [4, 5, 6, 7], ks=(2,)) == expected
    np.testing.assert_array_equal(fortran, scores)
    view = scores[:, ::2]
    before = view.copy()
    average_precision(view, labels[:, ::2])
    np.testing.assert_array_equal(view, before)


def test_hand_computed_f1_at_k() -> None:
    scores = np.array(
        [
            [0.9, 0.8, 0.1, 0.3],  # top2 = {0, 1}; positives {0, 2}  -> 1 hit
            [0.2, 0.1, 0.7, 0.6],  # top2 = {2, 3}; positives {3} (2 not annotated) -> 1 hit
            [0.5, 0.4, 0.3, 0.2],  # no positives: stays in N
        ],
        dtype=np.float32,
    )
    labels = np.array([[1, -1, 1, -1], [-1, -1, 0, 1], [-1, -1, -1, -1]], dtype=np.int8)
    precision, recall, f1 = precision_recall_f1_at_k(scores, labels, 2)
    assert precision == pytest.approx(2 / 6)
    assert recall == pytest.approx(2 / 3)
    assert f1 == pytest.approx(2 * (1 / 3) * (2 / 3) / (1 / 3 + 2 / 3))


@pytest.mark.parametrize("k", [1, 3, 7])
def test_precision_recall_f1_equal_a_per_image_loop(k: int) -> None:
    scores, labels = _random_problem(7, n=60, c=12)
    assert precision_recall_f1_at_k(scores, labels, k) == pytest.approx(
        loop_prf_at_k(scores, labels, k), rel=1e-12
    )


def test_zero_shot_report_equals_column_slices() -> None:
    scores, labels = _random_problem(4, c=12)
    seen, unseen = [0, 2, 4, 6, 8, 10], [11, 3, 5]
    report = evaluate_zero_shot(scores, labels, seen, unseen, ks=(2, 3))
    both = sorted(seen + unseen)
    for name, columns in (("zsl", unseen), ("gzsl", both)):
        sub_scores, sub_labels = scores[:, columns], labels[:, columns]
        assert report[name]["mAP"] == pytest.approx(
            average_precision(sub_scores, sub_labels).mean()
        )
        for k in (2, 3):
            p, r, f1 = precision_recall_f1_at_k(sub_scores, sub_labels, k)
            assert report[name][f"P@{k}"] == pytest.approx(p)
            assert report[name][f"R@{k}"] == pytest.approx(r)
            assert report[name][f"F1@{k}"] == pytest.approx(f1)
        assert all(isinstance(value, float) for value in report[name].values())
        assert all(0.0 <= value <= 1.0 for value in report[name].values())


def test_bad_input_is_named() -> None:
    scores, labels = _random_problem(5, n=10, c=4)
    bad = scores.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        average_precision(bad, labels)
    with pytest.raises(ValueError, match="NaN or inf"):
        precision_recall_f1_at_k(bad, labels, 2)
    with pytest.raises(ValueError, match="NaN or inf"):
        evaluate_zero_shot(bad, labels, [0, 1], [2, 3], ks=(1,))
    with pytest.raises(ValueError, match="1, -1 or 0"):
        evaluate_zero_shot(scores, labels * 3, [0, 1], [2, 3], ks=(1,))
    with pytest.raises(ValueError, match="larger than the number of labels"):
        precision_recall_f1_at_k(scores, labels, 5)
    with pytest.raises(ValueError, match="shape"):
        average_precision(scores, labels[:, :3])
    with pytest.raises(ValueError, match="integers"):
        average_precision(scores, labels.astype(np.float32))
    with pytest.raises(ValueError, match="1, -1 or 0"):
        average_precision(scores, labels * 3)
    with pytest.raises(ValueError, match="share label indices"):
        evaluate_zero_shot(scores, labels, [0, 1], [1, 2])
    with pytest.raises(ValueError, match="unseen must be a non-empty"):
        evaluate_zero_shot(scores, labels, [0, 1], [])
    with pytest.raises(ValueError, match="outside"):
        evaluate_zero_shot(scores, labels, [0, 1], [7])


def test_more_bad_input_is_named() -> None:
    scores, labels = _random_problem(5, n=10, c=4)
    infinite = scores.copy()
    infinite[0, 0] = -np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        average_precision(infinite, labels)
    with pytest.raises(ValueError, match="scores must be floating point"):
        average_precision(scores.astype(np.int64), labels)
    with pytest.raises(ValueError, match="2-D"):
        average_precision(scores[:, 0], labels[:, 0])
    with pytest.raises(ValueError, match=r"no labels \(C = 0\)"):
        average_precision(scores[:, :0], labels[:, :0])
    with pytest.raises(ValueError, match=r"no images \(N = 0\)"):
        precision_recall_f1_at_k(scores[:0], labels[:0], 2)
    for k in (0, 2.0, True):
        with pytest.raises(ValueError, match="K must be a positive integer"):
            precision_recall_f1_at_k(scores, labels, k)
    with pytest.raises(ValueError, match=r"K = 3 is larger than the number of labels \(2\)"):
        evaluate_zero_shot(scores, labels, [0, 1], [2, 3], ks=(1, 3))
    with pytest.raises(ValueError, match="ks is empty"):
        evaluate_zero_shot(scores, labels, [0, 1], [2, 3], ks=())
    with pytest.raises(ValueError, match="duplicate"):
        evaluate_zero_shot(scores, labels, [0, 0], [2, 3])
