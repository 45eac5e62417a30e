"""DatasetConfig picks its source by one key; prepare_dataset dispatches and skips finished work."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.states import Completed, Failed
from pydantic import TypeAdapter, ValidationError

from tasks.datasets import (
    DatasetConfig,
    EmojiScenesConfig,
    NusWideConfig,
    OpenImagesConfig,
    TableConfig,
    _retry_unless_bad_input,
    prepare_dataset,
)
from tasks.datasets.base import DatasetArtifacts, load_prepared
from tasks.storage import Storage, StorageConfig

ADAPTER = TypeAdapter(DatasetConfig)


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(StorageConfig(root=str(tmp_path / "store"), cache_dir=str(tmp_path / "c")))


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        ({"source": "nus-wide", "metadata": "s3://b/nus"}, NusWideConfig),
        (
            {
                "source": "open-images",
                "class_descriptions": "c.csv",
                "trainable_classes": "t.txt",
                "unseen_classes": "u.txt",
                "train_labels": "tr.csv",
                "test_labels": "te.csv",
                "images_prefix": "s3://b/oi",
            },
            OpenImagesConfig,
        ),
        ({"source": "table", "labels": "l.csv", "vocabulary": "v.csv"}, TableConfig),
        ({"source": "emoji-scenes"}, EmojiScenesConfig),
    ],
)
def test_union_selects_source(raw: dict[str, object], kind: type) -> None:
    assert isinstance(ADAPTER.validate_python(raw), kind)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"source": "coco"}, "does not match any of the expected tags"),
        ({"source": "table", "labels": "l.csv", "vocabulary": "v.csv", "sep": ","}, "sep"),
        ({"source": "nus-wide", "metadata": "m", "num_val": -1}, "num_val"),
        ({"source": "table", "labels": "l", "vocabulary": "v", "name": "../escape"}, "name"),
    ],
)
def test_union_rejects_bad_config_naming_the_key(raw: dict[str, object], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        ADAPTER.validate_python(raw)


def test_dispatch_writes_then_skips(tmp_path: Path, storage: Storage) -> None:
    (tmp_path / "labels.csv").write_text("uri,split,positives\na.jpg,train,cat\nb.jpg,test,dog\n")
    (tmp_path / "vocab.csv").write_text("label,seen\ncat,true\ndog,false\n")
    config = ADAPTER.validate_python(
        {
            "source": "table",
            "name": "t",
            "labels": str(tmp_path / "labels.csv"),
            "vocabulary": str(tmp_path / "vocab.csv"),
        }
    )
    artifacts = prepare_dataset(config, storage)
    assert artifacts == DatasetArtifacts(
        name="t",
        label_table_url=storage.url("datasets/t/labels.parquet"),
        vocabulary_url=storage.url("datasets/t/vocabulary.parquet"),
        images_prefix=str(tmp_path),
    )
    assert load_prepared(storage, "t", config) == artifacts
    # The raw files may disappear once prepared: a rerun does not read them.
    (tmp_path / "labels.csv").unlink()
    assert prepare_dataset(config, storage) == artifacts
    # A corrupted output is detected and rebuilt (here: fails, since the input is gone).
    storage.write_bytes(artifacts.label_table_url, b"garbage")
    assert load_prepared(storage, "t", config) is None


def test_unknown_source_object_is_refused(storage: Storage) -> None:
    with pytest.raises(ValueError, match="unknown dataset source 'coco'"):
        prepare_dataset(type("Fake", (), {"source": "coco"})(), storage)  # type: ignore[arg-type]


def test_prefect_wrapper_retries_transient_errors_only() -> None:
    assert _retry_unless_bad_input(None, None, Failed(data=OSError("S3 hiccup"))) is True
    assert _retry_unless_bad_input(None, None, Failed(data=ValueError("bad file"))) is False
    assert _retry_unless_bad_input(None, None, Completed(data=1)) is False
