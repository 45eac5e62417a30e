"""The LESA science core (Huynh & Elhamifar, CVPR 2020): pure PyTorch/NumPy, no orchestration.

``config`` (run-config sections), ``model`` (LESA), ``losses`` (Eq. 5-12), ``metrics``
(release-exact mAP and P/R/F1@K), ``calibration`` (thresholds), ``data`` (batch sources),
``trainer`` (training with exact resume), ``checkpoint`` (atomic, self-describing files),
``portable`` (safetensors + model card), ``inference`` (scores, top-K, attention),
``attention`` (heatmaps and the pointing game), ``backbones`` and ``images`` (features from
pictures) and ``tagger``: :class:`Tagger`, the library API.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Tagger"]


def __getattr__(name: str) -> Any:
    """``Tagger`` is imported on first use: importing the science core for training or
    scoring should not load torchvision and the backbones."""
    if name == "Tagger":
        from lesa_model.tagger import Tagger

        return Tagger
    raise AttributeError(f"module 'lesa_model' has no attribute {name!r}")
