"""The ``lesa-watch-labels`` flow (``python -m flows.watch``): one poll of a run's labels, an
event when they changed, and the loop that keeps polling through failures.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from prefect import flow, get_run_logger
from prefect.logging import get_logger

from flows.arguments import DEFAULT_CONFIG
from flows.cli import checked_config, warn_without_api
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


def run_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``python -m flows.watch`` once parsed: validate the config, then poll once or every
    ``--every`` seconds."""
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
