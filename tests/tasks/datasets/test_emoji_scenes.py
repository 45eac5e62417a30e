"""Tests for the emoji-scenes generator: config, vocabulary, split, drawn labels and boxes."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import unicodedata
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydantic import ValidationError

from tasks import schemas
from tasks.datasets import emoji_scenes as es
from tasks.datasets.base import DatasetArtifacts, load_prepared
from tasks.datasets.emoji_vocabulary import FAMILIES, emoji_labels
from tasks.embeddings import load_keyed_vectors
from tasks.fonts import find_emoji_font
from tasks.storage import Storage, StorageConfig

TINY = {
    "num_train": 24,
    "num_val": 4,
    "num_test": 16,
    "image_size": 96,
    "workers": 1,
    "image_format": "png",
}


@pytest.fixture(scope="module")
def glove(tmp_path_factory: pytest.TempPathFactory):
    """The offline GloVe vectors, loaded once for the module."""
    storage = Storage(StorageConfig(root=str(tmp_path_factory.mktemp("glove"))))
    return load_keyed_vectors(es.EmojiScenesConfig().embedding_source, storage)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[es.EmojiScenesConfig, Storage]:
    """One tiny lossless (PNG) dataset shared by the read-only tests below."""
    config = es.EmojiScenesConfig(**TINY)
    storage = Storage(StorageConfig(root=str(tmp_path_factory.mktemp("tiny"))))
    es.prepare_emoji_scenes(config, storage)
    return config, storage


def _tables(artifacts: DatasetArtifacts, storage: Storage) -> tuple[pd.DataFrame, ...]:
    assert artifacts.boxes_url is not None
    return (
        storage.read_parquet(artifacts.label_table_url),
        storage.read_parquet(artifacts.vocabulary_url),
        storage.read_parquet(artifacts.boxes_url),
    )


def _artifacts(prepared: tuple[es.EmojiScenesConfig, Storage]) -> DatasetArtifacts:
    config, storage = prepared
    return es.prepare_emoji_scenes(config, storage)


def _image_digests(artifacts: DatasetArtifacts, storage: Storage, uris: list[str]) -> list[str]:
    return [
        hashlib.sha256(storage.read_bytes(f"{artifacts.images_prefix}/{uri}")).hexdigest()
        for uri in uris
    ]


# -- config ------------------------------------------------------------------------------------


def test_default_config_is_valid_and_round_trips() -> None:
    config = es.EmojiScenesConfig()
    assert config.source == "emoji-scenes"
    assert config.name == "emoji-scenes"
    assert es.EmojiScenesConfig.model_validate(config.model_dump(mode="json")) == config
    low, high = config.objects_per_image
    assert 1 <= low <= high


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"objects_per_image": (5, 2)}, "objects_per_image"),
        ({"object_scale": (0.5, 0.1)}, "object_scale"),
        ({"families": ["dinosaurs-only"]}, "dinosaurs-only"),
        ({"unseen_fraction": 0.9}, "unseen_fraction"),
        ({"num_train": 0}, "num_train"),
        ({"name": "../escape"}, "name"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_config_names_the_problem(override: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        es.EmojiScenesConfig(**override)


# -- vocabulary and split ----------------------------------------------------------------------


def test_curated_vocabulary_is_clean(glove) -> None:
    entries = emoji_labels()
    labels = [entry.label for entry in entries]
    assert 300 <= len(labels) <= 700
    assert len(set(labels)) == len(labels)
    assert len({entry.codepoint for entry in entries}) == len(entries)
    for entry in entries:
        assert entry.label == entry.label.lower() and entry.label.isalpha(), entry
        assert entry.label in glove.key_to_index, entry
        assert unicodedata.name(entry.glyph, "")  # an assigned character, not a made-up code


def test_descriptions_are_the_unicode_name_and_the_family(tmp_path: Path) -> None:
    config = es.EmojiScenesConfig(families=["mammal", "fruit"])
    vocabulary = es.build_vocabulary(config, Storage(StorageConfig(root=str(tmp_path))))
    described = dict(zip(vocabulary["label"], vocabulary["description"], strict=True))
    assert described["tiger"] == "tiger; mammal"  # U+1F405 TIGER
    assert described["cat"] == "cat; mammal"
    assert described["banana"] == "banana; fruit"
    entries = {entry.label: entry for entry in emoji_labels()}
    for label, text in described.items():
        name, family = text.split("; ")
        assert name == unicodedata.name(entries[label].glyph).lower()
        assert family == entries[label].family.replace("_", " ")


def test_every_glyph_renders_in_colour() -> None:
    entries = emoji_labels()
    glyphs = es.glyph_images(str(find_emoji_font()), tuple(e.glyph for e in entries))
    colourful = 0
    for entry, glyph in zip(entries, glyphs, strict=True):
        pixels = np.asarray(glyph)
        assert glyph.mode == "RGBA" and min(glyph.size) >= 16, entry
        opaque = pixels[pixels[..., 3] > 200, :3].astype(int)
        assert len(np.unique(opaque, axis=0)) > 2, entry  # drawn artwork, not a flat fill
        # RGB channels that disagree mean colour; a few real emoji are grey (rabbit, wolf).
        colourful += np.abs(opaque - opaque.mean(axis=1, keepdims=True)).mean() > 3
    assert colourful >= 0.9 * len(entries)


def test_every_unseen_label_has_a_close_seen_relative(glove, tmp_path: Path) -> None:
    config = es.EmojiScenesConfig()
    storage = Storage(StorageConfig(root=str(tmp_path)))
    vocabulary = es.build_vocabulary(config, storage)
    family = {entry.label: entry.family for entry in emoji_labels()}
    seen = set(vocabulary.loc[vocabulary["seen"], "label"])
    unseen = set(vocabulary.loc[~vocabulary["seen"], "label"])
    assert 0.1 * len(vocabulary) <= len(unseen) <= 0.3 * len(vocabulary)
    for label in unseen:
        relatives = [
            other
            for other in seen
            if family[other] == family[label]
            and glove.similarity(label, other) >= config.min_relative_similarity
        ]
        assert relatives, f"{label} has no seen relative"
    for name in FAMILIES:
        members = [label for label, fam in family.items() if fam == name]
        assert any(label in seen for label in members), f"family {name} has no seen label"


def test_split_is_seeded(glove) -> None:
    entries = es.select_labels()
    vectors = np.stack([glove[entry.label] for entry in entries])

    def split(seed: int) -> np.ndarray:
        return es.split_seen_unseen(
            entries, vectors, unseen_fraction=0.2, min_similarity=0.5, seed=seed
        )

    assert np.array_equal(split(3), split(3))
    assert not np.array_equal(split(3), split(4))


def test_split_respects_similarity_on_a_hand_made_example() -> None:
    """Two families in 2-d: only labels with a same-family neighbour within 60 degrees qualify."""
    entries = [
        es.EmojiLabel(f"{0x1F400 + i:X}", name, fam)
        for i, (name, fam) in enumerate(
            [("a", "x"), ("b", "x"), ("c", "x"), ("d", "y"), ("e", "y")]
        )
    ]
    angles = np.radians([0, 10, 120, 0, 90])
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    for seed in range(20):
        seen = es.split_seen_unseen(
            entries, vectors, unseen_fraction=0.4, min_similarity=0.5, seed=seed
        )
        # c is 110+ degrees from a and b; d and e are 90 degrees apart: never unseen.
        assert seen[2] and seen[3] and seen[4]
        assert seen[:2].sum() == 1  # exactly one of the close pair a/b is unseen


# -- rendered dataset --------------------------------------------------------------------------


def test_tables_are_valid_and_train_has_no_unseen_label(prepared) -> None:
    config, storage = prepared
    artifacts = _artifacts(prepared)
    labels, vocabulary, boxes = _tables(artifacts, storage)
    schemas.validate(vocabulary, schemas.Vocabulary, stage="test")
    schemas.validate(labels, schemas.LabelTable, stage="test", vocabulary=vocabulary)
    schemas.validate(boxes, schemas.ObjectBoxes, stage="test")
    assert labels["split"].value_counts().to_dict() == {"train": 24, "test": 16, "val": 4}
    unseen = set(vocabulary.loc[~vocabulary["seen"], "label"])
    high = config.objects_per_image[1]
    for row in labels.itertuples():
        positives = set(row.positives)
        assert row.complete and len(row.negatives) == 0
        assert len(positives) == len(row.positives) <= high
        if row.split == "test":
            assert positives & unseen, row.image_id
        else:
            assert not positives & unseen, row.image_id


def test_boxes_match_labels_and_lie_inside_the_image(prepared) -> None:
    config, storage = prepared
    labels, _, boxes = _tables(_artifacts(prepared), storage)
    per_image = boxes.groupby("image_id")["label"].apply(sorted).to_dict()
    for row in labels.itertuples():
        assert per_image.get(row.image_id, []) == sorted(row.positives)
    size = config.image_size
    assert (boxes[["x0", "y0"]] >= 0).all().all()
    assert (boxes[["x1", "y1"]] <= size).all().all()
    longest = np.maximum(boxes["x1"] - boxes["x0"], boxes["y1"] - boxes["y0"]) / size
    low, high = config.object_scale
    assert longest.between(low - 0.02, high + 0.02).all()


def _background(config: es.EmojiScenesConfig, split: str, index: int, vocabulary) -> np.ndarray:
    """Replay an image's generator up to its background: the scene with nothing drawn on it."""
    rng = es.image_rng(config.seed, split, index)
    seen = vocabulary["seen"].to_numpy()
    es.choose_objects(rng, split, np.flatnonzero(seen), np.flatnonzero(~seen), config)
    return np.asarray(es.render_background(rng, config.image_size), dtype=np.int16)


