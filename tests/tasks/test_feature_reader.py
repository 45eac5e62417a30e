"""FeatureStore and FeatureBatches over hand-written HDF5 shards (independent of the writer)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from lesa_model.data import BatchSource, batch_count
from tasks.feature_reader import FeatureBatches, FeatureStore
from tasks.feature_shards import FeatureStoreError, ids_sha256, shard_name
from tasks.storage import Storage, StorageConfig

REGIONS, DIM = 4, 3


@dataclass
class ToySet:
    storage: Storage
    manifest_url: str
    ids: list[str]
    features: dict[str, np.ndarray]
    shard_of: dict[str, int]


def write_toy_set(
    storage: Storage,
    prefix: str,
    sizes: list[int],
    dtype: str = "float32",
    folder: Path | None = None,
) -> ToySet:
    """Shards of sizes ``sizes`` with features[r, d] = image number + r/10 + d/100 (exact in
    float16 for small numbers); shards are written locally and uploaded when remote."""
    rows, ids, features, shard_of = [], [], {}, {}
    number = 0
    for index, size in enumerate(sizes):
        shard_ids = [f"im{number + k:03d}" for k in range(size)]
        values = (
            np.stack(
                [
                    (number + k) + np.arange(REGIONS)[:, None] / 10 + np.arange(DIM)[None, :] / 100
                    for k in range(size)
                ]
            ).astype(dtype)
            if size
            else np.zeros((0, REGIONS, DIM), dtype)
        )
        local = (folder or Path(prefix)) / shard_name(index)
        local.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(local, "w") as shard:
            shard.create_dataset(
                "features", data=values, maxshape=(None, REGIONS, DIM), chunks=(2, REGIONS, DIM)
            )
            shard.create_dataset(
                "image_ids", data=np.array(shard_ids, dtype=object), dtype=h5py.string_dtype()
            )
            shard.attrs.update(
                {"backbone": "toy", "preprocessing": "none", "grid": [2, 2], "format_version": 1}
            )
        uri = f"{prefix}/{shard_name(index)}"
        if folder is not None:
            storage.upload_file(local, uri)
        data = local.read_bytes()
        rows.append(
            {
                "shard_index": index,
                "shard_uri": uri,
                "num_images": size,
                "backbone": "toy",
                "preprocessing": "none",
                "regions": REGIONS,
                "dim": DIM,
                "dtype": dtype,
                "sha256": hashlib.sha256(data).hexdigest(),
                "size_bytes": len(data),
                "ids_sha256": ids_sha256(shard_ids),
            }
        )
        for k, image_id in enumerate(shard_ids):
            features[image_id] = values[k]
            shard_of[image_id] = index
        ids += shard_ids
        number += size
    manifest_url = f"{prefix}/manifest.parquet"
    storage.write_parquet(manifest_url, pd.DataFrame(rows))
    return ToySet(storage, manifest_url, ids, features, shard_of)


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(StorageConfig(root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache")))


@pytest.fixture
def toy(storage: Storage) -> ToySet:
    return write_toy_set(storage, storage.url("features", "toy"), [5, 4, 0, 6, 3])


def labels_for(count: int) -> np.ndarray:
    """Labels that encode the image number, so features and labels can be checked to match."""
    labels = np.zeros((count, 8), dtype=np.int8)
    for number in range(count):
        bits = [(number >> b) & 1 for b in range(8)]
        labels[number] = np.where(bits, 1, -1)
    return labels


def decode_number(label_row: np.ndarray) -> int:
    return int(sum(1 << b for b in range(8) if label_row[b] == 1))


# -- FeatureStore ------------------------------------------------------------------------------


def test_store_describes_the_feature_set(toy: ToySet) -> None:
    with FeatureStore(toy.manifest_url, toy.storage) as store:
        assert (store.regions, store.dim, store.grid) == (REGIONS, DIM, (2, 2))
        assert store.num_images == 18
        assert list(store.image_ids) == toy.ids
        assert store.backbone == "toy"
        assert store.dtype == np.float32


def test_store_reads_any_ids_in_the_order_asked(toy: ToySet) -> None:
    wanted = ["im017", "im000", "im009", "im004", "im009", "im012"]
    store = FeatureStore(toy.manifest_url, toy.storage)
    got = store.read(wanted)
    np.testing.assert_array_equal(got, np.stack([toy.features[i] for i in wanted]))
    shards, rows = store.locate(wanted)
    assert shards.tolist() == [toy.shard_of[i] for i in wanted]
    assert rows.tolist() == [17 - 15, 0, 0, 4, 0, 12 - 9]


def test_store_reads_whole_and_partial_shards(toy: ToySet) -> None:
    store = FeatureStore(toy.manifest_url, toy.storage)
    whole = store.read_rows(3)
    np.testing.assert_array_equal(
        whole, np.stack([toy.features[f"im{n:03d}"] for n in range(9, 15)])
    )
    np.testing.assert_array_equal(store.read_rows(3, np.array([5, 0])), whole[[5, 0]])
    assert store.read_rows(3, np.array([], dtype=np.int64)).shape == (0, REGIONS, DIM)


def test_store_unknown_ids_are_named(toy: ToySet) -> None:
    store = FeatureStore(toy.manifest_url, toy.storage)
    with pytest.raises(FeatureStoreError, match="'nope'"):
        store.read(["im001", "nope"])


def test_manifest_listing_a_missing_shard_is_a_clear_error(toy: ToySet) -> None:
    Path(toy.storage.url("features", "toy", shard_name(1))).unlink()
    store = FeatureStore(toy.manifest_url, toy.storage)
    with pytest.raises(FeatureStoreError, match=r"shard-00001\.h5, which is missing"):
        store.read(["im006"])


def test_shard_changed_after_commit_is_detected(toy: ToySet) -> None:
    path = Path(toy.storage.url("features", "toy", shard_name(0)))
    path.write_bytes(path.read_bytes() + b"extra")
    with pytest.raises(FeatureStoreError, match="changed after it was committed"):
        FeatureStore(toy.manifest_url, toy.storage).read(["im000"])


def test_missing_or_invalid_manifest(storage: Storage, toy: ToySet) -> None:
    with pytest.raises(FeatureStoreError, match="no feature manifest"):
        FeatureStore(storage.url("nowhere", "manifest.parquet"), storage)
    manifest = storage.read_parquet(toy.manifest_url)
    manifest.loc[1, "dim"] = 7
    storage.write_parquet(toy.manifest_url, manifest)
    with pytest.raises(FeatureStoreError, match="different dim"):
        FeatureStore(toy.manifest_url, storage)


def test_store_reads_remote_shards_through_the_cache(tmp_path: Path, s3_storage: Storage) -> None:
    storage = s3_storage
    toy = write_toy_set(
        storage, storage.url("features", "toy"), [3, 2], dtype="float16", folder=tmp_path / "w"
    )
    store = FeatureStore(toy.manifest_url, storage)
    got = store.read(["im004", "im001"])
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, np.stack([toy.features["im004"], toy.features["im001"]]))
    assert len(list((tmp_path / "cache").rglob("*.h5"))) == 2


# -- FeatureBatches ----------------------------------------------------------------------------


def test_batches_implement_the_trainer_protocol(toy: ToySet) -> None:
    source = FeatureBatches(FeatureStore(toy.manifest_url, toy.storage), toy.ids, labels_for(18))
    assert isinstance(source, BatchSource)
    assert source.num_images == 18


def test_ordered_batches_follow_the_given_ids(toy: ToySet) -> None:
    ids = toy.ids[::-1]
    labels = labels_for(18)[::-1].copy()
    source = FeatureBatches(FeatureStore(toy.manifest_url, toy.storage), ids, labels)
    batches = list(source.batches(4, shuffle=False))
    assert [len(f) for f, _ in batches] == [4, 4, 4, 4, 2]
    features = np.concatenate([f for f, _ in batches])
    assert features.dtype == np.float32
    np.testing.assert_array_equal(features, np.stack([toy.features[i] for i in ids]))
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), labels)


@pytest.mark.parametrize("buffer_shards", [1, 2, 10])
def test_shuffled_batches_cover_every_image_once_with_matching_labels(
    toy: ToySet, buffer_shards: int
) -> None:
    store = FeatureStore(toy.manifest_url, toy.storage)
    source = FeatureBatches(store, toy.ids, labels_for(18), buffer_shards=buffer_shards)
    batches = list(source.batches(4, shuffle=True, seed=3, epoch=1))
    assert len(batches) == batch_count(18, 4)
    assert [len(f) for f, _ in batches[:-1]] == [4] * (len(batches) - 1)
    seen = []
    for features, labels in batches:
        assert labels.dtype == np.int8
        for feature, label in zip(features, labels, strict=True):
            number = decode_number(label)
            np.testing.assert_array_equal(feature, toy.features[f"im{number:03d}"])
            seen.append(number)
    assert sorted(seen) == list(range(18))
    assert seen != list(range(18))


def test_shuffled_batches_are_deterministic_per_seed_and_epoch(toy: ToySet) -> None:
    source = FeatureBatches(FeatureStore(toy.manifest_url, toy.storage), toy.ids, labels_for(18))

    def order(seed: int, epoch: int) -> list[int]:
        return [
            decode_number(row)
            for _, labels in source.batches(4, shuffle=True, seed=seed, epoch=epoch)
            for row in labels
        ]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


def test_shuffle_buffer_bounds_how_many_shards_a_batch_mixes(toy: ToySet) -> None:
    store = FeatureStore(toy.manifest_url, toy.storage)
    source = FeatureBatches(store, toy.ids, labels_for(18), buffer_shards=1)
    loaded: list[int] = []
    original = store.read_rows

    def counting(shard_index: int, rows: np.ndarray | None = None) -> np.ndarray:
        loaded.append(shard_index)
        return original(shard_index, rows)

    store.read_rows = counting  # type: ignore[method-assign]
    for _, labels in source.batches(2, shuffle=True, seed=0, epoch=0):
        shards = {toy.shard_of[f"im{decode_number(row):03d}"] for row in labels}
        assert len(shards) <= 2, "one buffered shard plus at most the previous carry"
    assert sorted(loaded) == [0, 1, 3, 4], "each non-empty shard read once per epoch"


def test_batches_over_a_subset_only_touch_those_images(toy: ToySet) -> None:
    subset = ["im003", "im010", "im016"]
    labels = labels_for(18)[[3, 10, 16]]
    source = FeatureBatches(FeatureStore(toy.manifest_url, toy.storage), subset, labels)
    numbers = sorted(
        decode_number(row) for _, y in source.batches(2, shuffle=True, seed=5) for row in y
    )
    assert numbers == [3, 10, 16]


@pytest.mark.parametrize(
    ("ids", "labels", "message"),
    [
        (["im000", "im001"], np.zeros((3, 2), np.int8), "labels must be"),
        (["im000"], np.zeros((1, 2), np.int64), "int8"),
        (["im000"], np.full((1, 2), 2, np.int8), "only hold 1"),
        (["im000", "im000"], np.zeros((2, 2), np.int8), "unique"),
        (["ghost"], np.zeros((1, 2), np.int8), "'ghost'"),
    ],
)
def test_bad_batch_source_inputs(
    toy: ToySet, ids: list[str], labels: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        FeatureBatches(FeatureStore(toy.manifest_url, toy.storage), ids, labels)
