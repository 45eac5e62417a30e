"""The ablation flow (``python -m flows.ablation``, the ``lesa/ablation`` deployment): every
variant of a config's ``ablation`` section with every seed, on Dask, into one report.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from prefect import flow, get_run_logger
from prefect.cache_policies import NO_CACHE

from flows.arguments import DEFAULT_CONFIG
from flows.artifacts import publish_ablation_artifacts
from flows.cli import checked_config, run_command
from flows.full_pipeline_flow import FLOW_NAME
from flows.stages import prepare_inputs
from tasks.ablation import ablation_markdown, run_ablation, summarise, write_ablation_report
from tasks.config import check_input_files, load_config
from tasks.retries import retrying_task
from tasks.storage import Storage

run_ablation_task = retrying_task("ablation-grid", retries=1, cache_policy=NO_CACHE)(run_ablation)


@flow(name=FLOW_NAME, flow_run_name="ablation-{config}", log_prints=True)
def ablation(config: str = DEFAULT_CONFIG, overrides: dict[str, Any] | None = None) -> dict:
    """Run the config's ablation grid and return the per-variant summary and report URLs.

    Args:
        config: path or URL of the YAML run config.
        overrides: config values to replace (dotted keys or nested sections), e.g.
            ``{"ablation.seeds": [0, 1, 2], "train.steps": 400}``.
    """
    logger = get_run_logger()
    cfg = load_config(config, overrides)
    check_input_files(cfg, config)
    storage = Storage(cfg.storage)
    grid = len(cfg.ablation.variants) * len(cfg.ablation.seeds)
    logger.info("ablation of run %s: %d cells on Dask", cfg.run_name, grid)
    inputs = prepare_inputs(cfg, storage)
    results = run_ablation_task(cfg, storage, inputs, dask=cfg.features.dask)
    urls = write_ablation_report(results, storage, run_name=cfg.run_name)
    summary = summarise(results)
    markdown = ablation_markdown(summary, run_name=cfg.run_name)
    publish_ablation_artifacts(cfg.run_name, summary, markdown, urls, storage)
    return {
        "run_name": cfg.run_name,
        "summary": summary.to_dict(orient="records"),
        "runs": results,
        "reports": urls,
        "markdown": markdown,
    }


def run_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``python -m flows.ablation`` once parsed: validate the config, run the grid, print it."""
    overrides, cfg = checked_config(parser, args)
    if cfg is None:
        return 2
    return run_command(
        lambda: ablation(config=args.config, overrides=overrides),
        failure="the ablation failed",
        show=print_ablation,
    )


def print_ablation(result: Mapping[str, Any]) -> None:
    """The ablation table, then where its reports are."""
    print(result["markdown"])
    for name, url in result["reports"].items():
        print(f"{name}: {url}")
