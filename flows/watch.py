"""Label watcher: emit ``lesa.labels.updated`` when a run's label table or vocabulary changes.

    python -m flows.watch --config configs/my-table.yaml            # poll once
    python -m flows.watch --config configs/my-table.yaml --every 300

Each poll is a run of the ``lesa-watch-labels`` flow. The first poll records a baseline; later
polls emit one event per change, which the ``lesa/full-pipeline`` deployment's trigger turns
into a pipeline run on the same config. Needs ``PREFECT_API_URL`` to reach the server that
holds the trigger.

A failed poll (storage or Prefect API down, a bad label file) is logged and the watcher keeps
going: the next poll waits twice as long after each failure in a row, up to ``--max-backoff``,
and the normal interval returns after the first poll that succeeds. Nothing is lost meanwhile:
the last version seen is kept in storage, so a change made during an outage is emitted by the
first poll after it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from flows.arguments import add_config_arguments, run_entry_point

DEFAULT_MAX_BACKOFF_S = 600.0


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flows.watch``."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.watch",
        description=(
            "Check whether the label table or vocabulary of a run config changed since the last "
            "check and, if so, emit the Prefect event 'lesa.labels.updated' (which triggers the "
            "lesa/full-pipeline deployment). The first check records a baseline."
        ),
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--every", type=float, metavar="SECONDS", help="keep polling at this interval"
    )
    parser.add_argument(
        "--max-backoff",
        type=float,
        default=DEFAULT_MAX_BACKOFF_S,
        metavar="SECONDS",
        help="longest wait between polls while they keep failing (default: %(default)g)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: validate the config first, then poll once or every ``--every`` seconds."""
    return run_entry_point(build_parser(), argv, "flows.watch_flow")


if __name__ == "__main__":
    raise SystemExit(main())
