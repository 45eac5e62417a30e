"""Training: overfitting a tiny set, exact resume after an interruption, reproducibility."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lesa_model.checkpoint import load_model
from lesa_model.config import ModelConfig, TrainerConfig
from lesa_model.data import TensorBatchSource
from lesa_model.inference import score
from lesa_model.metrics import average_precision
from lesa_model.model import LESA
from lesa_model.trainer import Trainer, resolve_device

N, R, D, C, d = 32, 9, 16, 8, 8


def _problem() -> tuple[TensorBatchSource, np.ndarray]:
    """Each present label plants its prototype in one random region of the image."""
    rng = np.random.default_rng(0)
    labels = np.where(rng.random((N, C)) < 0.3, 1, -1).astype(np.int8)
    features = 0.3 * rng.standard_normal((N, R, D)).astype(np.float32)
    prototypes = rng.standard_normal((C, D)).astype(np.float32)
    for image in range(N):
        for label in np.flatnonzero(labels[image] == 1):
            features[image, rng.integers(R)] += prototypes[label]
    vectors = rng.standard_normal((C, d)).astype(np.float32)
    return TensorBatchSource(features, labels), vectors


def _model() -> LESA:
    torch.manual_seed(0)
    return LESA(D, d, ModelConfig(num_modules=4))


def _pairs_in_order(scores: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of (present, absent) label pairs of the same image ranked present-first."""
    ordered = total = 0
    for row, truth in zip(scores, labels, strict=True):
        difference = row[truth == 1][:, None] - row[truth == -1][None, :]
        ordered += int((difference > 0).sum())
        total += difference.size
    return ordered / total


def test_overfits_a_tiny_set(tmp_path: Path) -> None:
    """The rank loss orders labels within each image, which is what must become perfect."""
    source, vectors = _problem()
    model = _model()
    cfg = TrainerConfig(
        steps=400, lr=1e-2, batch_size=8, val_every=100, select="F1@2", log_every=50,
        checkpoint_every=100, keep_checkpoints=2,
    )  # fmt: skip
    result = Trainer(model, vectors, cfg, checkpoint_dir=tmp_path, metadata={"a": 1}).fit(
        source, source
    )
    ranks = [record["rank"] for record in result.history if "rank" in record]
    assert ranks[-1] < ranks[0] / 20
    scores, labels = score(model, source, vectors), source.labels.numpy()
    assert _pairs_in_order(scores, labels) > 0.98
    assert average_precision(scores, labels).mean() > 0.9  # chance is about 0.3
    assert result.final_step == 400
    assert result.best_checkpoint == tmp_path / "best.pt"
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == [
        "step-00000300.pt",
        "step-00000400.pt",
    ]
    best_scores = [r["val_F1@2"] for r in result.history if "val_F1@2" in r]
    assert result.best_metric == max(best_scores)
    reloaded, metadata = load_model(result.final_checkpoint)
    assert metadata == {"a": 1}
    np.testing.assert_array_equal(score(reloaded, source, vectors), scores)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("schedule", ["constant", "release-plateau"])
def test_interrupt_and_resume_equals_straight_run(tmp_path: Path, schedule: str) -> None:
    source, vectors = _problem()
    # 4 batches per epoch: the checkpoint at step 6 falls mid-epoch.
    cfg = TrainerConfig(
        steps=12, lr=3e-3, batch_size=8, val_every=2, select="F1@2", log_every=1,
        checkpoint_every=6, lr_schedule=schedule, plateau_patience=1, plateau_factor=0.5,
        val_ema=1.0, optimizer="release" if schedule != "constant" else "paper",
    )  # fmt: skip
    # Under the plateau schedule, validate on the flipped labels: F1 falls as training learns
    # the true ones, so (no smoothing) the rate halves at steps 4, 8, 10 and 12, around step 6.
    val = source if schedule == "constant" else TensorBatchSource(source.features, -source.labels)
    straight_model = _model()
    straight = Trainer(straight_model, vectors, cfg, checkpoint_dir=tmp_path / "a").fit(source, val)
    again = Trainer(_model(), vectors, cfg, checkpoint_dir=tmp_path / "b").fit(source, val)
    assert again.history == straight.history  # same seed, same metrics

    def crash_after_checkpoint(record: dict[str, float]) -> None:
        if record["step"] == 8:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        Trainer(
            _model(), vectors, cfg, checkpoint_dir=tmp_path / "c", progress=crash_after_checkpoint
        ).fit(source, val)
    assert not (tmp_path / "c" / "final.pt").exists()
    resumed_model = _model()
    resumed = Trainer(resumed_model, vectors, cfg, checkpoint_dir=tmp_path / "c").fit(source, val)
    for (name, value), (_, expected) in zip(
        resumed_model.state_dict().items(), straight_model.state_dict().items(), strict=True
    ):
        assert torch.equal(value, expected), name
    assert resumed.history == straight.history
    assert (resumed.best_step, resumed.best_metric) == (straight.best_step, straight.best_metric)
    if schedule == "release-plateau":
        assert straight.history[-1]["next_lr"] == pytest.approx(cfg.lr * 0.5**4)


def test_resume_rejects_a_different_architecture(tmp_path: Path) -> None:
    source, vectors = _problem()
    cfg = TrainerConfig(steps=2, batch_size=8, checkpoint_every=1, log_every=1)
    Trainer(_model(), vectors, cfg, checkpoint_dir=tmp_path).fit(source)
    other = LESA(D, d, ModelConfig(num_modules=3))
    with pytest.raises(ValueError, match="different model"):
        Trainer(other, vectors, cfg.model_copy(update={"steps": 4}), checkpoint_dir=tmp_path).fit(
            source
        )


