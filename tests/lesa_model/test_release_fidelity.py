"""The release preset against an independent NumPy transcription of the authors' TF code.

``release_reference`` reads the release op by op (``core/model_share_attention.py``,
``core/utils.py``); these tests map the project's weights onto the release's variables and
compare every tensor the losses read, each loss term, the optimiser and the learning-rate rule.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

import tests.helpers.release_reference as tf_ref
from lesa_model.config import L2Config, LossConfig, ModelConfig
from lesa_model.losses import lesa_loss
from lesa_model.model import LESA
from lesa_model.optim import RMSPROP_PRESETS, TFRMSprop
from lesa_model.schedule import ReleasePlateau

RELEASE = Path(__file__).parents[2] / "reference" / "lesa-release"
RELEASE_LOG = RELEASE / "release-nus-wide-zs-training-log.csv"


def _release_weights(model: LESA) -> dict:
    """The project's parameters as the release's variables (bias rows appended)."""

    def augmented(linear: torch.nn.Linear) -> np.ndarray:
        return torch.cat([linear.weight.T, linear.bias[None]]).detach().double().numpy()

    weights = {
        "w_att_1": augmented(model.first_layer),
        "w_att_2": augmented(model.second_layer),
        "W": model.label_projection.weight.detach().double().numpy(),
    }
    if model.adapter is not None:
        norm = model.adapter.norm
        weights["conv_kernel"] = model.adapter.conv.weight.detach().permute(2, 3, 1, 0).double()
        weights["conv_kernel"] = weights["conv_kernel"].numpy()
        weights["bn"] = {
            "gamma": norm.weight.detach().double().numpy(),
            "beta": norm.bias.detach().double().numpy(),
            "moving_mean": norm.running_mean.double().numpy(),
            "moving_variance": norm.running_var.double().numpy(),
        }
    return weights


def _release_model(dim: int, label_dim: int, modules: int, grid: tuple[int, int]) -> LESA:
    """A release-preset model in inference mode with random batch-norm statistics and affine."""
    cfg = ModelConfig(num_modules=modules, first_layer="shared", feature_adapter=True)
    model = LESA(dim, label_dim, cfg, grid=grid).double()
    norm = model.adapter.norm
    with torch.no_grad():
        norm.running_mean.normal_(0.0, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.3)
    return model.eval()


def _labels(generator: torch.Generator, batch: int, count: int) -> torch.Tensor:
    """{1, -1} labels with ~3 positives per image and a few unannotated (0) entries."""
    labels = torch.where(torch.rand(batch, count, generator=generator) < 3 / count, 1, -1)
    labels[torch.rand(batch, count, generator=generator) < 0.1] = 0
    labels[0, :2] = torch.tensor([1, -1])  # at least one (present, absent) pair
    return labels.to(torch.int8)


SHAPES = [(4, 10, (3, 3), 8, 12), (3, 3, (2, 4), 6, 9), (2, 1, (2, 2), 5, 7), (5, 4, (1, 3), 4, 3)]
"""(B, M, grid, D, C): the paper's M = 10, a small M, a single module, a one-row grid."""


@pytest.mark.parametrize(("batch", "modules", "grid", "dim", "count"), SHAPES)
def test_release_forward_and_terms_equal_the_tf_code(batch, modules, grid, dim, count) -> None:
    generator = torch.Generator().manual_seed(batch * 100 + modules)
    torch.manual_seed(modules)
    label_dim = 5
    model = _release_model(dim, label_dim, modules, grid)
    regions = grid[0] * grid[1]
    features = torch.rand(batch, regions, dim, generator=generator, dtype=torch.float64) * 3
    vectors = torch.randn(count, label_dim, generator=generator, dtype=torch.float64)
    labels = _labels(generator, batch, count)

    ours = model(features, vectors)
    ref = tf_ref.forward(features.numpy(), vectors.numpy(), _release_weights(model), grid=grid)
    np.testing.assert_allclose(ours.scores.detach().numpy(), ref["logits"], rtol=1e-9)
    np.testing.assert_allclose(ours.module_scores.detach().numpy(), ref["att_logits"], rtol=1e-9)
    np.testing.assert_allclose(ours.logits.detach().numpy(), ref["out_att_log"], rtol=1e-9)
    np.testing.assert_allclose(ours.attention.detach().numpy(), ref["alphas"], rtol=1e-9)
    np.testing.assert_allclose(ours.mean_scores.detach().numpy(), ref["logits_global"], rtol=1e-9)

    margin = 0.2
    terms = lesa_loss(ours, labels, LossConfig(normalisation="release", rel_margin=margin))
    y = labels.double().numpy()
    expected = {
        "rank": tf_ref.ranking_loss(ref["logits"], y),
        "div": tf_ref.attention_ortho_span_regularizer(ref["out_att_log"]),
        "rel": tf_ref.attention_global_regularizer(ref["logits"], ref["logits_global"], y, margin),
        "dist": tf_ref.attention_distribution_soft_cardinality(ref["att_logits"], y),
    }
    for name, value in expected.items():
        assert float(getattr(terms, name).detach()) == pytest.approx(value, rel=1e-9), name
    if modules == 1:
        assert float(terms.div.detach()) == 0.0


