"""Peak RSS of training with the streaming reader: 10x the shards vs 1x (target <= 1.2x).

Writes two feature sets in the real shard format (``benchmarks/_feature_set.py``; NUS-WIDE's
R 196, D 512, float16, chunks of 32 rows), one with ``--shards`` shards and one with 10x as
many, then trains one epoch over each in a fresh subprocess (``Trainer.fit`` over
``FeatureBatches`` in stream mode, 925 labels) and reads that process's peak RSS
(``ru_maxrss``). Streaming holds a few shuffle windows, whatever the number of shards, so the
ratio should stay near 1. The memory mode's peaks are printed too, for contrast (it holds every
feature). The model is LESA with ``--modules`` modules (1 by default, so that an epoch over the
10x set takes about a minute on 2 cores; the reader's memory does not depend on it). Usage::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_reader_memory.py [--shards 4]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from _feature_set import write_feature_set

from lesa_model.config import ModelConfig, ReaderConfig, TrainerConfig
from lesa_model.model import LESA
from lesa_model.trainer import Trainer
from tasks.feature_reader import FeatureBatches, FeatureStore
from tasks.storage import Storage, StorageConfig

LABELS, WORD_DIM, DIM = 925, 300, 512


def _storage(folder: Path) -> Storage:
    return Storage(StorageConfig(root=str(folder), cache_dir=str(folder / "cache")))


def train_one_epoch(folder: Path, mode: str, window_chunks: int, modules: int) -> float:
    """Train one epoch over the feature set in ``folder``; return this process's peak RSS, MB."""
    store = FeatureStore(str(folder / "manifest.parquet"), _storage(folder))
    labels = np.load(folder / "labels.npy")
    reader = ReaderConfig(mode=mode, window_chunks=window_chunks)
    source = FeatureBatches(store, list(store.image_ids), labels, reader=reader)
    torch.manual_seed(0)
    model = LESA(DIM, WORD_DIM, ModelConfig(num_modules=modules))
    vectors = torch.nn.functional.normalize(torch.randn(LABELS, WORD_DIM), dim=1)
    cfg = TrainerConfig(
        device="cpu", epochs=1, log_every=10**6, checkpoint_every=10**6, reader=reader
    )
    with tempfile.TemporaryDirectory() as checkpoints:
        Trainer(model, vectors, cfg, checkpoint_dir=checkpoints).fit(source, resume=False)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_in_subprocess(folder: Path, mode: str, args: argparse.Namespace) -> float:
    """Peak RSS (MB) of a fresh process training one epoch over ``folder``."""
    command = [
        sys.executable, __file__, "--child", str(folder), "--mode", mode,
        "--window-chunks", str(args.window_chunks), "--modules", str(args.modules),
    ]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=4, help="shards of the 1x set")
    parser.add_argument("--shard-size", type=int, default=64, help="images per shard")
    parser.add_argument("--window-chunks", type=int, default=4, help="train.reader.window_chunks")
    parser.add_argument("--modules", type=int, default=1)
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(train_one_epoch(args.child, args.mode, args.window_chunks, args.modules))
        return

    with tempfile.TemporaryDirectory(prefix="lesa-bench-") as name:
        peaks: dict[tuple[int, str], float] = {}
        for factor in (1, 10):
            folder = Path(name) / f"x{factor}"
            folder.mkdir()
            images = factor * args.shards * args.shard_size
            data = write_feature_set(
                folder, images=images, shard_size=args.shard_size, labels=LABELS, seed=factor
            )
            np.save(folder / "labels.npy", data.labels)
            for mode in ("stream", "memory"):
                peaks[factor, mode] = peak_in_subprocess(folder, mode, args)
                print(
                    f"{factor:2d}x: {factor * args.shards:3d} shards, {images:5d} images "
                    f"({images * 196 * DIM * 2 / 1e6:6.0f} MB float16), {mode:6s} mode: "
                    f"peak RSS {peaks[factor, mode]:7.0f} MB"
                )
        window_mb = args.window_chunks * 32 * 196 * DIM * 2 / 1e6
        print(f"window: {args.window_chunks} chunks of 32 rows = {window_mb:.0f} MB")
        print(f"memory mode 10x / 1x: {peaks[10, 'memory'] / peaks[1, 'memory']:.2f}")
        print(f"stream peak RSS 10x / 1x: {peaks[10, 'stream'] / peaks[1, 'stream']:.2f}")


if __name__ == "__main__":
    main()