def test_bad_setup_is_named(tmp_path: Path) -> None:
    source, vectors = _problem()
    with pytest.raises(ValueError, match=r"F1@K with K = \[9\]"):
        Trainer(_model(), vectors, TrainerConfig(select=f"F1@{C + 1}"), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="select"):
        TrainerConfig(select="F1@0")
    with pytest.raises(ValueError, match="all-zero"):
        Trainer(_model(), np.zeros((C, d), np.float32), checkpoint_dir=tmp_path)
    trainer = Trainer(
        _model(), vectors[:-1], TrainerConfig(steps=1, select="F1@2"), checkpoint_dir=tmp_path
    )
    with pytest.raises(ValueError, match="match the label vectors"):
        trainer.fit(source)
    trainer = Trainer(_model(), vectors, TrainerConfig(select="F1@2"), checkpoint_dir=tmp_path)
    features = source.features[:4].numpy()
    with pytest.raises(ValueError, match="features must be floating point"):
        trainer.train_step(features.astype(np.int32), source.labels[:4])


def test_epochs_set_the_number_of_steps(tmp_path: Path) -> None:
    source, vectors = _problem()  # 32 images in batches of 12: 3 batches per epoch
    cfg = TrainerConfig(steps=1000, epochs=2, batch_size=12, select="F1@2", log_every=1)
    result = Trainer(_model(), vectors, cfg, checkpoint_dir=tmp_path).fit(source)
    assert result.final_step == 6
    assert [record["step"] for record in result.history] == [1, 2, 3, 4, 5, 6]


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_best_checkpoint_keeps_the_later_of_equal_values(tmp_path: Path) -> None:
    """Validation without any positive gives F1 0 every time: ``>=`` keeps the last one."""
    source, vectors = _problem()
    val = TensorBatchSource(source.features, -np.ones((N, C), dtype=np.int8))
    cfg = TrainerConfig(steps=6, batch_size=8, val_every=2, select="F1@2", log_every=1)
    result = Trainer(_model(), vectors, cfg, checkpoint_dir=tmp_path).fit(source, val)
    assert (result.best_step, result.best_metric) == (6, 0.0)


def test_validation_steps_follow_the_release_when_asked(tmp_path: Path) -> None:
    source, vectors = _problem()
    steps = {}
    for first in (False, True):
        cfg = TrainerConfig(
            steps=10, batch_size=8, val_every=4, select="mAP", log_every=5,
            validate_first_step=first,
        )  # fmt: skip
        result = Trainer(_model(), vectors, cfg, checkpoint_dir=tmp_path / str(first)).fit(
            source, source
        )
        steps[first] = [int(r["step"]) for r in result.history if "val_mAP" in r]
    assert steps == {False: [4, 8, 10], True: [1, 5, 9, 10]}


class _Recording(TensorBatchSource):
    """Remembers how each epoch was asked for."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.calls: list[tuple[bool, int]] = []

    def batches(self, batch_size, *, shuffle, seed=0, epoch=0):
        self.calls.append((shuffle, epoch))
        return super().batches(batch_size, shuffle=shuffle, seed=seed, epoch=epoch)


def test_no_shuffle_reads_storage_order_every_epoch(tmp_path: Path) -> None:
    source, vectors = _problem()
    recording = _Recording(source.features, source.labels)
    cfg = TrainerConfig(steps=10, batch_size=8, shuffle=False, log_every=5)
    Trainer(_model(), vectors, cfg, checkpoint_dir=tmp_path).fit(recording)
    assert recording.calls == [(False, 0), (False, 1), (False, 2)]


def test_images_without_positives_are_left_out_of_the_step(tmp_path: Path) -> None:
    source, vectors = _problem()
    labels = source.labels[:8].clone()
    labels[:3] = -1  # three images without a positive label
    cfg = TrainerConfig(skip_images_without_positives=True, optimizer="paper")
    skipping = Trainer(_model(), vectors, cfg, checkpoint_dir=tmp_path / "a")
    plain = Trainer(_model(), vectors, TrainerConfig(), checkpoint_dir=tmp_path / "b")
    terms = skipping.train_step(source.features[:8], labels)
    expected = plain.train_step(source.features[3:8], labels[3:])
    torch.testing.assert_close(terms.total, expected.total, rtol=1e-4, atol=1e-5)
    for mine, theirs in zip(skipping.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=5e-5)  # updates are ~1e-3
    before = [p.detach().clone() for p in skipping.model.parameters()]
    assert skipping.train_step(source.features[:3], labels[:3]) is None
    for value, old in zip(skipping.model.parameters(), before, strict=True):
        assert torch.equal(value, old)


def test_l2_penalty_is_logged_and_minimised(tmp_path: Path) -> None:
    from lesa_model.config import L2Config, LossConfig

    source, vectors = _problem()
    loss_cfg = LossConfig(l2=L2Config(label_projection=0.5))
    cfg = TrainerConfig(steps=4, batch_size=8, log_every=1)
    result = Trainer(_model(), vectors, cfg, loss_cfg, checkpoint_dir=tmp_path).fit(source)
    penalties = [record["l2"] for record in result.history]
    assert penalties[0] > 0 and penalties[-1] < penalties[0]
