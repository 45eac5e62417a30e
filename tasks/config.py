"""The run configuration: one YAML file composing every stage's own config section.

Each section class lives with the module that uses it (one source of truth per default); this
module only composes them and loads YAML, so that a bad file fails before any work starts, with
an error that names the offending key (``train.lr: Input should be a valid number``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import fsspec
import yaml
from pydantic import Field, ValidationError, WithJsonSchema, model_validator

from lesa_common import StrictModel
from lesa_model.backbones import PRETRAINED, RANDOM
from lesa_model.config import LossConfig, ModelConfig, TrainerConfig
from tasks.ablation_config import AblationConfig
from tasks.datasets import DatasetConfig
from tasks.embeddings import EmbeddingConfig, NusWideRelease
from tasks.evaluation import EvaluationConfig
from tasks.feature_config import FeaturesConfig
from tasks.settings import environment_overrides
from tasks.storage import (
    OVERRIDES_JSON_SCHEMA,
    SECRETS_HELP,
    StorageConfig,
    is_local,
    local_path,
    secret_keys,
)

__all__ = [
    "ConfigError",
    "Overrides",
    "PipelineConfig",
    "apply_overrides",
    "check_input_files",
    "input_files",
    "load_config",
    "parse_override",
]


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the file and the key path."""


Overrides = Annotated[dict[str, Any] | None, WithJsonSchema(OVERRIDES_JSON_SCHEMA)]
"""The type of a flow's ``overrides`` parameter: its JSON schema makes the Prefect server refuse
a run whose overrides name a secret key, before the run (and the secret) is stored."""


def _refuse_secrets(data: Any, where: str) -> None:
    found = secret_keys(data)
    if found:
        raise ConfigError(f"{where}: {', '.join(found)}: {SECRETS_HELP}")


DATASET_INPUTS: dict[str, tuple[str, ...]] = {
    "table": ("labels", "vocabulary", "images_prefix"),
    "nus-wide": ("metadata", "images", "urls_file"),
    "open-images": (
        "class_descriptions",
        "trainable_classes",
        "unseen_classes",
        "train_labels",
        "val_labels",
        "test_labels",
        "images_prefix",
    ),
}
"""Keys of each dataset source that name a file or folder the run reads."""


