"""Multi-label ranking metrics with the authors' release semantics (REFERENCE.md section 3).

Scores are (N, C) floats, labels (N, C) integers in {1, -1, 0}; 0 means "not annotated" and such
entries are ignored. Everything is computed in chunks (columns for AP, rows for top-K), so the
NUS-WIDE test set (107,859 x 1,006 float32, 434 MB) is evaluated with a working set of about a
hundred MB on top of the inputs, and no chunk ever copies the whole score matrix.

AP matches ``sklearn.metrics.average_precision_score`` on the annotated images of each label,
ties included, from one value sort per column (no argsort) and binary searches per positive.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from lesa_model.validation import check_label_values

CHUNK_ELEMENTS = 1 << 23
"""Elements of the score matrix processed at once (bounds the working memory)."""
TRANSPOSE_TILE_ROWS = 256
"""Rows copied at a time when a column block is transposed: the tile stays in cache, which makes
the copy ~4x faster than one strided pass over the whole column block."""


def _check_inputs(scores: np.ndarray, labels: np.ndarray) -> None:
    if not isinstance(scores, np.ndarray) or not isinstance(labels, np.ndarray):
        raise ValueError("scores and labels must be numpy arrays")
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (images, labels), got shape {scores.shape}")
    if labels.shape != scores.shape:
        raise ValueError(f"labels have shape {labels.shape}, scores have shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        raise ValueError(f"scores must be floating point, got dtype {scores.dtype}")
    if scores.shape[0] == 0:
        raise ValueError("scores have no images (N = 0)")
    if scores.shape[1] == 0:
        raise ValueError("scores have no labels (C = 0)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers in {{1, -1, 0}}, got dtype {labels.dtype}")


def _check_columns(columns: Sequence[int] | np.ndarray, num_labels: int, name: str) -> np.ndarray:
    index = np.asarray(columns)
    if index.ndim != 1 or index.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of label indices")
    if not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"{name} must hold integer label indices, got dtype {index.dtype}")
    if index.min() < 0 or index.max() >= num_labels:
        raise ValueError(f"{name} holds indices outside [0, {num_labels})")
    if np.unique(index).size != index.size:
        raise ValueError(f"{name} holds duplicate label indices")
    return index.astype(np.intp)


def _transposed(matrix: np.ndarray, chunk: slice | np.ndarray, width: int) -> np.ndarray:
    """A C-ordered (width, N) copy of ``matrix[:, chunk]``, made tile by tile."""
    out = np.empty((width, matrix.shape[0]), dtype=matrix.dtype)
    for start in range(0, matrix.shape[0], TRANSPOSE_TILE_ROWS):
        stop = start + TRANSPOSE_TILE_ROWS
        out[:, start:stop] = matrix[start:stop, chunk].T
    return out


def _column_blocks(
    scores: np.ndarray, labels: np.ndarray, columns: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(c, N) scores and labels for successive groups of the given columns (always copies: the
    scores are sorted in place)."""
    step = max(1, CHUNK_ELEMENTS // max(1, scores.shape[0]))
    for start in range(0, columns.size, step):
        chunk = columns[start : start + step]
        width = chunk.size
        if chunk[-1] - chunk[0] == width - 1 and (np.diff(chunk) == 1).all():
            chunk = slice(int(chunk[0]), int(chunk[-1]) + 1)  # basic slicing: no gather
        block = _transposed(scores, chunk, width)
        if not np.isfinite(block).all():
            raise ValueError("scores contain NaN or inf")
        label_block = _transposed(labels, chunk, width)
        check_label_values(label_block)
        yield block, label_block


def _average_precision_block(block: np.ndarray, label_block: np.ndarray) -> np.ndarray:
    """AP of each row of a (c, N) block, sklearn-exact (tied scores form one threshold).

    With the images sorted by descending score, AP = mean over positives p of
    ``#positives(score >= s_p) / #annotated(score >= s_p)``: the precision at the end of p's
    group of tied scores. Both counts are binary searches in sorted scores, so only the
    positives are visited after one (SIMD) sort of each column; unannotated images are moved
    below every score (-inf) so they are never counted.
    """
    positive = label_block == 1
    counts = positive.sum(axis=1)
    positive_scores = np.split(block[positive], np.cumsum(counts)[:-1])
    block[label_block == 0] = -np.inf
    block.sort(axis=1)
    result = np.zeros(block.shape[0])
    for row, scores in enumerate(positive_scores):
        if scores.size == 0:
            continue
        scores.sort()
        ranked_above = block.shape[1] - np.searchsorted(block[row], scores, side="left")
        positives_above = scores.size - np.searchsorted(scores, scores, side="left")
        result[row] = np.mean(positives_above / ranked_above)
    return result


def _average_precision(scores: np.ndarray, labels: np.ndarray, columns: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [_average_precision_block(b, lb) for b, lb in _column_blocks(scores, labels, columns)]
    )


def average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AP of every label (C,), as fractions in [0, 1].

    Only images annotated for the label (+1 or -1) take part; a label without a positive image
    gets AP 0 (and still counts when the caller averages into mAP).
    """
    _check_inputs(scores, labels)
    return _average_precision(scores, labels, np.arange(scores.shape[1]))


def _top_indices(block: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's ``k`` largest scores, best first (torch.topk, ~2x numpy)."""
    if not block.flags.writeable or not block.flags.c_contiguous or block.dtype == np.float16:
        block = np.array(block, dtype=np.promote_types(block.dtype, np.float32), order="C")
    return torch.from_numpy(block).topk(k, dim=1).indices.numpy()


def _top_k_hits(
    scores: np.ndarray,
    labels: np.ndarray,
    columns: np.ndarray,
    ks: Sequence[int],
    *,
    validate: bool = True,
) -> tuple[dict[int, int], int]:
    """True positives among each image's top k labels, for every k, and the number of +1 entries."""
    k_max = max(ks)
    whole = columns.size == scores.shape[1] and bool((columns == np.arange(columns.size)).all())
    rows = max(1, CHUNK_ELEMENTS // columns.size)
    hits = np.zeros(k_max, dtype=np.int64)
    positives = 0
    for start in range(0, scores.shape[0], rows):
        block = scores[start : start + rows]
        label_block = labels[start : start + rows]
        if not whole:
            block, label_block = block[:, columns], label_block[:, columns]
        if validate:
            if not np.isfinite(block).all():
                raise ValueError("scores contain NaN or inf")
            check_label_values(label_block)
        top = _top_indices(block, k_max)
        hits += (np.take_along_axis(label_block, top, axis=1) == 1).sum(axis=0)
        positives += int((label_block == 1).sum())
    cumulative = np.cumsum(hits)
    return {k: int(cumulative[k - 1]) for k in ks}, positives


def _check_ks(ks: Sequence[int], num_labels: int) -> None:
    if len(ks) == 0:
        raise ValueError("ks is empty: give at least one K")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"K must be a positive integer, got {k!r}")
        if k > num_labels:
            raise ValueError(f"K = {k} is larger than the number of labels ({num_labels})")


def _precision_recall_f1(
    true_pos: int, num_images: int, k: int, positives: int
) -> tuple[float, float, float]:
    precision = true_pos / (num_images * k) if num_images else 0.0
    recall = true_pos / positives if positives else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return float(precision), float(recall), float(f1)


def precision_recall_f1_at_k(
    scores: np.ndarray, labels: np.ndarray, k: int
) -> tuple[float, float, float]:
    """Overall (micro) precision, recall and F1 of each image's top ``k`` labels.

    ``P = TP / (N k)``, ``R = TP / #(+1 entries)``; images without a positive label stay in N.
    """
    _check_inputs(scores, labels)
    _check_ks([k], scores.shape[1])
    columns = np.arange(scores.shape[1])
    hits, positives = _top_k_hits(scores, labels, columns, [k])
    return _precision_recall_f1(hits[k], scores.shape[0], k, positives)


def _ranking_report(
    scores: np.ndarray,
    labels: np.ndarray,
    columns: np.ndarray,
    ks: Sequence[int],
    label_ap: np.ndarray,
) -> dict[str, float]:
    report = {"mAP": float(label_ap.mean())}
    # The AP pass has already validated every column these top-K passes read.
    hits, positives = _top_k_hits(scores, labels, columns, ks, validate=False)
    for k in ks:
        precision, recall, f1 = _precision_recall_f1(hits[k], scores.shape[0], k, positives)
        report |= {f"P@{k}": precision, f"R@{k}": recall, f"F1@{k}": f1}
    return report


def evaluate_zero_shot(
    scores: np.ndarray,
    labels: np.ndarray,
    seen: Sequence[int] | np.ndarray,
    unseen: Sequence[int] | np.ndarray,
    ks: Sequence[int] = (3, 5),
) -> dict[str, dict[str, float]]:
    """ZSL (unseen labels ranked alone) and GZSL (seen and unseen together) metrics.

    ``seen`` and ``unseen`` are disjoint column indices into ``scores``. Returns
    ``{"zsl": {"mAP", "P@k", "R@k", "F1@k" for k in ks}, "gzsl": {...}}`` as fractions in [0, 1].
    """
    _check_inputs(scores, labels)
    seen_index = _check_columns(seen, scores.shape[1], "seen")
    unseen_index = _check_columns(unseen, scores.shape[1], "unseen")
    overlap = np.intersect1d(seen_index, unseen_index)
    if overlap.size:
        raise ValueError(f"seen and unseen share label indices: {overlap[:10].tolist()}")
    both = np.sort(np.concatenate([seen_index, unseen_index]))
    _check_ks(ks, unseen_index.size)
    # A label's AP depends on its own column only: the ZSL APs are a subset of the GZSL ones.
    ap = _average_precision(scores, labels, both)
    return {
        "zsl": _ranking_report(scores, labels, unseen_index, ks, ap[np.isin(both, unseen_index)]),
        "gzsl": _ranking_report(scores, labels, both, ks, ap),
    }
