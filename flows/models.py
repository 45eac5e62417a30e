"""List a run's model versions, or prune old ones.

    python -m flows.models --config configs/default.yaml               # list, with pointers
    python -m flows.models --config configs/default.yaml --keep 5      # delete all but 5

Every training run that is not a reuse adds a version under ``runs/<run>/models/``; ``latest``
and ``best`` point at two of them (see :mod:`tasks.model_versions`). ``--keep N`` keeps the N
newest finished versions and never deletes one a pointer names or one still unfinished. It
holds the run's training claim while it deletes, so it never races a training run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flows.arguments import add_config_arguments, at_least_one


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flows.models``."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.models",
        description=(
            "List the model versions of a run config's run (newest last, with the latest and "
            "best pointers), or with --keep N delete all but the N newest (never one a pointer "
            "names)."
        ),
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--keep",
        type=at_least_one,
        metavar="N",
        help="delete the finished versions older than the N newest, except pointer targets",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: list the versions; with ``--keep``, prune first. The tasks (and Prefect)
    are imported once the arguments parsed, so that ``--help`` answers at once."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from flows.cli import overrides_from, prepare_process
    from tasks import model_versions
    from tasks.checkpoints import run_prefix
    from tasks.claims import claimed
    from tasks.config import ConfigError, load_config
    from tasks.storage import Storage

    prepare_process()
    try:
        cfg = load_config(args.config, overrides_from(parser, args.overrides))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    storage = Storage(cfg.storage)
    if args.keep is not None:
        folder = run_prefix(storage, cfg.run_name)
        with claimed(storage, folder, f"pruning the model versions of {cfg.run_name}"):
            removed = model_versions.prune(storage, cfg.run_name, args.keep)
        print(f"removed {len(removed)} version(s): {', '.join(removed) or '-'}")
    found = model_versions.versions(storage, cfg.run_name)
    if not found:
        print(f"run {cfg.run_name}: no model version yet", file=sys.stderr)
        return 0
    pointers = {
        name: model_versions.pointer(storage, cfg.run_name, name) for name in ("latest", "best")
    }
    for line in model_versions.table(found, pointers):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
