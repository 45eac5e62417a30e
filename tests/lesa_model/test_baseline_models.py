"""Baselines: ESZSL's closed form against independent references, the mean-pool shortcut."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from lesa_model.baselines import (
    fit_eszsl,
    mean_pool_grid,
    mean_pool_setup,
    pool_regions,
    tune_eszsl,
    tune_mean_pool,
)
from lesa_model.config import LossConfig, ModelConfig, TrainerConfig
from lesa_model.data import TensorBatchSource
from lesa_model.inference import score
from lesa_model.losses import lesa_loss
from lesa_model.model import LESA
from lesa_model.selection import holdout_columns, kept_columns, selection_value, validation_metrics


def _data(n: int = 60, dim: int = 9, labels: int = 7, word: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    y = np.where(rng.random((n, labels)) < 0.3, 1, -1).astype(np.int8)
    y[rng.random((n, labels)) < 0.1] = 0
    s = rng.standard_normal((labels, word))
    return x, y, s


def _objective(v, x, y, s, gamma, lam) -> float:
    """Romera-Paredes & Torr (2015), Eq. 4, with the Frobenius norms written out."""
    return float(
        np.sum((x @ v @ s.T - y) ** 2)
        + gamma * np.sum((v @ s.T) ** 2)
        + lam * np.sum((x @ v) ** 2)
        + gamma * lam * np.sum(v**2)
    )


def test_eszsl_is_the_minimiser_of_its_objective() -> None:
    x, y, s = _data()
    x = x + 3.0  # an offset the fit must remove
    fit = fit_eszsl(x, y, s, gamma=0.7, lam=2.0)
    np.testing.assert_allclose(fit.feature_mean, x.mean(axis=0))
    x = x - x.mean(axis=0)
    direct = (
        np.linalg.inv(x.T @ x + 0.7 * np.eye(9))
        @ x.T
        @ y
        @ s
        @ np.linalg.inv(s.T @ s + 2.0 * np.eye(4))
    )
    np.testing.assert_allclose(fit.weights, direct, rtol=1e-9, atol=1e-12)
    base = _objective(fit.weights, x, y, s, 0.7, 2.0)
    rng = np.random.default_rng(1)
    for _ in range(20):  # every small step away from V costs
        step = 1e-3 * rng.standard_normal(fit.weights.shape)
        assert _objective(fit.weights + step, x, y, s, 0.7, 2.0) > base
    # the gradient of the objective vanishes at V, entry by entry (a loop over V's entries)
    eps = 1e-6
    for i in range(9):
        for j in range(4):
            bump = np.zeros_like(fit.weights)
            bump[i, j] = eps
            slope = (
                _objective(fit.weights + bump, x, y, s, 0.7, 2.0)
                - _objective(fit.weights - bump, x, y, s, 0.7, 2.0)
            ) / (2 * eps)
            assert abs(slope) < 1e-4


def test_eszsl_with_identity_attributes_is_ridge_regression() -> None:
    """With S = I, V = (Xc^T Xc + g I)^-1 Xc^T Y / (1 + lam): sklearn's ridge (which centres X
    and Y for its intercept), shrunk by 1 + lam; scores differ from its predictions by the
    mean label only."""
    x, y, _ = _data()
    x = 2.0 * x + 1.0
    fit = fit_eszsl(x, y, np.eye(7), gamma=3.0, lam=0.5)
    ridge = Ridge(alpha=3.0, fit_intercept=True).fit(x, y.astype(np.float64))
    np.testing.assert_allclose(fit.weights, ridge.coef_.T / 1.5, rtol=1e-8, atol=1e-10)
    scores = fit.scores(x[:5], np.eye(7))
    expected = (ridge.predict(x[:5]) - y.mean(axis=0)) / 1.5  # its intercept fits mean(Y)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)


def test_eszsl_refuses_bad_input() -> None:
    x, y, s = _data()
    with pytest.raises(ValueError, match="positive"):
        fit_eszsl(x, y, s, gamma=0.0, lam=1.0)
    with pytest.raises(ValueError, match="labels"):
        fit_eszsl(x, y[:, :3], s, gamma=1.0, lam=1.0)


def test_tune_eszsl_picks_the_best_ridge_weights_by_the_selection_rule() -> None:
    x, y, s = _data(n=120, labels=10)
    vx, vy, _ = _data(n=50, labels=10, seed=3)
    vy[0] = 1
    cfg = TrainerConfig(select="mix", holdout_share=0.3, select_seen="F1@2", select_weight=0.6)
    gammas, lams = [0.1, 1.0, 10.0, 100.0], [0.01, 1.0, 50.0]
    chosen = tune_eszsl((x, y), (vx, vy), s, cfg, gammas=gammas, lams=lams, ks=[2])
    held = holdout_columns(10, 0.3, 0)
    kept = kept_columns(10, held)
    values = {}
    for gamma in gammas:
        for lam in lams:
            # the loop reference: fit on the kept labels only, score all, select by the rule
            fit = fit_eszsl(x, y[:, kept], s[kept], gamma, lam)
            metrics = validation_metrics(fit.scores(vx, s), vy, held, [2])
            values[gamma, lam] = selection_value(metrics, cfg)
    best = max(values.values())
    assert values[chosen.gamma, chosen.lam] == pytest.approx(best)
    assert chosen.validation["val_holdout_mAP"] > 0
    refit = fit_eszsl(x, y, s, chosen.gamma, chosen.lam)  # the final map uses every label
    np.testing.assert_allclose(chosen.weights, refit.weights, rtol=1e-9)


def test_pool_regions_is_the_mean_over_regions() -> None:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((11, 5, 3)).astype(np.float16)
    labels = np.where(rng.random((11, 4)) < 0.5, 1, -1).astype(np.int8)
    pooled, pooled_labels = pool_regions(TensorBatchSource(features, labels), batch_size=4)
    np.testing.assert_allclose(pooled, features.astype(np.float32).mean(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(pooled_labels, labels)


def test_mean_pool_attention_terms_are_dead_and_dropped() -> None:
    """One pooled feature: div 0, rel 0, dist a constant; the baseline keeps the rank loss."""
    model_cfg, loss_cfg = mean_pool_setup(ModelConfig(input_projection=6), LossConfig())
    assert model_cfg.pooling == "mean" and model_cfg.input_projection == 6
    assert (loss_cfg.div, loss_cfg.rel, loss_cfg.dist) == (0.0, 0.0, 0.0)
    torch.manual_seed(0)
    model = LESA(8, 4, model_cfg)
    features = torch.randn(5, 7, 8)
    labels = torch.tensor(np.where(np.random.default_rng(0).random((5, 3)) < 0.5, 1, -1))
    with torch.no_grad():
        terms = lesa_loss(model(features, torch.randn(3, 4)), labels, LossConfig())
    assert float(terms.div) == 0.0 and float(terms.rel) == pytest.approx(0.0, abs=1e-6)
    assert float(terms.dist) == float((labels == 1).sum() ** 2)  # every softmax weight is 1


def test_pooled_mean_pool_model_scores_full_regions_alike() -> None:
    """The projection is linear, so training on pooled features gives the full-region model."""
    model_cfg, _ = mean_pool_setup(ModelConfig(input_projection=6), LossConfig())
    torch.manual_seed(0)
    model = LESA(8, 4, model_cfg).eval()
    features = torch.randn(5, 7, 8)
    vectors = torch.randn(3, 4)
    full = model(features, vectors).scores
    pooled = model(features.mean(dim=1, keepdim=True), vectors).scores
    torch.testing.assert_close(full, pooled, rtol=1e-5, atol=1e-6)


def test_tune_mean_pool_keeps_the_candidate_with_the_best_selection_value(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    prototypes = rng.standard_normal((6, 10)).astype(np.float32)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.where(rng.random((n, 6)) < 0.35, 1, -1).astype(np.int8)
        regions = 0.3 * rng.standard_normal((n, 4, 10)).astype(np.float32)
        regions += ((labels == 1).astype(np.float32) @ prototypes)[:, None, :] / 4
        return regions, labels

    train, val = split(64), split(32)
    vectors = rng.standard_normal((6, 5)).astype(np.float32)
    cfg = TrainerConfig(steps=10, batch_size=16, val_every=5, log_every=5, select="mAP")
    candidates = mean_pool_grid([1e-3, 1e-2], [10], [0.0, 0.1])
    reported: list[tuple[str, float]] = []
    fit = tune_mean_pool(
        pool_regions(TensorBatchSource(*train)),
        pool_regions(TensorBatchSource(*val)),
        vectors,
        model_cfg=ModelConfig(input_projection=8),
        loss_cfg=LossConfig(),
        trainer_cfg=cfg,
        candidates=candidates,
        checkpoint_root=tmp_path,
        progress=lambda candidate, record: reported.append((candidate.name, record["step"])),
    )
    assert list(fit.trials) == [c.name for c in candidates]
    # every candidate reports its log and validation steps (5 and 10), in grid order
    assert list(dict.fromkeys(name for name, _ in reported)) == list(fit.trials)
    assert {step for name, step in reported if name == candidates[0].name} == {5, 10}
    assert fit.trials[fit.candidate.name] == max(fit.trials.values())
    assert fit.result.best_metric == fit.trials[fit.candidate.name]
    # the chosen model scores full region features with its validation mAP
    val_scores = score(fit.model, TensorBatchSource(*val), vectors)
    metrics = validation_metrics(val_scores, val[1], np.zeros(0, int), [])
    assert metrics["val_mAP"] == pytest.approx(fit.result.best_metric, abs=1e-5)
