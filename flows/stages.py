"""The stage compositions the flows share, each written once: the inputs of training and
evaluation (dataset -> validated tables -> features -> label vectors, each reused when done)
and the evaluation stage with the run's config sections."""

from __future__ import annotations

from collections.abc import Mapping

from flows.artifacts import ATTENTION_ARTIFACT_KEY, publish_images
from tasks.config import PipelineConfig
from tasks.datasets import prepare_dataset_task
from tasks.embeddings import embed_labels_task
from tasks.evaluation import EvaluationResult, evaluate_checkpoint_task
from tasks.feature_config import features_prefix
from tasks.features import extract_features_task
from tasks.stage_inputs import StageInputs, load_tables_task
from tasks.storage import Storage


def prepare_inputs(cfg: PipelineConfig, storage: Storage) -> StageInputs:
    """Dataset -> validated label table -> features -> label embeddings (each reused if done)."""
    dataset = prepare_dataset_task(cfg.dataset, storage)
    tables = load_tables_task(storage, dataset)
    cfg.evaluation.check_ks(len(tables.unseen_labels), tables.name, len(tables.seen_labels))
    features = extract_features_task(
        tables.labels,
        dataset.images_prefix,
        cfg.features,
        storage,
        features_prefix(storage, dataset.name, cfg.features),
    )
    embeddings = embed_labels_task(tables.vocabulary, cfg.embeddings, storage)
    return StageInputs(tables, features, embeddings)


def evaluate_stage(
    cfg: PipelineConfig,
    storage: Storage,
    inputs: StageInputs,
    *,
    checkpoint_url: str,
    baseline_checkpoints: Mapping[str, str],
    prefix: str | None = None,
    model_version: str | None = None,
) -> EvaluationResult:
    """Score ``checkpoint_url`` (and the baselines' checkpoints) on the test split; report
    under ``prefix`` (default: the run's own report folder), and attach the attention grids of
    a few test images to the run."""
    result = evaluate_checkpoint_task(
        cfg.evaluation,
        storage,
        inputs,
        run_name=cfg.run_name,
        checkpoint_url=checkpoint_url,
        baseline_checkpoints=baseline_checkpoints,
        prefix=prefix,
        model_version=model_version,
    )
    if result.attention_urls:
        publish_images(
            storage,
            key=ATTENTION_ARTIFACT_KEY,
            title="Attention of test images (Figure 1; * = unseen label)",
            images=result.attention_urls,
            description=f"{cfg.run_name}: attention of a few test images",
        )
    return result
