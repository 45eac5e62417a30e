"""The paper's ablation as a grid of runs on one set of prepared inputs, in parallel on Dask.

Each cell of the grid is one variant (dotted overrides of the ``model``, ``loss`` and ``train``
sections, e.g. ``loss.div: 0``) trained with one seed, then scored on the test split like the
pipeline's own run. Cells are independent runs of :func:`tasks.training.train_model` under
their own run name (``<run>.ablation.<variant>.s<seed>``), so every cell is reused on rerun and
resumed after a failure, exactly as the pipeline's training is; the dataset, features and label
vectors are prepared once by the caller and shared by all cells.

The summary gives, per variant, the mean and sample standard deviation over seeds of ZSL / GZSL
mAP and F1@K; the report is a Markdown table (like the paper's ablation table) and a plot of
ZSL against GZSL mAP per variant, written under ``runs/<run>/ablation/``.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
import torch
from distributed import as_completed
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

from tasks.ablation_config import AblationVariant
from tasks.config import PipelineConfig, apply_overrides
from tasks.evaluation import evaluate_checkpoint
from tasks.feature_config import DaskConfig
from tasks.features import dask_client
from tasks.progress import RunProgress
from tasks.stage_inputs import StageInputs
from tasks.storage import Storage
from tasks.training import train_model

ABLATION_DIR = "ablation"


def cell_run_name(run_name: str, variant: str, seed: int) -> str:
    """``<run>.ablation.<variant slug>.s<seed>``: a valid, distinct run name per cell."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", variant).strip("-").lower() or "variant"
    return f"{run_name}.ablation.{slug}.s{seed}"


def cell_config(config: PipelineConfig, variant: AblationVariant, seed: int) -> PipelineConfig:
    """The run config of one cell: the variant's overrides, the seed, its own run name.

    A variant that switches to ``train.select: mix`` without naming ``train.select_seen`` mixes
    the pseudo-unseen mAP with the run's own seen-label rule. The evaluation scores LESA alone
    (baselines and the pointing game belong to the main run).
    """
    own_rule = {}
    if variant.set.get("train.select") == "mix" and config.train.select != "mix":
        own_rule = {"train.select_seen": config.train.select}
    data = apply_overrides(
        config.model_dump(mode="json"),
        {
            **own_rule,
            **variant.set,
            "train.seed": seed,
            "run_name": cell_run_name(config.run_name, variant.name, seed),
            "evaluation.baselines": [],
            "evaluation.pointing_pairs": 0,
        },
    )
    try:
        return PipelineConfig.model_validate(data)
    except ValueError as error:
        raise ValueError(f"ablation variant {variant.name!r}: {error}") from error


def run_cell(
    config: PipelineConfig,
    storage: Storage,
    inputs: StageInputs,
    variant: AblationVariant,
    seed: int,
) -> dict[str, Any]:
    """Train (or reuse) and evaluate one cell; runs on a Dask worker, one torch thread each."""
    torch.set_num_threads(1)
    cell = cell_config(config, variant, seed)
    outcome = train_model(storage, inputs, **cell.training_sections())
    result = evaluate_checkpoint(
        cell.evaluation,
        storage,
        inputs,
        run_name=cell.run_name,
        checkpoint_url=outcome.checkpoints[cell.evaluation.checkpoint],
    )
    return {
        "variant": variant.name,
        "seed": seed,
        "run_name": cell.run_name,
        "best_step": outcome.result.get("best_step"),
        "reused": outcome.reused,
        "metrics": result.metrics["LESA"],
    }


