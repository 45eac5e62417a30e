"""Pseudo-unseen model selection: the held-out split, what training sees, and the mix rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from lesa_model.config import ModelConfig, TrainerConfig
from lesa_model.data import TensorBatchSource
from lesa_model.model import LESA
from lesa_model.selection import (
    HoldoutBatches,
    holdout_columns,
    kept_columns,
    selection_value,
    validation_metrics,
)
from lesa_model.trainer import Trainer

N, R, D, C, d = 48, 6, 12, 10, 8


def _problem(seed: int = 0) -> tuple[TensorBatchSource, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random((N, C)) < 0.3, 1, -1).astype(np.int8)
    prototypes = rng.standard_normal((C, D)).astype(np.float32)
    features = 0.3 * rng.standard_normal((N, R, D)).astype(np.float32)
    for image in range(N):
        for label in np.flatnonzero(labels[image] == 1):
            features[image, rng.integers(R)] += prototypes[label]
    return TensorBatchSource(features, labels), rng.standard_normal((C, d)).astype(np.float32)


def _model() -> LESA:
    torch.manual_seed(0)
    return LESA(D, d, ModelConfig(num_modules=3))


def test_the_split_is_a_pure_function_of_the_seed() -> None:
    first = holdout_columns(436, 0.2, seed=3)
    assert np.array_equal(first, holdout_columns(436, 0.2, seed=3))
    assert first.size == round(0.2 * 436) and np.all(np.diff(first) > 0)
    assert first.min() >= 0 and first.max() < 436
    assert not np.array_equal(first, holdout_columns(436, 0.2, seed=4))
    assert holdout_columns(436, 0.0, seed=3).size == 0
    assert holdout_columns(5, 0.01, seed=0).size == 1  # at least one when asked for
    assert holdout_columns(3, 0.9, seed=0).size == 2  # at least one kept
    assert np.array_equal(
        np.sort(np.concatenate([first, kept_columns(436, first)])), np.arange(436)
    )
    with pytest.raises(ValueError, match="at least 2"):
        holdout_columns(1, 0.5, seed=0)


class _Spy(Trainer):
    """Records the labels of every training batch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen_labels: list[torch.Tensor] = []

    def train_step(self, features, labels):
        self.seen_labels.append(torch.as_tensor(labels).clone())
        return super().train_step(features, labels)


def test_held_out_labels_are_zero_in_every_training_batch(tmp_path: Path) -> None:
    source, vectors = _problem()
    cfg = TrainerConfig(steps=9, batch_size=16, holdout_share=0.3, holdout_seed=1, log_every=3)
    spy = _Spy(_model(), vectors, cfg, checkpoint_dir=tmp_path)
    spy.fit(source)
    held = holdout_columns(C, 0.3, 1)
    assert len(spy.seen_labels) == 9
    for labels in spy.seen_labels:
        assert (labels[:, held] == 0).all()
        kept = kept_columns(C, held)
        assert (labels[:, kept] != 0).all()  # the others keep their annotations


def test_held_out_annotations_never_reach_the_weights(tmp_path: Path) -> None:
    """Training with the held-out columns flipped gives bit-identical weights."""
    source, vectors = _problem()
    cfg = TrainerConfig(steps=6, batch_size=16, holdout_share=0.3, log_every=3, lr=1e-2)
    held = holdout_columns(C, 0.3, 0)
    flipped = source.labels.clone()
    flipped[:, held] *= -1
    models = []
    for name, labels in (("a", source.labels), ("b", flipped)):
        model = _model()
        Trainer(model, vectors, cfg, checkpoint_dir=tmp_path / name).fit(
            TensorBatchSource(source.features, labels)
        )
        models.append(model)
    for (key, mine), theirs in zip(
        models[0].state_dict().items(), models[1].state_dict().values(), strict=True
    ):
        assert torch.equal(mine, theirs), key
    # and without a holdout the same flip does change them
    control = [_model(), _model()]
    plain = cfg.model_copy(update={"holdout_share": 0.0})
    for model, name, labels in zip(control, "cd", (source.labels, flipped), strict=True):
        Trainer(model, vectors, plain, checkpoint_dir=tmp_path / name).fit(
            TensorBatchSource(source.features, labels)
        )
    assert not torch.equal(control[0].label_projection.weight, control[1].label_projection.weight)


