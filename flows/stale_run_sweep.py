"""Mark Crashed the flow runs whose process died without a word, and their unfinished tasks.

A flow run killed by SIGKILL or the OOM killer (or on a machine that went away) cannot report
anything, so the server keeps it Running forever, and a flow run that crashed leaves the task
it was in Running too. Prefect's flow engine sends a heartbeat event
(``prefect.flow-run.heartbeat``) for every running flow run each
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (default 180, at least 30), served or started
from the command line. :func:`sweep` marks Crashed every Running flow run whose last heartbeat
(or, before the first one, its start) is older than ``stale_after`` (default three heartbeat
intervals), and every task run still Running or Pending under a flow run that has finished.

The sweep is what a long-lived process runs: ``python -m flows.deployments`` sweeps when it
starts and then every heartbeat interval, and ``python -m flows.stale_runs`` sweeps once (or
``--every`` seconds) for a server whose flows are served elsewhere.
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.settings import get_current_settings
from prefect.states import Crashed

from flows.stale_runs import MISSED_HEARTBEATS

log = logging.getLogger(__name__)

HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
UNFINISHED_TASKS = [StateType.RUNNING, StateType.PENDING]


def heartbeat_interval() -> float:
    """Seconds between the flow engine's heartbeats (its setting, at least 30)."""
    return float(max(get_current_settings().flows.heartbeat_frequency or 180, 30))


@dataclass
class SweepResult:
    """What one sweep marked Crashed."""

    flow_runs: list[str] = field(default_factory=list)
    task_runs: list[str] = field(default_factory=list)


def last_heartbeat(client: SyncPrefectClient, flow_run_id: str, since: datetime) -> datetime | None:
    """When the flow engine last sent a heartbeat for ``flow_run_id`` (None: not since
    ``since``)."""
    body = {
        "filter": {
            "occurred": {"since": since.isoformat()},
            "event": {"name": [HEARTBEAT_EVENT]},
            "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]},
            "order": "DESC",
        },
        "limit": 1,
    }
    events = client.request("POST", "/events/filter", json=body).raise_for_status().json()
    found = events.get("events") or []
    return datetime.fromisoformat(found[0]["occurred"]) if found else None


def _stale_flow_runs(client: SyncPrefectClient, stale_after: float) -> list[Any]:
    now = datetime.now(UTC)
    running = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
        )
    )
    stale = []
    for run in running:
        started = run.start_time or run.expected_start_time or now
        beat = last_heartbeat(client, str(run.id), started - timedelta(minutes=1))
        if (now - max(filter(None, [beat, started]))).total_seconds() > stale_after:
            stale.append(run)
    return stale


def _orphaned_task_runs(client: SyncPrefectClient, flow_run_ids: Sequence[str]) -> list[Any]:
    """Unfinished task runs whose flow run is in a final state (or among ``flow_run_ids``)."""
    unfinished = client.read_task_runs(
        task_run_filter=TaskRunFilter(
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=UNFINISHED_TASKS))
        )
    )
    parents = {str(run.flow_run_id) for run in unfinished if run.flow_run_id}
    if not parents:
        return []
    flows = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=sorted(parents)))
    )
    finished = {str(run.id) for run in flows if run.state and run.state.is_final()}
    finished |= set(flow_run_ids)
    return [run for run in unfinished if str(run.flow_run_id) in finished]


def sweep(client: SyncPrefectClient, stale_after: float | None = None) -> SweepResult:
    """Mark Crashed the Running flow runs without a heartbeat for ``stale_after`` seconds
    (default: three heartbeat intervals), then the unfinished task runs of finished flow runs."""
    limit = stale_after if stale_after is not None else MISSED_HEARTBEATS * heartbeat_interval()
    result = SweepResult()
    for run in _stale_flow_runs(client, limit):
        message = (
            f"no heartbeat for over {limit:.0f} s: the process running it died (killed by "
            "SIGKILL or the OOM killer, or its machine went away); marked by the stale-run sweep"
        )
        client.set_flow_run_state(run.id, Crashed(message=message), force=True)
        result.flow_runs.append(str(run.id))
        log.warning("flow run %s (%s): %s", run.name, run.id, message)
    for task_run in _orphaned_task_runs(client, result.flow_runs):
        message = "its flow run finished or crashed while this task was unfinished"
        client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
        result.task_runs.append(str(task_run.id))
        log.warning("task run %s (%s): %s", task_run.name, task_run.id, message)
    return result


def sweep_now(stale_after: float | None = None) -> SweepResult:
    """One sweep against the configured Prefect API."""
    with get_client(sync_client=True) as client:
        return sweep(client, stale_after)


def sweep_forever(every: float, stale_after: float | None = None) -> threading.Thread:
    """Sweep every ``every`` seconds in a daemon thread (a failed sweep is logged and retried
    on the next round: the API may be restarting)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            try:
                sweep_now(stale_after)
            except Exception as error:  # keep sweeping through API outages
                log.warning("stale-run sweep failed, will retry: %s", error)

    thread = threading.Thread(target=loop, name="stale-run-sweep", daemon=True)
    thread.start()
    return thread


def run_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``python -m flows.stale_runs`` once parsed: sweep once, or every ``--every`` seconds
    until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = sweep_now(args.stale_after)
    print(f"crashed {len(result.flow_runs)} flow run(s), {len(result.task_runs)} task run(s)")
    if args.every:
        sweep_forever(args.every, args.stale_after).join()
    return 0
