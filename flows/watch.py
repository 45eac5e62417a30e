"""Label watcher: emit ``lesa.labels.updated`` when a run's label table or vocabulary changes.

    python -m flows.watch --config configs/my-table.yaml            # poll once
    python -m flows.watch --config configs/my-table.yaml --every 300

Each poll is a run of the ``lesa-watch-labels`` flow. The first poll records a baseline; later
polls emit one event per change, which the ``lesa/full-pipeline`` deployment's trigger turns
into a pipeline run on the same config. Needs ``PREFECT_API_URL`` to reach the server that
holds the trigger.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger

from flows.cli import DEFAULT_CONFIG, add_config_arguments, checked_config, warn_without_api
from tasks.config import load_config
from tasks.events import check_labels_task, emit_labels_updated_task, record_version_task
from tasks.storage import Storage


@flow(name="lesa-watch-labels", log_prints=True)
def watch_labels(
    config: str = DEFAULT_CONFIG, overrides: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Check the labels of ``config`` once; emit an event and return the change if any."""
    logger = get_run_logger()
    cfg = load_config(config, overrides)
    storage = Storage(cfg.storage)
    update, version = check_labels_task(cfg, storage)
    if version is None:
        logger.info("dataset %s: no label table / vocabulary in storage yet", cfg.dataset.name)
        return None
    if update is None:
        record_version_task(cfg, storage, version)
        logger.info("dataset %s: labels unchanged", cfg.dataset.name)
        return None
    event_id = emit_labels_updated_task(update, config_source=config, overrides=overrides)
    record_version_task(cfg, storage, version)
    action = (
        "the pipeline will score the new unseen labels zero-shot without retraining"
        if update.unseen_only
        else "the pipeline will retrain"
    )
    logger.info("%s; emitted %s (%s)", update.describe(), event_id, action)
    return {**update.model_dump(mode="json"), "kind": update.kind, "event_id": event_id}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: validate the config first, then poll once or every ``--every`` seconds."""
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
    args = parser.parse_args(argv)
    # The watcher waits for a table dataset's files to appear, so missing ones are no error.
    overrides, cfg = checked_config(parser, args, check_inputs=False)
    if cfg is None:
        return 2
    warn_without_api("events go to a temporary local API and trigger nothing")
    while True:
        watch_labels(config=args.config, overrides=overrides)
        if args.every is None:
            return 0
        time.sleep(args.every)


if __name__ == "__main__":
    raise SystemExit(main())
