"""The release's adaptive learning rate (``core/utils.py``, ``LearningRate.adapt``).

Called once per validation with the selection metric (NUS-WIDE: F1@5 on the seen labels;
Open Images: mAP)::

    ema_old = ema_new
    ema_new = ema_new * (1 - signal) + metric * signal        # ema starts at 0
    if ema_new < ema_old and lr >= limit and wait <= 0:
        lr = lr * decay_rate; wait = patience
    wait -= 1

so after a decay the next ``patience - 1`` validations cannot decay again, and no decay happens
once the rate is below ``limit = limit_ratio * initial lr``. The released NUS-WIDE run used
signal 0.3, decay 0.8, patience 5, limit ratio 1e-3; Open Images patience 2.
"""

from __future__ import annotations

from typing import Any

import torch


class ReleasePlateau:
    """Decay the optimiser's learning rate when the metric's moving average drops."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        signal: float = 0.3,
        decay_rate: float = 0.8,
        patience: int = 5,
        limit_ratio: float = 1e-3,
    ) -> None:
        self.optimizer = optimizer
        self.signal = signal
        self.decay_rate = decay_rate
        self.patience = patience
        self.limit = optimizer.param_groups[0]["lr"] * limit_ratio
        self.ema = 0.0
        self.wait = 0

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self, metric: float) -> float:
        """Feed one validation value; returns the learning rate for the steps that follow."""
        previous = self.ema
        self.ema = self.ema * (1 - self.signal) + metric * self.signal
        if self.ema < previous and self.lr >= self.limit and self.wait <= 0:
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * self.decay_rate
            self.wait = self.patience
        self.wait -= 1
        return self.lr

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "wait": self.wait, "limit": self.limit}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema = float(state["ema"])
        self.wait = int(state["wait"])
        self.limit = float(state["limit"])
