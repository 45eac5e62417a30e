"""The LESA model: shared multi-attention over image regions with a bilinear label compatibility.

Eq. 1-4 and 10 of Huynh & Elhamifar (CVPR 2020): M attention modules each pool the R region
features into one attention feature z_m; a label c with word vector v_c scores
``s_c = max_m <W3 v_c, z_m>``. Because labels enter only through their word vectors, any label
(seen in training or not) is scored by the same forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lesa_model.config import L2Config, ModelConfig
from lesa_model.validation import check_label_vectors, check_tensor


@dataclass(frozen=True)
class LesaOutput:
    """Everything one forward pass produces; the losses and the attention maps read from it."""

    scores: torch.Tensor
    """(B, C) label scores s (Eq. 10)."""
    logits: torch.Tensor
    """(B, M, R) unnormalised attention e (Eq. 3)."""
    attention: torch.Tensor
    """(B, M, R) attention weights alpha, softmax of e over regions."""
    attended: torch.Tensor
    """(B, M, D) attention features z (Eq. 2)."""
    module_scores: torch.Tensor
    """(B, M, C) <theta_c, z_m> for every module and label."""
    selected: torch.Tensor
    """(B, C) int64 index of the module that gives each label its score."""
    mean_scores: torch.Tensor
    """(B, C) mean over regions of <theta_c, f_r> (the equal-weight score of the rel loss)."""


def variance_scaling_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """TensorFlow's ``variance_scaling_initializer()`` defaults, in place.

    Factor 2, fan-in mode, normal: a normal truncated at two standard deviations with
    ``std = sqrt(1.3 * 2 / fan_in)`` (1.3 undoes the truncation's loss of variance). ``fan_in``
    is the TF variable's second-to-last dimension, bias row included where the release augments
    its inputs with a constant 1.
    """
    std = math.sqrt(1.3 * 2.0 / fan_in)
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


def _variance_scaled_linear(in_features: int, out_features: int, *, bias: bool) -> nn.Linear:
    """A linear layer initialised like the release's ``[in (+1), out]`` variables.

    The release appends a constant 1 to the input and learns one ``(in + 1) x out`` matrix, so
    its bias row is drawn with the weights, from the same fan-in of ``in + 1``.
    """
    layer = nn.Linear(in_features, out_features, bias=bias)
    fan_in = in_features + 1 if bias else in_features
    with torch.no_grad():
        variance_scaling_(layer.weight, fan_in)
        if layer.bias is not None:
            variance_scaling_(layer.bias, fan_in)
    return layer


class FeatureAdapter(nn.Module):
    """The release's learned 2x2 convolution over the region grid: TF-slim ``conv2d`` defaults.

    ``slim.conv2d(features, 512, [2, 2], normalizer_fn=batch_normalization, padding="SAME")``:
    a Glorot-uniform kernel and no bias (slim drops it when a normaliser follows), TF batch norm
    (moving averages with momentum 0.99, i.e. PyTorch's 0.01; epsilon 1e-3), then ReLU. TF's
    "same" padding for an even kernel pads one row/column after the data only, which
    ``ZeroPad2d((0, 1, 0, 1))`` reproduces exactly. Regions are the grid in row-major order
    (``r = y * width + x``), the order of the release's ``reshape(-1, 14, 14, 512)``.
    """

    def __init__(self, dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.conv = nn.Conv2d(dim, dim, kernel_size=2, bias=False)
        self.norm = nn.BatchNorm2d(dim, eps=1e-3, momentum=0.01)
        nn.init.xavier_uniform_(self.conv.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, regions, dim = features.shape
        height, width = self.grid
        maps = features.transpose(1, 2).reshape(batch, dim, height, width)
        maps = torch.relu(self.norm(self.conv(self.pad(maps))))
        return maps.reshape(batch, dim, regions).transpose(1, 2)


class LESA(nn.Module):
    """Shared multi-attention zero-shot tagger.

    ``forward`` checks nothing (it is the training hot path); callers validate their inputs
    once where they enter, with :meth:`check_inputs`.

    Args:
        feature_dim: D, the size of each region feature given to :meth:`forward`.
        label_dim: d, the size of the label word vectors.
        cfg: architecture options (:class:`ModelConfig`).
        grid: (height, width) of the region grid, with height x width = R; needed only by the
            feature adapter, which convolves over the grid.
    """

    def __init__(
        self,
        feature_dim: int,
        label_dim: int,
        cfg: ModelConfig | None = None,
        *,
        grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        cfg = cfg or ModelConfig()
        if feature_dim < 1 or label_dim < 1:
            raise ValueError(
                f"feature_dim and label_dim must be positive, got {feature_dim}, {label_dim}"
            )
        if cfg.feature_adapter and grid is None:
            raise ValueError("feature_adapter needs the region grid: pass LESA(..., grid=(h, w))")
        self.feature_dim = feature_dim
        self.label_dim = label_dim
        self.cfg = cfg
        self.grid = tuple(grid) if grid is not None else None
        dim = cfg.input_projection or feature_dim
        hidden = cfg.hidden_dim or dim
        modules = 1 if cfg.pooling == "mean" else cfg.num_modules
        self.num_modules = modules
        self.hidden = hidden
        self.projection = (
            _variance_scaled_linear(feature_dim, dim, bias=False) if cfg.input_projection else None
        )
        self.adapter = FeatureAdapter(dim, self.grid) if cfg.feature_adapter else None
        self.first_layer: nn.Module | None = None
        if cfg.pooling == "attention" and cfg.first_layer == "per-module":
            # Eq. 3, W1 of all modules side by side, (D, M*H): W1_m = w1[:, m*H:(m+1)*H].
            self.w1 = nn.Parameter(variance_scaling_(torch.empty(dim, modules * hidden), dim))
            self.w2 = nn.Parameter(variance_scaling_(torch.empty(modules, hidden), hidden))
        elif cfg.pooling == "attention":
            # The release: e = tanh([F, 1] W1) [., 1] w2, with W1 (D+1, H) and w2 (H+1, M).
            self.first_layer = _variance_scaled_linear(dim, hidden, bias=True)
            self.second_layer = _variance_scaled_linear(hidden, modules, bias=True)
        # theta_c = W3 v_c: the release's W is a [D, d] variable, so its fan-in is D.
        self.label_projection = nn.Linear(label_dim, dim, bias=False)
        with torch.no_grad():
            variance_scaling_(self.label_projection.weight, dim)

    def check_inputs(
        self, features: torch.Tensor, label_vectors: torch.Tensor | None = None
    ) -> None:
        """Refuse inputs :meth:`forward` would turn into an error deep inside, or into NaN.

        Checks the features' shape, dtype and finiteness (one device sync) and, when given, the
        label vectors (:func:`check_label_vectors`).
        """
        check_tensor(features, "features", ndim=3)
        weight_dtype = self.label_projection.weight.dtype
        if features.dtype != weight_dtype:
            raise ValueError(
                f"features have dtype {features.dtype}, the model's weights {weight_dtype}: "
                f"convert the features (features.to({weight_dtype}))"
            )
        if features.shape[2] != self.feature_dim:
            raise ValueError(
                f"features have dimension {features.shape[2]}, the model expects {self.feature_dim}"
            )
        if features.shape[1] == 0:
            raise ValueError("features have no regions (R = 0)")
        if self.grid is not None and self.adapter is not None:
            expected = self.grid[0] * self.grid[1]
            if features.shape[1] != expected:
                raise ValueError(
                    f"features have {features.shape[1]} regions but the grid {self.grid} "
                    f"has {expected}"
                )
        if label_vectors is not None:
            check_label_vectors(label_vectors, self.label_dim)

    def region_features(self, features: torch.Tensor) -> torch.Tensor:
        """The region features F the attention sees: after the optional projection and adapter."""
        if self.projection is not None:
            features = self.projection(features)
        if self.adapter is not None:
            features = self.adapter(features)
        return features

    def attention_logits(self, regions: torch.Tensor) -> torch.Tensor:
        """e (B, M, R) of Eq. 3: ``tanh(F W1_m) w2_m`` per module."""
        batch, count, dim = regions.shape
        if self.first_layer is None:
            # Batched over modules, (M, B*R, H): no (B, R, M, H) product kept for the backward.
            per_module = self.w1.view(dim, self.num_modules, self.hidden).transpose(0, 1)
            hidden = torch.tanh(regions.reshape(1, batch * count, dim) @ per_module)
            logits = (hidden @ self.w2.unsqueeze(-1)).view(self.num_modules, batch, count)
            return logits.transpose(0, 1)
        return self.second_layer(torch.tanh(self.first_layer(regions))).transpose(1, 2)

    def forward(self, features: torch.Tensor, label_vectors: torch.Tensor) -> LesaOutput:
        """Score each label of ``label_vectors`` (C, d) in each image of ``features`` (B, R, D).

        Under autocast the attention runs in low precision, but the label scores (module and
        mean-region scores, the max over modules) are computed in float32: they are what the
        rank hinge compares and what evaluation ranks, where bfloat16's 8 bits would create ties
        (the weights' dtype: float32 unless the model was converted).
        """
        regions = self.region_features(features)
        batch, count, _ = regions.shape
        if self.cfg.pooling == "mean":
            logits = regions.new_zeros(batch, 1, count)
        else:
            logits = self.attention_logits(regions)
        attention = torch.softmax(logits, dim=-1)
        attended = attention @ regions
        dtype = self.label_projection.weight.dtype
        with torch.autocast(regions.device.type, enabled=False):
            theta = self.label_projection(label_vectors.to(dtype))
            module_scores = attended.to(dtype) @ theta.T
            mean_scores = regions.to(dtype).mean(dim=1) @ theta.T
        scores, selected = module_scores.max(dim=1)
        return LesaOutput(
            scores=scores,
            logits=logits,
            attention=attention,
            attended=attended,
            module_scores=module_scores,
            selected=selected,
            mean_scores=mean_scores,
        )

    def l2_penalty(self, cfg: L2Config) -> torch.Tensor:
        """``sum_k weight_k * sum(W_k ** 2) / 2`` over the regularised matrices (TF ``l2_loss``)."""
        penalty = self.label_projection.weight.new_zeros(())
        for weight, module in (
            (cfg.adapter, self.adapter.conv if self.adapter is not None else None),
            (cfg.label_projection, self.label_projection),
            (cfg.input_projection, self.projection),
        ):
            if weight and module is not None:
                penalty = penalty + weight * module.weight.square().sum() / 2
        return penalty
