"""Table models: good rows pass, bad rows fail naming stage/column/rule; label_matrix vs a loop."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pytest

from tasks import schemas
from tasks.schemas import (
    FeatureManifest,
    LabelEmbeddings,
    LabelTable,
    ObjectBoxes,
    Rejects,
    SchemaError,
    SourceFile,
    Vocabulary,
    label_matrix,
    validate,
)
from tasks.storage import Storage, StorageConfig

SHA = "ab" * 32


def label_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": ["i0", "i1", "i2"],
            "uri": ["a/0.jpg", "s3://b/1.jpg", "2.jpg"],
            "split": ["train", "val", "test"],
            "positives": [["cat", "dog"], [], ["sky"]],
            "negatives": [["sky"], ["cat"], []],
            "complete": [False, True, False],
        }
    )


def vocabulary() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "label": ["cat", "dog", "sky", "hot dog"],
            "seen": [True, True, False, False],
            "tokens": ["cat", "dog", "sky", "hot dog"],
            "description": ["small pet; mammal", "pet; mammal", None, "sausage in a bun; dish"],
        }
    )


def label_embeddings() -> pd.DataFrame:
    return pd.DataFrame({"label": ["cat", "dog"], "vector": [[0.6, 0.8], [1.0, 0.0]]})


def object_boxes() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": ["i0", "i0"],
            "label": ["cat", "dog"],
            "x0": [0, 10.5],
            "y0": [0, 3],
            "x1": [20, 40],
            "y1": [5, 9.5],
        }
    )


def feature_manifest() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "shard_index": [0, 1],
            "shard_uri": ["f/shard-00000.h5", "f/shard-00001.h5"],
            "num_images": [100, 7],
            "backbone": ["efficientnet-lite0", "efficientnet-lite0"],
            "preprocessing": ["224/[-1,1]", "224/[-1,1]"],
            "regions": [49, 49],
            "dim": [1280, 1280],
            "dtype": ["float16", "float16"],
            "sha256": [SHA, SHA],
            "size_bytes": [12345, 999],
            "ids_sha256": [SHA, SHA],
            "images_sha256": [SHA, SHA],
        }
    )


def rejects() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": ["i9"],
            "uri": ["9.jpg"],
            "stage": ["download"],
            "reason": ["placeholder image"],
        }
    )


GOOD: dict[type[pa.DataFrameModel], Callable[[], pd.DataFrame]] = {
    LabelTable: label_table,
    Vocabulary: vocabulary,
    LabelEmbeddings: label_embeddings,
    ObjectBoxes: object_boxes,
    FeatureManifest: feature_manifest,
    Rejects: rejects,
}


def _set(frame: pd.DataFrame, column: str, row: int, value: object) -> pd.DataFrame:
    frame = frame.copy()
    if isinstance(value, list) or frame[column].dtype != object:
        frame[column] = frame[column].astype(object)
    frame.at[row, column] = value
    return frame


# (model, column expected in the message, how to break a good table)
BAD = [
    (LabelTable, "image_id", lambda f: _set(f, "image_id", 1, "i0")),
    (LabelTable, "split", lambda f: _set(f, "split", 2, "holdout")),
    (LabelTable, "uri", lambda f: _set(f, "uri", 0, None)),
    (LabelTable, "positives", lambda f: _set(f, "positives", 0, "cat")),
    (LabelTable, "negatives", lambda f: _set(f, "negatives", 1, [3])),
    (LabelTable, "negatives", lambda f: _set(f, "negatives", 0, ["cat"])),
    (LabelTable, "complete", lambda f: _set(f, "complete", 0, "yes")),
    (LabelTable, "positives", lambda f: f.drop(columns="positives")),
    (Vocabulary, "label", lambda f: _set(f, "label", 1, "cat")),
    (Vocabulary, "seen", lambda f: _set(f, "seen", 0, "maybe")),
    (Vocabulary, "tokens", lambda f: _set(f, "tokens", 2, "  ")),
    (LabelEmbeddings, "vector", lambda f: _set(f, "vector", 0, [np.nan, 1.0])),
    (LabelEmbeddings, "vector", lambda f: _set(f, "vector", 0, [0.0, 0.6, 0.8])),
    (LabelEmbeddings, "vector", lambda f: _set(f, "vector", 1, [2.0, 0.0])),
    (LabelEmbeddings, "label", lambda f: _set(f, "label", 1, "cat")),
    (ObjectBoxes, "x1", lambda f: _set(f, "x1", 0, -1.0)),
    (ObjectBoxes, "y1", lambda f: _set(f, "y1", 1, 2.0)),
    (FeatureManifest, "shard_index", lambda f: _set(f, "shard_index", 1, 0)),
    (FeatureManifest, "dtype", lambda f: _set(f, "dtype", 0, "float64")),
    (FeatureManifest, "sha256", lambda f: _set(f, "sha256", 0, "not-a-hash")),
    (FeatureManifest, "regions", lambda f: _set(f, "regions", 0, 0)),
    (Rejects, "reason", lambda f: _set(f, "reason", 0, "")),
]


@pytest.mark.parametrize("model", list(GOOD), ids=lambda m: m.__name__)
def test_good_tables_pass(model: type[pa.DataFrameModel]) -> None:
    frame = GOOD[model]()
    validated = validate(frame, model, stage="unit")
    assert list(validated.columns) == list(frame.columns)
    assert len(validated) == len(frame)


@pytest.mark.parametrize(
    ("model", "column", "breaker"),
    BAD,
    ids=[f"{m.__name__}-{c}-{i}" for i, (m, c, _) in enumerate(BAD)],
)
def test_bad_tables_fail_naming_stage_and_column(
    model: type[pa.DataFrameModel], column: str, breaker: Callable
) -> None:
    bad = breaker(GOOD[model]())
    with pytest.raises(SchemaError) as caught:
        validate(bad, model, stage="load-xyz")
    message = str(caught.value)
    assert message.startswith("load-xyz: ")
    assert model.__name__ in message
    assert repr(column) in message
    assert caught.value.stage == "load-xyz"
    assert isinstance(caught.value, ValueError)


def test_message_lists_every_failure_with_example_rows() -> None:
    bad = label_table()
    bad["split"] = ["nope", "train", "nope2"]
    bad.at[1, "image_id"] = "i0"
    with pytest.raises(SchemaError) as caught:
        validate(bad, LabelTable, stage="parse")
    message = str(caught.value)
    assert "'split'" in message and "'image_id'" in message
    assert "isin" in message and "uniqueness" in message
    assert "'nope'" in message and "'nope2'" in message
    assert "row 0" in message and "row 2" in message


def test_labels_must_be_in_vocabulary() -> None:
    table = label_table()
    table.at[2, "positives"] = ["sky", "unicorn"]
    validate(table.drop(index=2), LabelTable, stage="ok", vocabulary=vocabulary())
    with pytest.raises(SchemaError, match=r"'positives'.*vocabulary.*'unicorn'"):
        validate(table, LabelTable, stage="ok", vocabulary=vocabulary())


def test_vocabulary_check_only_for_label_tables() -> None:
    with pytest.raises(ValueError, match="LabelTable"):
        validate(vocabulary(), Vocabulary, stage="x", vocabulary=vocabulary())


def test_ints_are_coerced_for_numeric_columns() -> None:
    boxes = validate(object_boxes(), ObjectBoxes, stage="boxes")
    assert boxes["x0"].dtype == np.float64
    manifest = feature_manifest().astype({"num_images": np.int32})
    assert validate(manifest, FeatureManifest, stage="m")["num_images"].dtype == np.int64


@pytest.mark.parametrize("model", list(GOOD), ids=lambda m: m.__name__)
def test_empty_tables_validate(model: type[pa.DataFrameModel]) -> None:
    frame = schemas.empty(model)
    assert len(frame) == 0
    assert list(frame.columns) == list(GOOD[model]().columns)
    validate(frame, model, stage="empty")


def _label_matrix_loop(table: pd.DataFrame, labels: list[str]) -> np.ndarray:
    out = np.zeros((len(table), len(labels)), dtype=np.int8)
    for i, row in enumerate(table.itertuples()):
        for j, label in enumerate(labels):
            if label in row.positives:
                out[i, j] = 1
            elif label in row.negatives or row.complete:
                out[i, j] = -1
    return out


def test_label_matrix_matches_loop_on_random_table() -> None:
    rng = np.random.default_rng(7)
    labels = [f"l{i}" for i in range(40)]
    positives, negatives = [], []
    for _ in range(300):
        chosen = rng.permutation(40)[: rng.integers(0, 12)]
        cut = rng.integers(0, len(chosen) + 1)
        positives.append([labels[j] for j in chosen[:cut]])
        negatives.append([labels[j] for j in chosen[cut:]])
    table = pd.DataFrame(
        {"positives": positives, "negatives": negatives, "complete": rng.random(300) < 0.3}
    )
    subset = [labels[j] for j in rng.permutation(40)[:25]]
    for columns in (labels, subset, []):
        matrix = label_matrix(table, columns)
        assert matrix.dtype == np.int8
        np.testing.assert_array_equal(matrix, _label_matrix_loop(table, columns))


def test_label_matrix_hand_example_and_duplicates() -> None:
    matrix = label_matrix(label_table(), ["sky", "cat", "dog", "hot dog"])
    expected = np.array([[-1, 1, 1, 0], [-1, -1, -1, -1], [1, 0, 0, 0]], dtype=np.int8)
    np.testing.assert_array_equal(matrix, expected)
    with pytest.raises(ValueError, match="duplicate labels"):
        label_matrix(label_table(), ["cat", "cat"])


def test_label_matrix_accepts_numpy_array_lists() -> None:
    table = label_table()
    table["positives"] = [np.array(v, dtype=object) for v in table["positives"]]
    table["negatives"] = [np.array(v, dtype=object) for v in table["negatives"]]
    np.testing.assert_array_equal(
        label_matrix(table, ["cat", "sky"]), label_matrix(label_table(), ["cat", "sky"])
    )


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return Storage(StorageConfig(root=str(tmp_path)))
    server = request.getfixturevalue("s3_server")
    return Storage(
        StorageConfig(
            root=f"s3://{server.bucket}/{uuid.uuid4().hex}",
            endpoint_url=server.endpoint_url,
            cache_dir=str(tmp_path / "cache"),
        )
    )


def test_every_table_round_trips_through_storage(storage: Storage) -> None:
    for model, make in GOOD.items():
        frame = validate(make(), model, stage="write")
        url = storage.url("tables", f"{model.__name__}.parquet")
        storage.write_parquet(url, frame)
        back = validate(storage.read_parquet(url), model, stage="read")
        for column in frame.columns:
            assert back[column].tolist() == frame[column].tolist(), (model.__name__, column)


@pytest.mark.parametrize(
    ("source", "first", "third"),
    [
        (SourceFile("in/labels.csv", header_lines=1), "line 2", "line 4"),
        (SourceFile("in/lists.txt", header_lines=0), "line 1", "line 3"),
        ("in/labels.parquet", "row 1", "row 3"),
    ],
    ids=["csv-with-header", "text-without-header", "parquet"],
)
def test_errors_name_the_file_and_count_rows_from_one(
    source: SourceFile | str, first: str, third: str
) -> None:
    bad = label_table()
    bad["split"] = ["nope", "train", "nope2"]
    with pytest.raises(SchemaError) as caught:
        validate(bad, LabelTable, stage="dataset", source=source)
    message = str(caught.value)
    url = source if isinstance(source, str) else source.url
    assert message.startswith(f"dataset: LabelTable table {url} is invalid:")
    assert f"{first}: 'nope'" in message and f"{third}: 'nope2'" in message
    unknown = label_table()
    unknown.at[2, "positives"] = ["unicorn"]
    with pytest.raises(SchemaError, match=rf"{url}.*\n.*{third}: 'unicorn'"):
        validate(unknown, LabelTable, stage="dataset", vocabulary=vocabulary(), source=source)


def test_a_manifest_written_before_images_sha256_existed_still_validates() -> None:
    """Older manifests lack the column; their shards are recomputed, not refused."""
    old = GOOD[FeatureManifest]().drop(columns="images_sha256")
    assert "images_sha256" not in validate(old, FeatureManifest, stage="t").columns
