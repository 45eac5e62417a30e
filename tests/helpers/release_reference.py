"""The authors' TensorFlow 1 release, transcribed op by op into NumPy, for tests only.

Each function names the release function it transcribes (repo ``hbdat/cvpr20_LESA``,
``core/model_share_attention.py`` and ``core/utils.py``) and keeps its operations and their
order: masks, ``tf.clip_by_value``, ``tf.sign``, ``tf.nn.l2_normalize``'s epsilon, the
augmentation of inputs with a constant 1 (bias rows). Nothing here imports ``lesa_model``: the
tests compare the project against this, so it must stay an independent reading of the code.

Shapes follow the release: features (B, R, D), logits e (B, T, R) with T the number of modules,
att_logits (B, T, C), labels (B, C) in {1, -1, 0} as float.
"""

from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def augment_1(x: np.ndarray) -> np.ndarray:
    """``_augment_1``: append a constant-1 feature on the last axis."""
    return np.concatenate([x, np.ones((*x.shape[:-1], 1), dtype=x.dtype)], axis=-1)


def augment_0(x: np.ndarray) -> np.ndarray:
    """``_augment_0``: append a constant-0 feature on the last axis."""
    return np.concatenate([x, np.zeros((*x.shape[:-1], 1), dtype=x.dtype)], axis=-1)


def conv_same_2x2_bn_relu(
    features: np.ndarray,
    grid: tuple[int, int],
    kernel: np.ndarray,
    bn: dict[str, np.ndarray],
    eps: float = 1e-3,
) -> np.ndarray:
    """``_conv`` at inference: slim.conv2d(.., [2, 2], padding='SAME') + batch norm + ReLU.

    ``kernel`` is TF's (2, 2, D_in, D_out); SAME pads one row and column after the data; slim
    adds no bias when a normaliser follows; ``bn`` holds gamma, beta, moving mean and variance.
    """
    batch, _, dim = features.shape
    height, width = grid
    maps = features.reshape(batch, height, width, dim)
    padded = np.zeros((batch, height + 1, width + 1, dim), dtype=features.dtype)
    padded[:, :height, :width] = maps
    out = np.zeros((batch, height, width, kernel.shape[3]), dtype=np.float64)
    for dy in range(2):
        for dx in range(2):
            out += padded[:, dy : dy + height, dx : dx + width] @ kernel[dy, dx]
    out = (out - bn["moving_mean"]) / np.sqrt(bn["moving_variance"] + eps) * bn["gamma"] + bn[
        "beta"
    ]
    return np.maximum(out, 0).reshape(batch, height * width, -1)


