"""The vectorised losses against plain Python loops over images, labels, pairs and modules."""

from __future__ import annotations

import math

import pytest
import torch

from lesa_model.config import LossConfig, ModelConfig
from lesa_model.losses import lesa_loss
from lesa_model.model import LESA, LesaOutput
from tests.helpers.loop_losses import loop_terms

B, M, R, C = 4, 3, 5, 9


def _output(seed: int) -> LesaOutput:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, M, R, generator=generator, requires_grad=True)
    module_scores = (2 * torch.randn(B, M, C, generator=generator)).requires_grad_()
    mean_scores = torch.randn(B, C, generator=generator, requires_grad=True)
    scores, selected = module_scores.max(dim=1)
    return LesaOutput(
        scores=scores,
        logits=logits,
        attention=torch.softmax(logits, dim=-1),
        attended=torch.zeros(B, M, 2),
        module_scores=module_scores,
        selected=selected,
        mean_scores=mean_scores,
    )


def _labels(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 100)
    labels = torch.randint(-1, 2, (B, C), generator=generator, dtype=torch.int8)
    labels[0] = 0  # an image with nothing annotated
    labels[1] = -1  # an image without positives
    labels[2, :3] = 1  # at least one image with pairs
    labels[2, 3:6] = -1
    return labels


@pytest.mark.parametrize("normalisation", ["paper", "release"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_term_and_its_gradient_equal_the_loop(normalisation: str, seed: int) -> None:
    cfg = LossConfig(normalisation=normalisation, div=0.3, rel=0.2, dist=0.1)
    labels = _labels(seed)
    fast_output, slow_output = _output(seed), _output(seed)
    fast = lesa_loss(fast_output, labels, cfg)
    slow = loop_terms(slow_output, labels, normalisation)
    for name in ("rank", "div", "rel", "dist"):
        torch.testing.assert_close(getattr(fast, name), slow[name], rtol=1e-5, atol=1e-5)
    slow_total = slow["rank"] + 0.3 * slow["div"] + 0.2 * slow["rel"] + 0.1 * slow["dist"]
    torch.testing.assert_close(fast.total, slow_total, rtol=1e-5, atol=1e-5)
    fast.total.backward()
    slow_total.backward()
    for name in ("logits", "module_scores", "mean_scores"):
        fast_grad = getattr(fast_output, name).grad
        assert torch.isfinite(fast_grad).all()
        torch.testing.assert_close(fast_grad, getattr(slow_output, name).grad, rtol=1e-4, atol=1e-5)


def test_unannotated_labels_change_nothing() -> None:
    labels = _labels(0)
    base = lesa_loss(_output(0), labels)
    moved = _output(0)
    unannotated = labels == 0
    with torch.no_grad():
        moved.mean_scores[unannotated] += 50.0
    shifted_scores = torch.where(unannotated, moved.scores + 50.0, moved.scores)
    moved = LesaOutput(**{**moved.__dict__, "scores": shifted_scores})
    terms = lesa_loss(moved, labels)
    for name in ("rank", "rel"):
        fast, reference = getattr(terms, name).detach(), getattr(base, name).detach()
        assert math.isclose(float(fast), float(reference), rel_tol=1e-6)


def test_hand_computed_rank_loss() -> None:
    scores = torch.tensor([[2.0, 0.5, 1.8, -3.0]])
    labels = torch.tensor([[1, 1, -1, -1]], dtype=torch.int8)
    output = LesaOutput(
        scores=scores,
        logits=torch.randn(1, 2, 3),
        attention=torch.full((1, 2, 3), 1 / 3),
        attended=torch.zeros(1, 2, 1),
        module_scores=torch.stack([scores, scores - 1], dim=1),
        selected=torch.zeros(1, 4, dtype=torch.long),
        mean_scores=scores,
    )
    # pairs (o, o'): (0,2): 1+1.8-2=0.8; (0,3): 0; (1,2): 1+1.8-0.5=2.3; (1,3): 0
    assert math.isclose(float(lesa_loss(output, labels).rank), 3.1, rel_tol=1e-6)
    release = lesa_loss(output, labels, LossConfig(normalisation="release"))
    assert math.isclose(float(release.rank), 3.1 / 2, rel_tol=1e-6)


def test_labels_of_the_wrong_shape_are_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        lesa_loss(_output(0), torch.zeros(B, C + 1, dtype=torch.int8))


def test_release_rel_margin_counts_every_entry() -> None:
    """With a margin, the release's rel adds it for unannotated (y = 0) entries too."""
    labels = _labels(0)
    output = _output(0)
    cfg = LossConfig(normalisation="release", rel_margin=0.5)
    with_margin = lesa_loss(output, labels, cfg).rel
    slow = loop_terms(_output(0), labels, "release", rel_margin=0.5)["rel"]
    torch.testing.assert_close(with_margin, slow)
    assert float(with_margin.detach()) >= 0.5 * int((labels == 0).sum())
    with pytest.raises(ValueError, match="rel_margin"):
        LossConfig(rel_margin=0.5)


def test_l2_penalty_is_added_to_the_total() -> None:
    terms = lesa_loss(_output(0), _labels(0), l2=torch.tensor(2.5))
    base = lesa_loss(_output(0), _labels(0))
    torch.testing.assert_close(terms.total, base.total + 2.5)
    assert float(terms.l2) == 2.5 and float(base.l2) == 0.0


@pytest.mark.parametrize("normalisation", ["paper", "release"])
def test_single_module_has_no_diversity_and_finite_gradients(normalisation: str) -> None:
    """Mean pooling (M = 1) has no module pairs: div is 0, and no 0/0 leaks into the gradient."""
    torch.manual_seed(0)
    model = LESA(6, 4, ModelConfig(pooling="mean"))
    output = model(torch.randn(B, R, 6), torch.randn(C, 4))
    terms = lesa_loss(output, _labels(0), LossConfig(normalisation=normalisation))
    assert float(terms.div) == 0.0
    terms.total.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
