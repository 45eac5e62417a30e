"""Evaluate a trained checkpoint locally: ZSL / GZSL table, report files, UI artifacts.

    python -m flows.evaluate --config configs/default.yaml         # latest model's best.pt
    python -m flows.evaluate --config configs/default.yaml --checkpoint final
    python -m flows.evaluate --config configs/default.yaml --model-version v0002
    python -m flows.evaluate --config configs/default.yaml --checkpoint s3://bucket/x/best.pt

The dataset, features and label embeddings of the config are reused (computed if missing); the
checkpoint must have been trained on the same features and word vectors (its metadata says).
Labels added to the vocabulary since training are scored zero-shot. The report goes to its own
folder, ``runs/<run>/evaluations/<checkpoint sha256[:16]>-<dataset version>/``, never over the
pipeline run's ``runs/<run>/reports/``; it names the checkpoint, dataset and code versions.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from flows.arguments import add_config_arguments, run_entry_point


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flows.evaluate``."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.evaluate",
        description=(
            "Evaluate a trained LESA checkpoint on the test split of a run config: ZSL and GZSL "
            "mAP and P/R/F1@K printed as a table and written as a report (metrics.json, "
            "report.md, PNG plots) under runs/<run>/evaluations/<checkpoint>-<data version>/ "
            "(the pipeline run's own report is left as it is)."
        ),
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--checkpoint",
        metavar="best|final|PATH_OR_URL",
        help="which checkpoint (default: evaluation.checkpoint of the config)",
    )
    parser.add_argument(
        "--model-version",
        default="latest",
        metavar="latest|best|vNNNN",
        help="the run's model version whose best/final checkpoint is scored (default: latest; "
        "python -m flows.models --config ... lists them)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: validate the config first, evaluate, print the metrics table."""
    return run_entry_point(build_parser(), argv, "flows.evaluate_flow")


if __name__ == "__main__":
    raise SystemExit(main())