def test_pixels_differ_from_background_only_inside_boxes(prepared) -> None:
    config, storage = prepared
    artifacts = _artifacts(prepared)
    labels, vocabulary, boxes = _tables(artifacts, storage)
    for row in labels.itertuples():
        split, index = row.split, int(row.image_id.rsplit("-", 1)[1])
        image = Image.open(io.BytesIO(storage.read_bytes(f"{artifacts.images_prefix}/{row.uri}")))
        assert image.size == (config.image_size, config.image_size)
        changed = (
            np.abs(
                np.asarray(image, dtype=np.int16) - _background(config, split, index, vocabulary)
            )
            > 0
        ).any(axis=2)
        inside = np.zeros_like(changed)
        for box in boxes[boxes["image_id"] == row.image_id].itertuples():
            region = changed[int(box.y0) : int(box.y1), int(box.x0) : int(box.x1)]
            assert region.mean() > 0.15, (row.image_id, box.label)
            inside[int(box.y0) : int(box.y1), int(box.x0) : int(box.x1)] = True
        assert not changed[~inside].any(), f"{row.image_id}: drawn pixels outside every box"


def test_each_box_shows_its_labels_glyph(tmp_path: Path) -> None:
    """Without overlap, each box crop is closest to its own label's glyph among candidates."""
    config = es.EmojiScenesConfig(**{**TINY, "num_train": 8, "num_test": 6, "max_overlap": 0.0})
    storage = Storage(StorageConfig(root=str(tmp_path)))
    artifacts = es.prepare_emoji_scenes(config, storage)
    labels, vocabulary, boxes = _tables(artifacts, storage)
    entries = es.select_labels()
    glyphs = es.glyph_images(str(find_emoji_font()), tuple(e.glyph for e in entries))
    glyph_of = {entry.label: glyph for entry, glyph in zip(entries, glyphs, strict=True)}
    rng = np.random.default_rng(0)
    checked = 0
    for row in labels.itertuples():
        split, index = row.split, int(row.image_id.rsplit("-", 1)[1])
        image = np.asarray(
            Image.open(io.BytesIO(storage.read_bytes(f"{artifacts.images_prefix}/{row.uri}"))),
            dtype=np.float64,
        )
        background = _background(config, split, index, vocabulary)
        decoys = list(rng.choice(vocabulary["label"], size=15, replace=False))
        for box in boxes[boxes["image_id"] == row.image_id].itertuples():
            x0, y0, x1, y1 = int(box.x0), int(box.y0), int(box.x1), int(box.y1)
            crop = image[y0:y1, x0:x1]
            under = Image.fromarray(background[y0:y1, x0:x1].astype(np.uint8)).convert("RGBA")

            def error(label: str, crop=crop, under=under, size=(x1 - x0, y1 - y0)) -> float:
                drawn = under.copy()
                drawn.alpha_composite(glyph_of[label].resize(size, Image.Resampling.BICUBIC))
                return float(
                    ((np.asarray(drawn.convert("RGB"), dtype=np.float64) - crop) ** 2).mean()
                )

            candidates = {box.label, *row.positives, *decoys}
            assert min(candidates, key=error) == box.label, (row.image_id, box.label)
            checked += 1
    assert checked >= 14 * config.objects_per_image[0]


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    config = es.EmojiScenesConfig(**{**TINY, "num_train": 6, "num_val": 1, "num_test": 4})

    def build(root: str, cfg: es.EmojiScenesConfig) -> tuple[pd.DataFrame, list[str]]:
        storage = Storage(StorageConfig(root=str(tmp_path / root)))
        artifacts = es.prepare_emoji_scenes(cfg, storage)
        labels, _, boxes = _tables(artifacts, storage)
        return labels.merge(boxes, on="image_id"), _image_digests(
            artifacts, storage, labels["uri"].tolist()
        )

    first, first_images = build("a", config)
    second, second_images = build("b", config)
    pd.testing.assert_frame_equal(first, second)
    assert first_images == second_images
    _, other_images = build("c", config.model_copy(update={"seed": 1}))
    assert not set(other_images) & set(first_images)


