"""Baselines: random ranking's mAP sits at the positive rate; mean-pool ignores attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from lesa_model.baselines import mean_pool_setup
from lesa_model.config import LossConfig, ModelConfig
from lesa_model.model import LESA
from tasks.baselines import random_ranking


def test_random_ranking_is_seeded_and_shaped() -> None:
    first = random_ranking(30, 7, seed=4)
    assert first.shape == (30, 7) and first.dtype == np.float32
    np.testing.assert_array_equal(first, random_ranking(30, 7, seed=4))
    assert not np.array_equal(first, random_ranking(30, 7, seed=5))
    with pytest.raises(ValueError, match="at least one image"):
        random_ranking(0, 7)


def test_random_ranking_map_is_about_the_positive_rate() -> None:
    rng = np.random.default_rng(0)
    rates = np.array([0.05, 0.1, 0.2, 0.3, 0.5])
    labels = (rng.random((4000, rates.size)) < rates).astype(np.int8) * 2 - 1
    scores = random_ranking(*labels.shape, seed=1)
    ap = np.array(
        [average_precision_score(labels[:, c] == 1, scores[:, c]) for c in range(rates.size)]
    )
    positive_rate = (labels == 1).mean(axis=0)
    np.testing.assert_allclose(ap, positive_rate, atol=0.03)


def test_mean_pool_setup_changes_only_pooling() -> None:
    base = ModelConfig(num_modules=4, hidden_dim=16)
    pooled = mean_pool_setup(base, LossConfig())[0]
    assert pooled.pooling == "mean"
    assert pooled.model_dump(exclude={"pooling"}) == base.model_dump(exclude={"pooling"})
    assert base.pooling == "attention"


def test_mean_pool_model_sees_only_the_mean_region() -> None:
    """Mean pooling: replacing every region by the regions' mean leaves the scores unchanged;
    the attention model with the same settings re-weights distinct regions, so its scores move."""
    torch.manual_seed(0)
    features = torch.randn(5, 6, 12)
    flattened = features.mean(dim=1, keepdim=True).expand_as(features)
    vectors = torch.nn.functional.normalize(torch.randn(9, 8), dim=1)
    config = ModelConfig(num_modules=3, hidden_dim=16)
    pooled = LESA(12, 8, mean_pool_setup(config, LossConfig())[0]).eval()
    attention = LESA(12, 8, config).eval()
    with torch.no_grad():
        scores = pooled(features, vectors).scores
        assert scores.shape == (5, 9)
        torch.testing.assert_close(pooled(flattened, vectors).scores, scores)
        assert not torch.allclose(
            attention(flattened, vectors).scores, attention(features, vectors).scores, atol=1e-3
        )
