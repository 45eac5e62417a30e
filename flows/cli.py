"""Command-line pieces shared by the flow entry points (``python -m flows.<name>``)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flows.artifacts import print_run
from tasks.config import (
    ConfigError,
    PipelineConfig,
    check_input_files,
    load_config,
    parse_override,
)

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


def prepare_process() -> None:
    """Process settings for an entry point that may start a temporary local Prefect API.

    SIGTERM and SIGHUP (a closed terminal or SSH session) become a normal exit, so Prefect
    marks the run Crashed (and its running task) and stops that API; the API's
    usage telemetry is off, since offline it only logs connection errors. Dask's own INFO lines
    (every worker's start-up banner) are held back here and in the workers this process starts,
    so the console shows the pipeline's progress; set ``DASK_LOGGING__DISTRIBUTED=info`` to see
    them.
    """
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: sys.exit(128 + signum))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.getLogger("distributed").setLevel(os.environ["DASK_LOGGING__DISTRIBUTED"].upper())


def overrides_from(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, Any]:
    """Parse ``--set`` items, turning a malformed one into an argparse error."""
    try:
        return dict(parse_override(item) for item in items)
    except ConfigError as exc:
        parser.error(str(exc))


def checked_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace, *, check_inputs: bool = True
) -> tuple[dict[str, Any], PipelineConfig | None]:
    """Process set-up, then the run config with its ``--set`` overrides, validated before any
    work starts. An invalid config, or (with ``check_inputs``) a local input file it names that
    does not exist, prints the error (naming the key) and gives ``None``, for which the entry
    point exits with status 2. A valid config then starts the temporary Prefect API when no
    server is configured (``flows.temporary_api``); if it cannot, the process exits with 1."""
    prepare_process()
    overrides = overrides_from(parser, args.overrides)
    try:
        config = load_config(args.config, overrides)
        if check_inputs:
            check_input_files(config, args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return overrides, None
    from flows.temporary_api import TemporaryAPIError, start_temporary_api  # Prefect's server: 10 s

    try:
        start_temporary_api()
    except TemporaryAPIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    return overrides, config


def run_command(
    run: Callable[[], Mapping[str, Any]],
    *,
    failure: str,
    title: str = "",
    show: Callable[[Mapping[str, Any]], None] | None = None,
) -> int:
    """Run a flow for an entry point and print what it produced (exit 0): ``show(result)``,
    by default its metrics table and summary under ``title``; or the error that stopped it
    (exit 1)."""
    try:
        result = run()
    except Exception as exc:
        print(f"error: {failure}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if show is None:
        print_run(result, title=title)
    else:
        show(result)
    return 0


def warn_without_api(consequence: str) -> None:
    """Say so when no Prefect server is configured: a temporary API is reachable by nobody."""
    if not os.environ.get("PREFECT_API_URL"):
        print(f"warning: PREFECT_API_URL is not set; {consequence}", file=sys.stderr)
