"""The batch-tagging flow (``python -m flows.tag``, the ``lesa/tag-images`` deployment): tag a
collection on Dask in shards, reusing the shards an earlier run finished.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.arguments import DEFAULT_CONFIG
from flows.cli import checked_config
from tasks.config import Overrides, load_config
from tasks.prediction import parse_labels
from tasks.storage import Storage
from tasks.tag_options import DEFAULT_SHARD_SIZE, DEFAULT_TOP_K, PredictionError
from tasks.tagging import TaggingSummary, tag_images_task

FLOW_NAME = "lesa"
SUMMARY_ARTIFACT_KEY = "lesa-tagging"


def summary_markdown(summary: TaggingSummary) -> str:
    """The run's summary artifact: counts, where the tables are, rejects by reason."""
    lines = [
        "# Batch tagging",
        "",
        f"- images: {summary.images} ({summary.tagged_now} tagged in this run in "
        f"{summary.shards_run} shard(s), {summary.reused} reused from earlier runs)",
        f"- labels: {summary.labels}; tags written: {summary.tags}",
        f"- rejected: {summary.rejected}",
        f"- time: {summary.seconds:.1f} s",
        f"- tags: `{summary.tags_url}`",
        f"- rejects: `{summary.rejects_url}`",
    ]
    if summary.rejects_by_reason:
        lines += ["", "| reason | images |", "|---|---:|"]
        lines += [f"| {reason} | {count} |" for reason, count in summary.rejects_by_reason.items()]
    return "\n".join(lines) + "\n"


@flow(name=FLOW_NAME, flow_run_name="tag-images", log_prints=True)
def tag_images(
    checkpoint: str,
    images: list[str],
    out: str,
    labels: list[str] | None = None,
    top_k: int | None = None,
    threshold: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    config: str = DEFAULT_CONFIG,
    overrides: Overrides = None,
) -> dict[str, Any]:
    """Tag every image under ``images`` with ``checkpoint`` into tables under ``out``.

    Args:
        checkpoint: path or URL of a checkpoint written by the training stage.
        images: image files, folders or ``s3://`` prefixes.
        out: folder or URL of the tables (and of the parts a rerun resumes from).
        labels: labels to score; default: the checkpoint's seen and unseen labels.
        top_k: tags per image (with ``threshold``: at most this many); default 5 without one.
        threshold: ``calibrated`` or a number (see ``python -m flows.predict --help``).
        shard_size: images per Dask task.
        config: run config whose ``storage`` and ``features.dask`` sections are used.
        overrides: values to replace in it (``storage.*``, ``features.dask.*``).
    """
    cfg = load_config(config, overrides)
    summary = tag_images_task(
        checkpoint,
        images,
        out,
        Storage(cfg.storage),
        labels=labels,
        top_k=top_k or (None if threshold else DEFAULT_TOP_K),
        threshold=threshold,
        shard_size=shard_size,
        dask=cfg.features.dask,
    )
    get_run_logger().info(
        "%d images, %d tagged now, %d reused, %d rejected: %s",
        summary.images,
        summary.tagged_now,
        summary.reused,
        summary.rejected,
        summary.tags_url,
    )
    create_markdown_artifact(
        summary_markdown(summary), key=SUMMARY_ARTIFACT_KEY, description="batch tagging"
    )
    return {"summary": summary.model_dump()}


def run_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``python -m flows.tag`` once parsed: check the config, run the flow, print the summary."""
    overrides, cfg = checked_config(parser, args, check_inputs=False)
    if cfg is None:
        return 2
    try:
        labels = None if args.labels is None else parse_labels(args.labels, Storage(cfg.storage))
        result = tag_images(
            checkpoint=args.checkpoint,
            images=args.images,
            out=args.out,
            labels=labels,
            top_k=args.top_k,
            threshold=args.threshold,
            shard_size=args.shard_size,
            config=args.config,
            overrides=overrides,
        )
    except PredictionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"error: tagging failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    summary = TaggingSummary.model_validate(result["summary"])
    print(summary_markdown(summary))
    return 0
