"""Running a flow from its entry point (``python -m flows.<name>``) once the arguments are parsed:
process set-up, the validated config, the temporary Prefect API, the printed result.

The entry points import this module (and Prefect with it) only after parsing; their parsers are
built from :mod:`flows.arguments`, which imports nothing heavy.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any

from flows.artifacts import print_run
from tasks.config import (
    ConfigError,
    PipelineConfig,
    check_input_files,
    load_config,
    parse_override,
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