class PipelineConfig(StrictModel):
    """Everything one pipeline run needs, section by section.

    Only the run's name and its dataset must be given; every other section (and every key in
    one) left out takes the defaults of its config class.
    """

    run_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    dataset: DatasetConfig
    storage: StorageConfig = Field(default_factory=StorageConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    embeddings: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainerConfig = Field(default_factory=TrainerConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    ablation: AblationConfig = Field(default_factory=AblationConfig)

    @model_validator(mode="before")
    @classmethod
    def _release_vectors_name_their_rows(cls, data: Any) -> Any:
        """The authors' NUS-WIDE vectors name their rows from the run's NUS-WIDE metadata."""
        if not isinstance(data, Mapping):
            return data
        source = (data.get("embeddings") or {}).get("source")
        dataset = data.get("dataset") or {}
        if (
            isinstance(source, Mapping)
            and source.get("kind") == NusWideRelease.model_fields["kind"].default
            and not source.get("metadata")
            and dataset.get("source") == "nus-wide"
        ):
            source = {**source, "metadata": dataset.get("metadata")}
            return {**data, "embeddings": {**data["embeddings"], "source": source}}
        return data

    @model_validator(mode="after")
    def _one_k_setting(self) -> PipelineConfig:
        """Validation and evaluation report F1 at the same K: the selection must be one of them."""
        k = self.train.select_k
        if k is not None and k not in self.evaluation.ks:
            key = "train.select_seen" if self.train.select == "mix" else "train.select"
            raise ValueError(
                f"{key} is F1@{k}, but evaluation.ks is {self.evaluation.ks}: select "
                f"F1 at one of those K (or mAP): validation and evaluation use one K setting"
            )
        return self

    def training_sections(self) -> dict[str, Any]:
        """The sections the training stages take (LESA's and the trained baselines'), as
        keyword arguments: the run's name, model, loss and trainer settings, and the K the
        validation reports (the evaluation's)."""
        return {
            "run_name": self.run_name,
            "model": self.model,
            "loss": self.loss,
            "trainer": self.train,
            "val_ks": self.evaluation.ks,
        }


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.path=value`` (value read as YAML, so numbers and lists get their types)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    return key.strip(), yaml.safe_load(value)


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge overrides into raw config data.

    Keys may be dotted paths (``{"train.max_steps": 10}``) or nested mappings
    (``{"train": {"max_steps": 10}}``); nested mappings merge into existing sections
    instead of replacing them.
    """
    merged = json.loads(json.dumps(data))
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = merged
        for index, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parents[: index + 1])
                raise ConfigError(f"override {key!r}: {where} is not a section")
            node = child
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            node[leaf] = apply_overrides(node[leaf], value)
        else:
            node[leaf] = value
    return merged


def _key_path(loc: tuple[int | str, ...], data: Any) -> str:
    """Turn a pydantic error location into the key path a user wrote.

    Tagged unions add the tag to the location (``dataset.emoji-scenes.num_images``); those
    entries are not keys of the YAML, so they are skipped by walking the raw data alongside.
    """
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(node, Mapping):
            if item in node:
                parts.append(str(item))
                node = node[item]
            elif isinstance(item, str) and _is_union_tag(node, item):
                continue
            else:
                parts.append(str(item))
                node = None
        elif isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
            parts.append(str(item))
            node = node[item]
        else:
            parts.append(str(item))
            node = None
    return ".".join(parts) or "(top level)"


def _is_union_tag(node: Mapping[str, Any], item: str) -> bool:
    """Whether ``item`` is the value of a discriminator field of ``node`` (e.g. ``source``)."""
    return any(value == item for value in node.values() if isinstance(value, str))


def _format_errors(error: ValidationError, data: Any, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    for detail in error.errors():
        lines.append(f"  {_key_path(tuple(detail['loc']), data)}: {detail['msg']}")
    return "\n".join(lines)


def _read_text(source: str | Path) -> str:
    text_source = str(source)
    try:
        with fsspec.open(text_source, "rt", encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {text_source}") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"config path is a directory, not a YAML file: {text_source}") from exc


def load_config(source: str | Path, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """Read and validate a YAML run config from a path or URL (``s3://``, ``https://``).

    Values set by the environment (``tasks.settings``: ``LESA_STORAGE_ROOT``,
    ``DASK_SCHEDULER_ADDRESS``) replace the file's; ``overrides`` replace both.

    Raises:
        ConfigError: the file is missing or not YAML, a key is unknown, missing or wrongly
            typed (the message lists every problem with its key path), or the file or an
            override names a secret (which must come from the environment or a Secret block).
    """
    text = _read_text(source)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {source} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {source} must be a YAML mapping, got {type(data).__name__}")
    _refuse_secrets(data, f"config {source}")
    _refuse_secrets(overrides, "override")
    data = apply_overrides(apply_overrides(data, environment_overrides()), overrides)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        # Not chained: pydantic's error repeats every input value, and a misspelt key may hold
        # a secret; the message names each key and rule, which is all the user needs.
        raise ConfigError(_format_errors(exc, data, str(source))) from None


def input_files(config: PipelineConfig) -> dict[str, str]:
    """Every file or folder the config names as an input, by key path (``dataset.labels``).

    Unset optional keys, pretrained/random weights and built-in embedding sources name nothing.
    """
    dataset = config.dataset
    found = {
        f"dataset.{key}": value
        for key in DATASET_INPUTS.get(dataset.source, ())
        if (value := getattr(dataset, key))
    }
    for index, url in enumerate(getattr(dataset, "image_ids", [])):
        found[f"dataset.image_ids[{index}]"] = url
    if config.features.weights not in (PRETRAINED, RANDOM):
        found["features.weights"] = config.features.weights
    for key, url in config.embeddings.source.input_files().items():
        found[f"embeddings.source.{key}"] = url
    return found


def check_input_files(config: PipelineConfig, origin: str | Path) -> None:
    """Fail before any work starts when a local input file the config names does not exist.

    Only local paths (plain or ``file://``) are checked: asking S3 or HTTP here would make a
    config check wait on the network, and the stage that reads a remote input reports a missing
    one itself (and retries a transient failure).

    Raises:
        ConfigError: naming each key whose local file or folder is missing.
    """
    missing = [
        f"  {key}: file not found: {value}"
        for key, value in input_files(config).items()
        if is_local(value) and not local_path(value).expanduser().exists()
    ]
    if missing:
        raise ConfigError("\n".join([f"invalid config {origin}:", *missing]))
