"""Batch tagging on 2 Dask workers vs the single-process predictor, in images per second.

Both sides tag the same photo-sized JPEGs with the same checkpoint (EfficientNet-Lite0 at 224,
ImageNet weights, 5 labels, top-5):

- ``dask``: :func:`tasks.tagging.tag_images` on a running LocalCluster (2 processes x 1
  thread, 1 torch thread per task), reading, tagging and writing the parquet parts and tables;
  each timed run writes to a fresh output folder, so nothing is reused;
- ``predictor``: :func:`tasks.prediction.predict_images` in this process (torch's default
  threads, all cores), the work behind ``python -m flows.predict``.

Both are warmed up first (weights, workers' model load), so the figure is steady-state
throughput, not start-up; timed runs alternate and the best of each side counts. Target
(issue 16): dask / predictor >= 1.7. Usage::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_tagging.py [--images 128]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from bench_extraction import write_photos

from lesa_model.checkpoint import model_payload, save_checkpoint
from lesa_model.config import ModelConfig
from lesa_model.model import LESA
from tasks.checkpoints import CheckpointMetadata
from tasks.embeddings import KumoGlove
from tasks.feature_config import DaskConfig, FeatureIdentity, feature_key
from tasks.features import dask_client
from tasks.prediction import find_images, load_predictor, predict_images
from tasks.storage import Storage, StorageConfig
from tasks.tagging import tag_images

LABELS = ["person", "cat", "coffee", "rocket", "sky"]


def write_checkpoint(path: Path) -> str:
    """An untrained LESA over EfficientNet-Lite0 features (speed does not depend on training)."""
    features = FeatureIdentity()
    metadata = CheckpointMetadata(
        run_name="bench",
        training_key="0" * 16,
        dataset="bench",
        seen_labels=LABELS[:3],
        unseen_labels=LABELS[3:],
        embedding_source=KumoGlove(),
        embedding_dim=50,
        feature_key=feature_key(features),
        features=features,
    )
    torch.manual_seed(0)
    model = LESA(features.dim, 50, ModelConfig(), grid=features.grid)
    payload = {**model_payload(model), "metadata": metadata.model_dump(mode="json")}
    return str(save_checkpoint(path, payload))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128, help="images timed on each side")
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="alternating timed runs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lesa-bench-") as folder:
        storage = Storage(StorageConfig(root=folder, cache_dir=str(Path(folder) / "cache")))
        write_photos(storage, args.images)
        checkpoint = write_checkpoint(Path(folder) / "best.pt")
        uris, _ = find_images([storage.url("images")], storage)
        print(f"{len(uris)} images, load average {os.getloadavg()[0]:.1f}")
        predictor = load_predictor(checkpoint, storage)
        dask_rates, predictor_rates = [], []
        with dask_client(DaskConfig(n_workers=2, threads_per_worker=1, dashboard=False)) as c:
            dask = DaskConfig(address=c.scheduler_info()["address"], dashboard=False)

            def dask_run(name: str, images: list[str]) -> None:
                tag_images(
                    checkpoint,
                    images,
                    storage.url(name),
                    storage,
                    labels=LABELS,
                    top_k=5,
                    shard_size=args.shard_size,
                    dask=dask,
                )

            dask_run("warm", uris[: 4 * args.shard_size])
            predict_images(predictor, uris[:8], LABELS, storage, top_k=5)
            for repeat in range(args.repeats):
                start = time.perf_counter()
                dask_run(f"dask-{repeat}", [storage.url("images")])
                dask_rates.append(len(uris) / (time.perf_counter() - start))
                start = time.perf_counter()
                predict_images(predictor, uris, LABELS, storage, top_k=5)
                predictor_rates.append(len(uris) / (time.perf_counter() - start))
        dask_rate, predictor_rate = max(dask_rates), max(predictor_rates)
        print(
            f"runs, img/s: dask {[round(r, 2) for r in dask_rates]}, "
            f"predictor {[round(r, 2) for r in predictor_rates]}"
        )
        print(f"dask 2 workers x 1 thread:    {dask_rate:7.2f} img/s")
        print(f"single-process predictor:     {predictor_rate:7.2f} img/s")
        print(f"dask / predictor:             {dask_rate / predictor_rate:7.2f} (target >= 1.7)")


if __name__ == "__main__":
    main()
