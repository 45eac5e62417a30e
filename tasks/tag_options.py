"""What a prediction or tagging request may ask for: how many tags, which score cut, how many
images per Dask task, and the defaults of each.

The command lines check these options and show their defaults in ``--help`` before anything
heavy is imported, so this module imports only the standard library; the prediction and tagging
tasks take their defaults from here too.
"""

from __future__ import annotations

import math

DEFAULT_TOP_K = 5
"""Tags per image when a request names neither a count nor a threshold."""
DEFAULT_SHARD_SIZE = 256
"""Images per Dask task in batch tagging: large enough to amortise loading the model, small
enough that a lost worker costs little."""
CALIBRATED = "calibrated"
"""``threshold`` value for the per-label thresholds evaluation fitted on the validation split."""


class PredictionError(ValueError):
    """A prediction request that cannot be served; the message says what to change."""


def parse_threshold(text: str) -> str:
    """``calibrated`` or a finite number, as text (what the flow parameter carries)."""
    value = text.strip().lower()
    if value == CALIBRATED:
        return value
    try:
        number = float(value)
    except ValueError:
        raise PredictionError(
            f"threshold must be {CALIBRATED!r} or a number, got {text!r}"
        ) from None
    if not math.isfinite(number):
        raise PredictionError(f"threshold must be a finite number, got {text!r}")
    return value
