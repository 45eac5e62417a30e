"""Open Images at the source: a public bucket in the official layout, read with no credentials,
features streamed from S3 on Dask workers with no download step."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from botocore.exceptions import NoCredentialsError
from PIL import Image

from tasks.datasets.openimages import OpenImagesConfig, prepare_openimages
from tasks.feature_config import DaskConfig, FeaturesConfig
from tasks.features import extract_features
from tasks.stage_inputs import load_tables
from tasks.storage import Storage, StorageConfig
from tests.helpers.services import S3Server

BUCKET = "open-images-dataset-test"
CLASSES = "/m/01,Cat\n/m/02,Dog\n/m/03,Fish\n"
HEADER = "ImageID,Source,LabelName,Confidence"
LABELS = {
    "train": ["tr1,verification,/m/01,1", "tr2,verification,/m/02,1", "gone,verification,/m/01,1"],
    "validation": ["va1,verification,/m/02,1"],
    "test": ["te1,verification,/m/03,1", "te2,verification,/m/01,0"],
}
ID_HEADER = "ImageID,Subset,OriginalURL,OriginalLandingURL,License,Rotation"


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def public_bucket(s3_server: S3Server) -> str:
    """A world-readable bucket laid out like s3://open-images-dataset: <split>/<ImageID>.jpg,
    written with credentials (by its owner), read below without any."""
    client = s3_server.client()
    client.create_bucket(Bucket=BUCKET, ACL="public-read")

    def put(key: str, body: bytes) -> None:
        client.put_object(Bucket=BUCKET, Key=key, Body=body, ACL="public-read")

    put("metadata/class-descriptions.csv", CLASSES.encode())
    put("metadata/classes-trainable.txt", b"/m/01\n/m/02\n")
    put("metadata/unseen.txt", b"/m/03\n")
    ids = []
    for split, rows in LABELS.items():
        put(
            f"metadata/{split}-annotations-human-imagelabels.csv",
            "\n".join([HEADER, *rows]).encode(),
        )
        for index, row in enumerate(rows):
            image_id = row.split(",")[0]
            if image_id != "gone":  # labelled, but not among the published images
                put(f"{split}/{image_id}.jpg", _jpeg(index))
                ids.append(f"{image_id},{split},https://example/{image_id}.jpg,,cc,0")
    put("metadata/image-ids.csv", "\n".join([ID_HEADER, *ids]).encode())
    return f"s3://{BUCKET}"


def test_images_stream_from_a_public_bucket_without_credentials(
    public_bucket: str, s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    settings = {"endpoint_url": s3_server.endpoint_url, "cache_dir": str(tmp_path / "cache")}
    signed = Storage(StorageConfig(root=str(tmp_path / "store"), **settings))
    with pytest.raises(NoCredentialsError):
        signed.read_bytes(f"{public_bucket}/train/tr1.jpg")
    storage = Storage(StorageConfig(root=str(tmp_path / "store"), anonymous=True, **settings))
    metadata = f"{public_bucket}/metadata"
    config = OpenImagesConfig(
        name="oi-source",
        class_descriptions=f"{metadata}/class-descriptions.csv",
        trainable_classes=f"{metadata}/classes-trainable.txt",
        unseen_classes=f"{metadata}/unseen.txt",
        train_labels=f"{metadata}/train-annotations-human-imagelabels.csv",
        val_labels=f"{metadata}/validation-annotations-human-imagelabels.csv",
        test_labels=f"{metadata}/test-annotations-human-imagelabels.csv",
        image_ids=[f"{metadata}/image-ids.csv"],
        images_prefix=public_bucket,
    )
    tables = load_tables(storage, prepare_openimages(config, storage))
    assert sorted(tables.labels["image_id"]) == ["te1", "te2", "tr1", "tr2", "va1"]
    assert set(tables.labels["uri"]) >= {"train/tr1.jpg", "validation/va1.jpg", "test/te2.jpg"}
    features = FeaturesConfig(
        weights="none",
        image_size=64,
        shard_size=2,
        dask=DaskConfig(n_workers=2, dashboard=False),
    )
    extracted = extract_features(
        tables.labels, tables.images_prefix, features, storage, storage.url("features", "oi")
    )
    assert extracted.num_images == 5
    manifest = storage.read_parquet(extracted.manifest_url)
    assert manifest["num_images"].sum() == 5
    assert not list((tmp_path / "store").rglob("*.jpg"))  # nothing was downloaded to storage


def test_anonymous_storage_refuses_a_credentials_block() -> None:
    with pytest.raises(ValueError, match="anonymous sends no credentials"):
        StorageConfig(anonymous=True, credentials_block="my-s3-creds")
