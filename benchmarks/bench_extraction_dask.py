"""Dask scaling on one machine: 2 worker processes x 1 thread vs 1 process x 2 threads.

Both sides extract the same photo-sized JPEGs into the same shard layout with the same backbone:

- ``dask``: :func:`tasks.features.extract_features` on a running LocalCluster (2 processes,
  1 thread each, 1 torch thread per task), including manifest commits and verified uploads;
- ``baseline``: one process running :func:`tasks.feature_worker.extract_shard` shard after shard
  with 2 torch threads.

Both are warmed up first (imports, weights, oneDNN kernels), so the figure is steady-state
throughput; timed runs alternate and the best of each side counts, which damps the noise of a
shared machine. Target (issue 4): dask / baseline >= 0.9. Usage::

    .venv/bin/python benchmarks/bench_extraction_dask.py [--images 96] [--backbone vgg19]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench_extraction import write_photos

from tasks.feature_config import DaskConfig, FeaturesConfig
from tasks.feature_worker import extract_shard
from tasks.features import dask_client, extract_features, plan_shards
from tasks.storage import Storage, StorageConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96, help="images timed on each side")
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternating timed runs; the best of each counts"
    )
    parser.add_argument(
        "--backbone", default="efficientnet-lite0", choices=["efficientnet-lite0", "vgg19"]
    )
    args = parser.parse_args()
    weights = "imagenet" if args.backbone == "efficientnet-lite0" else "none"

    with tempfile.TemporaryDirectory(prefix="lesa-bench-") as folder:
        storage = Storage(StorageConfig(root=folder, cache_dir=str(Path(folder) / "cache")))
        table = write_photos(storage, args.images)
        images = storage.url("images")
        print(f"{args.images} images, {args.backbone}, load average {os.getloadavg()[0]:.1f}")

        dask_rates, baseline_rates = [], []
        with dask_client(DaskConfig(n_workers=2, threads_per_worker=1, dashboard=False)) as c:
            config = FeaturesConfig(
                backbone=args.backbone,
                weights=weights,
                shard_size=args.shard_size,
                dask=DaskConfig(address=c.scheduler_info()["address"], dashboard=False),
            )
            warm = table.iloc[: 2 * args.shard_size]
            extract_features(warm, images, config, storage, storage.url("warm-dask"))
            plans = plan_shards(table, images, args.shard_size, storage.url("baseline"))
            extract_shard(plans[0], config, storage, torch_threads=2)
            for repeat in range(args.repeats):
                start = time.perf_counter()
                extract_features(table, images, config, storage, storage.url(f"dask-{repeat}"))
                dask_rates.append(len(table) / (time.perf_counter() - start))
                start = time.perf_counter()
                for plan in plans:
                    extract_shard(plan, config, storage, torch_threads=2)
                baseline_rates.append(len(table) / (time.perf_counter() - start))
        dask_rate, baseline_rate = max(dask_rates), max(baseline_rates)
        print(
            f"runs, img/s: dask {[round(r, 2) for r in dask_rates]}, "
            f"baseline {[round(r, 2) for r in baseline_rates]}"
        )
        print(f"dask 2 workers x 1 thread:    {dask_rate:7.2f} img/s")
        print(f"1 process x 2 threads:        {baseline_rate:7.2f} img/s")
        print(f"dask / baseline:              {dask_rate / baseline_rate:7.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
