"""The ``lesa`` flow: the whole pipeline on one run config (``python -m flows.full_pipeline``).

prepare dataset -> validate label table -> extract features (Dask) -> embed labels -> train ->
evaluate, every stage skipping work already done. The ``lesa/full-pipeline`` deployment in
``flows.deployments`` runs this same flow.
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import flow, get_run_logger

from flows.arguments import DEFAULT_CONFIG
from flows.artifacts import publish_run_artifacts
from flows.cli import checked_config, run_command
from flows.stages import evaluate_stage, prepare_inputs
from tasks.baselines import fit_eszsl_task, train_mean_pool_task
from tasks.config import Overrides, PipelineConfig, check_input_files, load_config
from tasks.evaluation import EvaluationResult
from tasks.stage_inputs import StageInputs
from tasks.storage import Storage
from tasks.training import TrainingOutcome, train_model_task

FLOW_NAME = "lesa"


def summary_lines(
    training: TrainingOutcome,
    evaluation: EvaluationResult,
    labels_update: dict[str, Any] | None,
) -> list[str]:
    """The run summary shown in the console and in the UI's Markdown artifact."""
    lines = []
    if labels_update:
        lines.append(f"- Triggered by new labels: {labels_update.get('summary', labels_update)}")
    lines.extend(f"- {line}" for line in training.describe())
    lines.extend(f"- {line}" for line in evaluation.describe())
    return lines


def train_models(
    cfg: PipelineConfig, storage: Storage, inputs: StageInputs
) -> tuple[TrainingOutcome, dict[str, str]]:
    """Train LESA and the trained baselines the evaluation scores (mean-pool, ESZSL): LESA's
    outcome and each baseline's checkpoint to evaluate (``evaluation.checkpoint``)."""
    sections = cfg.training_sections()
    training = train_model_task(storage, inputs, **sections)
    baselines = {}
    for name, task in (("mean-pool", train_mean_pool_task), ("eszsl", fit_eszsl_task)):
        if name in cfg.evaluation.baselines:
            urls = task(storage, inputs, **sections, tuning=cfg.evaluation.tuning)
            baselines[name] = urls[cfg.evaluation.checkpoint]
    return training, baselines


@flow(name=FLOW_NAME, log_prints=True)
def lesa(
    config: str = DEFAULT_CONFIG,
    overrides: Overrides = None,
    labels_update: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the LESA pipeline on one YAML config and return its metrics.

    Args:
        config: path or URL of the YAML run config (relative paths: from the working folder).
        overrides: config values to replace, as dotted keys or nested sections,
            e.g. ``{"storage.root": "s3://bucket/lesa", "train": {"steps": 200}}``.
        labels_update: set by the ``lesa.labels.updated`` trigger: what changed in the labels.
    """
    logger = get_run_logger()
    cfg = load_config(config, overrides)
    check_input_files(cfg, config)
    storage = Storage(cfg.storage)
    logger.info("run %s: storage %s", cfg.run_name, storage.root)

    inputs = prepare_inputs(cfg, storage)
    training, baselines = train_models(cfg, storage, inputs)
    which = cfg.evaluation.checkpoint
    evaluation = evaluate_stage(
        cfg,
        storage,
        inputs,
        checkpoint_url=training.checkpoints[which],
        baseline_checkpoints=baselines,
        model_version=training.model_version,
    )

    lines = summary_lines(training, evaluation, labels_update)
    for line in lines:
        logger.info(line.removeprefix("- "))
    result = publish_run_artifacts(cfg.run_name, evaluation, lines, storage)
    return {**result, "retrained": not training.reused}


def run_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``python -m flows.full_pipeline`` once parsed: validate the config, run, print metrics."""
    overrides, cfg = checked_config(parser, args)
    if cfg is None:
        return 2
    return run_command(
        lambda: lesa(config=args.config, overrides=overrides),
        failure="the pipeline failed",
        title=f"LESA run {cfg.run_name}",
    )
