"""The ``lesa-evaluate`` flow: score one checkpoint on a run config's test split
(``python -m flows.evaluate``), its report in its own folder with the checkpoint, dataset and
code versions it used.
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import flow, get_run_logger

from flows.arguments import DEFAULT_CONFIG
from flows.artifacts import publish_run_artifacts
from flows.cli import checked_config, run_command
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


def run_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``python -m flows.evaluate`` once parsed: validate the config, evaluate, print metrics."""
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
