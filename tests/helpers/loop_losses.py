"""Reference implementation of the LESA losses as plain loops, for tests and benchmarks.

Deliberately naive: every sum of Eq. 5-9 and 11 is a Python loop over images, labels, label pairs
and modules, so it can be checked by eye against the paper and the release's code
(``core/model_share_attention.py``).
"""

from __future__ import annotations

import torch

from lesa_model.model import LesaOutput


def loop_terms(
    output: LesaOutput, labels: torch.Tensor, normalisation: str, rel_margin: float = 0.0
) -> dict:
    """Eq. 5-9, 11 written literally, one scalar at a time (``normalisation`` as in LossConfig)."""
    release = normalisation == "release"
    B, M, _, C = (*output.logits.shape, output.scores.shape[1])
    s, e, ms, mean = output.scores, output.logits, output.module_scores, output.mean_scores
    rank_terms = []
    div_sum, div_squares = torch.zeros(()), torch.zeros(())
    rel = torch.zeros(())
    usage = [torch.zeros(()) for _ in range(M)]
    per_image_usage = []
    for i in range(B):
        hinge, violations = torch.zeros(()), 0
        for o in range(C):
            if labels[i, o] != 1:
                continue
            for n in range(C):
                if labels[i, n] != -1:
                    continue
                value = 1 + s[i, n] - s[i, o]
                if value > 0:
                    hinge = hinge + value
                    violations += 1
        rank_terms.append(hinge / (violations + 1e-8) if release else hinge)
        for m in range(M):
            for n in range(M):
                if m == n:
                    continue
                cos = torch.dot(e[i, m], e[i, n]) / (e[i, m].norm() * e[i, n].norm())
                div_sum = div_sum + cos
                div_squares = div_squares + cos**2
        image_usage = [torch.zeros(()) for _ in range(M)]
        for o in range(C):
            y = int(labels[i, o])
            if release:
                rel = rel + torch.clamp(-(s[i, o] - mean[i, o]) * y + rel_margin, min=0)
            elif y != 0:
                rel = rel + torch.clamp((mean[i, o] - s[i, o]) * y, min=0)
            if y == 1:
                denominator = sum(torch.exp(ms[i, n, o]) for n in range(M))
                for m in range(M):
                    share = torch.exp(ms[i, m, o]) / denominator
                    usage[m] = usage[m] + share
                    image_usage[m] = image_usage[m] + share
        per_image_usage.append(image_usage)
    if release:
        return {
            "rank": sum(rank_terms) / B,
            "div": torch.sqrt(div_squares),
            "rel": rel,
            "dist": sum(sum(u**2 for u in image) / M for image in per_image_usage) / B,
        }
    return {"rank": sum(rank_terms), "div": div_sum, "rel": rel, "dist": sum(u**2 for u in usage)}
