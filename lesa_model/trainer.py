"""Training loop with validation, best-model selection and exact resume.

Exact resume rests on three facts: the data order of an epoch is a pure function of
(seed, epoch) (``lesa_model.data.epoch_order``); a checkpoint records where in that order the run
stopped, plus the optimiser, scheduler and RNG states; and resuming replays the epoch's order,
skipping the batches already consumed. N steps, a checkpoint, and N more steps therefore give
the same parameters as 2N steps straight.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lesa_model.checkpoint import load_checkpoint, model_payload, save_checkpoint
from lesa_model.config import LossConfig, TrainerConfig
from lesa_model.data import BatchSource, DeviceFeed, batch_count
from lesa_model.inference import score_with_labels
from lesa_model.losses import LossTerms, lesa_loss
from lesa_model.model import LESA, LesaOutput
from lesa_model.optim import tf_rmsprop
from lesa_model.schedule import ReleasePlateau
from lesa_model.selection import (
    HoldoutBatches,
    holdout_columns,
    selection_value,
    validation_metrics,
)
from lesa_model.validation import as_float_features, check_label_vectors

STEP_CHECKPOINT = re.compile(r"^step-(\d+)\.pt$")
LOSS_KEYS = tuple(field.name for field in fields(LossTerms))


@dataclass(frozen=True)
class TrainResult:
    """Where a run ended and what it produced."""

    final_step: int
    best_step: int | None
    best_metric: float | None
    history: list[dict[str, float]]
    final_checkpoint: Path
    best_checkpoint: Path | None


def resolve_device(device: str) -> torch.device:
    """``"auto"`` means CUDA when present, else CPU; asking for absent CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return torch.device(device)


def step_checkpoint_name(step: int) -> str:
    """``step-00001000.pt``: zero-padded so names sort by step."""
    return f"step-{step:08d}.pt"


def make_optimizer(model: LESA, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """TensorFlow's RMSprop with the paper's or the release's settings (``lesa_model.optim``)."""
    return tf_rmsprop(model.parameters(), cfg.lr, cfg.optimizer)


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainerConfig) -> ReleasePlateau | None:
    """The release's adaptive learning rate, or None for a constant rate."""
    if cfg.lr_schedule == "constant":
        return None
    return ReleasePlateau(
        optimizer,
        signal=cfg.val_ema,
        decay_rate=cfg.plateau_factor,
        patience=cfg.plateau_patience,
        limit_ratio=cfg.plateau_min_lr_ratio,
    )


