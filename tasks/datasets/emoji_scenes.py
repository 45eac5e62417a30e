"""emoji-scenes: the embedded default dataset, multi-label scenes rendered from emoji glyphs.

Why it exists: the pipeline needs a real, offline, multi-label zero-shot dataset that builds in
seconds. Each image shows several Noto Color Emoji objects at random positions and scales on a
random background; its labels are exactly the objects drawn, and every object's box is recorded
for the attention-localisation score.

Zero-shot has to be measurable on it, so the seen/unseen split is family-aware: an unseen label
is only chosen where a seen label of the same emoji family is also a close GloVe neighbour
(say ``onion`` unseen while ``garlic`` is seen), the situation in which transferring through
word vectors can work. Train and val images draw seen objects only (complete
annotation, so unseen objects never appear in training); test images mix seen and unseen objects
and hold at least one unseen object each.

Rendering is deterministic: every image has its own random generator seeded by
``(seed, split, index)``, so the output does not depend on how the work is split across
processes.
"""

from __future__ import annotations

import io
import logging
import os
import unicodedata
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context
from typing import Literal, Self

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from pydantic import Field, model_validator
from tqdm import tqdm

from lesa_common import StrictModel
from tasks.datasets.base import (
    IMAGES_DIR,
    DatasetArtifacts,
    DatasetError,
    DatasetName,
    dataset_url,
    load_prepared,
    write_dataset,
)
from tasks.datasets.emoji_vocabulary import FAMILIES, EmojiLabel, emoji_labels
from tasks.embeddings import EmbeddingSource, KumoGlove, SourceKind, load_keyed_vectors
from tasks.fonts import find_emoji_font
from tasks.storage import Storage
from tasks.versions import RecordingStorage

logger = logging.getLogger(__name__)

EMOJI_FONT_SIZE = 109
"""Noto Color Emoji is a bitmap (CBDT) font with a single 109 ppem strike; other sizes fail."""

SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1, "test": 2}
BACKGROUND_KINDS: tuple[str, ...] = ("solid", "gradient", "blobs", "stripes")
_PLACEMENT_TRIES = 30
_CHUNK_IMAGES = 100


