"""Using a trained model: scores for any label set, top-K tags, and per-label attention.

Labels enter only through their word vectors, so the same calls score seen labels, the unseen
labels of the zero-shot split, or labels nobody has trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lesa_model.data import BatchSource, batch_count
from lesa_model.model import LESA
from lesa_model.validation import as_float_features

SCORE_BATCH = 256
"""Images scored per forward pass: only speed and memory depend on it."""


def _model_device(model: LESA) -> torch.device:
    return next(model.parameters()).device


def _as_label_vectors(
    label_vectors: np.ndarray | torch.Tensor, device: torch.device
) -> torch.Tensor:
    return torch.as_tensor(label_vectors, dtype=torch.float32, device=device)


def score_with_labels(
    model: LESA,
    source: BatchSource,
    label_vectors: np.ndarray | torch.Tensor,
    batch_size: int = SCORE_BATCH,
    *,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N, C) float32 and the source's labels (N, C') int8, in the source's order.

    ``batch_size`` is checked by the source (:meth:`lesa_model.data.BatchSource.batches`).
    """
    device = _model_device(model)
    vectors = _as_label_vectors(label_vectors, device)
    total = source.num_images
    scores: np.ndarray | None = None
    labels: np.ndarray | None = None
    filled = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batches = source.batches(batch_size, shuffle=False, seed=0, epoch=0)
            bar = tqdm(
                batches,
                total=batch_count(total, batch_size),
                desc="scoring",
                unit="batch",
                disable=None if progress else True,
            )
            for features, batch_labels in bar:
                features = as_float_features(features, device)
                if filled == 0:  # once: the source validated what it holds
                    model.check_inputs(features, vectors)
                batch_scores = model(features, vectors).scores.float().cpu().numpy()
                batch_labels = np.asarray(torch.as_tensor(batch_labels).cpu(), dtype=np.int8)
                if scores is None or labels is None:
                    scores = np.empty((total, batch_scores.shape[1]), dtype=np.float32)
                    labels = np.empty((total, batch_labels.shape[1]), dtype=np.int8)
                end = filled + batch_scores.shape[0]
                if end > total:
                    raise ValueError(f"source yielded more than its num_images ({total}) images")
                scores[filled:end] = batch_scores
                labels[filled:end] = batch_labels
                filled = end
    finally:
        model.train(was_training)
    if scores is None or labels is None or filled != total:
        raise ValueError(f"source yielded {filled} images but reports num_images = {total}")
    return scores, labels


def score(
    model: LESA,
    source: BatchSource,
    label_vectors: np.ndarray | torch.Tensor,
    batch_size: int = SCORE_BATCH,
) -> np.ndarray:
    """Scores (N, C) float32 of every image of ``source`` (in order) for every label vector."""
    return score_with_labels(model, source, label_vectors, batch_size)[0]


def top_k(scores: np.ndarray, label_names: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """Each image's ``k`` best labels as (name, score), best first."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (N, C), got shape {scores.shape}")
    if len(label_names) != scores.shape[1]:
        raise ValueError(f"{len(label_names)} label names for {scores.shape[1]} score columns")
    is_integer = isinstance(k, int | np.integer) and not isinstance(k, bool)
    if not is_integer or not 1 <= k <= scores.shape[1]:
        raise ValueError(
            f"k must be an integer between 1 and the number of labels ({scores.shape[1]}), "
            f"got {k!r}"
        )
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1, kind="stable")
    best = np.take_along_axis(best, order, axis=1)
    return [
        [(label_names[column], float(row_scores[column])) for column in row]
        for row, row_scores in zip(best, scores, strict=True)
    ]


def select_tags(
    scores: np.ndarray, top_k: int | None, thresholds: np.ndarray | float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each image's tags: the ``top_k`` best columns, or those at or above their threshold.

    Returns ``top`` (N, K) column indices, best first (ties: lower column first), and ``kept``
    (N, K) bool: which of them are tags. Without thresholds every one of the ``top_k`` is kept;
    with thresholds (one per column, or one for all) K is ``top_k`` (a cap) or every column.
    """
    scores = np.asarray(scores)
    width = scores.shape[1] if top_k is None else top_k
    if not 1 <= width <= scores.shape[1]:
        raise ValueError(f"top_k must be between 1 and the number of labels ({scores.shape[1]})")
    top = np.argsort(-scores, axis=1, kind="stable")[:, :width]
    if thresholds is None:
        if top_k is None:
            raise ValueError("give top_k, thresholds or both")
        return top, np.ones(top.shape, dtype=bool)
    cut = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (scores.shape[1],))
    kept = np.take_along_axis(scores, top, axis=1) >= cut[top]
    return top, kept


def attention_for(
    model: LESA,
    features: np.ndarray | torch.Tensor,
    label_vectors: np.ndarray | torch.Tensor,
) -> tuple[np.ndarray, np.ndarray]:
    """Which module scores each label and that module's attention over the regions.

    ``features`` is one image (R, D) or a batch (B, R, D). Returns ``selected`` (B, C) int64 and
    ``weights`` (B, C, R) float32 (each row sums to 1): the map to draw for label c.
    """
    device = _model_device(model)
    features = as_float_features(features, device)
    if features.ndim == 2:
        features = features.unsqueeze(0)
    vectors = _as_label_vectors(label_vectors, device)
    model.check_inputs(features, vectors)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            output = model(features, vectors)
    finally:
        model.train(was_training)
    rows = torch.arange(output.attention.shape[0], device=device)[:, None]
    weights = output.attention[rows, output.selected]
    return output.selected.cpu().numpy(), weights.float().cpu().numpy()
