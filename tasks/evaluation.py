"""Evaluation stage: score a checkpoint on the test split, ZSL and GZSL, and write the report.

The checkpoint is scored with the *current* vocabulary's label vectors, so labels added after
training (unseen ones) are evaluated zero-shot without retraining.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from lesa_model.config import StrictModel


class EvaluationConfig(StrictModel):
    """What to report: top-K cut-offs, which checkpoint, and the baselines scored beside LESA.

    ``ks`` follow the paper: 3 and 5 on NUS-WIDE, 10 and 20 on Open Images.
    """

    ks: list[PositiveInt] = Field(default_factory=lambda: [3, 5], min_length=1)
    checkpoint: Literal["best", "final"] = "best"
    baselines: list[Literal["mean-pool", "random"]] = Field(
        default_factory=lambda: ["mean-pool", "random"]
    )
    batch_size: PositiveInt = 256
