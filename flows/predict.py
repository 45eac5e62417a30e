"""Tag new images with a trained checkpoint: any labels, seen, unseen or never seen before.

    python -m flows.predict --config configs/default.yaml --images photos/ \\
        --labels "cat,dog,surfboard" --top-k 5 --out predictions --attention-maps

Labels are embedded on the fly with the checkpoint's word vectors, so no retraining is needed
for a label the model never saw. Runs as the Prefect flow ``lesa-predict`` (on a temporary local
Prefect API unless ``PREFECT_API_URL`` is set).
"""

from __future__ import annotations

import argparse

from flows.arguments import (
    add_config_arguments,
    at_least_one,
    run_entry_point,
    threshold_argument,
)
from lesa_model.config import BACKBONE_BATCH
from tasks.tag_options import DEFAULT_TOP_K


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flows.predict``."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.predict",
        description=(
            "Tag new images with a trained LESA checkpoint. Any label can be scored, including "
            "labels never seen in training (embedded on the fly with the checkpoint's word "
            "vectors). Prints the top-K labels per image (* marks labels not trained on) and "
            "writes predictions.csv and predictions.json. Unreadable images are skipped with "
            "a reason."
        ),
        epilog=(
            "examples:\n"
            "  python -m flows.predict "
            "--checkpoint .lesa-data/runs/emoji-default/models/v0001/checkpoints/best.pt "
            "--images photo.jpg other.png\n"
            "  python -m flows.predict --config configs/default.yaml --model-version best "
            "--images photo.jpg\n"
            "  python -m flows.predict --checkpoint s3://bucket/lesa/runs/r1/models/v0001/"
            "checkpoints/best.pt --images s3://bucket/new-photos/ --labels labels.txt --top-k 10 "
            "--attention-maps"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        metavar="PATH_OR_URL",
        help="checkpoint (.pt) to use; default: the best.pt of --model-version of the --config run",
    )
    parser.add_argument(
        "--model-version",
        metavar="latest|best|vNNNN",
        help="model version of the --config run to use (default: latest; python -m flows.models "
        "--config ... lists them)",
    )
    parser.add_argument(
        "--images",
        required=True,
        nargs="+",
        metavar="PATH_OR_URL",
        help="image files, folders or s3:// prefixes (folders: files with an image ending)",
    )
    parser.add_argument(
        "--labels",
        metavar="FILE_OR_LIST",
        help=(
            "a label file (one per line, # comments) or a comma-separated list, e.g. "
            "'cat,dog,hot dog'; default: the labels recorded in the checkpoint"
        ),
    )
    parser.add_argument(
        "--top-k",
        type=at_least_one,
        default=None,
        help=f"labels per image (default {DEFAULT_TOP_K}); with --threshold, at most this many "
        "(default: no cap)",
    )
    parser.add_argument(
        "--threshold",
        type=threshold_argument,
        metavar="calibrated|NUMBER",
        help="tag every label scoring at least a threshold: 'calibrated' uses the per-label "
        "thresholds that evaluation fitted on the run's validation split (labels without one, "
        "and new labels, use its global threshold); a number uses that score for every label",
    )
    parser.add_argument(
        "--out",
        default="predictions",
        metavar="DIR_OR_URL",
        help="output folder or URL (default: ./predictions)",
    )
    parser.add_argument(
        "--attention-maps",
        action="store_true",
        help="also write attention heatmaps per (image, top label) and a grid figure per image",
    )
    parser.add_argument(
        "--batch-size",
        type=at_least_one,
        default=BACKBONE_BATCH,
        help=f"images per backbone pass (default {BACKBONE_BATCH})",
    )
    add_config_arguments(
        parser,
        default=None,
        config_help="run config whose storage section says how to reach s3:// URLs "
        "(default: the AWS_* environment variables)",
        set_help="storage setting, e.g. --set storage.endpoint_url=http://127.0.0.1:9000 "
        "(repeatable)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line: check the arguments and labels, run the flow, say where the outputs went."""
    return run_entry_point(build_parser(), argv, "flows.predict_flow")


if __name__ == "__main__":
    raise SystemExit(main())
