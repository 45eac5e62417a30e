"""CPU feature-extraction throughput against this machine's own fp32 matmul FLOP rate.

Runs the real shard pipeline (:func:`tasks.feature_worker.extract_shard`: read JPEG, decode,
preprocess, backbone in batches, write HDF5, upload verified) in this process on photo-sized
JPEGs, and reports:

- VGG-19 (conv5_4) images/s, the GFLOP/s that implies (conv FLOPs counted from the layers, 39.0
  GFLOP per 224x224 image) and its ratio to the fp32 matmul rate measured in the same run
  (``benchmarks/_flops.py``); target >= 0.6;
- the backbone alone on ready tensors, to show what the pipeline around it costs;
- EfficientNet-Lite0 images/s at 224 and 448;
- EfficientNet-Lite0 at 224 through the real Dask shard path (:func:`tasks.features.
  extract_features` on a LocalCluster of the default shape, 2 workers x 1 thread, shards of
  ``--shard-size``, manifest commits and verified uploads included) against the backbone alone
  on ready tensors with all the cores, the last line ``pipeline / backbone-only: X`` (target
  >= 0.8).

Random weights (``weights: none``) cost exactly the FLOPs of pretrained ones. Usage::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_extraction.py [--images 32] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import skimage.data
import torch
from _flops import measure_matmul_gflops, measure_onednn_gemm_gflops
from PIL import Image

from lesa_model.backbones import load_backbone
from tasks.feature_config import DaskConfig, FeaturesConfig
from tasks.feature_worker import extract_shard
from tasks.features import dask_client, extract_features, plan_shards, usable_cores
from tasks.storage import Storage, StorageConfig

PHOTO_SIZE = (500, 375)
"""A typical Flickr "Middle" size, as in NUS-WIDE."""


def write_photos(storage: Storage, count: int) -> pd.DataFrame:
    """``count`` distinct photo-sized JPEGs (crops of scikit-image's sample photos) in storage,
    and a label table pointing at them (relative URIs under ``storage.url("images")``)."""
    sources = [
        skimage.data.astronaut(),
        skimage.data.coffee(),
        skimage.data.chelsea(),
        skimage.data.rocket(),
    ]
    rng = np.random.default_rng(0)
    ids = []
    for number in range(count):
        picture = Image.fromarray(sources[number % len(sources)])
        left, top = rng.integers(0, 40, size=2)
        crop = picture.crop((left, top, left + picture.width - 40, top + picture.height - 40))
        buffer = io.BytesIO()
        crop.resize(PHOTO_SIZE).save(buffer, "JPEG", quality=90)
        image_id = f"photo-{number:05d}"
        storage.write_bytes(storage.url("images", f"{image_id}.jpg"), buffer.getvalue())
        ids.append(image_id)
    return pd.DataFrame(
        {
            "image_id": ids,
            "uri": [f"{image_id}.jpg" for image_id in ids],
            "split": "train",
            "positives": [["photo"] for _ in ids],
            "negatives": [[] for _ in ids],
            "complete": False,
        }
    )


def conv_gflop_per_image(module: torch.nn.Module, image_size: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of every convolution for one image, counted by hooks."""
    total = 0

    def count(layer: torch.nn.Conv2d, _: object, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = layer.kernel_size
        per_output = (layer.in_channels // layer.groups) * kh * kw
        total += 2 * per_output * output[0].numel()

    hooks = [
        layer.register_forward_hook(count)
        for layer in module.modules()
        if isinstance(layer, torch.nn.Conv2d)
    ]
    with torch.inference_mode():
        module(torch.zeros(1, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    return total / 1e9


def shard_throughput(
    storage: Storage, table: pd.DataFrame, config: FeaturesConfig, threads: int
) -> float:
    """Images/s of one shard through the whole pipeline, after a warm-up shard."""
    out = storage.url("features", f"bench-{os.getpid()}-{time.monotonic_ns()}")
    warm, timed = plan_shards(table, storage.url("images"), len(table) // 2, out)[:2]
    extract_shard(warm, config, storage, torch_threads=threads)
    start = time.perf_counter()
    result = extract_shard(timed, config, storage, torch_threads=threads)
    elapsed = time.perf_counter() - start
    return result.manifest_row["num_images"] / elapsed


def forward_throughput(config: FeaturesConfig, batch_size: int, repeats: int = 3) -> float:
    """Images/s of the backbone alone on ready (channels-last) tensors."""
    module = load_backbone(config.backbone, weights="none", image_size=config.image_size).module
    module = module.to(memory_format=torch.channels_last)
    batch = torch.randn(batch_size, 3, config.image_size, config.image_size).contiguous(
        memory_format=torch.channels_last
    )
    with torch.inference_mode():
        module(batch)
        start = time.perf_counter()
        for _ in range(repeats):
            module(batch)
    return batch_size * repeats / (time.perf_counter() - start)


def dask_pipeline_ratio(
    storage: Storage, table: pd.DataFrame, args: argparse.Namespace
) -> tuple[float, float]:
    """(pipeline img/s, backbone-only img/s) for EfficientNet-Lite0 at 224: ``extract_features``
    on a LocalCluster of the default shape vs the backbone on ready tensors with every core.
    Both are warmed up; timed runs alternate and the best of each counts."""
    pipeline, backbone = [], []
    with dask_client(DaskConfig(dashboard=False)) as client:
        config = FeaturesConfig(
            shard_size=args.shard_size,
            dask=DaskConfig(address=client.scheduler_info()["address"], dashboard=False),
        )
        images = storage.url("images")
        extract_features(
            table.iloc[: 2 * args.shard_size], images, config, storage, storage.url("w")
        )
        forward_throughput(config, config.batch_size)
        for repeat in range(args.repeats):
            start = time.perf_counter()
            extract_features(table, images, config, storage, storage.url(f"dask-{repeat}"))
            pipeline.append(len(table) / (time.perf_counter() - start))
            backbone.append(forward_throughput(config, config.batch_size, repeats=6))
    print(
        f"runs, img/s: pipeline {[round(r, 1) for r in pipeline]}, "
        f"backbone {[round(r, 1) for r in backbone]}"
    )
    return max(pipeline), max(backbone)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="timed images per backbone")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    parser.add_argument("--threads", type=int, default=usable_cores(), help="torch threads")
    parser.add_argument("--dask-images", type=int, default=256, help="images of the Dask run")
    parser.add_argument("--shard-size", type=int, default=64, help="images per shard (Dask run)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating timed Dask runs")
    parser.add_argument("--only-dask", action="store_true", help="only the Dask-path ratio")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="lesa-bench-") as folder:
        storage = Storage(StorageConfig(root=folder, cache_dir=str(Path(folder) / "cache")))
        table = write_photos(storage, max(2 * args.images, args.dask_images))
        print(f"machine: {args.threads} torch threads, load average {os.getloadavg()[0]:.1f}")
        if not args.only_dask:
            vgg_and_lite(storage, table.iloc[: 2 * args.images], args)
        rate, forward = dask_pipeline_ratio(storage, table.iloc[: args.dask_images], args)
        print(
            f"EfficientNet-Lite0 224, Dask 2 workers x 1 thread: {rate:7.2f} img/s; "
            f"backbone only ({torch.get_num_threads()} threads): {forward:7.2f} img/s"
        )
        print(f"pipeline / backbone-only: {rate / forward:.2f}")


def vgg_and_lite(storage: Storage, table: pd.DataFrame, args: argparse.Namespace) -> None:
    """VGG-19 against the matmul ceiling, and EfficientNet-Lite0 at 224 and 448, in process."""
    before = measure_matmul_gflops(seconds=1.0)

    vgg = FeaturesConfig(
        backbone="vgg19", weights="none", batch_size=args.batch_size, dtype="float16"
    )
    gflop = conv_gflop_per_image(load_backbone("vgg19", weights="none").module, vgg.image_size)
    rate = shard_throughput(storage, table, vgg, args.threads)
    forward = forward_throughput(vgg, args.batch_size)
    after = measure_matmul_gflops(seconds=1.0)
    ceiling = (before + after) / 2
    print(
        f"fp32 matmul ceiling:          {ceiling:8.1f} GFLOP/s "
        f"(before {before:.1f}, after {after:.1f})"
    )
    onednn = measure_onednn_gemm_gflops(seconds=1.0)
    print(
        f"fp32 GEMM via oneDNN:         {onednn:8.1f} GFLOP/s (the convolutions' library; "
        f"VGG-19 backbone = {forward * gflop / onednn:.2f} of it)"
    )
    print(f"VGG-19 conv FLOPs per image:  {gflop:8.2f} GFLOP (224x224)")
    print(
        f"VGG-19 pipeline:              {rate:8.2f} img/s = {rate * gflop:7.1f} GFLOP/s "
        f"= {rate * gflop / ceiling:.2f} of the matmul ceiling (target >= 0.6)"
    )
    print(
        f"VGG-19 backbone only:         {forward:8.2f} img/s = {forward * gflop:7.1f} "
        f"GFLOP/s = {forward * gflop / ceiling:.2f} of the ceiling"
    )
    print(f"pipeline / backbone only:     {rate / forward:8.2f}")
    for size in (224, 448):
        lite = FeaturesConfig(image_size=size, batch_size=args.batch_size)
        lite_rate = shard_throughput(storage, table, lite, args.threads)
        print(f"EfficientNet-Lite0 {size}x{size}:   {lite_rate:8.2f} img/s (pipeline)")


if __name__ == "__main__":
    main()
