"""Export a trained checkpoint as a portable one: model.safetensors + model-card.json.

    python -m flows.export \\
        --checkpoint .lesa-data/runs/emoji-default/models/v0001/checkpoints/best.pt \\
        --out exported/emoji-default

The card carries the model's config, its labels and their word vectors, the feature recipe, the
calibrated thresholds, the run's metrics and the code version; ``lesa_model.Tagger`` loads the
folder without Prefect, Dask or S3. No Prefect flow: exporting is one file conversion.
"""

from __future__ import annotations

import argparse
import sys

from flows.arguments import add_config_arguments


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flows.export``."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.export",
        description="Export a checkpoint (.pt) as model.safetensors + model-card.json, loadable "
        "with `from lesa_model import Tagger; Tagger.from_checkpoint(OUT)`.",
    )
    parser.add_argument("--checkpoint", required=True, metavar="PATH_OR_URL")
    parser.add_argument("--out", required=True, metavar="DIR_OR_URL", help="output folder")
    add_config_arguments(
        parser,
        default=None,
        config_help="run config whose storage section says how to reach s3:// URLs",
        set_help="storage setting, e.g. --set storage.endpoint_url=http://127.0.0.1:9000",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line: export and say where the card went. The export code (torch with it) is
    imported once the arguments parsed, so that ``--help`` answers at once."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from flows.predict_flow import storage_section
    from tasks.export import ExportError, export_checkpoint
    from tasks.storage import Storage

    storage = Storage(storage_section(parser, args))
    try:
        card = export_checkpoint(args.checkpoint, args.out, storage)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported: {card}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
