"""Vectorised LESA losses vs the plain-loop reference (forward + backward), target >= 50x.

The loop reference (tests/helpers/loop_losses.py) is only feasible at a small shape, so both
run there; the vectorised version is also timed at the NUS-WIDE shape (B 32, M 10, R 196,
C 925) for scale.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lesa_model.config import LossConfig
from lesa_model.losses import lesa_loss
from lesa_model.model import LesaOutput

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from loop_losses import loop_terms


def _output(batch: int, modules: int, regions: int, labels: int) -> LesaOutput:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, modules, regions, generator=generator, requires_grad=True)
    module_scores = torch.randn(batch, modules, labels, generator=generator, requires_grad=True)
    mean_scores = torch.randn(batch, labels, generator=generator, requires_grad=True)
    scores, selected = module_scores.max(dim=1)
    return LesaOutput(
        scores=scores,
        logits=logits,
        attention=torch.softmax(logits, -1),
        attended=torch.zeros(batch, modules, 1),
        module_scores=module_scores,
        selected=selected,
        mean_scores=mean_scores,
    )


def _labels(batch: int, labels: int, positive: float = 0.1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    draw = torch.rand(batch, labels, generator=generator)
    return torch.where(draw < positive, 1, torch.where(draw < 0.9, -1, 0)).to(torch.int8)


def _time(run: Callable[[], None], repeats: int) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--labels", type=int, default=40)
    parser.add_argument("--modules", type=int, default=10)
    parser.add_argument("--regions", type=int, default=196)
    args = parser.parse_args()
    shape = (args.batch, args.modules, args.regions, args.labels)
    labels = _labels(args.batch, args.labels)

    for normalisation in ("paper", "release"):
        cfg = LossConfig(normalisation=normalisation)

        def fast(cfg: LossConfig = cfg) -> None:
            lesa_loss(_output(*shape), labels, cfg).total.backward()

        def slow(normalisation: str = normalisation) -> None:
            terms = loop_terms(_output(*shape), labels, normalisation)
            (terms["rank"] + terms["div"] + terms["rel"] + terms["dist"]).backward()

        fast_s, slow_s = _time(fast, 20), _time(slow, 2)
        print(
            f"{normalisation:8s} B={args.batch} C={args.labels} M={args.modules}: "
            f"loop {slow_s * 1e3:.1f} ms, vectorised {fast_s * 1e3:.2f} ms, "
            f"speed-up {slow_s / fast_s:.0f}x (target >= 50x)"
        )

    nus = (32, 10, 196, 925)
    nus_labels = _labels(32, 925, positive=0.02)
    nus_s = _time(lambda: lesa_loss(_output(*nus), nus_labels).total.backward(), 10)
    print(f"vectorised at NUS-WIDE shape B=32 C=925 M=10 R=196: {nus_s * 1e3:.1f} ms fwd+bwd")


if __name__ == "__main__":
    main()
