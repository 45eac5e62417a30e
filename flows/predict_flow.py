"""The ``lesa-predict`` flow (``python -m flows.predict``): tag a few images with a checkpoint,
any labels, into CSV, JSON and attention maps.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from prefect import flow, get_run_logger
from pydantic import ValidationError
from rich.console import Console

from flows.cli import overrides_from, prepare_process
from lesa_model.config import BACKBONE_BATCH
from tasks import model_versions
from tasks.config import ConfigError, load_config
from tasks.model_versions import ModelVersionError
from tasks.prediction import (
    find_images,
    load_predictor_task,
    parse_labels,
    predict_images_task,
    print_predictions,
    resolve_threshold,
    write_predictions_task,
)
from tasks.storage import Storage, StorageConfig
from tasks.tag_options import DEFAULT_TOP_K, PredictionError

FLOW_NAME = "lesa-predict"


@flow(name=FLOW_NAME)
def predict(
    checkpoint: str,
    images: list[str],
    labels: list[str] | None = None,
    top_k: int | None = DEFAULT_TOP_K,
    threshold: str | None = None,
    out: str = "predictions",
    attention_maps: bool = False,
    storage: StorageConfig | None = None,
    batch_size: int = BACKBONE_BATCH,
) -> dict[str, Any]:
    """Tag ``images`` (files, folders, ``s3://`` prefixes) and write CSV/JSON (+ maps) to ``out``.

    Args:
        checkpoint: path or URL of a checkpoint written by the training stage.
        images: image files, folders or prefixes.
        labels: the labels to score (see :func:`tasks.prediction.parse_labels` for reading a
            label file or list); default: the seen and unseen labels recorded in the checkpoint.
        top_k: labels kept per image; with ``threshold``, at most this many (None: no cap).
        threshold: ``calibrated`` (the thresholds evaluation fitted on the run's validation
            split, stored beside the checkpoint) or a number: tag every label scoring at least
            it. None: top-K only.
        out: folder or URL for predictions.csv, predictions.json and attention/.
        attention_maps: also write a heatmap per (image, top label) and a grid figure per image.
        storage: how to reach ``s3://`` URLs (endpoint, credentials); default from the env.
        batch_size: images per backbone pass.
    """
    logger = get_run_logger()
    store = Storage(storage)
    predictor = load_predictor_task(checkpoint, store)
    cut = None if threshold is None else resolve_threshold(threshold, checkpoint, store)
    names = labels or predictor.known_labels
    if not names:
        raise PredictionError("the checkpoint records no labels and none were given: pass --labels")
    uris, missing = find_images(images, store)
    logger.info("%d image(s), %d label(s), checkpoint %s", len(uris), len(names), checkpoint)
    predictions = predict_images_task(
        predictor,
        uris,
        names,
        store,
        top_k=top_k,
        threshold=cut,
        attention=attention_maps,
        batch_size=batch_size,
        skipped=missing,
    )
    artifacts = write_predictions_task(predictions, store, out, attention_maps=attention_maps)
    print_predictions(predictions)
    logger.info("wrote %s and %s", artifacts.csv_url, artifacts.json_url)
    document = predictions.document()
    return {
        "csv": artifacts.csv_url,
        "json": artifacts.json_url,
        "attention_maps": artifacts.attention_urls,
        "images": document["images"],
        "skipped": document["skipped"],
    }


def run_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``python -m flows.predict`` once parsed: check the arguments and labels, run the flow,
    say where the outputs went."""
    prepare_process()
    storage_config = storage_section(parser, args)
    try:
        checkpoint = chosen_checkpoint(parser, args, storage_config)
        labels = None if args.labels is None else parse_labels(args.labels, Storage(storage_config))
        result = predict(
            checkpoint=checkpoint,
            images=args.images,
            labels=labels,
            top_k=args.top_k or (None if args.threshold else DEFAULT_TOP_K),
            threshold=args.threshold,
            out=args.out,
            attention_maps=args.attention_maps,
            storage=storage_config,
            batch_size=args.batch_size,
        )
    except (PredictionError, ModelVersionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"error: prediction failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    console = Console()
    console.print(f"predictions: {result['csv']}, {result['json']}", markup=False)
    if result["attention_maps"]:
        console.print(f"attention maps: {len(result['attention_maps'])} files", markup=False)
    return 0


def chosen_checkpoint(
    parser: argparse.ArgumentParser, args: argparse.Namespace, storage: StorageConfig
) -> str:
    """``--checkpoint``, else the ``best.pt`` of the ``--config`` run's ``--model-version``."""
    if args.checkpoint:
        if args.model_version:
            parser.error("--model-version picks a checkpoint of the --config run: give it or "
                         "--checkpoint, not both")  # fmt: skip
        return args.checkpoint
    if args.config is None:
        parser.error("give --checkpoint PATH_OR_URL, or --config RUN_CONFIG to use that run's "
                     "model version (--model-version, default latest)")  # fmt: skip
    run_name = load_config(args.config, overrides_from(parser, args.overrides)).run_name
    version = model_versions.resolve(Storage(storage), run_name, args.model_version or "latest")
    return version.checkpoints["best"]


def storage_section(parser: argparse.ArgumentParser, args: argparse.Namespace) -> StorageConfig:
    """The storage section of ``--config`` (with ``--set``), or the environment's defaults."""
    overrides = overrides_from(parser, args.overrides)
    if args.config is None:
        storage_overrides = {
            key.removeprefix("storage."): value
            for key, value in overrides.items()
            if key.startswith("storage.")
        }
        other = sorted(set(overrides) - {f"storage.{key}" for key in storage_overrides})
        if other:
            parser.error(f"only storage.* settings apply to prediction, not {other}")
        try:
            return StorageConfig(**storage_overrides)
        except ValidationError as exc:
            parser.error(f"invalid storage setting: {exc}")
    try:
        return load_config(args.config, overrides).storage
    except ConfigError as exc:
        parser.error(str(exc))
