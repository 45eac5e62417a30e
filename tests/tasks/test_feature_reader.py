"""FeatureStore and FeatureBatches over hand-written HDF5 shards (independent of the writer)."""

from __future__ import annotations

import hashlib
import pickle
import threading
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from lesa_model.config import ModelConfig, ReaderConfig, TrainerConfig
from lesa_model.data import BatchSource, batch_count
from lesa_model.model import LESA
from lesa_model.trainer import Trainer
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
    chunk_rows: int = 2,
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
                "features",
                data=values,
                maxshape=(None, REGIONS, DIM),
                chunks=(chunk_rows, REGIONS, DIM),
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


def _numbers(batches: list[tuple[np.ndarray, np.ndarray]]) -> list[int]:
    return [decode_number(row) for _, labels in batches for row in np.asarray(labels)]


@pytest.mark.parametrize(("mode", "window"), [("stream", 1), ("stream", 3), ("memory", 3)])
def test_shuffled_batches_cover_every_image_once_with_matching_labels(
    toy: ToySet, mode: str, window: int
) -> None:
    store = FeatureStore(toy.manifest_url, toy.storage)
    reader = ReaderConfig(mode=mode, window_chunks=window)
    source = FeatureBatches(store, toy.ids, labels_for(18), reader=reader)
    batches = list(source.batches(4, shuffle=True, seed=3, epoch=1))
    assert len(batches) == batch_count(18, 4)
    assert [len(f) for f, _ in batches[:-1]] == [4] * (len(batches) - 1)
    seen = []
    for features, labels in batches:
        assert labels.dtype == np.int8
        assert features.dtype == np.float32  # the stored dtype: widened on the device
        for feature, label in zip(features, labels, strict=True):
            number = decode_number(label)
            np.testing.assert_array_equal(feature, toy.features[f"im{number:03d}"])
            seen.append(number)
    assert sorted(seen) == list(range(18))
    assert seen != list(range(18))


def test_float16_features_stay_float16_on_the_wire(storage: Storage) -> None:
    toy = write_toy_set(storage, storage.url("features", "half"), [3, 4], dtype="float16")
    source = FeatureBatches(FeatureStore(toy.manifest_url, storage), toy.ids, labels_for(7))
    features = np.concatenate([f for f, _ in source.batches(3, shuffle=True)])
    assert features.dtype == np.float16


def test_shuffled_batches_are_deterministic_per_seed_and_epoch(toy: ToySet) -> None:
    source = FeatureBatches(FeatureStore(toy.manifest_url, toy.storage), toy.ids, labels_for(18))

    def order(seed: int, epoch: int) -> list[int]:
        return _numbers(list(source.batches(4, shuffle=True, seed=seed, epoch=epoch)))

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


