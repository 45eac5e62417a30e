"""Inference helpers against the model's own forward pass and numpy sorting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lesa_model.config import ModelConfig
from lesa_model.data import TensorBatchSource
from lesa_model.inference import attention_for, score, top_k
from lesa_model.model import LESA


@pytest.fixture
def setup() -> tuple[LESA, TensorBatchSource, torch.Tensor]:
    torch.manual_seed(0)
    model = LESA(6, 4, ModelConfig(num_modules=3))
    features = torch.randn(10, 5, 6)
    source = TensorBatchSource(features, np.zeros((10, 2), dtype=np.int8))
    return model, source, torch.randn(7, 4)


def test_score_is_the_forward_pass_in_source_order(setup) -> None:
    model, source, vectors = setup
    scores = score(model, source, vectors, batch_size=3)
    assert scores.dtype == np.float32 and scores.shape == (10, 7)
    with torch.no_grad():
        expected = model(source.features, vectors).scores.numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert model.training  # restored


def test_top_k_matches_a_full_sort() -> None:
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((4, 6)).astype(np.float32)
    names = [f"l{i}" for i in range(6)]
    result = top_k(scores, names, 3)
    for row, tags in zip(scores, result, strict=True):
        order = np.argsort(-row)[:3]
        assert tags == [(names[i], float(row[i])) for i in order]
    with pytest.raises(ValueError, match="between 1 and the number of labels"):
        top_k(scores, names, 7)
    with pytest.raises(ValueError, match="integer between 1"):
        top_k(scores, names, 2.0)
    with pytest.raises(ValueError, match="label names"):
        top_k(scores, names[:-1], 2)
    scores[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        top_k(scores, names, 2)


def test_attention_for_picks_the_selected_modules_map(setup) -> None:
    model, source, vectors = setup
    selected, weights = attention_for(model, source.features[:2], vectors)
    assert selected.shape == (2, 7) and weights.shape == (2, 7, 5)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    with torch.no_grad():
        out = model(source.features[:2], vectors)
    for b in range(2):
        for c in range(7):
            assert selected[b, c] == int(out.module_scores[b, :, c].argmax())
            np.testing.assert_allclose(weights[b, c], out.attention[b, selected[b, c]].numpy())
    one_selected, one_weights = attention_for(model, source.features[0], vectors)
    np.testing.assert_array_equal(one_selected, selected[:1])
    np.testing.assert_allclose(one_weights, weights[:1], rtol=1e-6)


def test_integer_features_are_refused_not_cast(setup) -> None:
    model, _, vectors = setup
    pixels = np.zeros((2, 5, 6), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"floating point, got dtype torch\.uint8"):
        attention_for(model, pixels, vectors)

    class IntegerSource:
        num_images = 2

        def batches(self, batch_size, *, shuffle, seed=0, epoch=0):
            yield pixels, np.zeros((2, 2), dtype=np.int8)

    with pytest.raises(ValueError, match="features must be floating point"):
        score(model, IntegerSource(), vectors)
