"""The LESA training objective (Eq. 5-9, 11, 12), vectorised over images, labels and modules.

Labels are integers in {1, -1, 0}: present, absent, not annotated. ``LossConfig.normalisation``
picks how each term is computed (docs/FIDELITY.md has the full table and sources):

=====  ==========================================  ===========================================
term   "paper" (Eq. 5-11, summed over the batch)    "release" (``core/model_share_attention.py``)
=====  ==========================================  ===========================================
rank   sum of hinges over (present, absent) pairs   per image the hinge sum / number of violating
                                                    pairs (+1e-8), then the batch mean
div    sum over images of sum_{m!=n} cos(e_m, e_n)  one Frobenius norm of the whole (B, M, M)
                                                    tensor of off-diagonal cosines
rel    sum over annotated (i, o) of                 plain sum over every (i, o) of
       max((s_bar - s) y, 0)                        max(-(s - s_bar) y + margin, 0)
dist   sum_m l_m^2, l_m summed over the batch's     per image: P_m = sum over its positives of
       images and their positives                   softmax_m; mean_m P_m^2; mean over images
=====  ==========================================  ===========================================

Cosines normalise e as TensorFlow's ``l2_normalize`` does, ``e / sqrt(max(|e|^2, 1e-12))``.

Nothing here checks its inputs: this is the training hot path, and the labels are validated once
where they enter (the batch sources), the model output's finiteness by the trainer at log time.

The rank loss is computed without materialising the (B, C, C) pair tensor: for a present label
o, ``sum_{o'} max(1 + s_o' - s_o, 0)`` is the sum of the absent scores above ``s_o - 1`` minus
their count times ``s_o - 1``, read off a sorted suffix sum. That keeps memory at O(B C) even
for Open Images' 7,186 labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lesa_model.config import LossConfig
from lesa_model.model import LesaOutput


@dataclass(frozen=True)
class LossTerms:
    """The weighted total (what is minimised) and the unweighted terms (what is logged)."""

    total: torch.Tensor
    rank: torch.Tensor
    div: torch.Tensor
    rel: torch.Tensor
    dist: torch.Tensor
    l2: torch.Tensor
    """The L2 penalty on the model's weights (``LossConfig.l2``), already weighted."""


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


def cosines(logits: torch.Tensor) -> torch.Tensor:
    """(B, M, M) cosines between the modules' logits e (B, M, R), the diagonal set to 0."""
    unit = logits * torch.rsqrt(logits.square().sum(dim=-1, keepdim=True).clamp(min=1e-12))
    cosine = unit @ unit.transpose(1, 2)
    eye = torch.eye(cosine.shape[1], dtype=torch.bool, device=cosine.device)
    return cosine.masked_fill(eye, 0.0)


def lesa_loss(
    output: LesaOutput,
    labels: torch.Tensor,
    cfg: LossConfig | None = None,
    *,
    l2: torch.Tensor | None = None,
) -> LossTerms:
    """Eq. 12 for one batch: ``rank + div_w * div + rel_w * rel + dist_w * dist (+ l2)``.

    Args:
        output: the model's forward pass on the batch.
        labels: (B, C) integers in {1, -1, 0}, aligned with ``output.scores``.
        cfg: term weights and normalisation; the paper's by default.
        l2: the weighted L2 penalty of the model's weights (``LESA.l2_penalty``), if any.
    """
    cfg = cfg or LossConfig()
    scores = output.scores
    if labels.shape != scores.shape:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)}, the scores {tuple(scores.shape)}"
        )
    labels = labels.to(scores.device)
    positive = (labels == 1).to(scores.dtype)
    sign = labels.to(scores.dtype)
    hinge, violations = rank_hinge(scores, labels)
    off_diagonal = cosines(output.logits)
    # (B, M): per image, the summed softmax over modules of its present labels.
    usage = (torch.softmax(output.module_scores, dim=1) * positive[:, None, :]).sum(dim=2)
    margin = scores - output.mean_scores
    if cfg.normalisation == "release":
        rank = (hinge / (violations.to(hinge.dtype) + 1e-8)).mean()
        div = torch.linalg.vector_norm(off_diagonal)
        rel = torch.relu(-margin * sign + cfg.rel_margin).sum()
        dist = usage.square().mean(dim=1).mean()
    else:
        rank = hinge.sum()
        div = off_diagonal.sum()
        rel = torch.relu(-margin * sign).sum()
        dist = usage.sum(dim=0).square().sum()
    penalty = l2 if l2 is not None else scores.new_zeros(())
    total = rank + cfg.div * div + cfg.rel * rel + cfg.dist * dist + penalty
    return LossTerms(total=total, rank=rank, div=div, rel=rel, dist=dist, l2=penalty)
