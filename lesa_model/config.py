"""Run-configuration sections owned by the science core.

Every config section in the project derives from :class:`lesa_common.StrictModel`, so a YAML
file with an unknown key or a wrongly typed value fails on load with an error that names the key.
Defaults are the paper's settings (Huynh & Elhamifar, CVPR 2020); the authors' release behaviour
is opt-in.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, PositiveInt, model_validator

from lesa_common import StrictModel

BACKBONE_BATCH = 32
"""Images per backbone forward pass, in extraction (``features.batch_size``) and prediction
(``--batch-size``): only speed and memory depend on it. Kept here, in a module without torch, so
that ``--help`` shows it without importing the backbones."""


class ModelConfig(StrictModel):
    """Architecture of :class:`lesa_model.model.LESA` (docs/FIDELITY.md: which preset uses what).

    ``first_layer="per-module"`` is the paper's Eq. 3 (one ``W1`` per module, no bias);
    ``"shared"`` is the release's single first layer with a bias shared by all modules (its
    ``w2`` has a bias too). ``feature_adapter`` is the release's learned 2x2 convolution over the
    region grid followed by batch norm and ReLU (TF-slim ``conv2d``), so the model needs the grid
    shape. ``pooling="mean"`` replaces the attention modules with one feature, the mean of the
    regions (the Fast0Tag-style baseline); ``num_modules`` is then ignored. Every weight matrix
    starts from TensorFlow's variance-scaling initialiser, as in the release.
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


class L2Config(StrictModel):
    """L2 penalties ``weight * sum(W**2) / 2`` added to the objective (TF's ``l2_regularizer``).

    ``adapter`` is the release's regulariser on the adapter's kernel (scale 5e-4 in
    ``model_share_attention._conv``); the released NUS-WIDE run builds it but leaves
    ``is_regularizer`` off, so it is not part of that run's loss (its logged total is exactly the
    weighted sum of the four terms). ``label_projection`` (W3) and ``input_projection`` regularise
    the visual-to-semantic map.
    """

    adapter: float = Field(default=0.0, ge=0)
    label_projection: float = Field(default=0.0, ge=0)
    input_projection: float = Field(default=0.0, ge=0)


class LossConfig(StrictModel):
    """Weights of Eq. 12 and how each term is normalised (docs/FIDELITY.md).

    ``normalisation="paper"`` sums every term over the images of the batch (Eq. 5-11);
    ``"release"`` computes each term as the authors' code does (see ``lesa_model.losses``).
    ``rel_margin`` is the release's ``margin_att_global`` (0 in the released run); the paper's rel
    has no margin, so it must stay 0 with the paper normalisation.
    """

    div: float = Field(default=1e-2, ge=0)
    rel: float = Field(default=1e-3, ge=0)
    dist: float = Field(default=1e-1, ge=0)
    normalisation: Literal["paper", "release"] = "paper"
    rel_margin: float = Field(default=0.0, ge=0)
    l2: L2Config = Field(default_factory=L2Config)

    @model_validator(mode="after")
    def _margin_is_the_release_s(self) -> LossConfig:
        if self.rel_margin and self.normalisation == "paper":
            raise ValueError(
                "rel_margin exists only in the release's rel term (normalisation: release)"
            )
        return self


class ReaderConfig(StrictModel):
    """How training batches are fed (``tasks.feature_reader.FeatureBatches``; docs/ARCHITECTURE.md,
    "Training input").

    ``mode`` only changes speed and memory, never the batches: ``memory`` loads the training
    features once (in their stored dtype) and gathers every batch from memory; ``stream`` reads
    them from the shards window by window in a background thread; ``auto`` loads them when they
    fit ``memory_budget_gb`` (None: half of the host memory available when training starts) and
    streams otherwise. On CUDA, loaded features move to the device when they take at most half
    of its free memory, so batches are gathered there. ``window_chunks`` changes the shuffle
    (hence the weights): an epoch permutes every stored chunk of the training images, then
    shuffles rows within each run of ``window_chunks`` consecutive chunks of that permutation.
    ``prefetch`` is the number of windows (streaming) or batches (device feed) read ahead.
    """

    mode: Literal["auto", "memory", "stream"] = "auto"
    memory_budget_gb: float | None = Field(default=None, gt=0)
    window_chunks: PositiveInt = 64
    prefetch: PositiveInt = 2

    SPEED_ONLY: ClassVar[frozenset[str]] = frozenset({"mode", "memory_budget_gb", "prefetch"})
    """The fields that change speed and memory but not one batch."""


SEEN_METRIC = r"^(mAP|F1@[1-9][0-9]*)$"
"""``mAP`` or ``F1@K``: a validation metric of the (kept) seen labels."""
SELECTION_METRIC = r"^(mAP|F1@[1-9][0-9]*|mix)$"
"""A seen-label metric, or ``mix``: the validation value that picks ``best.pt`` and drives the
schedule."""


