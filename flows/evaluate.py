"""Evaluate a trained checkpoint locally: ZSL / GZSL table, report files, UI artifacts.

    python -m flows.evaluate --config configs/default.yaml         # latest model's best.pt
    python -m flows.evaluate --config configs/default.yaml --checkpoint final
    python -m flows.evaluate --config configs/default.yaml --model-version v0002
    python -m flows.evaluate --config configs/default.yaml --checkpoint s3://bucket/x/best.pt

The dataset, features and label embeddings of the config are reused (computed if missing); the
checkpoint must have been trained on the same features and word vectors (its metadata says).
Labels added to the vocabulary since training are scored zero-shot. The report goes to its own
folder, ``runs/<run>/evaluations/<checkpoint sha256[:16]>-<dataset version>/``, never over the
pipeline run's ``runs/<run>/reports/``; it names the checkpoint, dataset and code versions.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger

from flows.artifacts import publish_run_artifacts
from flows.cli import DEFAULT_CONFIG, add_config_arguments, checked_config, run_command
from flows.stages import evaluate_stage, prepare_inputs
from tasks import model_versions
from tasks.checkpoints import CHECKPOINT_NAMES, checkpoint_url
from tasks.config import Overrides, PipelineConfig, check_input_files, load_config
from tasks.evaluation import evaluation_prefix
from tasks.provenance import checkpoint_sha256
from tasks.storage import Storage


@flow(name="lesa-evaluate", log_prints=True)
def evaluate(
    config: str = DEFAULT_CONFIG,
    overrides: Overrides = None,
    checkpoint: str | None = None,
    model_version: str = "latest",
) -> dict[str, Any]:
    """Score one checkpoint on the config's test split and write its report.

    Args:
        config: path or URL of the YAML run config.
        overrides: config values to replace (dotted keys or nested sections).
        checkpoint: ``best``, ``final`` (checkpoints of the run's model version) or a
            checkpoint path/URL; default: ``evaluation.checkpoint`` of the config.
        model_version: the run's model version (``v0003``) or pointer (``latest``, ``best``)
            whose checkpoint is scored.
    """
    cfg = load_config(config, overrides)
    check_input_files(cfg, config)
    storage = Storage(cfg.storage)
    which = checkpoint or cfg.evaluation.checkpoint
    own = which in CHECKPOINT_NAMES
    version = model_versions.resolve(storage, cfg.run_name, model_version) if own else None
    url = version.checkpoints[which] if version else which
    if not storage.exists(url):
        raise FileNotFoundError(
            f"checkpoint not found: {url} (train first: python -m flows.full_pipeline "
            f"--config {config})"
        )
    baselines = _baseline_checkpoints(cfg, storage, which if own else None)
    evaluation_cfg = cfg.evaluation.model_copy(
        update={
            "baselines": [b for b in cfg.evaluation.baselines if b == "random" or b in baselines]
        }
    )
    evaluated = cfg.model_copy(update={"evaluation": evaluation_cfg})
    inputs = prepare_inputs(cfg, storage)
    prefix = evaluation_prefix(
        storage, cfg.run_name, checkpoint_sha256(storage, url), inputs.tables.version
    )
    result = evaluate_stage(
        evaluated,
        storage,
        inputs,
        checkpoint_url=url,
        baseline_checkpoints=baselines,
        prefix=prefix,
        model_version=version.version if version else None,
    )
    return publish_run_artifacts(
        cfg.run_name, result, [f"- {line}" for line in result.describe()], storage
    )


def _baseline_checkpoints(
    cfg: PipelineConfig, storage: Storage, which: str | None
) -> dict[str, str]:
    """The run's checkpoints of the model baselines the config scores, where they exist
    (``which`` of them, or ``evaluation.checkpoint`` when a checkpoint URL was given)."""
    found = {}
    for name in cfg.evaluation.baselines:
        if name == "random":
            continue
        candidate = checkpoint_url(
            storage, cfg.run_name, which or cfg.evaluation.checkpoint, baseline=name
        )
        if storage.exists(candidate):
            found[name] = candidate
        else:
            get_run_logger().warning(
                "no %s baseline checkpoint at %s; leaving it out", name, candidate
            )
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: validate the config first, evaluate, print the metrics table."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.evaluate",
        description=(
            "Evaluate a trained LESA checkpoint on the test split of a run config: ZSL and GZSL "
            "mAP and P/R/F1@K printed as a table and written as a report (metrics.json, "
            "report.md, PNG plots) under runs/<run>/evaluations/<checkpoint>-<data version>/ "
            "(the pipeline run's own report is left as it is)."
        ),
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--checkpoint",
        metavar="best|final|PATH_OR_URL",
        help="which checkpoint (default: evaluation.checkpoint of the config)",
    )
    parser.add_argument(
        "--model-version",
        default="latest",
        metavar="latest|best|vNNNN",
        help="the run's model version whose best/final checkpoint is scored (default: latest; "
        "python -m flows.models --config ... lists them)",
    )
    args = parser.parse_args(argv)
    overrides, cfg = checked_config(parser, args)
    if cfg is None:
        return 2
    return run_command(
        lambda: evaluate(
            config=args.config,
            overrides=overrides,
            checkpoint=args.checkpoint,
            model_version=args.model_version,
        ),
        failure="evaluation failed",
        title=f"LESA run {cfg.run_name} (evaluation)",
    )


if __name__ == "__main__":
    raise SystemExit(main())
