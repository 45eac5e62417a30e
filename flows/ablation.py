"""The paper's ablation as one Prefect flow (flow ``lesa``, deployment ``lesa/ablation``).

    python -m flows.ablation --config configs/default.yaml

prepare dataset -> validate label table -> extract features -> embed labels (each reused from
the pipeline's earlier runs, as ``flows.full_pipeline`` prepares them), then every
(variant, seed) cell of the config's ``ablation`` section trains and is scored on the Dask
cluster of ``features.dask``, in parallel. The summary (mean and spread over seeds), a Markdown
table and a ZSL-against-GZSL plot are written under ``runs/<run>/ablation/`` and attached to the
flow run as artifacts. Finished cells are reused on rerun.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from prefect import flow, get_run_logger
from prefect.cache_policies import NO_CACHE

from flows.artifacts import publish_ablation_artifacts
from flows.cli import DEFAULT_CONFIG, add_config_arguments, checked_config, run_command
from flows.full_pipeline import FLOW_NAME
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


def main(argv: list[str] | None = None) -> int:
    """Command line: validate the config first, run the grid, print the ablation table."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.ablation",
        description=(
            "Run the paper's ablation on one config: each variant of its 'ablation' section "
            "(loss terms on/off, M, normalisation, selection rule) with every seed, in parallel "
            "on Dask, reusing the pipeline's dataset, features and label vectors. Prints the "
            "table and writes a Markdown + PNG report under runs/<run>/ablation/."
        ),
        epilog=(
            "examples:\n"
            "  python -m flows.ablation --config configs/default.yaml\n"
            "  python -m flows.ablation --config configs/tiny.yaml --set 'ablation.seeds=[0]'"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
