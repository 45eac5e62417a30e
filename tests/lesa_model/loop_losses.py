"""Reference implementation of the LESA losses as plain loops, for tests and benchmarks.

Deliberately naive: every sum of Eq. 5-9 and 11 is a Python loop over images, labels, label pairs
and modules, so it can be checked by eye against the paper and REFERENCE.md section 2.
"""

from __future__ import annotations

import torch

from lesa_model.model import LesaOutput


def loop_terms(output: LesaOutput, labels: torch.Tensor, normalisation: str) -> dict:
    """Eq. 5-9, 11 written literally, one scalar at a time (``normalisation`` as in LossConfig)."""
    release = normalisation == "release"
    B, M, _, C = (*output.logits.shape, output.scores.shape[1])
    s, e, ms, mean = output.scores, output.logits, output.module_scores, output.mean_scores
    rank_terms, div_terms = [], []
    rel = torch.zeros(())
    annotated = 0
    usage = [torch.zeros(()) for _ in range(M)]
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
        rank_terms.append(hinge / max(violations, 1) if release else hinge)
        off = torch.zeros(())
        squares = torch.zeros(())
        for m in range(M):
            for n in range(M):
                if m == n:
                    continue
                cos = torch.dot(e[i, m], e[i, n]) / (e[i, m].norm() * e[i, n].norm())
                off = off + cos
                squares = squares + cos**2
        div_terms.append(torch.sqrt(squares) if release else off)
        for o in range(C):
            y = int(labels[i, o])
            if y != 0:
                annotated += 1
                rel = rel + torch.clamp((mean[i, o] - s[i, o]) * y, min=0)
            if y == 1:
                denominator = sum(torch.exp(ms[i, n, o]) for n in range(M))
                for m in range(M):
                    usage[m] = usage[m] + torch.exp(ms[i, m, o]) / denominator
    squares = [u**2 for u in usage]
    if release:
        return {
            "rank": sum(rank_terms) / B,
            "div": sum(div_terms) / B,
            "rel": rel / annotated,
            "dist": sum(squares) / M,
        }
    return {"rank": sum(rank_terms), "div": sum(div_terms), "rel": rel, "dist": sum(squares)}
