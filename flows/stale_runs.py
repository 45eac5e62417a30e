"""Mark Crashed the flow runs whose process died without a word, and their unfinished tasks.

    python -m flows.stale_runs [--stale-after SECONDS] [--every SECONDS]

sweeps once (or every ``--every`` seconds) a Prefect server whose flows are served elsewhere;
``python -m flows.deployments`` sweeps on its own while it serves. How a run is judged dead:
:mod:`flows.stale_run_sweep`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from flows.arguments import run_entry_point

MISSED_HEARTBEATS = 3
"""Heartbeat intervals without a heartbeat after which a Running flow run counts as dead."""


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flows.stale_runs``."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.stale_runs",
        description=(
            "Mark Crashed the Running flow runs on the Prefect server (PREFECT_API_URL) whose "
            "heartbeat stopped (their process was killed), and the Running or Pending task "
            "runs of flow runs that have finished."
        ),
    )
    parser.add_argument(
        "--stale-after",
        type=float,
        metavar="SECONDS",
        help=f"heartbeat age that counts as dead (default {MISSED_HEARTBEATS} x "
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY)",
    )
    parser.add_argument(
        "--every", type=float, metavar="SECONDS", help="keep sweeping at this interval"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: sweep once, or every ``--every`` seconds until interrupted."""
    return run_entry_point(build_parser(), argv, "flows.stale_run_sweep")


if __name__ == "__main__":
    raise SystemExit(main())
