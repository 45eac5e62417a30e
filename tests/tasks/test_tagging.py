"""Batch tagging on Dask: the pipeline predictor's scores, resumable by content version."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesa_model.config import ModelConfig
from tasks.feature_config import DaskConfig, FeaturesConfig
from tasks.prediction import load_predictor, predict_images
from tasks.storage import Storage, StorageConfig
from tasks.tagging import tag_images
from tests.helpers.checkpoints import write_checkpoint

FEATURES = FeaturesConfig(backbone="efficientnet-lite0", weights="none", image_size=64)
SEEN = ["cat", "dog", "tree"]
LABELS = [*SEEN, "fish", "zebra"]
THREADS = DaskConfig(n_workers=2, processes=False, dashboard=False)


def write_image(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def collection(tmp_path: Path) -> dict[str, Path]:
    images = tmp_path / "photos"
    (images / "sub").mkdir(parents=True)
    for seed, name in enumerate(["a.png", "b.png", "sub/c.png", "sub/d.png"]):
        write_image(images / name, seed)
    (images / "broken.jpg").write_bytes(b"<html>not a jpeg</html>")
    checkpoint = write_checkpoint(
        tmp_path / "best.pt",
        FEATURES,
        SEEN,
        ["fish"],
        model=ModelConfig(num_modules=3, hidden_dim=16),
    )
    return {"root": tmp_path, "images": images, "checkpoint": checkpoint}


def _run(collection: dict[str, Path], storage: Storage, **options):
    return tag_images(
        str(collection["checkpoint"]),
        [str(collection["images"])],
        str(collection["root"] / "tags"),
        storage,
        labels=LABELS,
        shard_size=2,
        dask=THREADS,
        **{"top_k": 2, **options},
    )


def test_tags_match_the_predictor_and_a_rerun_tags_only_new_or_changed_images(collection) -> None:
    storage = Storage(StorageConfig(root=str(collection["root"] / "store")))
    first = _run(collection, storage)
    assert (first.images, first.tagged_now, first.rejected, first.shards_run) == (5, 5, 1, 3)
    tags = storage.read_parquet(first.tags_url)
    assert list(tags.columns) == ["image", "label", "score", "rank", "module", "seen", "version"]
    predictor = load_predictor(str(collection["checkpoint"]), storage)
    images = sorted(set(tags["image"]))
    expected = predict_images(predictor, images, LABELS, storage, top_k=2)
    for index, image in enumerate(expected.uris):
        rows = tags[tags["image"] == image].sort_values("rank")
        assert rows["label"].tolist() == [LABELS[c] for c in expected.top[index]]
        assert rows["score"].to_numpy() == pytest.approx(
            expected.scores[index, expected.top[index]]
        )
        assert rows["seen"].tolist() == [label in SEEN for label in rows["label"]]
        assert rows["rank"].tolist() == [1, 2]
    rejects = storage.read_parquet(first.rejects_url)
    assert [Path(image).name for image in rejects["image"]] == ["broken.jpg"]
    assert rejects["reason"].tolist() == ["corrupt"]

    again = _run(collection, storage)
    assert (again.tagged_now, again.shards_run, again.reused) == (0, 0, 5)
    assert storage.read_parquet(again.tags_url).equals(tags)

    write_image(collection["images"] / "sub" / "c.png", 99)  # changed in place
    write_image(collection["images"] / "e.png", 7)  # new
    (collection["images"] / "b.png").unlink()  # gone
    third = _run(collection, storage)
    assert (third.images, third.tagged_now) == (5, 2)
    updated = storage.read_parquet(third.tags_url)
    names = {Path(image).name for image in updated["image"]}
    assert names == {"a.png", "c.png", "d.png", "e.png"}
    changed = str(collection["images"] / "sub" / "c.png")
    fresh = predict_images(predictor, [changed], LABELS, storage, top_k=2)
    assert updated[updated["image"] == changed]["score"].to_numpy() == pytest.approx(
        fresh.scores[0, fresh.top[0]]
    )


def test_a_threshold_is_another_request_and_tags_every_label_above_it(collection) -> None:
    storage = Storage(StorageConfig(root=str(collection["root"] / "store")))
    summary = _run(collection, storage, top_k=None, threshold="-1e9")
    tags = storage.read_parquet(summary.tags_url)
    assert summary.tagged_now == 5
    assert tags.groupby("image").size().tolist() == [len(LABELS)] * 4
    none = _run(collection, storage, top_k=None, threshold="1e9")
    assert none.tagged_now == 5 and none.tags == 0


def test_an_s3_prefix_is_tagged_into_s3_and_a_rerun_reuses_it(collection, s3_storage) -> None:
    prefix = s3_storage.url("photos")
    for name in ("a.png", "sub/c.png"):
        s3_storage.write_bytes(f"{prefix}/{name}", (collection["images"] / name).read_bytes())
    s3_storage.write_bytes(f"{prefix}/notes.txt", b"not an image")
    out = s3_storage.url("tags")
    checkpoint = s3_storage.url("best.pt")
    s3_storage.upload_file(collection["checkpoint"], checkpoint)
    options = {"labels": LABELS, "top_k": 1, "shard_size": 1, "dask": THREADS}
    first = tag_images(checkpoint, [prefix], out, s3_storage, **options)
    assert (first.images, first.tagged_now, first.rejected) == (2, 2, 0)
    tags = s3_storage.read_parquet(first.tags_url)
    assert sorted(tags["image"]) == [f"{prefix}/a.png", f"{prefix}/sub/c.png"]
    local = _run(collection, Storage(StorageConfig(root=str(collection["root"] / "s"))), top_k=1)
    local_tags = Storage().read_parquet(local.tags_url).set_index("image")
    for image, score in zip(tags["image"], tags["score"], strict=True):
        name = image.removeprefix(f"{prefix}/")
        expected_score = local_tags.loc[str(collection["images"] / name), "score"]
        assert score == pytest.approx(expected_score, rel=1e-5, abs=1e-6)
    again = tag_images(checkpoint, [prefix], out, s3_storage, **options)
    assert (again.tagged_now, again.reused) == (0, 2)
