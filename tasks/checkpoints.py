"""Trained checkpoints as the pipeline hands them on: where they live and what they were made of.

:class:`CheckpointMetadata` travels inside every checkpoint file. The training stage writes it;
evaluation checks it against the features and word vectors it is about to score with (a model
trained on other features would score, but meaninglessly); prediction reads it to recompute
exactly the features the model was trained on and to embed new labels with the same vectors.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from lesa_model.checkpoint import load_model
from lesa_model.model import LESA
from tasks.embeddings import EmbeddingSource, LabelText, SourceKind
from tasks.feature_config import FeatureIdentity, feature_key
from tasks.storage import Storage

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_NAMES = ("best", "final")
"""The checkpoints every training run ends with (``best`` is ``final`` without validation)."""


class CheckpointMetadataError(ValueError):
    """A checkpoint whose metadata is missing or not what the training stage writes."""


class CheckpointMismatchError(ValueError):
    """A checkpoint was trained on other features or word vectors than the run provides."""


class CheckpointMetadata(BaseModel):
    """What a checkpoint's model was trained on."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    run_name: str
    baseline: str | None = None
    """The baseline model the checkpoint holds (``mean-pool``, ``eszsl``); None for LESA."""
    training_key: str
    dataset: str
    seen_labels: list[str]
    unseen_labels: list[str]
    """Unseen labels of the vocabulary at training time (scored zero-shot)."""
    embedding_source: EmbeddingSource
    embedding_dim: int
    label_text: LabelText = "label"
    """What embedded the labels in training (``embeddings.text``); new labels at prediction
    time are embedded from their words only."""
    feature_key: str
    features: FeatureIdentity

    @model_validator(mode="before")
    @classmethod
    def _older_layout(cls, data: Any) -> Any:
        """Checkpoints from before ``features`` was recorded name only the backbone, image
        size and preprocessing: rebuild the identity with the default weights and dtype, and
        accept it only if it reproduces the recorded feature key (features computed any other
        way would silently feed the model numbers it never saw)."""
        if not isinstance(data, dict) or "features" in data:
            return data
        missing = [key for key in ("backbone", "image_size", "feature_key") if key not in data]
        if missing:
            raise ValueError(
                f"metadata lacks {missing}; cannot tell which backbone made its features"
            )
        kind = str(data.get("preprocessing") or "").split("-resize", 1)[0] or None
        identity = FeatureIdentity(
            backbone=data["backbone"], image_size=int(data["image_size"]), preprocessing=kind
        )
        if feature_key(identity) != data["feature_key"]:
            raise ValueError(
                f"its features ({data['feature_key']}) were not made with {identity.backbone}'s "
                f"default weights and dtype ({feature_key(identity)}), and the metadata has no "
                "'features' section saying how they were made"
            )
        return {**data, "features": identity}

    @property
    def known_labels(self) -> list[str]:
        """Seen then unseen labels recorded at training time."""
        return list(dict.fromkeys(self.seen_labels + self.unseen_labels))

    def check_trained_on(self, url: str, features_key: str, source: SourceKind) -> None:
        """Refuse to score features or word vectors other than the ones the model learnt from.

        Raises:
            CheckpointMismatchError: naming the differing fact and both values.
        """
        for name, recorded, given in (
            ("feature_key", self.feature_key, features_key),
            ("embedding_source", self.embedding_source.identity, source.identity),
        ):
            if recorded != given:
                raise CheckpointMismatchError(
                    f"checkpoint {url} was trained with {name} = {recorded!r}, but this run "
                    f"has {given!r}; evaluate it with the config it was trained with"
                )


def read_metadata(raw: dict[str, Any], url: str) -> CheckpointMetadata:
    """The typed metadata of checkpoint ``url`` (its ``metadata`` dict)."""
    try:
        return CheckpointMetadata.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, item['loc'])) or 'metadata'}: {item['msg']}"
            for item in error.errors()
        )
        raise CheckpointMetadataError(
            f"checkpoint {url}: {problems} (it was not written by this project's training stage)"
        ) from None


def load_trained_model(storage: Storage, url: str) -> tuple[LESA, CheckpointMetadata]:
    """The model of a checkpoint (path or URL, in eval mode on the CPU) and its metadata.

    Raises:
        FileNotFoundError: no checkpoint at ``url``.
        ValueError: not a LESA checkpoint, or metadata not written by the training stage.
    """
    if not storage.exists(url):
        raise FileNotFoundError(f"checkpoint not found: {url}")
    model, raw = load_model(storage.local_copy(url))
    return model, read_metadata(raw, url)


def run_prefix(storage: Storage, run_name: str, baseline: str | None = None) -> str:
    """``runs/<run>``, or ``runs/<run>/baselines/<baseline>`` for a baseline model."""
    parts = ("runs", run_name, *(("baselines", baseline) if baseline else ()))
    return storage.url(*parts)


def checkpoint_url(storage: Storage, run_name: str, which: str, baseline: str | None = None) -> str:
    """URL of a run's ``best`` or ``final`` checkpoint."""
    return f"{run_prefix(storage, run_name, baseline)}/{CHECKPOINTS_DIR}/{which}.pt"
