"""Command-line arguments shared by the entry points (``python -m flows.<name>``).

An entry point's parser is built from this module and other light ones only, and its flow,
Prefect and the tasks are imported after the arguments are parsed: ``--help`` and a usage error
answer at once instead of after ten seconds of imports. ``tests/flows/test_cli.py``
holds every entry point to that.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path

from tasks.tag_options import PredictionError, parse_threshold

DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "default.yaml")
"""The embedded default run config (emoji-scenes, EfficientNet-Lite0, offline GloVe)."""


CONFIG_HELP = "YAML run config: a path, file:// or s3:// URL (default: configs/default.yaml)"
SET_HELP = (
    "override one config value, e.g. --set train.steps=200 --set "
    "storage.root=s3://bucket/lesa (repeatable; VALUE is read as YAML). Never a secret: S3 "
    "credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment, or "
    "from a Prefect Secret block named by --set storage.credentials_block=NAME"
)


def add_config_arguments(
    parser: argparse.ArgumentParser,
    *,
    default: str | None = DEFAULT_CONFIG,
    config_help: str = CONFIG_HELP,
    set_help: str = SET_HELP,
) -> None:
    """``--config`` and repeatable ``--set key.path=value`` overrides."""
    parser.add_argument("--config", default=default, metavar="PATH_OR_URL", help=config_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=set_help,
    )


def run_entry_point(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, implementation: str
) -> int:
    """Parse ``argv``, then import the module ``implementation`` (and Prefect and the tasks with
    it) and hand it the parsed arguments: its ``run_from_args(parser, args)`` gives the exit
    status. Only a command line that parsed pays for those imports."""
    args = parser.parse_args(argv)
    return importlib.import_module(implementation).run_from_args(parser, args)


def at_least_one(text: str) -> int:
    """argparse type of counts such as ``--top-k``: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def threshold_argument(text: str) -> str:
    """argparse type of ``--threshold``: ``calibrated`` or a finite number."""
    try:
        return parse_threshold(text)
    except PredictionError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
