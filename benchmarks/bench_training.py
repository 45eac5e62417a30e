"""Training-step throughput on CPU at the NUS-WIDE shape, next to the machine's matmul ceiling.

Shape: batch 32, R = 196 regions (14 x 14), D = 512 (VGG-19 conv5_4), 925 seen labels with
300-d word vectors, M = 10 modules, paper configuration. The step's FLOPs (forward + backward)
are counted by ``torch.utils.flop_counter``; the figure of merit is the achieved FLOP rate over
the fp32 matmul rate measured in the same run (target >= 0.5).
"""

from __future__ import annotations

import argparse
import time

import torch
from _flops import measure_matmul_gflops, measure_onednn_gemm_gflops
from torch.utils.flop_counter import FlopCounterMode

from lesa_model.config import ModelConfig, TrainerConfig
from lesa_model.losses import lesa_loss
from lesa_model.model import LESA
from lesa_model.trainer import make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--regions", type=int, default=196)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--labels", type=int, default=925)
    parser.add_argument("--word-dim", type=int, default=300)
    parser.add_argument("--modules", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = LESA(args.dim, args.word_dim, ModelConfig(num_modules=args.modules))
    optimizer = make_optimizer(model, TrainerConfig())
    features = torch.randn(args.batch, args.regions, args.dim).relu()
    vectors = torch.nn.functional.normalize(torch.randn(args.labels, args.word_dim), dim=1)
    labels = torch.where(torch.rand(args.batch, args.labels) < 0.02, 1, -1).to(torch.int8)

    def step() -> None:
        loss = lesa_loss(model(features, vectors), labels).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    step()
    ceiling = measure_matmul_gflops(2.0)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    ceiling = max(ceiling, measure_matmul_gflops(2.0))
    best, median = min(times), sorted(times)[len(times) // 2]
    print(f"threads                     {torch.get_num_threads()}")
    print(
        f"shape                       B={args.batch} R={args.regions} D={args.dim} "
        f"C={args.labels} d={args.word_dim} M={args.modules}"
    )
    print(f"FLOPs per step (fwd+bwd)    {flops / 1e9:.2f} GFLOP")
    print(f"step time median / best     {median * 1e3:.0f} ms / {best * 1e3:.0f} ms")
    print(f"throughput (median)         {args.batch / median:.1f} img/s")
    print(
        f"achieved (median / best)    {flops / median / 1e9:.1f} / {flops / best / 1e9:.1f} GFLOP/s"
    )
    print(f"fp32 matmul ceiling         {ceiling:.1f} GFLOP/s")
    print(f"ratio to ceiling (median)   {flops / median / 1e9 / ceiling:.2f}  (target >= 0.5)")
    print(f"ratio to ceiling (best)     {flops / best / 1e9 / ceiling:.2f}")
    onednn = measure_onednn_gemm_gflops(2.0)
    print(
        f"fp32 GEMM via oneDNN        {onednn:.1f} GFLOP/s (context: on AMD CPUs MKL's torch.mm "
        "takes its AVX2 path and oneDNN does not)"
    )


if __name__ == "__main__":
    main()
