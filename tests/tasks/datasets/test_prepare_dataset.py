"""DatasetConfig picks its source by one key; prepare_dataset dispatches and skips finished work."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from tasks.datasets import (
    DatasetConfig,
    EmojiScenesConfig,
    NusWideConfig,
    OpenImagesConfig,
    TableConfig,
    prepare_dataset,
)
from tasks.datasets.base import DatasetArtifacts, DatasetError, load_prepared
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
    assert prepare_dataset(config, storage) == artifacts
    # The user's files are the dataset's version: without them a rerun cannot tell it is current.
    (tmp_path / "labels.csv").unlink()
    with pytest.raises(DatasetError, match="missing label table"):
        prepare_dataset(config, storage)
    # A corrupted output is detected, so the caller rebuilds.
    storage.write_bytes(artifacts.label_table_url, b"garbage")
    assert load_prepared(storage, "t", config) is None


def test_unknown_source_object_is_refused(storage: Storage) -> None:
    with pytest.raises(ValueError, match="unknown dataset source 'coco'"):
        prepare_dataset(type("Fake", (), {"source": "coco"})(), storage)  # type: ignore[arg-type]


@pytest.mark.parametrize("marker", [b"{not json", b"[1, 2]"])
def test_unreadable_marker_rebuilds(tmp_path: Path, storage: Storage, marker: bytes) -> None:
    (tmp_path / "labels.csv").write_text("uri,split,positives\na.jpg,train,cat\n")
    (tmp_path / "vocab.csv").write_text("label,seen\ncat,true\n")
    config = TableConfig(
        name="t", labels=str(tmp_path / "labels.csv"), vocabulary=str(tmp_path / "vocab.csv")
    )
    artifacts = prepare_dataset(config, storage)
    marker_url = storage.url("datasets/t/dataset.json")
    written = storage.read_json(marker_url)
    storage.write_bytes(marker_url, marker)
    assert load_prepared(storage, "t", config) is None
    assert prepare_dataset(config, storage) == artifacts
    assert storage.read_json(marker_url) == written
