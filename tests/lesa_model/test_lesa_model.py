"""The LESA forward pass against Eq. 2-4 and 10 written one module and one label at a time."""

from __future__ import annotations

import pytest
import torch

from lesa_model.config import ModelConfig
from lesa_model.model import LESA

B, R, D, C, d = 3, 6, 8, 5, 4


@pytest.fixture
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(B, R, D, generator=generator), torch.randn(C, d, generator=generator)


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(num_modules=4),
        ModelConfig(num_modules=4, first_layer="shared", hidden_dim=7),
        ModelConfig(num_modules=2, input_projection=6, feature_adapter=True),
        ModelConfig(pooling="mean"),
    ],
    ids=["paper", "shared", "projection+adapter", "mean"],
)
def test_shapes_and_attention_normalised(cfg: ModelConfig, inputs) -> None:
    features, vectors = inputs
    model = LESA(D, d, cfg, grid=(2, 3))
    out = model(features, vectors)
    modules = 1 if cfg.pooling == "mean" else cfg.num_modules
    width = cfg.input_projection or D
    assert out.scores.shape == (B, C)
    assert out.logits.shape == out.attention.shape == (B, modules, R)
    assert out.attended.shape == (B, modules, width)
    assert out.module_scores.shape == (B, modules, C)
    assert out.selected.shape == out.mean_scores.shape == (B, C)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(B, modules))


def test_paper_model_equals_module_by_module_loop(inputs) -> None:
    features, vectors = inputs
    model = LESA(D, d, ModelConfig(num_modules=3, hidden_dim=5)).requires_grad_(False)
    out = model(features, vectors)
    theta = vectors @ model.label_projection.weight.T
    for i in range(B):
        for m in range(3):
            e = torch.tanh(features[i] @ model.w1[:, m * 5 : (m + 1) * 5]) @ model.w2[m]
            alpha = torch.softmax(e, dim=0)
            z = (alpha[:, None] * features[i]).sum(0)
            torch.testing.assert_close(out.logits[i, m], e)
            torch.testing.assert_close(out.attended[i, m], z)
            for c in range(C):
                torch.testing.assert_close(out.module_scores[i, m, c], theta[c] @ z)
        for c in range(C):
            expected = max(float(out.module_scores[i, m, c]) for m in range(3))
            assert float(out.scores[i, c]) == pytest.approx(expected)
            assert float(out.module_scores[i, out.selected[i, c], c]) == float(out.scores[i, c])
            mean = torch.stack([theta[c] @ features[i, r] for r in range(R)]).mean()
            torch.testing.assert_close(out.mean_scores[i, c], mean)


def test_shared_first_layer_equals_the_release_formula(inputs) -> None:
    """Release: e = tanh(F W1 + b1) w2 + b2, one W1 for all modules, one column of w2 each."""
    features, vectors = inputs
    cfg = ModelConfig(num_modules=3, first_layer="shared", hidden_dim=5)
    model = LESA(D, d, cfg).requires_grad_(False)
    out = model(features, vectors)
    first, second = model.first_layer, model.second_layer
    for i in range(B):
        hidden = torch.tanh(features[i] @ first.weight.T + first.bias)
        for m in range(3):
            expected = hidden @ second.weight[m] + second.bias[m]
            torch.testing.assert_close(out.logits[i, m], expected)


def test_mean_pooling_is_the_region_average(inputs) -> None:
    features, vectors = inputs
    model = LESA(D, d, ModelConfig(pooling="mean"))
    out = model(features, vectors)
    torch.testing.assert_close(out.attended[:, 0], features.mean(1))
    torch.testing.assert_close(out.scores, out.mean_scores)


def test_new_label_is_scored_without_retraining(inputs) -> None:
    features, vectors = inputs
    model = LESA(D, d, ModelConfig(num_modules=4))
    new = torch.randn(1, d)
    together = model(features, torch.cat([vectors, new])).scores
    torch.testing.assert_close(together[:, :C], model(features, vectors).scores)
    torch.testing.assert_close(together[:, C:], model(features, new).scores)


def test_bad_input_is_named(inputs) -> None:
    features, vectors = inputs
    model = LESA(D, d)
    nan = features.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="features contains NaN"):
        model.check_inputs(nan, vectors)
    with pytest.raises(ValueError, match="dimension"):
        model.check_inputs(features[..., :-1], vectors)
    with pytest.raises(ValueError, match="3 dimensions"):
        model.check_inputs(features[0], vectors)
    with pytest.raises(ValueError, match="floating-point"):
        model.check_inputs(features.long(), vectors)
    with pytest.raises(ValueError, match=r"features have dtype torch\.float64"):
        model.check_inputs(features.double(), vectors)
    infinite = features.clone()
    infinite[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="features contains NaN or inf"):
        model.check_inputs(infinite, vectors)
    nan_vectors = vectors.clone()
    nan_vectors[1, 0] = float("nan")
    with pytest.raises(ValueError, match="label_vectors contains NaN or inf"):
        model.check_inputs(features, nan_vectors)
    with pytest.raises(ValueError, match="empty"):
        model.check_inputs(features, vectors[:0])
    zero = vectors.clone()
    zero[2] = 0
    with pytest.raises(ValueError, match=r"all-zero rows .*\[2\]"):
        model.check_inputs(features, zero)
    with pytest.raises(ValueError, match="label_vectors have dimension"):
        model.check_inputs(features, vectors[:, :-1])
    with pytest.raises(ValueError, match="grid"):
        LESA(D, d, ModelConfig(feature_adapter=True))
    with pytest.raises(ValueError, match="regions"):
        LESA(D, d, ModelConfig(feature_adapter=True), grid=(2, 2)).check_inputs(features)
