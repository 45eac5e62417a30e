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
import functools
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from prefect import flow, get_run_logger
from prefect.logging import get_logger

from flows.cli import DEFAULT_CONFIG, add_config_arguments, checked_config, warn_without_api
from tasks.config import Overrides, load_config
from tasks.events import (
    LABELS_UPDATED_EVENT,
    check_labels_task,
    emit_labels_updated_task,
    record_version_task,
)
from tasks.storage import Storage


@flow(name="lesa-watch-labels", log_prints=True)
def watch_labels(
    config: str = DEFAULT_CONFIG, overrides: Overrides = None
) -> dict[str, Any] | None:
    """Check the labels of ``config`` once; emit an event and return the change if any."""
    logger = get_run_logger()
    cfg = load_config(config, overrides)
    storage = Storage(cfg.storage)
    update, version, baseline = check_labels_task(cfg, storage)
    if version is None:
        logger.info("dataset %s: no label table / vocabulary in storage yet", cfg.dataset.name)
        return None
    if baseline:
        record_version_task(cfg, storage, version)
        logger.info(
            "dataset %s: recorded the baseline label version (%s); later changes emit %s",
            cfg.dataset.name,
            ", ".join(f"{name} {digest[:12]}" for name, digest in version.versions.items()),
            LABELS_UPDATED_EVENT,
        )
        return None
    if update is None:
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


DEFAULT_MAX_BACKOFF_S = 600.0


def backoff_delay(every: float, failures: int, max_backoff: float) -> float:
    """Seconds before the next poll: ``every`` after a success, doubling with each failure in
    a row, never above ``max_backoff`` (nor below ``every``)."""
    return min(every * 2**failures, max(every, max_backoff))


def poll_forever(
    poll: Callable[[], object],
    every: float,
    max_backoff: float,
    sleep: Callable[[float], None] = time.sleep,
) -> NoReturn:
    """Call ``poll`` every ``every`` seconds forever; a failure is logged and backs off."""
    log = get_logger("lesa.watch")
    failures = 0
    while True:
        try:
            poll()
        except Exception as exc:
            failures += 1
            delay = backoff_delay(every, failures, max_backoff)
            log.warning(
                "poll failed (%d in a row): %s: %s; next poll in %.0f s",
                failures,
                type(exc).__name__,
                exc,
                delay,
            )
        else:
            if failures:
                log.info("poll succeeded again after %d failed poll(s)", failures)
            failures = 0
            delay = every
        sleep(delay)


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
    parser.add_argument(
        "--max-backoff",
        type=float,
        default=DEFAULT_MAX_BACKOFF_S,
        metavar="SECONDS",
        help="longest wait between polls while they keep failing (default: %(default)g)",
    )
    args = parser.parse_args(argv)
    # The watcher waits for a table dataset's files to appear, so missing ones are no error.
    overrides, cfg = checked_config(parser, args, check_inputs=False)
    if cfg is None:
        return 2
    warn_without_api("events go to a temporary local API and trigger nothing")
    poll = functools.partial(watch_labels, config=args.config, overrides=overrides)
    if args.every is not None:
        poll_forever(poll, args.every, args.max_backoff)
    try:
        poll()
    except Exception as exc:
        print(f"error: the poll failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
