"""Run-configuration sections owned by the science core.

Every config section in the project derives from :class:`StrictModel`, so a YAML file with an
unknown key or a wrongly typed value fails on load with an error that names the key. Defaults are
the paper's settings (Huynh & Elhamifar, CVPR 2020); the authors' release behaviour is opt-in.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt


class StrictModel(BaseModel):
    """Base for all config sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(StrictModel):
    """Architecture of :class:`lesa_model.model.LESA`.

    ``first_layer="per-module"`` is the paper's Eq. 3 (one ``W1`` per module, no bias);
    ``"shared"`` is the release's single first layer with a bias shared by all modules.
    ``feature_adapter`` is the release's 2x2 convolution + batch norm over the region grid, so the
    model needs the grid shape. ``pooling="mean"`` replaces the attention modules with one feature,
    the mean of the regions (the Fast0Tag-style baseline); ``num_modules`` is then ignored.
    """

    num_modules: PositiveInt = 10
    hidden_dim: PositiveInt | None = Field(
        default=None, description="Width of the attention layer; None = the feature dimension."
    )
    first_layer: Literal["per-module", "shared"] = "per-module"
    feature_adapter: bool = False
    input_projection: PositiveInt | None = Field(
        default=None, description="Linear projection of region features to this size; None = off."
    )
    pooling: Literal["attention", "mean"] = "attention"


class LossConfig(StrictModel):
    """Weights of Eq. 12 and how each term is normalised.

    ``normalisation="paper"`` sums every term over the images of the batch (Eq. 5-11);
    ``"release"`` uses the authors' per-batch normalisations (see ``lesa_model.losses``).
    """

    div: float = Field(default=1e-2, ge=0)
    rel: float = Field(default=1e-3, ge=0)
    dist: float = Field(default=1e-1, ge=0)
    normalisation: Literal["paper", "release"] = "paper"


class TrainerConfig(StrictModel):
    """Optimisation, validation and checkpointing of :class:`lesa_model.trainer.Trainer`.

    ``optimizer="paper"`` is RMSprop with lr 1e-3 and PyTorch's other defaults; ``"release"`` is
    RMSprop with decay 0.9, momentum 0.9 and epsilon 1.0. ``epochs``, when set, overrides
    ``steps`` (steps = epochs x batches per epoch). Validation scores F1@``eval_k`` on the seen
    labels every ``val_every`` steps; the best one is kept as ``best.pt``. With
    ``lr_schedule="release-plateau"`` the validation F1 feeds an exponential moving average
    (``val_ema`` = weight of the newest value) and the learning rate is multiplied by
    ``plateau_factor`` after ``plateau_patience`` validations without improvement, down to
    ``plateau_min_lr_ratio`` x ``lr``.
    """

    optimizer: Literal["paper", "release"] = "paper"
    lr: float = Field(default=1e-3, gt=0)
    batch_size: PositiveInt = 32
    steps: PositiveInt = 200_000
    epochs: PositiveInt | None = None
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = Field(
        default=True, description="bfloat16 autocast on CUDA; ignored on CPU."
    )
    val_every: PositiveInt = 4_000
    eval_k: PositiveInt = 5
    val_ema: float = Field(default=0.3, gt=0, le=1)
    lr_schedule: Literal["constant", "release-plateau"] = "constant"
    plateau_factor: float = Field(default=0.8, gt=0, lt=1)
    plateau_patience: PositiveInt = 3
    plateau_min_lr_ratio: float = Field(default=1e-3, gt=0, le=1)
    checkpoint_every: PositiveInt = 1_000
    keep_checkpoints: PositiveInt = Field(
        default=3, description="How many step-*.pt files to keep (best.pt and final.pt are kept)."
    )
    log_every: PositiveInt = 100
