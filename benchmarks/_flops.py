"""The machine's fp32 matmul rate: the ceiling other benchmarks compare their FLOP rate with.

Measured in the same run as the benchmark, so a loaded or throttled machine moves the ceiling and
the measured rate together and their ratio stays meaningful.
"""

from __future__ import annotations

import time

import torch


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_gflops(
    seconds: float = 1.0, *, device: str = "cpu", size: int | None = None
) -> float:
    """Best sustained GFLOP/s of square fp32 matmuls over about ``seconds`` of repeats.

    On CUDA, TF32 is disabled for the measurement so the figure is true fp32.
    """
    target = torch.device(device)
    n = size or (8192 if target.type == "cuda" else 1024)
    generator = torch.Generator(device=target).manual_seed(0)
    a = torch.randn(n, n, device=target, generator=generator)
    b = torch.randn(n, n, device=target, generator=generator)
    out = torch.empty(n, n, device=target)
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch.mm(a, b, out=out)  # warm-up
        _synchronise(target)
        best = 0.0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            for _ in range(4):
                torch.mm(a, b, out=out)
            _synchronise(target)
            elapsed = time.perf_counter() - start
            best = max(best, 4 * 2 * n**3 / elapsed / 1e9)
        return best
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32


def measure_onednn_gemm_gflops(seconds: float = 1.0, size: int = 1024) -> float:
    """Best sustained CPU GFLOP/s of the same fp32 GEMM run by oneDNN, as a 1x1 convolution.

    Printed beside the matmul ceiling for context: ``torch.mm`` runs on MKL, which on AMD CPUs
    takes its AVX2 path, while oneDNN (behind every convolution) uses AVX-512 there; on such a
    machine convolutions can beat the matmul "ceiling" by about 2x.
    """
    side = 32
    conv = torch.nn.Conv2d(size, size, 1, bias=False).to(memory_format=torch.channels_last)
    images = max(1, size // (side * side))
    batch = torch.randn(images, size, side, side).contiguous(memory_format=torch.channels_last)
    flops = 2 * images * side * side * size * size
    best = 0.0
    with torch.inference_mode():
        conv(batch)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            for _ in range(4):
                conv(batch)
            best = max(best, 4 * flops / (time.perf_counter() - start) / 1e9)
    return best


if __name__ == "__main__":
    threads = torch.get_num_threads()
    print(f"fp32 matmul (torch.mm): {measure_matmul_gflops():.1f} GFLOP/s on {threads} threads")
    print(f"fp32 GEMM via oneDNN:   {measure_onednn_gemm_gflops():.1f} GFLOP/s")