def test_rerun_with_same_config_skips_and_changed_config_rebuilds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = es.EmojiScenesConfig(**{**TINY, "num_train": 3, "num_val": 0, "num_test": 2})
    storage = Storage(StorageConfig(root=str(tmp_path)))
    first = es.prepare_emoji_scenes(config, storage)
    calls: list[int] = []
    original: Callable = es.render_all

    def counting(jobs, workers):
        calls.append(len(jobs))
        return original(jobs, workers)

    monkeypatch.setattr(es, "render_all", counting)
    assert es.prepare_emoji_scenes(config, storage) == first
    # The worker count does not change the images, so it does not force a rebuild either.
    assert es.prepare_emoji_scenes(config.model_copy(update={"workers": 2}), storage) == first
    assert calls == []
    bigger = config.model_copy(update={"num_test": 3})
    labels = storage.read_parquet(es.prepare_emoji_scenes(bigger, storage).label_table_url)
    assert calls and (labels["split"] == "test").sum() == 3


@pytest.mark.slow
def test_process_pool_gives_the_same_dataset(tmp_path: Path) -> None:
    config = es.EmojiScenesConfig(**{**TINY, "num_train": 150, "num_val": 0, "num_test": 60})

    def build(root: str, workers: int) -> tuple[pd.DataFrame, list[str]]:
        storage = Storage(StorageConfig(root=str(tmp_path / root)))
        artifacts = es.prepare_emoji_scenes(config.model_copy(update={"workers": workers}), storage)
        labels, _, _ = _tables(artifacts, storage)
        return labels, _image_digests(artifacts, storage, labels["uri"].tolist())

    serial, serial_images = build("serial", 1)
    parallel, parallel_images = build("parallel", 2)
    pd.testing.assert_frame_equal(serial, parallel)
    assert serial_images == parallel_images


