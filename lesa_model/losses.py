"""The LESA training objective (Eq. 5-9, 11, 12), vectorised over images, labels and modules.

Labels are integers in {1, -1, 0}: present, absent, not annotated. Unannotated labels take part
in no term. ``LossConfig.normalisation`` picks how each term is scaled:

- rank: Eq. 11, the hinge over (present, absent) pairs | per image divided by its number of
  violating pairs, then the batch mean;
- div: Eq. 5, the sum of cosines of e_m, e_n (m != n) | the Frobenius norm of the off-diagonal
  cosine matrix, batch mean;
- rel: Eq. 6 over annotated labels | the mean over the batch's annotated entries (the release's
  normalisation of this term is not documented; this is our choice);
- dist: Eq. 8-9, sum_m l_m^2 | mean_m l_m^2.

Left of "|" is "paper" (sums over the batch's images), right is "release".

The rank loss is computed without materialising the (B, C, C) pair tensor: for a present label
o, ``sum_{o'} max(1 + s_o' - s_o, 0)`` is the sum of the absent scores above ``s_o - 1`` minus
their count times ``s_o - 1``, read off a sorted suffix sum. That keeps memory at O(B C) even
for Open Images' 7,186 labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lesa_model.config import LossConfig
from lesa_model.model import LesaOutput
from lesa_model.validation import check_label_values


@dataclass(frozen=True)
class LossTerms:
    """The weighted total (what is minimised) and the unweighted terms (what is logged)."""

    total: torch.Tensor
    rank: torch.Tensor
    div: torch.Tensor
    rel: torch.Tensor
    dist: torch.Tensor


def rank_hinge(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the sum of ``max(1 + s_o' - s_o, 0)`` over (present o, absent o') pairs.

    Returns the sums (B,) and the number of violating pairs (B,) (pairs with a positive hinge).
    """
    positive = labels == 1
    negative = labels == -1
    num_labels = scores.shape[1]
    # Absent scores ascending; the others are pushed to the end as +inf and masked to 0.
    ascending, _ = torch.sort(torch.where(negative, scores, torch.inf), dim=1)
    num_negative = negative.sum(dim=1, keepdim=True)
    valid = torch.arange(num_labels, device=scores.device) < num_negative
    values = torch.where(valid, ascending, 0.0)
    # suffix[:, k] = sum of the sorted absent scores from position k on; suffix[:, C] = 0.
    suffix = torch.cat(
        [values.flip(1).cumsum(1).flip(1), values.new_zeros(values.shape[0], 1)], dim=1
    )
    threshold = scores - 1.0
    at_most = torch.searchsorted(ascending.detach(), threshold.detach().contiguous(), right=True)
    above = (num_negative - at_most).clamp(min=0)
    hinge = suffix.gather(1, at_most) - above * threshold
    hinge = torch.where(positive, hinge, 0.0)
    violations = torch.where(positive, above, 0).sum(dim=1)
    return hinge.sum(dim=1), violations


def diversity(logits: torch.Tensor) -> torch.Tensor:
    """Per image (B,): the off-diagonal cosine matrix of the modules' logits e (B, M, R)."""
    unit = F.normalize(logits, dim=-1)
    cosine = unit @ unit.transpose(1, 2)
    eye = torch.eye(cosine.shape[1], dtype=torch.bool, device=cosine.device)
    return cosine.masked_fill(eye, 0.0)


LOSS_INPUTS = ("scores", "logits", "module_scores", "mean_scores")
"""The fields of :class:`LesaOutput` the loss reads."""


def check_finite_output(output: LesaOutput) -> None:
    """Refuse NaN or inf in what the loss reads: they would turn every term into NaN silently.

    One reduction over all fields, so the check costs a single device sync per step.
    """
    finite = torch.stack([torch.isfinite(getattr(output, name)).all() for name in LOSS_INPUTS])
    if not bool(finite.all()):
        bad = [name for name, ok in zip(LOSS_INPUTS, finite.tolist(), strict=True) if not ok]
        raise ValueError(
            f"the model output's {', '.join(bad)} contain NaN or inf "
            "(diverged training or non-finite weights)"
        )


def lesa_loss(output: LesaOutput, labels: torch.Tensor, cfg: LossConfig | None = None) -> LossTerms:
    """Eq. 12 for one batch: ``rank + div_w * div + rel_w * rel + dist_w * dist``.

    Args:
        output: the model's forward pass on the batch.
        labels: (B, C) integers in {1, -1, 0}, aligned with ``output.scores``.
        cfg: term weights and normalisation; the paper's by default.
    """
    cfg = cfg or LossConfig()
    scores = output.scores
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.shape != scores.shape:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)}, the scores {tuple(scores.shape)}"
        )
    check_label_values(labels)
    check_finite_output(output)
    labels = labels.to(scores.device)
    positive = (labels == 1).to(scores.dtype)
    sign = labels.to(scores.dtype)
    release = cfg.normalisation == "release"

    hinge, violations = rank_hinge(scores, labels)
    off_diagonal = diversity(output.logits)
    relevance = torch.relu((output.mean_scores - scores) * sign)
    usage = (torch.softmax(output.module_scores, dim=1) * positive[:, None, :]).sum(dim=(0, 2))

    if release:
        rank = (hinge / violations.clamp(min=1)).mean()
        if off_diagonal.shape[1] > 1:
            div = torch.linalg.matrix_norm(off_diagonal).mean()
        else:
            div = off_diagonal.sum()
        rel = relevance.sum() / (labels != 0).sum().clamp(min=1)
        dist = usage.square().mean()
    else:
        rank = hinge.sum()
        div = off_diagonal.sum()
        rel = relevance.sum()
        dist = usage.square().sum()
    total = rank + cfg.div * div + cfg.rel * rel + cfg.dist * dist
    return LossTerms(total=total, rank=rank, div=div, rel=rel, dist=dist)
