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
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

from flows import stale_runs
from flows.ablation import ablation
from flows.cli import DEFAULT_CONFIG, add_config_arguments, checked_config, warn_without_api
from flows.full_pipeline import lesa
from flows.tag import tag_images
from flows.watch import watch_labels
from tasks.events import LABELS_UPDATED_EVENT, RESOURCE_PREFIX
from tasks.settings import environment_overrides

DEPLOYMENT_NAME = "full-pipeline"
ABLATION_DEPLOYMENT_NAME = "ablation"
WATCH_DEPLOYMENT_NAME = "poll"
TAG_DEPLOYMENT_NAME = "tag-images"


def labels_updated_trigger() -> DeploymentEventTrigger:
    """Run the pipeline on the config named in a ``lesa.labels.updated`` event."""
    return DeploymentEventTrigger(
        name="lesa: retrain or rescore on new labels",
        expect={LABELS_UPDATED_EVENT},
        match={"prefect.resource.id": f"{RESOURCE_PREFIX}*"},
        parameters={
            "config": "{{ event.payload.config }}",
            "overrides": "{{ event.payload.overrides }}",
            "labels_update": "{{ event.payload }}",
        },
    )


def build_deployments(
    *,
    config: str = DEFAULT_CONFIG,
    overrides: dict[str, Any] | None = None,
    cron: str | None = None,
    watch_every: float | None = None,
) -> list[RunnerDeployment]:
    """The deployments this repository serves, with their default parameters."""
    parameters = {"config": config, "overrides": overrides or {}}
    deployments = [
        lesa.to_deployment(
            name=DEPLOYMENT_NAME,
            parameters=parameters,
            triggers=[labels_updated_trigger()],
            cron=cron,
            concurrency_limit=1,
            description="LESA: dataset -> features -> embeddings -> train -> evaluate",
            tags=["lesa"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
        ablation.to_deployment(
            name=ABLATION_DEPLOYMENT_NAME,
            parameters=parameters,
            concurrency_limit=1,
            description="LESA ablation: loss terms, M, normalisation, selection; seeds on Dask",
            tags=["lesa"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
        tag_images.to_deployment(
            name=TAG_DEPLOYMENT_NAME,
            parameters={"config": config, "overrides": overrides or {}},
            description="Tag every image under folders or s3:// prefixes on Dask (resumable)",
            tags=["lesa"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
    ]
    if watch_every is not None:
        deployments.append(
            watch_labels.to_deployment(
                name=WATCH_DEPLOYMENT_NAME,
                parameters=parameters,
                interval=timedelta(seconds=watch_every),
                description="Emit lesa.labels.updated when the label table or vocabulary changes",
                tags=["lesa"],
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return deployments


def _sweep_stale_runs() -> None:
    """Crash what killed processes left Running, now and every heartbeat interval while
    serving (``flows.stale_runs``); a server that cannot be swept yet is retried later."""
    try:
        crashed = stale_runs.sweep_now()
        if crashed.flow_runs or crashed.task_runs:
            print(
                f"marked Crashed {len(crashed.flow_runs)} stale flow run(s) and "
                f"{len(crashed.task_runs)} task run(s) left Running",
                file=sys.stderr,
            )
    except Exception as error:  # the sweep thread retries; serving must not wait for it
        print(f"warning: stale-run sweep failed, will retry: {error}", file=sys.stderr)
    stale_runs.sweep_forever(stale_runs.heartbeat_interval())


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: validate the config first, then serve the deployments until stopped."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.deployments",
        description=(
            "Serve the lesa/full-pipeline deployment (flow 'lesa') with its trigger on the "
            f"'{LABELS_UPDATED_EVENT}' event, and lesa/ablation, against the Prefect server at "
            "PREFECT_API_URL. "
            "Runs execute in this process until Ctrl-C."
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
    args = parser.parse_args(argv)
    overrides, cfg = checked_config(parser, args)
    if cfg is None:
        return 2
    warn_without_api(
        "serving against a temporary local API that nothing else can reach "
        "(start one with: python -m infra.local_stack)"
    )
    for key, value in environment_overrides().items():
        print(f"runs use {key} = {value} (from the environment)", file=sys.stderr)
    _sweep_stale_runs()
    serve(
        *build_deployments(
            config=args.config,
            overrides=overrides,
            cron=args.cron,
            watch_every=args.watch_every,
        ),
        limit=args.limit,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
