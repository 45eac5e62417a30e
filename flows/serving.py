"""What ``python -m flows.deployments`` serves: the deployments of this repository's flows, the
trigger that retrains on new labels, and the stale-run sweep that runs while it serves.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from typing import Any

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

from flows import stale_run_sweep
from flows.ablation_flow import ablation
from flows.arguments import DEFAULT_CONFIG
from flows.cli import checked_config, warn_without_api
from flows.full_pipeline_flow import lesa
from flows.tag_flow import tag_images
from flows.watch_flow import watch_labels
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
    serving (``flows.stale_run_sweep``); a server that cannot be swept yet is retried later."""
    try:
        crashed = stale_run_sweep.sweep_now()
        if crashed.flow_runs or crashed.task_runs:
            print(
                f"marked Crashed {len(crashed.flow_runs)} stale flow run(s) and "
                f"{len(crashed.task_runs)} task run(s) left Running",
                file=sys.stderr,
            )
    except Exception as error:  # the sweep thread retries; serving must not wait for it
        print(f"warning: stale-run sweep failed, will retry: {error}", file=sys.stderr)
    stale_run_sweep.sweep_forever(stale_run_sweep.heartbeat_interval())


def run_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``python -m flows.deployments`` once parsed: validate the config, then serve the
    deployments until stopped."""
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
