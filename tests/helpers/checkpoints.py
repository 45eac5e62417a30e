"""Checkpoint files as the training stage writes them, for prediction tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lesa_model.checkpoint import model_payload, save_checkpoint
from lesa_model.config import ModelConfig
from lesa_model.model import LESA
from tasks.checkpoints import CheckpointMetadata
from tasks.embeddings import KumoGlove
from tasks.feature_config import FeatureIdentity, feature_key


def checkpoint_metadata(
    features: FeatureIdentity, seen: list[str], unseen: list[str], **changes: Any
) -> dict[str, Any]:
    """The metadata dict the training stage writes (``changes`` replace or add keys)."""
    metadata = CheckpointMetadata(
        run_name="test",
        training_key="0" * 16,
        dataset="test",
        seen_labels=seen,
        unseen_labels=unseen,
        embedding_source=KumoGlove(),
        embedding_dim=50,
        feature_key=feature_key(features),
        features=features.identity(),
    )
    return {**metadata.model_dump(mode="json"), **changes}


def write_checkpoint(
    path: Path,
    features: FeatureIdentity,
    seen: list[str],
    unseen: list[str],
    *,
    model: ModelConfig,
    **changes: Any,
) -> Path:
    """A small untrained LESA (50-d label vectors, 1280-d regions) with training's metadata."""
    torch.manual_seed(0)
    network = LESA(1280, 50, model, grid=features.grid)
    metadata = checkpoint_metadata(features, seen, unseen, **changes)
    return save_checkpoint(path, {**model_payload(network), "metadata": metadata})
