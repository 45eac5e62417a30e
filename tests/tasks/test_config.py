"""Run configs: every shipped config loads; bad ones fail on load, naming the key path."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from lesa_model.config import TrainerConfig
from tasks.config import (
    DATASET_INPUTS,
    ConfigError,
    PipelineConfig,
    apply_overrides,
    check_input_files,
    input_files,
    load_config,
    parse_override,
)
from tasks.datasets import EmojiScenesConfig, NusWideConfig, OpenImagesConfig, TableConfig
from tasks.embeddings import KumoGlove
from tasks.evaluation import EvaluationConfig
from tasks.feature_config import FeaturesConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write_config(tmp_path: Path, data: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def tiny_data() -> dict:
    return yaml.safe_load((CONFIGS / "tiny.yaml").read_text())


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, PipelineConfig)
    assert config.run_name


def test_default_config_is_the_offline_embedded_one() -> None:
    config = load_config(CONFIGS / "default.yaml")
    assert isinstance(config.dataset, EmojiScenesConfig)
    assert config.features.backbone == "efficientnet-lite0"
    assert config.features.weights == "imagenet"
    assert config.embeddings.source == KumoGlove()


def test_paper_configs_use_vgg19_and_the_paper_ks() -> None:
    nus = load_config(CONFIGS / "nus-wide.yaml")
    assert isinstance(nus.dataset, NusWideConfig)
    assert nus.features.backbone == "vgg19"
    assert nus.evaluation.ks == [3, 5]
    assert nus.model.num_modules == 10
    assert load_config(CONFIGS / "open-images.yaml").evaluation.ks == [10, 20]


def test_sections_left_out_take_their_owners_defaults(tmp_path: Path, tiny_data: dict) -> None:
    del tiny_data["train"], tiny_data["evaluation"]
    config = load_config(write_config(tmp_path, tiny_data))
    assert config.train == TrainerConfig()
    assert config.evaluation == EvaluationConfig()


def test_selection_must_use_an_evaluation_k(tmp_path: Path, tiny_data: dict) -> None:
    """One K setting: validation selects on F1 at one of the K the evaluation reports."""
    data = apply_overrides(tiny_data, {"train.select": "F1@5", "evaluation.ks": [10, 20]})
    with pytest.raises(ConfigError, match=r"train.select is F1@5, but evaluation.ks is \[10, 20\]"):
        load_config(write_config(tmp_path, data))
    data = apply_overrides(data, {"train.select": "mAP"})
    assert load_config(write_config(tmp_path, data)).train.select == "mAP"


@pytest.mark.parametrize(
    ("override", "key", "message"),
    [
        ({"train": {"lr": "fast"}}, "train.lr", "valid number"),
        ({"train": {"bogus": 1}}, "train.bogus", "Extra inputs are not permitted"),
        ({"surprise": True}, "surprise", "Extra inputs are not permitted"),
        ({"dataset": {"num_train": "many"}}, "dataset.num_train", "valid integer"),
        ({"features": {"dask": {"n_workers": 0}}}, "features.dask.n_workers", "greater than"),
        ({"evaluation": {"ks": [3, "x"]}}, "evaluation.ks.1", "valid integer"),
        ({"evaluation": {"checkpoint": "latest"}}, "evaluation.checkpoint", "'best' or 'final'"),
        ({"dataset": {"source": "flickr"}}, "dataset", "does not match any of the expected tags"),
    ],
)
def test_bad_values_are_named_by_key_path(
    tmp_path: Path, tiny_data: dict, override: dict, key: str, message: str
) -> None:
    path = write_config(tmp_path, apply_overrides(tiny_data, override))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    line = next(line for line in str(error.value).splitlines() if line.strip().startswith(key))
    assert line.strip().startswith(f"{key}: ")
    assert message in line
    assert str(path) in str(error.value)


def test_missing_required_section_is_named(tmp_path: Path, tiny_data: dict) -> None:
    del tiny_data["dataset"]
    with pytest.raises(ConfigError, match=r"(?m)^  dataset: Field required"):
        load_config(write_config(tmp_path, tiny_data))


def test_only_run_name_and_dataset_are_required(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"run_name": "r", "dataset": {"source": "emoji-scenes"}})
    config = load_config(path)
    assert config.storage.root == ".lesa-data"
    assert config.features == FeaturesConfig()
    assert config.embeddings.source == KumoGlove()


def test_every_problem_is_listed_at_once(tmp_path: Path, tiny_data: dict) -> None:
    data = apply_overrides(tiny_data, {"train.lr": "x", "model.num_modules": -1})
    with pytest.raises(ConfigError) as error:
        load_config(write_config(tmp_path, data))
    assert "train.lr:" in str(error.value)
    assert "model.num_modules:" in str(error.value)


def test_config_errors_never_carry_a_secret_value() -> None:
    secret = "wJalrXUtnFEMI-not-a-real-key"
    overrides = {"storage.secret_key": secret, "storage.secret": 12345}
    with pytest.raises(ConfigError) as caught:
        load_config(CONFIGS / "tiny.yaml", overrides)
    assert "storage.secret_key" in str(caught.value)
    chain = traceback.format_exception(caught.value)
    assert not any(secret in line or "12345" in line for line in chain)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [("run_name: [unclosed", "not valid YAML"), ("- a\n- b\n", "must be a YAML mapping")],
)
def test_non_mapping_or_broken_yaml(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_overrides_dotted_and_nested_merge_into_sections() -> None:
    config = load_config(
        CONFIGS / "tiny.yaml",
        {"train.steps": 3, "storage": {"root": "s3://bucket/x"}, "model": {"num_modules": 4}},
    )
    assert config.train.steps == 3
    assert config.train.batch_size == 16  # the rest of the section is kept
    assert config.storage.root == "s3://bucket/x"
    assert config.model.num_modules == 4
    assert config.model.hidden_dim == 32


def test_override_into_a_value_that_is_not_a_section() -> None:
    with pytest.raises(ConfigError, match="run_name is not a section"):
        load_config(CONFIGS / "tiny.yaml", {"run_name.x": 1})


def test_override_values_are_typed_like_yaml() -> None:
    assert parse_override("train.lr=0.01") == ("train.lr", 0.01)
    assert parse_override("evaluation.ks=[10, 20]") == ("evaluation.ks", [10, 20])
    assert parse_override(" storage.root = s3://b/p") == ("storage.root", "s3://b/p")
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        parse_override("train.lr")


def table_config(tmp_path: Path, tiny_data: dict, **changes: str) -> PipelineConfig:
    """The tiny config on a ``table`` dataset whose label table and vocabulary exist."""
    (tmp_path / "labels.csv").write_text("uri,split,positives\n")
    (tmp_path / "vocabulary.csv").write_text("label,seen\n")
    dataset = {
        "source": "table",
        "labels": str(tmp_path / "labels.csv"),
        "vocabulary": f"file://{tmp_path / 'vocabulary.csv'}",
    }
    return load_config(write_config(tmp_path, {**tiny_data, "dataset": dataset}), changes)


def test_input_keys_are_fields_of_their_dataset_source() -> None:
    classes = {"table": TableConfig, "nus-wide": NusWideConfig, "open-images": OpenImagesConfig}
    assert set(DATASET_INPUTS) == set(classes)
    for source, keys in DATASET_INPUTS.items():
        assert set(keys) <= set(classes[source].model_fields), source


def test_input_files_lists_every_named_input_by_key(tmp_path: Path, tiny_data: dict) -> None:
    assert input_files(load_config(CONFIGS / "tiny.yaml")) == {}
    config = table_config(
        tmp_path,
        tiny_data,
        **{
            "features.weights": "/w/lite0.pt",
            "embeddings.source": {"kind": "glove-file", "url": "s3://b/g.txt"},
        },
    )
    assert input_files(config) == {
        "dataset.labels": str(tmp_path / "labels.csv"),
        "dataset.vocabulary": f"file://{tmp_path / 'vocabulary.csv'}",
        "features.weights": "/w/lite0.pt",
        "embeddings.source.url": "s3://b/g.txt",
    }
    assert set(input_files(load_config(CONFIGS / "open-images.yaml"))) == {
        f"dataset.{key}" for key in DATASET_INPUTS["open-images"]
    }


def test_missing_local_inputs_are_named_by_key(tmp_path: Path, tiny_data: dict) -> None:
    config = table_config(tmp_path, tiny_data)
    check_input_files(config, "run.yaml")
    config = table_config(
        tmp_path,
        tiny_data,
        **{
            "dataset.labels": str(tmp_path / "gone.csv"),
            "features.weights": f"file://{tmp_path / 'gone.pt'}",
            "embeddings.source": {"kind": "glove-file", "url": str(tmp_path / "gone.txt")},
        },
    )
    with pytest.raises(ConfigError) as error:
        check_input_files(config, "run.yaml")
    assert str(error.value).splitlines() == [
        "invalid config run.yaml:",
        f"  dataset.labels: file not found: {tmp_path / 'gone.csv'}",
        f"  features.weights: file not found: file://{tmp_path / 'gone.pt'}",
        f"  embeddings.source.url: file not found: {tmp_path / 'gone.txt'}",
    ]


def test_remote_inputs_are_left_to_their_stage() -> None:
    check_input_files(load_config(CONFIGS / "open-images.yaml"), "open-images.yaml")
    check_input_files(load_config(CONFIGS / "nus-wide.yaml"), "nus-wide.yaml")


@pytest.mark.slow
def test_config_from_s3(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    boto3.client("s3", endpoint_url=s3_server.endpoint_url).put_object(
        Bucket=s3_server.bucket, Key="configs/tiny.yaml", Body=(CONFIGS / "tiny.yaml").read_bytes()
    )
    config = load_config(f"s3://{s3_server.bucket}/configs/tiny.yaml")
    assert config.run_name == "tiny"
    with pytest.raises(ConfigError, match="not found"):
        load_config(f"s3://{s3_server.bucket}/configs/missing.yaml")


@pytest.mark.parametrize(
    "overrides",
    [
        {"storage.secret": "wJalrXUtnFEMI-not-a-real-key"},
        {"storage": {"key": "AKIAEXAMPLE", "root": "s3://b"}},
        {"storage.Secret_Access_Key": "wJalrXUtnFEMI-not-a-real-key"},
        {"dataset": {"download": {"password": "hunter2-not-real"}}},
    ],
    ids=["dotted", "nested", "any-case", "other-section"],
)
def test_secrets_given_as_overrides_are_refused_saying_how_to_pass_them(
    overrides: dict[str, Any],
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(CONFIGS / "tiny.yaml", overrides)
    message = str(caught.value)
    assert message.startswith("override: ")
    assert "AWS_ACCESS_KEY_ID" in message and "storage.credentials_block=" in message
    for secret in ("wJalrXUtnFEMI", "AKIAEXAMPLE", "hunter2"):
        assert not any(secret in line for line in traceback.format_exception(caught.value))


def test_a_secret_in_the_yaml_file_is_refused(tmp_path: Path, tiny_data: dict) -> None:
    tiny_data.setdefault("storage", {})["secret"] = "wJalrXUtnFEMI-not-a-real-key"
    path = write_config(tmp_path, tiny_data)
    with pytest.raises(ConfigError, match=rf"config {path}: storage.secret: secrets are not") as e:
        load_config(path)
    assert "wJalrXUtnFEMI" not in str(e.value)
    tiny_data["storage"] = {"root": "s3://bucket/lesa", "credentials_block": "my-s3-creds"}
    assert load_config(write_config(tmp_path, tiny_data)).storage.credentials_block == (
        "my-s3-creds"
    )