@pytest.mark.slow
def test_dataset_round_trips_through_s3(s3_server) -> None:
    config = es.EmojiScenesConfig(**{**TINY, "num_train": 3, "num_val": 1, "num_test": 2})
    storage = Storage(
        StorageConfig(root=f"s3://{s3_server.bucket}/lesa", endpoint_url=s3_server.endpoint_url)
    )
    artifacts = es.prepare_emoji_scenes(config, storage)
    assert artifacts.images_prefix.startswith("s3://")
    labels, _, boxes = _tables(artifacts, storage)
    assert len(labels) == 6 and len(boxes) >= 6
    for uri in labels["uri"]:
        image = Image.open(io.BytesIO(storage.read_bytes(f"{artifacts.images_prefix}/{uri}")))
        assert image.size == (config.image_size, config.image_size)


def test_the_font_and_word_vectors_are_versioned_inputs(tmp_path: Path) -> None:
    font = tmp_path / "emoji.ttf"
    shutil.copy(find_emoji_font(), font)
    config = es.EmojiScenesConfig(
        **{**TINY, "num_train": 3, "num_val": 0, "num_test": 2, "font_path": str(font)}
    )
    storage = Storage(StorageConfig(root=str(tmp_path / "store"), cache_dir=str(tmp_path / "c")))
    artifacts = es.prepare_emoji_scenes(config, storage)
    inputs = storage.read_json(storage.url("datasets", config.name, "dataset.json"))["inputs"]
    assert inputs[str(font)].startswith("sha256:")
    assert any(url.endswith("glove_6B_50d_emb.npy") for url in inputs)
    os.utime(font, ns=(1, 1))  # touched, same bytes: still the same dataset
    assert load_prepared(storage, config.name, config) == artifacts
    with open(font, "ab") as handle:  # another font file under the same name
        handle.write(b"\0")
    assert load_prepared(storage, config.name, config) is None