def attention_layer_mlp(
    features: np.ndarray, w_att_1: np.ndarray, w_att_2: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_attention_layer_MLP`` on already-augmented features (B, R, D+1).

    Returns f_att (B, T, D+1), the attention (B, T, R) and its logits out_att_log (B, T, R).
    """
    att_h = np.tanh(np.tensordot(features, w_att_1, axes=[[2], [0]]))
    out_att_log = np.tensordot(augment_1(att_h), w_att_2, axes=[[2], [0]]).transpose(0, 2, 1)
    out_att = softmax(out_att_log, axis=2)
    f_att = (features[:, None, :, :] * out_att[:, :, :, None]).sum(axis=2)
    return f_att, out_att, out_att_log


def predict_frac(
    f_att: np.ndarray, vecs: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_predict_frac``: classifiers = (W vecs^T)^T augmented with 0; max over modules."""
    classifiers = augment_0((w @ vecs.T).T)
    att_logits = np.tensordot(f_att, classifiers.T, axes=[[2], [0]])
    return att_logits.max(axis=1), att_logits, classifiers


def forward(
    features: np.ndarray,
    vecs: np.ndarray,
    weights: dict[str, np.ndarray],
    *,
    grid: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """``build_model_rank`` (shared W1, optional conv): every tensor the losses read."""
    if "conv_kernel" in weights:
        features = conv_same_2x2_bn_relu(features, grid, weights["conv_kernel"], weights["bn"])
    features_a = augment_1(features)
    f_att, alphas, out_att_log = attention_layer_mlp(
        features_a, weights["w_att_1"], weights["w_att_2"]
    )
    logits, att_logits, classifiers = predict_frac(f_att, vecs, weights["W"])
    f_global = features_a.mean(axis=1)
    return {
        "logits": logits,
        "att_logits": att_logits,
        "out_att_log": out_att_log,
        "alphas": alphas,
        "logits_global": f_global @ classifiers.T,
    }


def ranking_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """``_ranking_loss``."""
    eps = 1e-8
    subset_idx = np.flatnonzero(np.abs(labels).sum(axis=0) > 0)
    sub_labels = labels[:, subset_idx]
    sub_logits = logits[:, subset_idx]
    positive_tags = np.clip(sub_labels, 0.0, 1.0)
    negative_tags = np.clip(-sub_labels, 0.0, 1.0)
    mask = positive_tags[:, np.newaxis, :] * negative_tags[:, :, np.newaxis]
    pos_score_mat = sub_logits * positive_tags
    neg_score_mat = sub_logits * negative_tags
    o = 1 + neg_score_mat[:, :, np.newaxis] - pos_score_mat[:, np.newaxis, :]
    diff = np.maximum(mask * o, 0)
    violation = np.sign(diff).sum(axis=1).sum(axis=1)
    diff = diff.sum(axis=1).sum(axis=1)
    return float(np.mean(diff / (violation + eps)))


def attention_ortho_span_regularizer(out_att_log: np.ndarray) -> float:
    """``_attention_ortho_span_regularizer``: one Frobenius norm over (B, T, T)."""
    squares = np.maximum((out_att_log**2).sum(axis=2, keepdims=True), 1e-12)
    out_att_norm = out_att_log / np.sqrt(squares)  # tf.nn.l2_normalize(x, 2)
    regularizer = (out_att_norm[:, np.newaxis, :, :] * out_att_norm[:, :, np.newaxis, :]).sum(3)
    modules = regularizer.shape[1]
    regularizer[:, np.arange(modules), np.arange(modules)] = 0.0  # tf.linalg.set_diag(.., 0)
    return float(np.sqrt((regularizer**2).sum()))  # tf.norm: Frobenius over every entry


def attention_distribution_soft_cardinality(att_logits: np.ndarray, labels: np.ndarray) -> float:
    """``_attention_distribution_soft_cardinality``."""
    mask = np.clip(labels, 0, 1)[:, np.newaxis, :]
    p = softmax(att_logits, axis=1) * mask
    p = p.sum(axis=2)
    p = np.square(p)
    p = p.mean(axis=1)
    return float(p.mean())


def attention_global_regularizer(
    logits: np.ndarray, logits_global: np.ndarray, labels: np.ndarray, margin: float = 0.0
) -> float:
    """``_attention_global_regularizer`` (the rel term)."""
    loss = -((logits - logits_global) * labels)
    loss = np.maximum(loss + margin, 0)
    return float(loss.sum())


def l2_regularizer(kernel: np.ndarray, scale: float) -> float:
    """``tf.contrib.layers.l2_regularizer(scale)``: scale * sum(w^2) / 2 (``tf.nn.l2_loss``)."""
    return float(scale * (kernel**2).sum() / 2)


def rmsprop_steps(
    weights: np.ndarray,
    gradients: list[np.ndarray],
    lr: float | list[float],
    decay: float,
    momentum: float,
    epsilon: float,
) -> np.ndarray:
    """``tf.train.RMSPropOptimizer`` (``ApplyRMSProp``): ms starts at 1, epsilon inside sqrt."""
    rates = lr if isinstance(lr, list) else [lr] * len(gradients)
    ms = np.ones_like(weights)
    mom = np.zeros_like(weights)
    for grad, rate in zip(gradients, rates, strict=True):
        ms = decay * ms + (1 - decay) * grad * grad
        mom = momentum * mom + rate * grad / np.sqrt(ms + epsilon)
        weights = weights - mom
    return weights


class LearningRate:
    """``core/utils.py`` ``LearningRate`` (without the TF session): ``adapt`` per validation."""

    def __init__(self, lr: float, signal_strength: float = 0.3, patient: int = 2) -> None:
        self.learning_rate = lr
        self.exp_moving_avg_old = 0.0
        self.exp_moving_avg_new = 0.0
        self.signal_strength = signal_strength
        self.decay_rate = 0.8
        self.patient = patient
        self.limit_learning_rate = lr * 1e-3
        self.m = 0

    def adapt(self, metric: float) -> float:
        cur_lr = self.learning_rate
        new_lr = cur_lr
        self.exp_moving_avg_old = self.exp_moving_avg_new
        self.exp_moving_avg_new = (
            self.exp_moving_avg_new * (1 - self.signal_strength) + metric * self.signal_strength
        )
        if (
            self.exp_moving_avg_new < self.exp_moving_avg_old
            and cur_lr >= self.limit_learning_rate
            and self.m <= 0
        ):
            new_lr = self.learning_rate = cur_lr * self.decay_rate
            self.m = self.patient
        self.m -= 1
        return new_lr