class EmojiScenesConfig(StrictModel):
    """How many scenes to render, how they look, and how labels split into seen and unseen."""

    source: Literal["emoji-scenes"] = "emoji-scenes"
    name: DatasetName = "emoji-scenes"
    num_train: int = Field(default=6000, ge=1, description="training images (seen objects only)")
    num_val: int = Field(default=500, ge=0, description="validation images (seen objects only)")
    num_test: int = Field(default=2000, ge=1, description="test images (seen and unseen)")
    image_size: int = Field(default=224, ge=64, le=1024, description="square side in pixels")
    objects_per_image: tuple[int, int] = Field(
        default=(2, 4), description="(min, max) objects drawn per image, inclusive"
    )
    object_scale: tuple[float, float] = Field(
        default=(0.3, 0.5),
        description="(min, max) longest object side as a fraction of the image",
    )
    max_overlap: float = Field(
        default=0.2,
        ge=0.0,
        le=1.0,
        description="largest fraction of an object's box that another object may cover",
    )
    unseen_fraction: float = Field(
        default=0.3, gt=0.0, lt=0.5, description="target share of each family that is unseen"
    )
    min_relative_similarity: float = Field(
        default=0.75,
        gt=-1.0,
        lt=1.0,
        description="GloVe cosine an unseen label needs to at least one seen label of its family",
    )
    test_unseen_share: float = Field(
        default=0.5, gt=0.0, le=1.0, description="probability that a test object is unseen"
    )
    families: list[str] | None = Field(
        default=None, description="emoji families to use (default: all)"
    )
    embedding_source: EmbeddingSource = Field(
        default_factory=KumoGlove,
        description="word vectors that check label words and pick the seen/unseen split",
    )
    image_format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = Field(default=90, ge=50, le=100)
    seed: int = Field(default=0, ge=0)
    workers: int = Field(
        default=0,
        ge=0,
        exclude=True,  # does not change the output, so it stays out of the config fingerprint
        description="render processes; 0 = one per CPU",
    )
    font_path: str | None = Field(
        default=None, description="Noto Color Emoji file; default: installed or downloaded"
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> Self:
        low, high = self.objects_per_image
        if not 1 <= low <= high <= 12:
            raise ValueError(
                f"objects_per_image must satisfy 1 <= min <= max <= 12, got {low, high}"
            )
        small, large = self.object_scale
        if not 0.05 <= small <= large <= 0.9:
            raise ValueError(
                f"object_scale must satisfy 0.05 <= min <= max <= 0.9, got {small, large}"
            )
        if self.families is not None:
            unknown = sorted(set(self.families) - set(FAMILIES))
            if unknown or not self.families:
                raise ValueError(
                    f"families: unknown {unknown or 'empty list'}; known: {sorted(FAMILIES)}"
                )
        return self


# -- vocabulary and split ----------------------------------------------------------------------


def select_labels(families: Sequence[str] | None = None) -> list[EmojiLabel]:
    """The curated vocabulary entries of ``families`` (all when None), in a fixed order."""
    wanted = set(FAMILIES) if families is None else set(families)
    return [entry for entry in emoji_labels() if entry.family in wanted]


def split_seen_unseen(
    entries: Sequence[EmojiLabel],
    vectors: np.ndarray,
    *,
    unseen_fraction: float,
    min_similarity: float,
    seed: int,
) -> np.ndarray:
    """Boolean ``seen`` mask over ``entries``: a seeded, family-aware seen/unseen split.

    In each family, candidates are visited in a seeded random order and made unseen while the
    family is below ``round(unseen_fraction * size)`` unseen labels, provided that afterwards
    every unseen label of the family still has a *relative*: a seen label of the same family
    whose word vector has cosine >= ``min_similarity``. ``vectors`` are the labels' word
    vectors, one row per entry.
    """
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ unit.T
    families = np.array([entry.family for entry in entries])
    seen = np.ones(len(entries), dtype=bool)
    rng = np.random.default_rng([seed, 7])
    for family in dict.fromkeys(families):
        members = np.flatnonzero(families == family)
        quota = round(unseen_fraction * len(members))
        unseen: list[int] = []
        for candidate in rng.permutation(members):
            if len(unseen) >= quota:
                break
            seen[candidate] = False
            trial = [*unseen, candidate]
            seen_members = members[seen[members]]
            if len(seen_members) and all(
                similarity[label, seen_members].max() >= min_similarity for label in trial
            ):
                unseen = trial
            else:
                seen[candidate] = True
    return seen


def label_vectors(labels: Sequence[str], source: SourceKind, storage: Storage) -> np.ndarray:
    """Word vectors of single-word ``labels`` from ``source``; unknown words are an error."""
    vectors = load_keyed_vectors(source, storage)
    missing = [label for label in labels if label not in vectors.key_to_index]
    if missing:
        raise DatasetError(f"emoji-scenes: labels not in {source.identity}: {missing}")
    return np.stack([vectors[label] for label in labels]).astype(np.float64)


def build_vocabulary(config: EmojiScenesConfig, storage: Storage) -> pd.DataFrame:
    """The vocabulary table (label, seen, tokens, description) with the config's seen/unseen
    split, made from the label words alone (descriptions never move the split)."""
    entries = select_labels(config.families)
    labels = [entry.label for entry in entries]
    seen = split_seen_unseen(
        entries,
        label_vectors(labels, config.embedding_source, storage),
        unseen_fraction=config.unseen_fraction,
        min_similarity=config.min_relative_similarity,
        seed=config.seed,
    )
    if seen.all():
        raise DatasetError(
            "emoji-scenes: no label could be made unseen; lower min_relative_similarity "
            f"({config.min_relative_similarity}) or raise unseen_fraction "
            f"({config.unseen_fraction})"
        )
    logger.info(
        "emoji-scenes: %d labels in %d families, %d unseen",
        len(labels),
        len({entry.family for entry in entries}),
        int((~seen).sum()),
    )
    descriptions = [label_description(entry) for entry in entries]
    return pd.DataFrame(
        {"label": labels, "seen": seen, "tokens": labels, "description": descriptions}
    )


def label_description(entry: EmojiLabel) -> str:
    """The emoji's Unicode name and its family, the text ``embeddings.text: label+description``
    adds to the label word (e.g. ``tiger face; mammal``)."""
    return f"{unicodedata.name(entry.glyph).lower()}; {entry.family.replace('_', ' ')}"


# -- rendering ---------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def glyph_images(font_path: str, glyphs: tuple[str, ...]) -> tuple[Image.Image, ...]:
    """Each glyph rendered once in colour and cropped to its opaque pixels (RGBA)."""
    font = ImageFont.truetype(font_path, EMOJI_FONT_SIZE)
    rendered = []
    for glyph in glyphs:
        left, top, right, bottom = font.getbbox(glyph)
        canvas = Image.new("RGBA", (right - left + 2, bottom - top + 2), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((1 - left, 1 - top), glyph, font=font, embedded_color=True)
        box = canvas.getchannel("A").getbbox()
        if box is None:
            raise DatasetError(f"emoji-scenes: {font_path} draws nothing for U+{ord(glyph):X}")
        rendered.append(canvas.crop(box))
    return tuple(rendered)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def render_background(rng: np.random.Generator, size: int) -> Image.Image:
    """A random background: a solid colour, a gradient, soft colour blobs or stripes."""
    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    if kind == "solid":
        pixels = np.broadcast_to(_random_colour(rng), (size, size, 3))
    elif kind == "gradient":
        start, end = _random_colour(rng), _random_colour(rng)
        angle = rng.uniform(0, 2 * np.pi)
        grid = np.linspace(0.0, 1.0, size, dtype=np.float32)
        t = np.cos(angle) * grid[None, :] + np.sin(angle) * grid[:, None]
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        pixels = start + (end - start) * t[..., None]
    elif kind == "blobs":
        cells = int(rng.integers(2, 6))
        coarse = rng.integers(0, 256, size=(cells, cells, 3)).astype(np.uint8)
        return Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    else:
        first, second = _random_colour(rng), _random_colour(rng)
        period = int(rng.integers(8, 40))
        coordinate = np.arange(size)[None, :] if rng.random() < 0.5 else np.arange(size)[:, None]
        band = ((coordinate // period) % 2).astype(np.float32)
        band = np.broadcast_to(band, (size, size))
        pixels = first + (second - first) * band[..., None]
    return Image.fromarray(np.ascontiguousarray(pixels).astype(np.uint8), "RGB")


@dataclass(frozen=True)
class PlacedObject:
    """One drawn object: its vocabulary index and its box in pixels (x0, y0, x1, y1)."""

    label_index: int
    box: tuple[int, int, int, int]


def _covered_fraction(box: tuple[int, int, int, int], other: tuple[int, int, int, int]) -> float:
    width = min(box[2], other[2]) - max(box[0], other[0])
    height = min(box[3], other[3]) - max(box[1], other[1])
    if width <= 0 or height <= 0:
        return 0.0
    smaller = min(
        (box[2] - box[0]) * (box[3] - box[1]), (other[2] - other[0]) * (other[3] - other[1])
    )
    return width * height / smaller


def choose_objects(
    rng: np.random.Generator,
    split: str,
    seen_indices: np.ndarray,
    unseen_indices: np.ndarray,
    config: EmojiScenesConfig,
) -> list[int]:
    """Distinct vocabulary indices to draw: seen only in train/val; a mix, >= 1 unseen, in test."""
    low, high = config.objects_per_image
    count = int(rng.integers(low, high + 1))
    if split != "test":
        count = min(count, len(seen_indices))
        return [int(i) for i in rng.choice(seen_indices, size=count, replace=False)]
    unseen_count = max(1, int(rng.binomial(count, config.test_unseen_share)))
    unseen_count = min(unseen_count, len(unseen_indices))
    seen_count = min(count - unseen_count, len(seen_indices))
    # Unseen objects go first so that a crowded scene drops a seen object, never the unseen one.
    return [
        *(int(i) for i in rng.choice(unseen_indices, size=unseen_count, replace=False)),
        *(int(i) for i in rng.choice(seen_indices, size=seen_count, replace=False)),
    ]


def render_scene(
    rng: np.random.Generator,
    label_indices: Sequence[int],
    glyphs: Sequence[Image.Image],
    config: EmojiScenesConfig,
) -> tuple[Image.Image, list[PlacedObject]]:
    """Draw the chosen objects on a random background; objects that find no free spot are left out.

    Each object is resized so its longest side is a random fraction of the image, then placed
    where no box (its own or an earlier one) would be covered by more than ``max_overlap``.
    """
    size = config.image_size
    canvas = render_background(rng, size).convert("RGBA")
    placed: list[PlacedObject] = []
    for label_index in label_indices:
        glyph = glyphs[label_index]
        longest = rng.uniform(*config.object_scale) * size
        ratio = longest / max(glyph.size)
        width = max(2, round(glyph.width * ratio))
        height = max(2, round(glyph.height * ratio))
        for _ in range(_PLACEMENT_TRIES):
            x0 = int(rng.integers(0, size - width + 1))
            y0 = int(rng.integers(0, size - height + 1))
            box = (x0, y0, x0 + width, y0 + height)
            if all(_covered_fraction(box, other.box) <= config.max_overlap for other in placed):
                scaled = glyph.resize((width, height), Image.Resampling.BILINEAR)
                canvas.alpha_composite(scaled, (x0, y0))
                placed.append(PlacedObject(label_index, box))
                break
    return canvas.convert("RGB"), placed


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for one image, independent of every other image's."""
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


def image_id(split: str, index: int) -> str:
    """Stable image id, e.g. ``test-000042``."""
    return f"{split}-{index:06d}"


def encode(image: Image.Image, config: EmojiScenesConfig) -> bytes:
    """The image file bytes in the configured format."""
    buffer = io.BytesIO()
    if config.image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=config.jpeg_quality)
    else:
        image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@dataclass(frozen=True)
class RenderJob:
    """A chunk of consecutive images of one split, rendered and written by one worker."""

    split: str
    start: int
    stop: int
    config: EmojiScenesConfig
    font_path: str
    glyphs: tuple[str, ...]
    labels: tuple[str, ...]
    seen: tuple[bool, ...]
    images_prefix: str
    storage: Storage


def render_chunk(job: RenderJob) -> tuple[list[dict], list[dict]]:
    """Render, encode and store the images of ``job``; return their label rows and box rows."""
    glyphs = glyph_images(job.font_path, job.glyphs)
    seen = np.asarray(job.seen)
    seen_indices, unseen_indices = np.flatnonzero(seen), np.flatnonzero(~seen)
    suffix = "jpg" if job.config.image_format == "jpeg" else "png"
    rows, boxes = [], []
    for index in range(job.start, job.stop):
        rng = image_rng(job.config.seed, job.split, index)
        chosen = choose_objects(rng, job.split, seen_indices, unseen_indices, job.config)
        image, placed = render_scene(rng, chosen, glyphs, job.config)
        identifier = image_id(job.split, index)
        uri = f"{job.split}/{identifier}.{suffix}"
        job.storage.write_bytes(f"{job.images_prefix}/{uri}", encode(image, job.config))
        rows.append(
            {
                "image_id": identifier,
                "uri": uri,
                "split": job.split,
                "positives": [job.labels[obj.label_index] for obj in placed],
                "negatives": [],
                "complete": True,
            }
        )
        boxes.extend(
            {
                "image_id": identifier,
                "label": job.labels[obj.label_index],
                "x0": float(obj.box[0]),
                "y0": float(obj.box[1]),
                "x1": float(obj.box[2]),
                "y1": float(obj.box[3]),
            }
            for obj in placed
        )
    return rows, boxes


def _jobs(
    config: EmojiScenesConfig,
    vocabulary: pd.DataFrame,
    entries: Sequence[EmojiLabel],
    font_path: str,
    images_prefix: str,
    storage: Storage,
) -> Iterator[RenderJob]:
    counts = {"train": config.num_train, "val": config.num_val, "test": config.num_test}
    for split, count in counts.items():
        for start in range(0, count, _CHUNK_IMAGES):
            yield RenderJob(
                split=split,
                start=start,
                stop=min(start + _CHUNK_IMAGES, count),
                config=config,
                font_path=font_path,
                glyphs=tuple(entry.glyph for entry in entries),
                labels=tuple(vocabulary["label"]),
                seen=tuple(bool(s) for s in vocabulary["seen"]),
                images_prefix=images_prefix,
                storage=storage,
            )


def render_all(jobs: Sequence[RenderJob], workers: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run the render jobs (in a process pool when ``workers`` > 1) behind a progress bar."""
    total = sum(job.stop - job.start for job in jobs)
    results: list[tuple[list[dict], list[dict]]] = []
    with tqdm(total=total, unit="img", desc="emoji-scenes") as bar:
        if workers <= 1 or len(jobs) == 1:
            for job in jobs:
                results.append(render_chunk(job))
                bar.update(job.stop - job.start)
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                for job, result in zip(jobs, pool.map(render_chunk, jobs), strict=True):
                    results.append(result)
                    bar.update(job.stop - job.start)
    rows = [row for chunk_rows, _ in results for row in chunk_rows]
    boxes = [box for _, chunk_boxes in results for box in chunk_boxes]
    return pd.DataFrame(rows), pd.DataFrame(boxes)


def prepare_emoji_scenes(config: EmojiScenesConfig, storage: Storage) -> DatasetArtifacts:
    """Render the emoji-scenes dataset into ``datasets/<name>/`` (skipped if already done).

    Writes the images under ``images/<split>/``, then the label table, vocabulary and object
    boxes; ``dataset.json`` is committed last, so an interrupted run is redone, not trusted.
    Its inputs are the emoji font and the word vectors that split the labels: their versions
    are recorded, so a different font file or vector file re-renders the dataset.
    """
    prepared = load_prepared(storage, config.name, config)
    if prepared is not None:
        return prepared
    font_path = str(find_emoji_font(config.font_path))
    reads = RecordingStorage(storage)
    reads.record(font_path, *config.embedding_source.vector_files())
    entries = select_labels(config.families)
    vocabulary = build_vocabulary(config, storage)
    images_prefix = dataset_url(storage, config.name, IMAGES_DIR)
    jobs = list(_jobs(config, vocabulary, entries, font_path, images_prefix, storage))
    workers = config.workers or os.cpu_count() or 1
    labels, boxes = render_all(jobs, workers)
    return write_dataset(
        storage,
        config,
        name=config.name,
        labels=labels,
        vocabulary=vocabulary,
        images_prefix=images_prefix,
        boxes=boxes,
        inputs=reads.inputs,
    )
