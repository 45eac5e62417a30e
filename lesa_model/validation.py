"""Input checks shared by the science core.

Bad input must fail loudly with a message naming the problem, never turn into a silently wrong
number, so every public entry point funnels its tensors and arrays through these helpers.
"""

from __future__ import annotations

import numpy as np
import torch


def check_tensor(
    value: torch.Tensor, name: str, *, ndim: int, floating: bool = True, finite: bool = True
) -> None:
    """Raise ``ValueError`` unless ``value`` is a tensor of ``ndim`` dims, float, and finite."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if finite and floating and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_label_vectors(label_vectors: torch.Tensor, label_dim: int) -> None:
    """Label vectors must be a non-empty, finite (C, label_dim) matrix without all-zero rows.

    An all-zero word vector (a word missing from the embedding) would give the label a constant
    score of 0 in every image, which ranks it arbitrarily instead of failing.
    """
    check_tensor(label_vectors, "label_vectors", ndim=2)
    if label_vectors.shape[0] == 0:
        raise ValueError("label_vectors is empty: at least one label is needed")
    if label_vectors.shape[1] != label_dim:
        raise ValueError(
            f"label_vectors have dimension {label_vectors.shape[1]}, the model expects {label_dim}"
        )
    zero_rows = torch.nonzero(~label_vectors.any(dim=1)).flatten()
    if zero_rows.numel():
        raise ValueError(
            f"label_vectors has all-zero rows (labels without a word vector): "
            f"{zero_rows[:10].tolist()}"
        )


def check_label_values(labels: torch.Tensor | np.ndarray, name: str = "labels") -> None:
    """Labels must be integers in {1, -1, 0} (present, absent, not annotated)."""
    dtype_is_int = (
        not labels.is_floating_point() and not labels.is_complex() and labels.dtype != torch.bool
        if isinstance(labels, torch.Tensor)
        else np.issubdtype(labels.dtype, np.integer)
    )
    if not dtype_is_int:
        raise ValueError(
            f"{name} must be an integer array in {{1, -1, 0}}, got dtype {labels.dtype}"
        )
    bad = (labels > 1) | (labels < -1)
    if bool(bad.any()):
        raise ValueError(f"{name} must only contain 1, -1 or 0")


def as_float_features(features: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    """Region features as float32 on ``device``, refusing non-float input instead of casting it.

    Stored features are float16 or float32 and the model runs in float32, so floats are widened;
    an integer or boolean array here is the wrong array (pixels, labels), which a cast would hide.
    """
    tensor = torch.as_tensor(features, device=device)
    if not tensor.is_floating_point():
        raise ValueError(f"features must be floating point, got dtype {tensor.dtype}")
    return tensor.float()
