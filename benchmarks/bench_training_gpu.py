"""Training-step throughput on a CUDA GPU at the NUS-WIDE shape: img/s, fp32 vs bf16 autocast.

Same model and shape as ``bench_training.py`` (B 32, R 196, D 512, C 925, d 300, M 10), run
through ``Trainer.train_step`` so the figures include exactly what training does (autocast
forward, float32 loss, RMSprop step). Also prints the achieved FLOP rate next to the GPU's fp32
matmul rate (TF32 off) measured in the same run, and larger batches to show where the GPU
saturates. Needs CUDA; exits with a clear message otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
from _flops import measure_matmul_gflops
from torch.utils.flop_counter import FlopCounterMode

from lesa_model.config import ModelConfig, TrainerConfig
from lesa_model.model import LESA
from lesa_model.trainer import Trainer


def _throughput(batch: int, mixed_precision: bool, args: argparse.Namespace) -> tuple[float, float]:
    """(img/s, GFLOP per step) for one batch size and precision."""
    torch.manual_seed(0)
    model = LESA(args.dim, args.word_dim, ModelConfig(num_modules=args.modules))
    vectors = torch.nn.functional.normalize(torch.randn(args.labels, args.word_dim), dim=1)
    cfg = TrainerConfig(device="cuda", mixed_precision=mixed_precision, batch_size=batch)
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(model, vectors, cfg, checkpoint_dir=folder)
    features = torch.randn(batch, args.regions, args.dim, device="cuda").relu()
    labels = torch.where(torch.rand(batch, args.labels, device="cuda") < 0.02, 1, -1)
    labels = labels.to(torch.int8)
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(features, labels)
    for _ in range(3):
        trainer.train_step(features, labels)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(features, labels)
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / args.steps
    return batch / elapsed, counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--regions", type=int, default=196)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--labels", type=int, default=925)
    parser.add_argument("--word-dim", type=int, default=300)
    parser.add_argument("--modules", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_training_gpu.py needs a CUDA GPU; none is visible to PyTorch.")

    ceiling = measure_matmul_gflops(2.0, device="cuda")
    print(f"device                {torch.cuda.get_device_name()}")
    print(f"fp32 matmul ceiling   {ceiling:.0f} GFLOP/s (TF32 off)")
    for batch in args.batches:
        for mixed in (False, True):
            images, gflop = _throughput(batch, mixed, args)
            rate = images / batch * gflop
            name = "bf16 autocast" if mixed else "fp32"
            print(
                f"batch {batch:4d} {name:14s} {images:9.0f} img/s  {rate:8.0f} GFLOP/s  "
                f"({rate / ceiling:.2f} x fp32 matmul)"
            )


if __name__ == "__main__":
    main()