def test_adapter_applies_relu_after_batch_norm() -> None:
    torch.manual_seed(3)
    grid, dim = (3, 4), 6
    model = _release_model(dim, 4, 2, grid)
    features = torch.randn(2, 12, dim, dtype=torch.float64)
    adapted = model.region_features(features).detach().numpy()
    weights = _release_weights(model)
    expected = tf_ref.conv_same_2x2_bn_relu(
        features.numpy(), grid, weights["conv_kernel"], weights["bn"]
    )
    np.testing.assert_allclose(adapted, expected, rtol=1e-9, atol=1e-12)
    assert (adapted == 0).mean() > 0.2, "random BN statistics should leave many units negative"
    assert model.adapter.conv.bias is None
    assert (model.adapter.norm.momentum, model.adapter.norm.eps) == (0.01, 1e-3)


def test_adapter_l2_penalty_is_tf_l2_regularizer() -> None:
    model = _release_model(6, 4, 2, (2, 2))
    kernel = model.adapter.conv.weight.detach().permute(2, 3, 1, 0).numpy()
    penalty = model.l2_penalty(L2Config(adapter=5e-4))
    assert float(penalty.detach()) == pytest.approx(tf_ref.l2_regularizer(kernel, 5e-4), rel=1e-9)
    assert float(model.l2_penalty(L2Config())) == 0.0


@pytest.mark.parametrize("preset", ["paper", "release"])
def test_rmsprop_matches_tensorflow(preset: str) -> None:
    """A few steps with scripted gradients and a mid-run rate change, against ApplyRMSProp."""
    rng = np.random.default_rng(7)
    start = rng.standard_normal((3, 4))
    gradients = [rng.standard_normal((3, 4)) * scale for scale in (1.0, 0.1, 3.0, 0.5, 2.0)]
    rates = [1e-3, 1e-3, 1e-3, 8e-4, 8e-4]
    param = torch.nn.Parameter(torch.tensor(start))
    optimizer = TFRMSprop([param], lr=rates[0], **RMSPROP_PRESETS[preset])
    for grad, rate in zip(gradients, rates, strict=True):
        optimizer.param_groups[0]["lr"] = rate
        param.grad = torch.tensor(grad)
        optimizer.step()
    expected = tf_ref.rmsprop_steps(start, gradients, rates, **RMSPROP_PRESETS[preset])
    np.testing.assert_allclose(param.detach().numpy(), expected, rtol=1e-12)

    torch_param = torch.nn.Parameter(torch.tensor(start))
    torch_rmsprop = torch.optim.RMSprop([torch_param], lr=1e-3, alpha=0.9)
    torch_param.grad = torch.tensor(gradients[0])
    torch_rmsprop.step()
    first = tf_ref.rmsprop_steps(start, gradients[:1], 1e-3, **RMSPROP_PRESETS[preset])
    assert not np.allclose(torch_param.detach().numpy(), first), "PyTorch's RMSprop differs"


def _plateau(patience: int) -> tuple[ReleasePlateau, torch.optim.Optimizer]:
    optimizer = TFRMSprop([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    return ReleasePlateau(optimizer, patience=patience), optimizer


def test_schedule_decays_on_each_drop_of_the_moving_average_after_its_patience() -> None:
    schedule, _ = _plateau(patience=2)
    # ema: .03, .057, .0489 (drop: decay), .0432 (drop, waiting), .0393 (drop: decay), .0575
    values = [0.1, 0.12, 0.03, 0.03, 0.03, 0.1]
    rates = [schedule.step(value) for value in values]
    assert rates == pytest.approx([1e-3, 1e-3, 8e-4, 8e-4, 6.4e-4, 6.4e-4])
    reference = tf_ref.LearningRate(1e-3, patient=2)
    assert [reference.adapt(value) for value in values] == pytest.approx(rates)


def test_schedule_stops_decaying_below_the_limit() -> None:
    schedule, optimizer = _plateau(patience=1)
    optimizer.param_groups[0]["lr"] = 0.9e-6  # below 1e-3 x the initial 1e-3
    schedule.step(1.0)
    assert schedule.step(0.0) == pytest.approx(0.9e-6)


def test_schedule_replays_the_released_run() -> None:
    """Fed the released NUS-WIDE run's validation F1, the rule gives the rates that run logged."""
    with RELEASE_LOG.open() as handle:
        rows = list(csv.DictReader(handle))
    schedule, _ = _plateau(patience=5)
    reference = tf_ref.LearningRate(1e-3, patient=5)
    for row in rows:
        logged = float(row["lr"])
        assert schedule.step(float(row["mF1"])) == pytest.approx(logged, rel=1e-6), row["index"]
        assert reference.adapt(float(row["mF1"])) == pytest.approx(logged, rel=1e-6)
    assert float(rows[-1]["lr"]) < 1e-3  # the run did decay (0.8^7)


def test_released_total_is_the_weighted_sum_of_the_four_terms() -> None:
    """Why the release preset leaves the adapter's L2 regulariser off: the released run's logged
    loss is exactly rank + 0.01 div + 0.001 rel + 0.1 dist (``is_regularizer`` was False)."""
    with RELEASE_LOG.open() as handle:
        for row in csv.DictReader(handle):
            weighted = (
                float(row["l_rank"])
                + 0.01 * float(row["l_att_span"])
                + 0.001 * float(row["l_att_global"])
                + 0.1 * float(row["l_att_dist"])
            )
            assert float(row["l"]) == pytest.approx(weighted, rel=1e-5), row["index"]