def use_deterministic_cuda() -> None:
    """Make CUDA kernels deterministic for this process (cuBLAS workspace, cuDNN, scatter ops).

    Ops without a deterministic CUDA kernel then raise instead of silently varying.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)


def validation_ks(cfg: TrainerConfig, ks: Sequence[int] | None) -> list[int]:
    """The K of every F1@K validation reports: the evaluation's, plus the selection's own."""
    chosen = sorted(set(ks or ()) | ({cfg.select_k} if cfg.select_k else set()))
    return chosen


def _float32(output: LesaOutput) -> LesaOutput:
    """The loss runs in float32 even when the forward pass ran under autocast."""
    return replace(
        output,
        **{
            field.name: getattr(output, field.name).float()
            for field in fields(output)
            if getattr(output, field.name).is_floating_point()
        },
    )


class Trainer:
    """Trains a :class:`LESA` on seen labels.

    Args:
        model: the model to train (moved to the configured device).
        label_vectors: (C, d) word vectors of the training (seen) labels, in the column order of
            the sources' labels.
        cfg: optimisation, validation and checkpointing settings.
        loss_cfg: loss weights and normalisation.
        checkpoint_dir: local folder for ``step-*.pt``, ``best.pt`` and ``final.pt``.
        metadata: JSON-like facts stored in every checkpoint (label names, embedding source...).
        progress: called with every history record (log and validation steps).
        val_ks: the K of every F1@K validation reports (the evaluation's cut-offs), besides mAP
            and the selection metric's own K.
    """

    def __init__(
        self,
        model: LESA,
        label_vectors: np.ndarray | torch.Tensor,
        cfg: TrainerConfig | None = None,
        loss_cfg: LossConfig | None = None,
        checkpoint_dir: str | Path = "checkpoints",
        *,
        metadata: dict[str, Any] | None = None,
        progress: Callable[[dict[str, float]], None] | None = None,
        val_ks: Sequence[int] | None = None,
    ) -> None:
        self.cfg = cfg or TrainerConfig()
        self.loss_cfg = loss_cfg or LossConfig()
        self.device = resolve_device(self.cfg.device)
        if self.cfg.deterministic and self.device.type == "cuda":
            use_deterministic_cuda()
        self.model = model.to(self.device)
        self.label_vectors = torch.as_tensor(label_vectors, dtype=torch.float32, device=self.device)
        check_label_vectors(self.label_vectors, model.label_dim)
        num_labels = self.label_vectors.shape[0]
        # Pseudo-unseen label columns (lesa_model.selection); empty unless asked for.
        self.holdout = holdout_columns(num_labels, self.cfg.holdout_share, self.cfg.holdout_seed)
        self.val_ks = validation_ks(self.cfg, val_ks)
        too_large = [k for k in self.val_ks if k > num_labels - self.holdout.size]
        if too_large:
            raise ValueError(
                f"validation F1@K with K = {too_large} is larger than the number of training "
                f"labels kept ({num_labels - self.holdout.size})"
            )
        self.checkpoint_dir = Path(checkpoint_dir)
        self.metadata = dict(metadata or {})
        self.progress = progress
        self.amp = self.cfg.mixed_precision and self.device.type == "cuda"
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.schedule = make_schedule(self.optimizer, self.cfg)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.history: list[dict[str, float]] = []
        self._window: dict[str, float | torch.Tensor] = dict.fromkeys(LOSS_KEYS, 0.0)
        self._window_steps = 0
        self._checked = False

    # ----- checkpoints -------------------------------------------------------------------------

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint with the highest step in ``checkpoint_dir`` (step-*.pt or final.pt)."""
        candidates: list[tuple[int, Path]] = []
        if self.checkpoint_dir.is_dir():
            for path in self.checkpoint_dir.iterdir():
                match = STEP_CHECKPOINT.match(path.name)
                if match:
                    candidates.append((int(match.group(1)), path))
            final = self.checkpoint_dir / "final.pt"
            if final.is_file():
                candidates.append((int(load_checkpoint(final)["step"]), final))
        return max(candidates, key=lambda item: item[0])[1] if candidates else None

    def state(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly where it stands."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            **model_payload(self.model),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict() if self.schedule else None,
            "rng": rng,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "history": self.history,
            "window": {
                "sums": {key: float(value) for key, value in self._window.items()},
                "steps": self._window_steps,
            },
            "holdout": self.holdout.tolist(),
            "trainer_config": self.cfg.model_dump(),
            "loss_config": self.loss_cfg.model_dump(),
            "metadata": self.metadata,
        }

    def restore(self, path: str | Path) -> None:
        """Continue from a checkpoint written by this trainer (same architecture and dims)."""
        payload = load_checkpoint(path, map_location=str(self.device))
        mine = model_payload(self.model)
        for key in ("model_config", "dims"):
            if payload[key] != mine[key]:
                raise ValueError(
                    f"checkpoint {path} was written for a different model: {key} "
                    f"{payload[key]} != {mine[key]}"
                )
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.schedule is not None and payload.get("schedule") is not None:
            self.schedule.load_state_dict(payload["schedule"])
        torch.set_rng_state(payload["rng"]["torch"].cpu())
        if "cuda" in payload["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([state.cpu() for state in payload["rng"]["cuda"]])
        self.step = int(payload["step"])
        self.epoch = int(payload["epoch"])
        self.batch_in_epoch = int(payload["batch_in_epoch"])
        self.best_metric = payload["best_metric"]
        self.best_step = payload["best_step"]
        self.history = list(payload["history"])
        self._window = dict(payload["window"]["sums"])
        self._window_steps = int(payload["window"]["steps"])

    def _save_step_checkpoint(self) -> None:
        save_checkpoint(self.checkpoint_dir / step_checkpoint_name(self.step), self.state())
        steps = sorted(
            (int(m.group(1)), path)
            for path in self.checkpoint_dir.iterdir()
            if (m := STEP_CHECKPOINT.match(path.name))
        )
        for _, path in steps[: -self.cfg.keep_checkpoints]:
            path.unlink(missing_ok=True)

    # ----- training ----------------------------------------------------------------------------

    def total_steps(self, train: BatchSource) -> int:
        """``steps``, or ``epochs`` x batches per epoch when epochs are given."""
        if self.cfg.epochs is not None:
            return self.cfg.epochs * batch_count(train.num_images, self.cfg.batch_size)
        return self.cfg.steps

    def train_step(self, features: Any, labels: Any) -> LossTerms | None:
        """One optimiser step on one batch; returns the (detached) loss terms.

        No host sync happens here (the loss stays on the device), except with
        ``skip_images_without_positives``, which must know which rows to keep; a batch left
        empty by it makes no update and returns None, as the release's ``continue`` does.
        """
        features = as_float_features(features, self.device)
        labels = torch.as_tensor(labels, device=self.device)
        if labels.ndim != 2 or labels.shape[1] != self.label_vectors.shape[0]:
            raise ValueError(
                f"training labels have shape {tuple(labels.shape)}; expected (batch, "
                f"{self.label_vectors.shape[0]}) to match the label vectors"
            )
        if self.cfg.skip_images_without_positives:
            keep = (labels == 1).any(dim=1)
            if not bool(keep.any()):
                return None
            features, labels = features[keep], labels[keep]
        self.model.train()
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else nullcontext()
        )
        with autocast:
            output = self.model(features, self.label_vectors)
        l2 = self.model.l2_penalty(self.loss_cfg.l2)
        terms = lesa_loss(_float32(output), labels, self.loss_cfg, l2=l2)
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        self.optimizer.step()
        return LossTerms(**{key: getattr(terms, key).detach() for key in LOSS_KEYS})

    def validate(self, val: BatchSource) -> dict[str, float]:
        """mAP and F1@K (every K of ``val_ks``) on the validation source's kept (seen) labels,
        and the pseudo-unseen labels' mAP when some are held out (``validation_metrics``)."""
        batch_size = max(self.cfg.batch_size, 256)
        scores, labels = score_with_labels(
            self.model, val, self.label_vectors, batch_size, progress=False
        )
        if labels.shape[1] != scores.shape[1]:
            raise ValueError(
                f"validation labels have {labels.shape[1]} columns, the label vectors "
                f"{scores.shape[1]}"
            )
        return validation_metrics(scores, labels, self.holdout, self.val_ks)

    def _record(self, record: dict[str, float]) -> None:
        if self.history and self.history[-1]["step"] == record["step"]:
            self.history[-1] |= record
        else:
            self.history.append(record)
        if self.progress is not None:
            self.progress(self.history[-1])

    def _log(self) -> dict[str, float]:
        means = {key: float(value) / self._window_steps for key, value in self._window.items()}
        bad = [key for key, value in means.items() if not math.isfinite(value)]
        if bad:
            raise FloatingPointError(
                f"training diverged at step {self.step}: the loss terms {', '.join(bad)} are "
                f"NaN or inf (non-finite features or weights, or a too-large learning rate)"
            )
        self._window = dict.fromkeys(LOSS_KEYS, 0.0)
        self._window_steps = 0
        record = {"step": float(self.step), "lr": self.optimizer.param_groups[0]["lr"]}
        record |= {("loss" if key == "total" else key): value for key, value in means.items()}
        self._record(record)
        return record

    def _validate_and_select(self, val: BatchSource) -> None:
        """Validate, feed the schedule, and keep ``best.pt`` on ``>=`` of the selection value."""
        metrics = self.validate(val)
        metric = selection_value(metrics, self.cfg)
        if self.cfg.select == "mix":
            metrics["val_mix"] = metric
        if self.schedule is not None:
            self.schedule.step(metric)
            metrics |= {"val_ema": self.schedule.ema, "next_lr": self.schedule.lr}
        self._record({"step": float(self.step), **metrics})
        if self.best_metric is None or metric >= self.best_metric:
            self.best_metric, self.best_step = metric, self.step
            save_checkpoint(self.checkpoint_dir / "best.pt", self.state())

    def _is_validation_step(self, total: int) -> bool:
        """Every ``val_every`` steps and at the end; from step 1 on with ``validate_first_step``."""
        since = self.step - 1 if self.cfg.validate_first_step else self.step
        return since % self.cfg.val_every == 0 or self.step == total

    def _after_step(self, terms: LossTerms | None, val: BatchSource | None, total: int) -> None:
        if terms is not None:
            for key in LOSS_KEYS:  # summed as tensors: no device sync per step
                self._window[key] = self._window[key] + getattr(terms, key)
            self._window_steps += 1
        if (self.step % self.cfg.log_every == 0 or self.step == total) and self._window_steps:
            self._log()
        if val is not None and self._is_validation_step(total):
            self._validate_and_select(val)
        if self.step % self.cfg.checkpoint_every == 0:
            self._save_step_checkpoint()

    def _start(self, resume: bool) -> None:
        """Resume from the latest checkpoint, or seed the run's RNG for a fresh start."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        latest = self.latest_checkpoint() if resume else None
        if latest is not None:
            self.restore(latest)
        else:
            torch.manual_seed(self.cfg.seed)

    def _run_epoch(
        self, train: BatchSource, val: BatchSource | None, total: int, bar: tqdm
    ) -> None:
        """Train on the rest of the current epoch (from ``batch_in_epoch``), or up to ``total``.

        The epoch's batches come through a :class:`DeviceFeed` (staged in a background thread,
        copied asynchronously); the only host syncs are the logging and validation steps'.
        """
        batches = train.batches(
            self.cfg.batch_size, shuffle=self.cfg.shuffle, seed=self.cfg.seed, epoch=self.epoch
        )
        feed = DeviceFeed(
            batches, self.device, skip=self.batch_in_epoch, depth=self.cfg.reader.prefetch
        )
        with feed:
            for index, features, labels in feed:
                if not self._checked:
                    self.model.check_inputs(as_float_features(features, self.device))
                    self._checked = True
                terms = self.train_step(features, labels)
                self.step += 1
                self.batch_in_epoch = index + 1
                self._after_step(terms, val, total)
                bar.update(1)
                if self.history and self.history[-1]["step"] == self.step:
                    bar.set_postfix(loss=f"{self.history[-1].get('loss', float('nan')):.4g}")
                if self.step >= total:
                    return
        self.epoch += 1
        self.batch_in_epoch = 0

    def fit(
        self, train: BatchSource, val: BatchSource | None = None, *, resume: bool = True
    ) -> TrainResult:
        """Train to the configured number of steps, resuming from ``checkpoint_dir`` if asked.

        Validation (when ``val`` is given) runs as :class:`TrainerConfig` describes; the best
        selection metric is saved as ``best.pt``. The run always ends with ``final.pt``. The
        first batch's features are checked once (:meth:`LESA.check_inputs`); the sources
        validated their labels when they were built.
        """
        if train.num_images < 1:
            raise ValueError("the training source holds no images")
        place = getattr(train, "place_on", None)
        if place is not None:
            place(self.device)
        self._checked = False
        if self.holdout.size:
            train = HoldoutBatches(train, self.holdout)
        self._start(resume)
        total = self.total_steps(train)
        bar = tqdm(
            total=total, initial=min(self.step, total), desc="training", unit="step", disable=None
        )
        try:
            while self.step < total:
                self._run_epoch(train, val, total, bar)
        finally:
            bar.close()
        final = save_checkpoint(self.checkpoint_dir / "final.pt", self.state())
        best = self.checkpoint_dir / "best.pt"
        return TrainResult(
            final_step=self.step,
            best_step=self.best_step,
            best_metric=self.best_metric,
            history=list(self.history),
            final_checkpoint=final,
            best_checkpoint=best if self.best_step is not None and best.is_file() else None,
        )
