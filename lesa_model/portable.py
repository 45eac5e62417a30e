"""Portable checkpoints: weights in safetensors plus a JSON model card, nothing pickled.

A ``.pt`` checkpoint needs torch's unpickler and this project's metadata conventions; the
portable form is two files any tool can read:

- ``model.safetensors``: the LESA weights (``model.<name>``) and the word vectors of the known
  labels (``label_vectors``, one row per label in the card's order);
- ``model-card.json``: the model's config and dimensions, the labels (seen or not), the feature
  recipe (:class:`lesa_model.backbones.FeatureRecipe`), the embedding source, the calibrated
  thresholds, the evaluation metrics, the code version and the weights' SHA-256.

The card is written last, so a folder with a card is complete; loading checks the weights'
digest against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lesa_model.backbones import FeatureRecipe
from lesa_model.checkpoint import build_model
from lesa_model.model import LESA

CARD_FILE = "model-card.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FORMAT = "lesa-model-card/1"
_MODEL_PREFIX = "model."
_VECTORS = "label_vectors"


class PortableError(ValueError):
    """A folder that is not a complete, intact portable checkpoint."""


@dataclass(frozen=True)
class PortableModel:
    """A loaded portable checkpoint."""

    model: LESA
    card: dict[str, Any]
    label_vectors: np.ndarray
    """(C, d) float32, one row per ``labels``."""

    @property
    def labels(self) -> list[str]:
        return [row["label"] for row in self.card["labels"]]

    @property
    def seen_labels(self) -> list[str]:
        return [row["label"] for row in self.card["labels"] if row["seen"]]

    @property
    def recipe(self) -> FeatureRecipe:
        return FeatureRecipe.from_dict(self.card["features"])


def save_portable(
    folder: str | os.PathLike[str],
    model: LESA,
    *,
    labels: list[str],
    seen: list[bool],
    label_vectors: np.ndarray,
    recipe: FeatureRecipe,
    extra: Mapping[str, Any],
) -> Path:
    """Write ``model`` and its card into ``folder``; returns the card's path.

    ``extra`` holds the rest of the card (embedding source, thresholds, metrics, code version,
    provenance); it must be JSON-serialisable.
    """
    vectors = np.ascontiguousarray(label_vectors, dtype=np.float32)
    if vectors.shape != (len(labels), model.label_dim) or len(seen) != len(labels):
        raise PortableError(
            f"{len(labels)} labels, {len(seen)} seen flags and label vectors {vectors.shape} "
            f"do not match (the model takes {model.label_dim}-d vectors)"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{_MODEL_PREFIX}{name}": tensor.detach().cpu().contiguous()
        for name, tensor in model.state_dict().items()
    }
    tensors[_VECTORS] = torch.from_numpy(vectors)
    weights = folder / WEIGHTS_FILE
    _atomic(weights, lambda path: save_file(tensors, str(path)))
    card = {
        "format": CARD_FORMAT,
        "model_config": model.cfg.model_dump(mode="json"),
        "dims": {
            "feature_dim": model.feature_dim,
            "label_dim": model.label_dim,
            "grid": list(model.grid) if model.grid is not None else None,
        },
        "labels": [
            {"label": label, "seen": bool(flag)} for label, flag in zip(labels, seen, strict=True)
        ],
        "features": {**recipe.__dict__},
        **extra,
        "weights_sha256": _sha256(weights),
    }
    text = json.dumps(card, indent=2, sort_keys=False)
    path = folder / CARD_FILE
    _atomic(path, lambda target: target.write_text(text, encoding="utf-8"))
    return path


def load_portable(location: str | os.PathLike[str]) -> PortableModel:
    """Load a portable checkpoint from its folder (or its card file), in eval mode on the CPU.

    Raises:
        PortableError: no card, another format, weights missing or not the ones the card names.
    """
    location = Path(location)
    card_path = location if location.is_file() else location / CARD_FILE
    if not card_path.is_file():
        raise PortableError(f"no {CARD_FILE} at {location}: not an exported checkpoint")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    if card.get("format") != CARD_FORMAT:
        raise PortableError(f"{card_path} is not a {CARD_FORMAT} card: {card.get('format')!r}")
    weights = card_path.parent / WEIGHTS_FILE
    if not weights.is_file():
        raise PortableError(f"{weights} is missing (the card {card_path} needs it)")
    if _sha256(weights) != card["weights_sha256"]:
        raise PortableError(f"{weights} is not the file {card_path} was written with")
    tensors = load_file(str(weights))
    state = {
        name.removeprefix(_MODEL_PREFIX): tensor
        for name, tensor in tensors.items()
        if name.startswith(_MODEL_PREFIX)
    }
    model = build_model(
        {"model_config": card["model_config"], "dims": card["dims"], "model": state}
    )
    model.eval()
    return PortableModel(model, card, tensors[_VECTORS].numpy())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic(path: Path, write: Any) -> None:
    """Write through ``write(temporary)`` then rename over ``path``: never a half file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
