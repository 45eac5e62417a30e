"""Parse NUS-WIDE-sized metadata (269,648 images x 1,000 tags + 81 concepts): time and peak memory.

Generates the official file layout at full size in a temporary folder (AllTags1k.txt alone is
~540 MB), then, each in a fresh subprocess so peak memory is its own:

- ``lesa``: ``read_nuswide_metadata`` + ``build_nuswide_tables`` + schema validation;
- ``baseline``: the obvious alternative for the biggest file only, ``pandas.read_csv`` of
  AllTags1k.txt (tab-separated, trailing tab).

Targets (issue 3): under 60 s and under 2 GB peak. Usage::

    .venv/bin/python benchmarks/bench_nuswide_parse.py [--images 269648] [--tags 1000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NUM_TRAIN_FRACTION = 161_789 / 269_648
NUM_CONCEPTS = 81
OVERLAP = 75
TAG_DENSITY = 0.007  # ~7 tags per image, as in NUS-WIDE
CONCEPT_DENSITY = 0.025
ROW_CHUNK = 20_000


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(root: Path, num_images: int, num_tags: int, seed: int = 0) -> None:
    """Write the official layout with random sparse 0/1 annotations, chunk by chunk."""
    rng = np.random.default_rng(seed)
    concepts = [f"concept{k:02d}" for k in range(NUM_CONCEPTS)]
    tags = concepts[:OVERLAP] + [f"tag{k:04d}" for k in range(num_tags - OVERLAP)]
    paths = [f"cat{k % 700:03d}\\{k:06d}_{1_000_000 + k}.jpg" for k in range(num_images)]
    is_train = rng.random(num_images) < NUM_TRAIN_FRACTION
    for folder in ("ImageList", "NUS_WID_Tags", "ConceptsList", "Groundtruth/AllLabels"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "ImageList/Imagelist.txt").write_text(
        "".join(f"C:\\ImageData\\Flickr\\{p}\n" for p in paths)
    )
    (root / "ImageList/TrainImagelist.txt").write_text(
        "".join(f"{p}\n" for p, t in zip(paths, is_train, strict=True) if t)
    )
    (root / "ImageList/TestImagelist.txt").write_text(
        "".join(f"{p}\n" for p, t in zip(paths, is_train, strict=True) if not t)
    )
    (root / "NUS_WID_Tags/TagList1k.txt").write_text("".join(f"{t}\n" for t in tags))
    (root / "ConceptsList/Concepts81.txt").write_text("".join(f"{c}\n" for c in concepts))
    with open(root / "NUS_WID_Tags/AllTags1k.txt", "wb") as handle:
        for start in range(0, num_images, ROW_CHUNK):
            rows = min(ROW_CHUNK, num_images - start)
            line = np.full((rows, 2 * num_tags + 1), ord("\t"), dtype=np.uint8)
            line[:, 0 : 2 * num_tags : 2] = ord("0") + (rng.random((rows, num_tags)) < TAG_DENSITY)
            line[:, -1] = ord("\n")
            handle.write(line.tobytes())
    for concept in concepts:
        values = (rng.random(num_images) < CONCEPT_DENSITY).astype(np.uint8) + ord("0")
        lines = np.stack([values, np.full_like(values, ord("\n"))], axis=1)
        (root / f"Groundtruth/AllLabels/Labels_{concept}.txt").write_bytes(lines.tobytes())


def run_lesa(root: Path) -> dict[str, float]:
    """Child process: the project's parser, table builder and validation."""
    from tasks import schemas
    from tasks.datasets.nuswide import build_nuswide_tables, read_nuswide_metadata
    from tasks.storage import Storage, StorageConfig

    storage = Storage(StorageConfig(root=str(root / "store")))
    baseline_rss = _peak_rss_mb()
    started = time.perf_counter()
    metadata = read_nuswide_metadata(storage, str(root))
    parsed = time.perf_counter()
    labels, vocabulary = build_nuswide_tables(metadata, num_val=5000)
    built = time.perf_counter()
    schemas.validate(labels, schemas.LabelTable, stage="bench", vocabulary=vocabulary)
    validated = time.perf_counter()
    return {
        "parse_s": parsed - started,
        "build_s": built - parsed,
        "validate_s": validated - built,
        "total_s": validated - started,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_imports_mb": baseline_rss,
        "images": float(len(labels)),
        "seen": float(vocabulary["seen"].sum()),
        "unseen": float((~vocabulary["seen"]).sum()),
    }


def run_baseline(root: Path) -> dict[str, float]:
    """Child process: pandas.read_csv of the tag matrix alone."""
    import pandas as pd

    baseline_rss = _peak_rss_mb()
    started = time.perf_counter()
    frame = pd.read_csv(root / "NUS_WID_Tags/AllTags1k.txt", sep="\t", header=None)
    matrix = frame.iloc[:, :-1].to_numpy(dtype=bool)
    return {
        "total_s": time.perf_counter() - started,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_imports_mb": baseline_rss,
        "images": float(matrix.shape[0]),
    }


def _child(mode: str, root: Path) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--root", str(root)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=269_648, help="number of images")
    parser.add_argument("--tags", type=int, default=1000, help="number of tags (>= 75)")
    parser.add_argument("--skip-baseline", action="store_true", help="only time lesa's parser")
    parser.add_argument("--child", choices=["lesa", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_lesa(args.root) if args.child == "lesa" else run_baseline(args.root)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="nuswide-bench-") as folder:
        root = Path(folder)
        started = time.perf_counter()
        generate(root, args.images, args.tags)
        size_mb = (root / "NUS_WID_Tags/AllTags1k.txt").stat().st_size / 2**20
        print(
            f"generated {args.images:,} images x {args.tags} tags "
            f"(AllTags1k.txt {size_mb:.0f} MB) in {time.perf_counter() - started:.1f} s"
        )
        lesa = _child("lesa", root)
        print(
            f"lesa: parse {lesa['parse_s']:.1f} s + build {lesa['build_s']:.1f} s + validate "
            f"{lesa['validate_s']:.1f} s = {lesa['total_s']:.1f} s (target < 60 s); peak RSS "
            f"{lesa['peak_rss_mb']:.0f} MB (after imports {lesa['rss_after_imports_mb']:.0f} MB; "
            f"target < 2048 MB); {lesa['images']:.0f} images, {lesa['seen']:.0f} seen / "
            f"{lesa['unseen']:.0f} unseen labels"
        )
        if not args.skip_baseline:
            base = _child("baseline", root)
            print(
                f"baseline pandas.read_csv(AllTags1k.txt) alone: {base['total_s']:.1f} s, peak RSS "
                f"{base['peak_rss_mb']:.0f} MB"
            )
            lesa_tags_s = lesa["parse_s"]
            print(
                f"ratio: lesa's whole metadata parse is {base['total_s'] / lesa_tags_s:.1f}x "
                f"faster than the baseline's tag matrix alone; peak memory "
                f"{lesa['peak_rss_mb'] / base['peak_rss_mb']:.2f}x the baseline's"
            )


if __name__ == "__main__":
    main()
