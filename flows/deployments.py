"""The ``lesa/full-pipeline`` and ``lesa/ablation`` deployments, served from this repository.

    python -m flows.deployments [--config configs/default.yaml] [--cron "0 3 * * *"]

registers the deployment (flow ``lesa``, deployment ``full-pipeline``) with the Prefect server
at ``PREFECT_API_URL`` and runs its flow runs in this process until stopped. Runs start from
``prefect deployment run lesa/full-pipeline -p config=... -p overrides='{...}'``, from the UI,
from the optional cron schedule, or from the trigger on ``lesa.labels.updated`` (emitted by
``python -m flows.watch``), which passes the watched config and the change along. With
``--watch-every SECONDS`` the label watcher is served too, as ``lesa-watch-labels/poll`` on an
interval schedule. ``lesa/ablation`` (``flows.ablation``) runs the config's ablation grid on
demand (``prefect deployment run lesa/ablation -p config=...``); it has no trigger.
``lesa/tag-images`` (``flows.tag``) tags a collection on Dask (``prefect deployment run
lesa/tag-images -p checkpoint=... -p images='["s3://bucket/photos/"]' -p out=...``).
While it serves, it marks Crashed the flow runs whose heartbeat stopped (``flows.stale_runs``).

Where the runs keep their data and extract features is the run config's ``storage.root`` and
``features.dask.address``, unless the serving process's environment sets ``LESA_STORAGE_ROOT``
/ ``DASK_SCHEDULER_ADDRESS`` (``source .lesa-stack/stack.env`` after
``python -m infra.local_stack``; see ``tasks.settings``); a run's ``overrides`` beat both.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from flows.arguments import add_config_arguments, run_entry_point


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flows.deployments``."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.deployments",
        description=(
            "Serve the lesa/full-pipeline deployment (flow 'lesa') with its trigger on the "
            "labels-updated event that python -m flows.watch emits, lesa/ablation and "
            "lesa/tag-images, against the Prefect server at PREFECT_API_URL. Runs execute in "
            "this process until Ctrl-C."
        ),
    )
    add_config_arguments(parser)
    parser.add_argument("--cron", help='optional schedule, e.g. "0 3 * * *" (nightly at 03:00)')
    parser.add_argument(
        "--watch-every",
        type=float,
        metavar="SECONDS",
        help="also serve the label watcher (lesa-watch-labels/poll) on this interval",
    )
    parser.add_argument("--limit", type=int, default=1, help="concurrent runs (default: 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: validate the config first, then serve the deployments until stopped."""
    return run_entry_point(build_parser(), argv, "flows.serving")


if __name__ == "__main__":
    raise SystemExit(main())
