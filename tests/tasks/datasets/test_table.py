"""The user's own CSV / parquet tables parse to the documented annotations; bad input is named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks import schemas
from tasks.datasets.base import DatasetError
from tasks.datasets.table import TableConfig, prepare_table
from tasks.storage import Storage, StorageConfig

VOCABULARY_CSV = "label,seen,tokens\ncat,true,\nsofa,1,couch\nhot_dog,no,\nzebra,unseen,\n"
LABELS_CSV = (
    "uri,split,positives,negatives,complete\n"
    "a/1.jpg,train,cat|sofa,,true\n"
    "a/2.png,val,sofa, cat ,false\n"
    "s3://bucket/3.jpg,TEST,hot_dog|cat,zebra,false\n"
)
EXPECTED = np.array(
    [
        # cat sofa hot_dog zebra
        [1, 1, -1, -1],
        [-1, 1, 0, 0],
        [1, 0, 1, -1],
    ],
    dtype=np.int8,
)
LABELS = ["cat", "sofa", "hot_dog", "zebra"]


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(StorageConfig(root=str(tmp_path / "store"), cache_dir=str(tmp_path / "c")))


def _write(
    tmp_path: Path, labels: str = LABELS_CSV, vocabulary: str = VOCABULARY_CSV
) -> TableConfig:
    (tmp_path / "labels.csv").write_text(labels)
    (tmp_path / "vocabulary.csv").write_text(vocabulary)
    return TableConfig(
        name="mine",
        labels=str(tmp_path / "labels.csv"),
        vocabulary=str(tmp_path / "vocabulary.csv"),
    )


def test_a_description_column_is_kept_and_blank_cells_are_empty(
    tmp_path: Path, storage: Storage
) -> None:
    described = (
        "label,seen,description\ncat,1,small pet; feline\nsofa,1,\nhot_dog,0,food\nzebra,0,\n"
    )
    artifacts = prepare_table(_write(tmp_path, vocabulary=described), storage)
    vocabulary = storage.read_parquet(artifacts.vocabulary_url)
    assert vocabulary["description"].tolist() == ["small pet; feline", "", "food", ""]


def test_csv_parses_to_expected_matrix(tmp_path: Path, storage: Storage) -> None:
    artifacts = prepare_table(_write(tmp_path), storage)
    labels = storage.read_parquet(artifacts.label_table_url)
    vocabulary = storage.read_parquet(artifacts.vocabulary_url)
    assert vocabulary["seen"].tolist() == [True, True, False, False]
    assert vocabulary["tokens"].tolist() == ["cat", "couch", "hot dog", "zebra"]
    assert labels["image_id"].tolist() == ["a/1", "a/2", "s3://bucket/3"]
    assert labels["split"].tolist() == ["train", "val", "test"]
    np.testing.assert_array_equal(schemas.label_matrix(labels, LABELS), EXPECTED)
    assert artifacts.images_prefix == str(tmp_path)


def test_parquet_with_list_columns_matches_csv(tmp_path: Path, storage: Storage) -> None:
    frame = pd.DataFrame(
        {
            "image_id": ["one", "two", "three"],
            "uri": ["a/1.jpg", "a/2.png", "s3://bucket/3.jpg"],
            "split": ["train", "val", "test"],
            "positives": [["cat", "sofa"], ["sofa"], ["hot_dog", "cat"]],
            "negatives": [[], ["cat"], ["zebra"]],
            "complete": [True, False, False],
        }
    )
    frame.to_parquet(tmp_path / "labels.parquet")
    pd.DataFrame(
        {"label": LABELS, "seen": [True, True, False, False], "tokens": [None, "couch", None, ""]}
    ).to_parquet(tmp_path / "vocab.parquet")
    config = TableConfig(
        labels=str(tmp_path / "labels.parquet"),
        vocabulary=str(tmp_path / "vocab.parquet"),
        images_prefix="s3://bucket/images",
    )
    artifacts = prepare_table(config, storage)
    labels = storage.read_parquet(artifacts.label_table_url)
    assert labels["image_id"].tolist() == ["one", "two", "three"]
    np.testing.assert_array_equal(schemas.label_matrix(labels, LABELS), EXPECTED)
    assert artifacts.images_prefix == "s3://bucket/images"
    vocabulary = storage.read_parquet(artifacts.vocabulary_url)
    assert vocabulary["tokens"].tolist() == ["cat", "couch", "hot dog", "zebra"]


def test_complete_defaults_from_config(tmp_path: Path, storage: Storage) -> None:
    config = _write(tmp_path, labels="uri,split,positives\nx.jpg,train,cat\n").model_copy(
        update={"complete": False}
    )
    labels = storage.read_parquet(prepare_table(config, storage).label_table_url)
    np.testing.assert_array_equal(schemas.label_matrix(labels, LABELS), [[1, 0, 0, 0]])


@pytest.mark.parametrize(
    ("labels", "vocabulary", "error", "match"),
    [
        ("uri,positives\nx.jpg,cat\n", VOCABULARY_CSV, DatasetError,
         r"lacks column\(s\) \['split'\]"),
        ("uri,split,positives\nx.jpg,train,cat\nx.png,test,cat\n", VOCABULARY_CSV, DatasetError,
         r"duplicate image ids \['x'\]"),
        ("uri,split,positives\nx.jpg,training,cat\n", VOCABULARY_CSV, schemas.SchemaError,
         r"column 'split'.*training"),
        ("uri,split,positives\nx.jpg,train,cat|dog\n", VOCABULARY_CSV, schemas.SchemaError,
         r"label in vocabulary.*'dog'"),
        ("uri,split,positives,negatives\nx.jpg,train,cat,cat\n", VOCABULARY_CSV,
         schemas.SchemaError, "disjoint"),
        ("uri,split,positives\nx.jpg,train,cat\n", "label,seen\ncat,maybe\n", DatasetError,
         r"'seen' has values that are not true/false: \['maybe'\]"),
        ("uri,split,positives\n,train,cat\n", VOCABULARY_CSV, DatasetError, "empty uri"),
    ],
)  # fmt: skip
def test_bad_input_is_named(
    tmp_path: Path,
    storage: Storage,
    labels: str,
    vocabulary: str,
    error: type[Exception],
    match: str,
) -> None:
    with pytest.raises(error, match=match):
        prepare_table(_write(tmp_path, labels, vocabulary), storage)
    assert not storage.exists(storage.url("datasets", "mine", "labels.parquet"))


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        # Header = line 1, so data row 3 is line 4; blank lines count as lines.
        (LABELS_CSV + "a/4.jpg,train,unicorn,,true\n", r"(?s)labels\.csv .*line 5: 'unicorn'"),
        (LABELS_CSV + "\n\na/4.jpg,holdout,cat,,true\n", r"(?s)labels\.csv .*line 7: 'holdout'"),
        (LABELS_CSV + "a/1.png,train,cat,,true\n", r"duplicate image ids \['a/1'\] at line 2, l"),
        (LABELS_CSV + ",train,cat,,true\n", r"empty uri at line 5"),
        (LABELS_CSV + "a/5.jpg,train,cat,,perhaps\n", r"'complete' .*\['perhaps'\] at line 5"),
    ],
    ids=["unknown-label", "bad-split-after-blank-lines", "duplicate-id", "empty-uri", "flag"],
)  # fmt: skip
def test_errors_name_the_file_and_the_line_a_person_sees(
    tmp_path: Path, storage: Storage, labels: str, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        prepare_table(_write(tmp_path, labels), storage)


def test_parquet_errors_count_rows_from_one(tmp_path: Path, storage: Storage) -> None:
    pd.DataFrame({"label": ["cat", "dog", "cat"], "seen": [True, False, True]}).to_parquet(
        tmp_path / "vocab.parquet"
    )
    config = _write(tmp_path).model_copy(update={"vocabulary": str(tmp_path / "vocab.parquet")})
    match = r"(?s)vocab\.parquet .*row 1: 'cat'.*row 3: 'cat'"
    with pytest.raises(schemas.SchemaError, match=match):
        prepare_table(config, storage)


@pytest.mark.parametrize(
    ("vocabulary", "match"),
    [
        (
            pd.DataFrame({"label": ["cat", None, "dog"], "seen": [True, False, False]}),
            r"vocab\.parquet: empty or null label at row 2",
        ),
        (
            pd.DataFrame({"label": ["cat", float("nan")], "seen": [True, False]}),
            r"empty or null label at row 2",
        ),
        (
            pd.DataFrame({"label": pd.Series([], dtype=str), "seen": pd.Series([], dtype=bool)}),
            r"vocab\.parquet lists no labels",
        ),
    ],
    ids=["none", "nan", "empty"],
)
def test_null_or_no_labels_in_a_parquet_vocabulary_are_named(
    tmp_path: Path, storage: Storage, vocabulary: pd.DataFrame, match: str
) -> None:
    """Was an AttributeError (retried twice) and a dtype error about `tokens`."""
    vocabulary.to_parquet(tmp_path / "vocab.parquet")
    config = _write(tmp_path).model_copy(update={"vocabulary": str(tmp_path / "vocab.parquet")})
    with pytest.raises(DatasetError, match=match):
        prepare_table(config, storage)


@pytest.mark.parametrize(
    "bad_labels",
    [
        LABELS_CSV + "a/4.jpg,train,unicorn,,true\n",
        LABELS_CSV + "a/4.jpg,holdout,cat,,true\n",
        LABELS_CSV + "a/1.png,train,cat,,true\n",
    ],
    ids=["unknown-label", "unknown-split", "duplicate-id"],
)
def test_bad_rewrite_keeps_the_previous_dataset(
    tmp_path: Path, storage: Storage, bad_labels: str
) -> None:
    config = _write(tmp_path)
    artifacts = prepare_table(config, storage)
    outputs = [artifacts.label_table_url, artifacts.vocabulary_url]
    outputs.append(storage.url("datasets", "mine", "dataset.json"))
    before = [storage.read_bytes(url) for url in outputs]
    (tmp_path / "labels.csv").write_text(bad_labels)
    with pytest.raises(ValueError, match=r"label in vocabulary|'split'|duplicate image ids"):
        prepare_table(config, storage)
    assert [storage.read_bytes(url) for url in outputs] == before


def test_missing_and_unreadable_files(tmp_path: Path, storage: Storage) -> None:
    config = _write(tmp_path)
    (tmp_path / "labels.csv").unlink()
    with pytest.raises(DatasetError, match=r"missing label table: .*labels\.csv"):
        prepare_table(config, storage)
    (tmp_path / "labels.parquet").write_bytes(b"not parquet")
    broken = config.model_copy(update={"labels": str(tmp_path / "labels.parquet")})
    with pytest.raises(DatasetError, match="not a readable parquet file"):
        prepare_table(broken, storage)


def test_a_table_rewritten_in_place_is_a_new_version(tmp_path: Path, storage: Storage) -> None:
    config = _write(tmp_path)
    prepare_table(config, storage)
    marker = storage.url("datasets", "mine", "dataset.json")
    written = storage.read_json(marker)
    prepare_table(config, storage)
    assert storage.read_json(marker) == written, "unchanged files must be reused as they are"

    (tmp_path / "labels.csv").write_text(LABELS_CSV + "a/4.jpg,train,cat,,false\n")
    artifacts = prepare_table(config, storage)
    labels = storage.read_parquet(artifacts.label_table_url)
    assert labels["image_id"].tolist()[-1] == "a/4"
    rebuilt = storage.read_json(marker)
    assert rebuilt["config_sha256"] != written["config_sha256"]
    assert set(rebuilt["inputs"]) == {config.labels, config.vocabulary}


@pytest.mark.slow
def test_inputs_and_outputs_on_s3(s3_storage: Storage) -> None:
    storage = s3_storage
    storage.write_bytes(storage.url("raw/labels.csv"), LABELS_CSV.encode())
    storage.write_parquet(
        storage.url("raw/vocab.parquet"),
        pd.DataFrame({"label": LABELS, "seen": [True, True, False, False]}),
    )
    config = TableConfig(
        name="s3-table",
        labels=storage.url("raw/labels.csv"),
        vocabulary=storage.url("raw/vocab.parquet"),
    )
    artifacts = prepare_table(config, storage)
    assert artifacts.images_prefix == storage.url("raw")
    labels = storage.read_parquet(artifacts.label_table_url)
    np.testing.assert_array_equal(schemas.label_matrix(labels, LABELS), EXPECTED)
    assert storage.read_json(storage.url("datasets/s3-table/dataset.json"))["num_images"] == 3
    assert prepare_table(config, storage) == artifacts
