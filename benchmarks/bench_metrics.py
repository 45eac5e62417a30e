"""Zero-shot evaluation of a NUS-WIDE-sized score matrix: time and memory.

107,859 test images x 1,006 labels (925 seen + 81 unseen), float32 random scores, complete
labels with ~2% positives. ``evaluate_zero_shot`` (ZSL + GZSL: mAP and P/R/F1 at K = 3, 5) is
timed against the per-label loop most code uses, sklearn's ``average_precision_score`` over the
same 81 + 1,006 label columns, measured on a slice of columns and scaled up (target >= 10x).
Peak memory is what the evaluation allocates on top of its inputs (traced by ``tracemalloc``,
which sees numpy's allocations), against the score matrix itself (target: inputs + peak <= 2x).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
from sklearn.metrics import average_precision_score

from lesa_model.metrics import evaluate_zero_shot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=107_859)
    parser.add_argument("--seen", type=int, default=925)
    parser.add_argument("--unseen", type=int, default=81)
    parser.add_argument("--slice", type=int, default=40, help="columns timed for the baseline")
    args = parser.parse_args()
    labels_total = args.seen + args.unseen
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((args.images, labels_total), dtype=np.float32)
    labels = np.where(rng.random((args.images, labels_total)) < 0.02, 1, -1).astype(np.int8)
    seen, unseen = np.arange(args.seen), np.arange(args.seen, labels_total)

    tracemalloc.start()
    start = time.perf_counter()
    report = evaluate_zero_shot(scores, labels, seen, unseen, ks=(3, 5))
    ours = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    start = time.perf_counter()
    for column in range(args.slice):
        average_precision_score(labels[:, column] == 1, scores[:, column])
    per_label = (time.perf_counter() - start) / args.slice
    ap_columns = args.unseen + labels_total  # ZSL ranks the unseen, GZSL all labels
    baseline = per_label * ap_columns

    matrix = scores.nbytes
    zsl, gzsl = report["zsl"]["mAP"], report["gzsl"]["mAP"]
    rows = [
        ("scores", f"{args.images} x {labels_total} float32 = {matrix / 2**20:.0f} MiB"),
        ("evaluate_zero_shot", f"{ours:.2f} s (ZSL mAP {zsl:.4f}, GZSL mAP {gzsl:.4f})"),
        (
            "sklearn per-label AP loop",
            f"{baseline:.2f} s ({per_label * 1e3:.1f} ms/label x {ap_columns} labels, "
            f"timed on {args.slice})",
        ),
        ("speed-up", f"{baseline / ours:.1f}x (target >= 10x)"),
        ("peak extra memory", f"{peak / 2**20:.0f} MiB = {peak / matrix:.2f} x the score matrix"),
        (
            "inputs + peak",
            f"{(matrix + labels.nbytes + peak) / matrix:.2f} x the score matrix (target <= 2x)",
        ),
    ]
    for name, value in rows:
        print(f"{name:28s}{value}")


if __name__ == "__main__":
    main()
