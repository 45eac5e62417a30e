"""Tag a whole collection on the Dask cluster: every image under folders or ``s3://`` prefixes.

    python -m flows.tag \\
        --checkpoint .lesa-data/runs/emoji-default/models/v0001/checkpoints/best.pt \\
        --images s3://bucket/photos/ --out s3://bucket/tags/photos --threshold calibrated

Writes ``OUT/tags.parquet`` (image, label, score, rank, module, seen, version), ``OUT/rejects
.parquet`` and ``OUT/summary.json``. Shards run on the cluster of the config's
``features.dask`` (a LocalCluster by default, or ``DASK_SCHEDULER_ADDRESS``); a rerun tags only
images that are new or changed since (see :mod:`tasks.tagging`). Served as the deployment
``lesa/tag-images`` by ``python -m flows.deployments``.
"""

from __future__ import annotations

import argparse

from flows.arguments import (
    add_config_arguments,
    at_least_one,
    run_entry_point,
    threshold_argument,
)
from tasks.tag_options import DEFAULT_SHARD_SIZE, DEFAULT_TOP_K


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flows.tag``."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.tag",
        description="Tag every image under folders or s3:// prefixes on the Dask cluster, in "
        "shards, into OUT/tags.parquet and OUT/rejects.parquet. Rerunning tags only new or "
        "changed images. Runs on a temporary local Prefect API unless PREFECT_API_URL is set.",
    )
    parser.add_argument("--checkpoint", required=True, metavar="PATH_OR_URL")
    parser.add_argument("--images", required=True, nargs="+", metavar="PATH_OR_URL")
    parser.add_argument("--out", required=True, metavar="DIR_OR_URL", help="output folder")
    parser.add_argument(
        "--labels",
        metavar="FILE_OR_LIST",
        help="a label file (one per line) or a comma-separated list; default: the checkpoint's",
    )
    parser.add_argument(
        "--top-k", type=at_least_one, help=f"tags per image (default {DEFAULT_TOP_K})"
    )
    parser.add_argument(
        "--threshold",
        type=threshold_argument,
        metavar="calibrated|NUMBER",
        help="tag every label scoring at least the checkpoint's calibrated thresholds or NUMBER",
    )
    parser.add_argument(
        "--shard-size",
        type=at_least_one,
        default=DEFAULT_SHARD_SIZE,
        help=f"images per Dask task (default {DEFAULT_SHARD_SIZE})",
    )
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line: check the config, run the flow, print the summary."""
    return run_entry_point(build_parser(), argv, "flows.tag_flow")


if __name__ == "__main__":
    raise SystemExit(main())
