"""VGG-19 half-precision extraction on a CUDA GPU (written for a lent H100/H200; needs CUDA).

Reports, all measured in the same run:

- the GPU's fp16 matmul rate (8192^3 tensor-core matmuls), the ceiling;
- VGG-19 conv5_4 images/s on ready fp16 channels-last tensors at several batch sizes, and the
  fraction of the ceiling that is (39.0 GFLOP per 224x224 image, counted from the layers);
- the whole shard pipeline (:func:`tasks.feature_worker.extract_shard` with ``device: cuda``: JPEG
  read + decode + preprocess on CPU threads, fp16 backbone, HDF5 write) images/s, which on a
  GPU is bounded by JPEG decoding, not by the GPU.

Usage (exits with status 2 and a message when there is no CUDA device)::

    .venv/bin/python benchmarks/bench_extraction_gpu.py [--images 512] [--batch-sizes 64 128 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_extraction import conv_gflop_per_image, write_photos

from lesa_model.backbones import load_backbone
from tasks.feature_config import FeaturesConfig
from tasks.feature_worker import extract_shard
from tasks.features import plan_shards, usable_cores
from tasks.storage import Storage, StorageConfig


def fp16_matmul_tflops(seconds: float = 2.0, size: int = 8192) -> float:
    """Sustained fp16 matmul rate of the current GPU in TFLOP/s."""
    a = torch.randn(size, size, device="cuda", dtype=torch.float16)
    b = torch.randn(size, size, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ b
        count += 10
        torch.cuda.synchronize()
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e12


def vgg_forward_rate(batch_size: int, repeats: int = 10) -> float:
    """Images/s of VGG-19 conv5_4 in fp16 on ready channels-last tensors."""
    module = load_backbone("vgg19", weights="none").module
    module = module.to("cuda", memory_format=torch.channels_last).half()
    batch = torch.randn(batch_size, 3, 224, 224, device="cuda", dtype=torch.float16)
    batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(2):
            module(batch)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            module(batch)
        torch.cuda.synchronize()
    return batch_size * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="images through the pipeline")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine", file=sys.stderr)
        sys.exit(2)
    torch.backends.cudnn.benchmark = True
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")

    gflop = conv_gflop_per_image(load_backbone("vgg19", weights="none").module, 224)
    ceiling = fp16_matmul_tflops()
    print(f"fp16 matmul ceiling:           {ceiling:8.1f} TFLOP/s")
    for batch_size in args.batch_sizes:
        rate = vgg_forward_rate(batch_size)
        print(
            f"VGG-19 fp16 backbone, batch {batch_size:4d}: {rate:9.1f} img/s = "
            f"{rate * gflop / 1e3 / ceiling:.2f} of the ceiling"
        )

    with tempfile.TemporaryDirectory(prefix="lesa-bench-") as folder:
        storage = Storage(StorageConfig(root=folder, cache_dir=str(Path(folder) / "cache")))
        table = write_photos(storage, args.images)
        config = FeaturesConfig(
            backbone="vgg19",
            weights="none",
            batch_size=max(args.batch_sizes),
            shard_size=args.images,
            device="cuda",
        )
        (plan,) = plan_shards(table, storage.url("images"), args.images, storage.url("out"))
        warm = plan_shards(
            table.iloc[: config.batch_size], storage.url("images"), 10**9, storage.url("warm")
        )[0]
        threads = usable_cores()
        extract_shard(warm, config, storage, torch_threads=threads)
        start = time.perf_counter()
        extract_shard(plan, config, storage, torch_threads=threads)
        rate = args.images / (time.perf_counter() - start)
        print(f"VGG-19 fp16 whole pipeline:    {rate:9.1f} img/s ({threads} CPU threads)")


if __name__ == "__main__":
    main()
