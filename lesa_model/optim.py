"""TensorFlow 1's RMSprop, which both the paper ("default RMSprop") and the release train with.

``tf.train.RMSPropOptimizer`` differs from ``torch.optim.RMSprop`` in three ways that change the
trajectory, most of all in the first steps:

- the mean square ``ms`` starts at 1, not 0 (so early updates are ``lr * g / sqrt(1 + eps)``,
  not ``lr * sign(g) / sqrt(1 - decay)``);
- epsilon is added inside the square root: ``g / sqrt(ms + eps)``;
- the momentum buffer accumulates ``lr * g / sqrt(ms + eps)``, learning rate included, so a rate
  decayed by the schedule only scales new contributions, not the momentum already built up.

Update (TF's ``ApplyRMSProp`` kernel, non-centred)::

    ms  <- decay * ms + (1 - decay) * g^2
    mom <- momentum * mom + lr * g / sqrt(ms + epsilon)
    w   <- w - mom
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

RMSPROP_PRESETS: dict[str, dict[str, float]] = {
    # tf.train.RMSPropOptimizer(learning_rate) defaults: the paper's "default setting".
    "paper": {"decay": 0.9, "momentum": 0.0, "epsilon": 1e-10},
    # The release's RMSPropOptimizer(lr, 0.9, 0.9, 1.0) (NUS-WIDE and Open Images scripts).
    "release": {"decay": 0.9, "momentum": 0.9, "epsilon": 1.0},
}


class TFRMSprop(torch.optim.Optimizer):
    """RMSprop with TensorFlow 1's semantics (see the module docstring)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        decay: float = 0.9,
        momentum: float = 0.0,
        epsilon: float = 1e-10,
    ) -> None:
        if lr <= 0 or not 0 <= decay < 1 or momentum < 0 or epsilon < 0:
            raise ValueError(
                f"invalid RMSprop settings: lr {lr}, decay {decay}, momentum {momentum}, "
                f"epsilon {epsilon}"
            )
        defaults = {"lr": lr, "decay": decay, "momentum": momentum, "epsilon": epsilon}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("TFRMSprop does not take a closure")
        for group in self.param_groups:
            decay, momentum = group["decay"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if not state:
                    state["ms"] = torch.ones_like(param, memory_format=torch.preserve_format)
                    state["mom"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                ms, mom = state["ms"], state["mom"]
                ms.mul_(decay).addcmul_(grad, grad, value=1 - decay)
                update = grad / (ms + group["epsilon"]).sqrt()
                mom.mul_(momentum).add_(update, alpha=group["lr"])
                param.sub_(mom)


def tf_rmsprop(params: Iterable[torch.Tensor], lr: float, preset: str) -> TFRMSprop:
    """TF RMSprop with one of :data:`RMSPROP_PRESETS`."""
    if preset not in RMSPROP_PRESETS:
        raise ValueError(f"unknown RMSprop preset {preset!r}: use one of {sorted(RMSPROP_PRESETS)}")
    return TFRMSprop(params, lr, **RMSPROP_PRESETS[preset])
