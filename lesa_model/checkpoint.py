"""Checkpoint files: a plain dict of tensors and primitives written atomically.

A checkpoint is self-describing: it carries the model's config and dimensions next to its
weights, so :func:`load_model` rebuilds the model without the run config, and the caller's
``metadata`` (label names, embedding source, backbone...) travels with it. Files are loaded with
``weights_only=True``: nothing in them can execute code, which is why metadata must be JSON-like.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from lesa_model.config import ModelConfig
from lesa_model.model import LESA

FORMAT_VERSION = 1


def model_payload(model: LESA) -> dict[str, Any]:
    """What it takes to rebuild ``model``: its config, dimensions and weights."""
    return {
        "model_config": model.cfg.model_dump(),
        "dims": {
            "feature_dim": model.feature_dim,
            "label_dim": model.label_dim,
            "grid": list(model.grid) if model.grid is not None else None,
        },
        "model": model.state_dict(),
    }


def build_model(payload: dict[str, Any]) -> LESA:
    """A LESA with the architecture and weights stored in a checkpoint payload."""
    dims = payload["dims"]
    grid = tuple(dims["grid"]) if dims["grid"] is not None else None
    model = LESA(
        dims["feature_dim"],
        dims["label_dim"],
        ModelConfig.model_validate(payload["model_config"]),
        grid=grid,
    )
    model.load_state_dict(payload["model"])
    return model


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temporary file in the same folder + rename).

    A crash mid-write leaves the previous checkpoint intact, never a truncated file.
    """
    path = Path(path)
    metadata = payload.get("metadata", {})
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint metadata must be JSON-serialisable: {error}") from error
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save({"format_version": FORMAT_VERSION, **payload}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: str = "cpu") -> dict[str, Any]:
    """The payload of a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a readable checkpoint: {error}") from error
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a LESA checkpoint (format version {FORMAT_VERSION})")
    return payload


def load_model(
    path: str | os.PathLike[str], map_location: str = "cpu"
) -> tuple[LESA, dict[str, Any]]:
    """The model stored in a checkpoint (in eval mode) and the metadata saved with it."""
    payload = load_checkpoint(path, map_location=map_location)
    model = build_model(payload).to(map_location)
    model.eval()
    return model, payload.get("metadata", {})