def run_ablation(
    config: PipelineConfig, storage: Storage, inputs: StageInputs, *, dask: DaskConfig
) -> list[dict[str, Any]]:
    """Run every (variant, seed) cell of ``config.ablation`` on Dask; results in grid order.

    Every cell's config is checked before anything is submitted, so a bad variant fails at once.
    Inside a Prefect task run, the finished share of the grid shows as its progress.
    """
    progress = RunProgress(f"ablation {config.run_name}")
    grid = [(v, seed) for v in config.ablation.variants for seed in config.ablation.seeds]
    for variant, seed in grid:
        cell_config(config, variant, seed)
    results: dict[tuple[str, int], dict[str, Any]] = {}
    with dask_client(dask) as client:
        shared = client.scatter([config, storage, inputs], broadcast=True)
        futures = [
            client.submit(run_cell, *shared, variant, seed, pure=False) for variant, seed in grid
        ]
        for done, future in enumerate(as_completed(futures), start=1):
            record = future.result()
            results[record["variant"], record["seed"]] = record
            progress(done, len(grid))
    return [results[variant.name, seed] for variant, seed in grid]


# -- summary and report ----------------------------------------------------------------------


def summarise(results: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per variant (grid order): seeds, and mean / std over seeds of every ZSL and GZSL metric.

    Columns ``<setting> <metric> mean`` and ``... std`` (fractions; std 0 for one seed).
    """
    rows = []
    for variant in dict.fromkeys(record["variant"] for record in results):
        runs = [record for record in results if record["variant"] == variant]
        row: dict[str, Any] = {"variant": variant, "seeds": len(runs)}
        for setting in ("zsl", "gzsl"):
            for metric in runs[0]["metrics"][setting]:
                values = np.array([run["metrics"][setting][metric] for run in runs])
                name = f"{setting.upper()} {metric}"
                row[f"{name} mean"] = float(values.mean())
                row[f"{name} std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def _metric_names(summary: pd.DataFrame) -> list[str]:
    return [column.removesuffix(" mean") for column in summary.columns if column.endswith("mean")]


def ablation_markdown(summary: pd.DataFrame, *, run_name: str) -> str:
    """The ablation table (mAP and F1@K, ZSL then GZSL; mean ± std over seeds, in %)."""
    names = [name for name in _metric_names(summary) if name.split()[1][:2] in ("mA", "F1")]
    lines = [
        f"# Ablation of run `{run_name}`",
        "",
        "Mean ± standard deviation over seeds, in %; every cell is a full training run.",
        "",
        "| variant | seeds | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for _, row in summary.iterrows():
        cells = [
            f"{100 * row[f'{name} mean']:.2f} ± {100 * row[f'{name} std']:.2f}" for name in names
        ]
        lines.append(f"| {row['variant']} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ablation_figure(summary: pd.DataFrame) -> Figure:
    """ZSL mAP against GZSL mAP per variant, with the seeds' standard deviation as error bars."""
    figure, axes = plt.subplots(figsize=(7, 5))
    for _, row in summary.iterrows():
        axes.errorbar(
            100 * row["GZSL mAP mean"],
            100 * row["ZSL mAP mean"],
            xerr=100 * row["GZSL mAP std"],
            yerr=100 * row["ZSL mAP std"],
            fmt="o",
            capsize=3,
        )
        axes.annotate(
            row["variant"],
            (100 * row["GZSL mAP mean"], 100 * row["ZSL mAP mean"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    axes.set_xlabel("GZSL mAP (%)")
    axes.set_ylabel("ZSL mAP (%)")
    axes.set_title("Ablation: zero-shot against generalised zero-shot (mean ± std over seeds)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def write_ablation_report(
    results: Sequence[dict[str, Any]], storage: Storage, *, run_name: str
) -> dict[str, str]:
    """Write ``ablation.md``, ``ablation.png`` and ``ablation.json``; return their URLs."""
    summary = summarise(results)
    prefix = storage.url("runs", run_name, ABLATION_DIR)
    figure = ablation_figure(summary)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    urls = {name: f"{prefix}/{name}" for name in ("ablation.md", "ablation.png", "ablation.json")}
    storage.write_bytes(urls["ablation.md"], ablation_markdown(summary, run_name=run_name).encode())
    storage.write_bytes(urls["ablation.png"], buffer.getvalue())
    storage.write_json(
        urls["ablation.json"],
        {"summary": summary.to_dict(orient="records"), "runs": list(results)},
    )
    return urls