def test_holdout_batches_leave_the_source_untouched() -> None:
    source, _ = _problem()
    held = np.array([1, 4])
    before = source.labels.clone()
    for _, labels in HoldoutBatches(source, held).batches(20, shuffle=True, seed=2):
        assert (labels[:, held] == 0).all()
    assert torch.equal(source.labels, before)


def test_validation_metrics_split_kept_and_held_out_labels() -> None:
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((40, 7)).astype(np.float32)
    labels = np.where(rng.random((40, 7)) < 0.35, 1, -1).astype(np.int8)
    labels[0] = 1  # every column has a positive
    held = np.array([2, 5])
    kept = np.array([0, 1, 3, 4, 6])
    metrics = validation_metrics(scores, labels, held, ks=[2])

    def sklearn_map(columns: np.ndarray) -> float:
        return np.mean([average_precision_score(labels[:, c] == 1, scores[:, c]) for c in columns])

    assert metrics["val_mAP"] == pytest.approx(sklearn_map(kept))
    assert metrics["val_holdout_mAP"] == pytest.approx(sklearn_map(held))
    top = np.argsort(-scores[:, kept], axis=1)[:, :2]
    predicted = np.zeros((40, kept.size), dtype=bool)
    np.put_along_axis(predicted, top, True, axis=1)
    micro = f1_score(labels[:, kept] == 1, predicted, average="micro")
    assert metrics["val_F1@2"] == pytest.approx(micro)
    assert "val_holdout_mAP" not in validation_metrics(scores, labels, np.zeros(0, int), ks=[2])


def test_selection_value_follows_the_configured_rule() -> None:
    metrics = {"val_mAP": 0.4, "val_F1@5": 0.3, "val_F1@3": 0.2, "val_holdout_mAP": 0.1}
    assert selection_value(metrics, TrainerConfig(select="mAP")) == 0.4
    assert selection_value(metrics, TrainerConfig(select="F1@3")) == 0.2
    mix = TrainerConfig(select="mix", holdout_share=0.2, select_weight=0.25, select_seen="mAP")
    assert selection_value(metrics, mix) == pytest.approx(0.25 * 0.1 + 0.75 * 0.4)
    assert mix.select_k is None
    assert TrainerConfig(select="mix", holdout_share=0.2, select_seen="F1@3").select_k == 3
    with pytest.raises(ValueError, match="holdout_share > 0"):
        TrainerConfig(select="mix")
    with pytest.raises(ValueError, match="select_seen"):
        TrainerConfig(select="mix", holdout_share=0.2, select_seen="mix")


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_best_checkpoint_follows_the_mix(tmp_path: Path, weight: float) -> None:
    source, vectors = _problem()
    val, _ = _problem(seed=1)
    cfg = TrainerConfig(
        steps=24, batch_size=8, lr=3e-3, val_every=3, log_every=3, select="mix",
        select_seen="F1@2", select_weight=weight, holdout_share=0.3,
    )  # fmt: skip
    result = Trainer(_model(), vectors, cfg, checkpoint_dir=tmp_path).fit(source, val)
    records = [r for r in result.history if "val_mix" in r]
    assert [int(r["step"]) for r in records] == list(range(3, 25, 3))
    for record in records:
        expected = weight * record["val_holdout_mAP"] + (1 - weight) * record["val_F1@2"]
        assert record["val_mix"] == pytest.approx(expected)
    values = [r["val_mix"] for r in records]
    best = max(values)
    last_best = max(i for i, value in enumerate(values) if value == best)
    assert result.best_metric == best
    assert result.best_step == int(records[last_best]["step"])
    payload = torch.load(tmp_path / "best.pt", weights_only=True)
    assert payload["step"] == result.best_step
    assert payload["holdout"] == holdout_columns(C, 0.3, 0).tolist()