class TrainerConfig(StrictModel):
    """Optimisation, validation and checkpointing of :class:`lesa_model.trainer.Trainer`.

    ``optimizer`` picks TensorFlow's RMSprop (mean square starting at 1, epsilon inside the square
    root) with the paper's "default setting" (decay 0.9, momentum 0, epsilon 1e-10) or the
    release's (decay 0.9, momentum 0.9, epsilon 1.0). ``epochs``, when set, overrides ``steps``
    (steps = epochs x batches per epoch). ``shuffle: false`` reads the training images in storage
    order every epoch, as the release does.

    Validation runs every ``val_every`` steps and at the end; with ``validate_first_step`` it also
    runs after step 1, so it falls on steps 1, 1 + val_every, ... as in the release (``i % 4000
    == 0`` after the update of step i, counted from 0). It reports mAP and F1@K on the seen labels
    for every K the evaluation reports; ``select`` names the one that keeps ``best.pt`` (``>=``:
    the later of equal values wins, as in the release). With ``lr_schedule="release-plateau"``
    that metric feeds an exponential moving average that starts at 0 (``val_ema`` = weight of the
    newest value); whenever the average drops, the rate is multiplied by ``plateau_factor``, and
    the next ``plateau_patience - 1`` validations cannot decay it again; no decay once the rate is
    below ``plateau_min_lr_ratio`` x ``lr`` (release ``core/utils.py`` ``LearningRate.adapt``).

    Zero-shot-aware selection (``lesa_model.selection``; off by default, so both presets are
    untouched): ``holdout_share`` of the training labels, drawn by ``holdout_seed``, are held out
    as pseudo-unseen (their annotations are 0 in every training batch) and ranked zero-shot on
    the validation split (``val_holdout_mAP``); the seen metrics then cover the kept labels only.
    ``select: mix`` keeps ``select_weight * val_holdout_mAP + (1 - select_weight) *
    val_<select_seen>``.
    """

    optimizer: Literal["paper", "release"] = "paper"
    lr: float = Field(default=1e-3, gt=0)
    batch_size: PositiveInt = 32
    steps: PositiveInt = 200_000
    epochs: PositiveInt | None = None
    shuffle: bool = True
    skip_images_without_positives: bool = Field(
        default=False,
        description="Drop images without a positive label from each batch (release, Open Images).",
    )
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = Field(
        default=True, description="bfloat16 autocast on CUDA; ignored on CPU."
    )
    deterministic: bool = Field(
        default=False,
        description="Deterministic CUDA kernels (slower); CPU runs are deterministic already.",
    )
    val_every: PositiveInt = 4_000
    validate_first_step: bool = False
    select: str = Field(default="F1@5", pattern=SELECTION_METRIC)
    select_seen: str = Field(
        default="F1@5", pattern=SEEN_METRIC, description="The seen-label metric of select: mix."
    )
    select_weight: float = Field(
        default=0.5, ge=0, le=1, description="Weight of val_holdout_mAP in select: mix."
    )
    holdout_share: float = Field(
        default=0.0, ge=0, lt=1, description="Share of training labels held out as pseudo-unseen."
    )
    holdout_seed: int = 0
    val_ema: float = Field(default=0.3, gt=0, le=1)
    lr_schedule: Literal["constant", "release-plateau"] = "constant"
    plateau_factor: float = Field(default=0.8, gt=0, lt=1)
    plateau_patience: PositiveInt = 5
    plateau_min_lr_ratio: float = Field(default=1e-3, gt=0, le=1)
    checkpoint_every: PositiveInt = 1_000
    keep_checkpoints: PositiveInt = Field(
        default=3, description="How many step-*.pt files to keep (best.pt and final.pt are kept)."
    )
    log_every: PositiveInt = 100
    reader: ReaderConfig = Field(default_factory=ReaderConfig)

    @model_validator(mode="after")
    def _mix_needs_held_out_labels(self) -> TrainerConfig:
        if self.select == "mix" and self.holdout_share == 0:
            raise ValueError(
                "select: mix weighs the pseudo-unseen mAP, so it needs holdout_share > 0"
            )
        return self

    def weights_identity(self) -> dict[str, object]:
        """Every setting that changes the trained weights (what a training key hashes): all of
        them but the reader's speed-only ones."""
        return self.model_dump(mode="json", exclude={"reader": set(ReaderConfig.SPEED_ONLY)})

    @property
    def select_k(self) -> int | None:
        """K of the ``F1@K`` the selection reads (``select_seen``'s under mix); None for mAP."""
        seen = self.select_seen if self.select == "mix" else self.select
        return int(seen.removeprefix("F1@")) if seen.startswith("F1@") else None