@pytest.mark.parametrize(("window", "batch_size"), [(1, 4), (2, 5), (3, 3), (50, 4)])
def test_memory_and_stream_modes_give_identical_batches(
    toy: ToySet, window: int, batch_size: int
) -> None:
    store = FeatureStore(toy.manifest_url, toy.storage)

    def batches(mode: str, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        reader = ReaderConfig(mode=mode, window_chunks=window)
        source = FeatureBatches(store, toy.ids, labels_for(18), reader=reader)
        return list(source.batches(batch_size, shuffle=True, seed=7, epoch=epoch))

    for epoch in (0, 1):
        streamed, loaded = batches("stream", epoch), batches("memory", epoch)
        assert len(streamed) == len(loaded) == batch_count(18, batch_size)
        for (f_stream, y_stream), (f_memory, y_memory) in zip(streamed, loaded, strict=True):
            np.testing.assert_array_equal(f_stream, f_memory)
            np.testing.assert_array_equal(y_stream, y_memory)


def test_auto_mode_loads_what_fits_the_budget(toy: ToySet) -> None:
    store = FeatureStore(toy.manifest_url, toy.storage)

    def mode(budget_gb: float) -> str:
        reader = ReaderConfig(memory_budget_gb=budget_gb)
        return FeatureBatches(store, toy.ids, labels_for(18), reader=reader).mode

    nbytes = 18 * REGIONS * DIM * 4
    assert mode(nbytes / 1e9) == "memory"
    assert mode(nbytes / 2 / 1e9) == "stream"
    assert FeatureBatches(store, toy.ids, labels_for(18)).mode == "stream"  # no reader: streams


def test_streaming_reads_each_chunk_once_per_epoch(toy: ToySet) -> None:
    store = FeatureStore(toy.manifest_url, toy.storage)
    reads: list[tuple[int, int, int]] = []
    into, read_slice = store.read_into, store.read_slice

    def counting_into(shard_index: int, start: int, stop: int, out: np.ndarray) -> None:
        reads.append((shard_index, start, stop))
        into(shard_index, start, stop, out)

    def counting_slice(shard_index: int, start: int, stop: int) -> np.ndarray:
        reads.append((shard_index, start, stop))
        return read_slice(shard_index, start, stop)

    store.read_into = counting_into  # type: ignore[method-assign]
    store.read_slice = counting_slice  # type: ignore[method-assign]
    reader = ReaderConfig(mode="stream", window_chunks=2)
    source = FeatureBatches(store, toy.ids, labels_for(18), reader=reader)
    assert _numbers(list(source.batches(4, shuffle=True, seed=0, epoch=0)))
    chunks = [
        (shard, start, min(start + 2, size))
        for shard, size in [(0, 5), (1, 4), (3, 6), (4, 3)]
        for start in range(0, size, 2)
    ]
    assert sorted(reads) == sorted(chunks), "every chunk read once, whole"


def test_a_subset_reads_only_the_rows_it_holds(storage: Storage) -> None:
    """Rows with gaps inside a chunk (a split's images among others) and runs of rows read
    alike, in both modes."""
    toy = write_toy_set(storage, storage.url("features", "gaps"), [8, 8], chunk_rows=4)
    subset = ["im000", "im002", "im003", "im009", "im010", "im011", "im015"]
    labels = labels_for(16)[[0, 2, 3, 9, 10, 11, 15]]
    store = FeatureStore(toy.manifest_url, storage)
    got = {}
    for mode in ("stream", "memory"):
        reader = ReaderConfig(mode=mode, window_chunks=1)
        source = FeatureBatches(store, subset, labels, reader=reader)
        got[mode] = list(source.batches(3, shuffle=True, seed=2))
        for features, batch_labels in got[mode]:
            for feature, label in zip(features, batch_labels, strict=True):
                np.testing.assert_array_equal(
                    feature, toy.features[f"im{decode_number(label):03d}"]
                )
        assert sorted(_numbers(got[mode])) == [0, 2, 3, 9, 10, 11, 15]
    assert _numbers(got["stream"]) == _numbers(got["memory"])


def test_shuffle_mixes_many_small_shards(storage: Storage) -> None:
    """40 shards of 6 images stored in the order of a grouped train list (as NUS-WIDE's, by
    Flickr folder): each epoch visits every image once, and batches mix shards far more than a
    shard-by-shard reader would (which puts 1 or 2 shards in a batch)."""
    shards, size, batch = 40, 6, 8
    toy = write_toy_set(storage, storage.url("features", "many"), [size] * shards)
    reader = ReaderConfig(mode="stream", window_chunks=16)
    source = FeatureBatches(
        FeatureStore(toy.manifest_url, storage), toy.ids, labels_for(240), reader=reader
    )
    orders = []
    for epoch in range(3):
        batches = list(source.batches(batch, shuffle=True, seed=1, epoch=epoch))
        numbers = _numbers(batches)
        assert sorted(numbers) == list(range(240)), "every image exactly once per epoch"
        per_batch = [
            len({toy.shard_of[f"im{decode_number(row):03d}"] for row in labels})
            for _, labels in batches
        ]
        assert np.mean(per_batch) >= 5.5  # a uniform shuffle gives ~7.2 of 8, this ~6.9
        shard_sequence = [toy.shard_of[f"im{n:03d}"] for n in numbers]
        first_quarter = set(shard_sequence[: len(numbers) // 4])
        # 30 random chunks of 120 (3 per shard) hit ~40 x (1 - 0.75**3) = 23 shards; a
        # shard-by-shard reader, 10.
        assert len(first_quarter) >= 18, "a quarter of the epoch already spans most shards"
        rho = np.corrcoef(np.arange(len(numbers)), shard_sequence)[0, 1]
        assert abs(rho) < 0.3, "no drift from the first shards to the last"
        orders.append(numbers)
    assert orders[0] != orders[1] != orders[2]


def test_prefetch_thread_ends_on_early_stop_and_on_error(toy: ToySet) -> None:
    store = FeatureStore(toy.manifest_url, toy.storage)
    reader = ReaderConfig(mode="stream", window_chunks=1, prefetch=1)
    source = FeatureBatches(store, toy.ids, labels_for(18), reader=reader)
    batches = source.batches(2, shuffle=True)
    next(batches)
    assert any(t.name == "feature-windows" for t in threading.enumerate())
    batches.close()
    assert not any(t.name == "feature-windows" for t in threading.enumerate())

    def broken(*args: object) -> np.ndarray:
        raise OSError("disk gone")

    store.read_slice = store.read_into = broken  # type: ignore[method-assign]
    with pytest.raises(OSError, match="disk gone"):
        list(source.batches(2, shuffle=True))
    assert not any(t.name == "feature-windows" for t in threading.enumerate())


def test_training_resumes_exactly_from_streamed_shards(toy: ToySet, tmp_path: Path) -> None:
    """N steps, an interruption, and the rest give the same weights as one straight run, with
    batches streamed from shards (the order is a pure function of seed and epoch)."""
    store = FeatureStore(toy.manifest_url, toy.storage)
    reader = ReaderConfig(mode="stream", window_chunks=2, prefetch=2)
    source = FeatureBatches(store, toy.ids, labels_for(18), reader=reader)
    vectors = np.random.default_rng(0).standard_normal((8, 5)).astype(np.float32)
    cfg = TrainerConfig(
        steps=14, batch_size=4, checkpoint_every=3, log_every=1, val_every=100, reader=reader
    )

    def model() -> LESA:
        torch.manual_seed(0)
        return LESA(DIM, 5, ModelConfig(num_modules=2))

    class Interrupt(Exception):
        pass

    def stop_at_step_7(record: dict[str, float]) -> None:
        if record["step"] == 7:
            raise Interrupt

    straight = model()
    Trainer(straight, vectors, cfg, checkpoint_dir=tmp_path / "a").fit(source)
    with pytest.raises(Interrupt):
        Trainer(model(), vectors, cfg, checkpoint_dir=tmp_path / "b", progress=stop_at_step_7).fit(
            source
        )
    assert not any(t.name in {"feature-windows", "batch-feed"} for t in threading.enumerate())
    resumed = model()
    Trainer(resumed, vectors, cfg, checkpoint_dir=tmp_path / "b").fit(source)
    for (name, value), (_, expected) in zip(
        resumed.state_dict().items(), straight.state_dict().items(), strict=True
    ):
        assert torch.equal(value, expected), name


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


def test_a_pickled_source_leaves_its_loaded_features_behind(toy: ToySet) -> None:
    reader = ReaderConfig(mode="memory")
    source = FeatureBatches(
        FeatureStore(toy.manifest_url, toy.storage), toy.ids, labels_for(18), reader=reader
    )
    before = _numbers(list(source.batches(4, shuffle=True, seed=1)))
    copy = pickle.loads(pickle.dumps(source))
    assert copy._memory is None
    assert _numbers(list(copy.batches(4, shuffle=True, seed=1))) == before
