"""Where the model looked: attention weights as heatmaps over the image, and the pointing game.

LESA's attention for a label is the region weights ``alpha_m`` of the module that Eq. 10 selects
for it. Those weights live on the backbone's region grid (h, w), which covers only the part of
the picture the backbone saw (after resize + centre crop), so every function here takes an
optional ``region_box``: the pixel rectangle ``(x0, y0, x1, y1)`` of the original image that the
grid covers (default: the whole image; :func:`centre_crop_box` computes it for centre-cropped
inputs). Outside that rectangle the model saw nothing, so heatmaps are zero there.

Pure NumPy/PyTorch (+ matplotlib's object API for figures, no pyplot global state).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

Grid = tuple[int, int]
"""Region grid ``(h, w)``: region ``r`` is row ``r // w``, column ``r % w``."""
ImageSize = tuple[int, int]
"""Image size ``(W, H)`` in pixels, as Pillow reports it."""
Box = tuple[float, float, float, float]
"""Pixel rectangle ``(x0, y0, x1, y1)`` with ``x0 < x1`` and ``y0 < y1``."""


class AttentionError(ValueError):
    """Attention weights, grid, boxes or sizes that do not fit together."""


def centre_crop_box(image_size: ImageSize, crop_fraction: float) -> Box:
    """The pixel rectangle a "resize short side, then centre-crop a square" transform keeps.

    With the short side resized to ``S'`` and a centre crop of ``S``, ``crop_fraction = S / S'``
    (224 / 256 in the paper): the kept square has side ``crop_fraction * min(W, H)`` in original
    pixels, centred on the image.
    """
    width, height = _check_size(image_size)
    if not 0.0 < crop_fraction <= 1.0:
        raise AttentionError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    side = crop_fraction * min(width, height)
    x0 = (width - side) / 2.0
    y0 = (height - side) / 2.0
    return (x0, y0, x0 + side, y0 + side)


def upsample_attention(
    weights: np.ndarray | torch.Tensor,
    grid: Grid,
    image_size: ImageSize,
    *,
    region_box: Box | None = None,
) -> np.ndarray:
    """Region weights ``(R,)`` -> a float32 heatmap ``(H, W)`` over the image, peak scaled to 1.

    Bilinear with ``align_corners=False``, so each weight sits at its region's centre and the
    map's maximum is at the centre of the heaviest region. Scaling by the peak (not min-max)
    keeps proportions: a pixel at 0.5 got half the peak attention, and a uniform attention shows
    as uniformly 1 rather than as nothing.
    """
    values = _check_weights(weights, grid)
    width, height = _check_size(image_size)
    x0, y0, x1, y1 = _pixel_box(region_box, (width, height))
    h, w = grid
    heat = np.zeros((height, width), dtype=np.float32)
    if x1 > x0 and y1 > y0:
        cells = torch.from_numpy(values.reshape(1, 1, h, w))
        patch = F.interpolate(cells, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
        heat[y0:y1, x0:x1] = patch[0, 0].numpy()
    peak = float(heat.max())
    return heat / peak if peak > 0 else heat


def heatmap_overlay(
    image: Image.Image,
    weights: np.ndarray | torch.Tensor,
    grid: Grid,
    *,
    region_box: Box | None = None,
    alpha: float = 0.5,
    colormap: str = "jet",
) -> Image.Image:
    """The image with its attention heatmap blended on top (RGB, same size as ``image``)."""
    if not 0.0 <= alpha <= 1.0:
        raise AttentionError(f"alpha must be in [0, 1], got {alpha}")
    heat = upsample_attention(weights, grid, image.size, region_box=region_box)
    coloured = colormaps[colormap](heat)[..., :3]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    blended = (1.0 - alpha) * base + alpha * coloured
    return Image.fromarray(np.clip(blended * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def peak_points(
    weights: np.ndarray | torch.Tensor,
    grid: Grid,
    region_boxes: np.ndarray,
) -> np.ndarray:
    """Pixel centre ``(x, y)`` of the heaviest region of each weight row: ``(N, R) -> (N, 2)``.

    Ties go to the first region in row-major order. ``region_boxes`` is ``(N, 4)``: the pixel
    rectangle the grid covers in each image.
    """
    h, w = grid
    values = _check_weights(weights, grid, batched=True)
    peak = values.argmax(axis=1)
    rows, cols = np.divmod(peak, w)
    x0, y0, x1, y1 = (region_boxes[:, i] for i in range(4))
    x = x0 + (cols + 0.5) * (x1 - x0) / w
    y = y0 + (rows + 0.5) * (y1 - y0) / h
    return np.stack([x, y], axis=1)


@dataclass(frozen=True)
class PointingGameResult:
    """Outcome of the pointing game over (image, present label) pairs.

    ``chance`` is the share of the seen area covered by the boxes, averaged over pairs (a random
    pixel's hit rate). ``chance_regions`` is the hit rate of pointing at a uniformly random
    region instead, the exact baseline on a coarse grid where a small box may hold no region
    centre at all.
    """

    hit_rate: float
    chance: float
    chance_regions: float
    pairs: int
    hits: np.ndarray


def pointing_game(
    weights: np.ndarray | torch.Tensor,
    grid: Grid,
    boxes: np.ndarray,
    image_size: ImageSize | np.ndarray,
    *,
    region_boxes: np.ndarray | None = None,
) -> PointingGameResult:
    """Share of pairs whose attention peak (the heaviest region's centre) falls inside the box.

    ``weights`` ``(N, R)`` is the selected module's attention for pair ``n``; ``boxes`` ``(N, 4)``
    the label's box in original pixels (edges count as inside); ``image_size`` one ``(W, H)`` for
    all pairs or ``(N, 2)``; ``region_boxes`` ``(N, 4)`` what the grid covers (default: whole
    image).
    """
    h, w = grid
    values = _check_weights(weights, grid, batched=True)
    count = values.shape[0]
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.shape != (count, 4):
        raise AttentionError(f"boxes must have shape ({count}, 4), got {boxes.shape}")
    if (
        not np.isfinite(boxes).all()
        or (boxes[:, 2] <= boxes[:, 0]).any()
        or (boxes[:, 3] <= boxes[:, 1]).any()
    ):
        raise AttentionError("boxes must be finite with x0 < x1 and y0 < y1")
    sizes = np.broadcast_to(np.asarray(image_size, dtype=np.float64), (count, 2))
    if (sizes <= 0).any():
        raise AttentionError("image sizes must be positive")
    if region_boxes is None:
        covered = np.column_stack([np.zeros(count), np.zeros(count), sizes[:, 0], sizes[:, 1]])
    else:
        covered = np.asarray(region_boxes, dtype=np.float64)
        if covered.shape != (count, 4):
            raise AttentionError(f"region_boxes must have shape ({count}, 4), got {covered.shape}")
    if count == 0:
        empty = np.zeros(0, dtype=bool)
        return PointingGameResult(float("nan"), float("nan"), float("nan"), 0, empty)
    hits = _inside(peak_points(values, grid, covered), boxes)
    overlap_w = np.clip(
        np.minimum(boxes[:, 2], covered[:, 2]) - np.maximum(boxes[:, 0], covered[:, 0]), 0, None
    )
    overlap_h = np.clip(
        np.minimum(boxes[:, 3], covered[:, 3]) - np.maximum(boxes[:, 1], covered[:, 1]), 0, None
    )
    covered_area = (covered[:, 2] - covered[:, 0]) * (covered[:, 3] - covered[:, 1])
    chance = overlap_w * overlap_h / covered_area
    rows, cols = np.divmod(np.arange(h * w), w)
    centre_x = covered[:, :1] + (cols + 0.5) * (covered[:, 2:3] - covered[:, :1]) / w
    centre_y = covered[:, 1:2] + (rows + 0.5) * (covered[:, 3:4] - covered[:, 1:2]) / h
    inside = (
        (centre_x >= boxes[:, :1])
        & (centre_x <= boxes[:, 2:3])
        & (centre_y >= boxes[:, 1:2])
        & (centre_y <= boxes[:, 3:4])
    )
    return PointingGameResult(
        hit_rate=float(hits.mean()),
        chance=float(chance.mean()),
        chance_regions=float(inside.mean()),
        pairs=count,
        hits=hits,
    )


def attention_grid_figure(
    image: Image.Image,
    labels: Sequence[str],
    weights: np.ndarray | torch.Tensor,
    grid: Grid,
    *,
    scores: Sequence[float] | None = None,
    region_box: Box | None = None,
    columns: int = 4,
) -> Figure:
    """A figure like the paper's Figure 1: the image, then one heatmap overlay per label.

    ``weights`` is ``(L, R)``: row ``l`` is the attention label ``labels[l]`` used (its selected
    module). Titles carry the score when ``scores`` is given.
    """
    rows_weights = _check_weights(weights, grid, batched=True)
    if len(labels) != rows_weights.shape[0]:
        raise AttentionError(
            f"{len(labels)} labels but {rows_weights.shape[0]} rows of attention weights"
        )
    if scores is not None and len(scores) != len(labels):
        raise AttentionError(f"{len(scores)} scores for {len(labels)} labels")
    if columns < 1:
        raise AttentionError(f"columns must be at least 1, got {columns}")
    panels = len(labels) + 1
    ncols = min(columns, panels)
    nrows = -(-panels // ncols)
    figure = Figure(figsize=(3.0 * ncols, 3.2 * nrows), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    axes[0].imshow(image)
    axes[0].set_title("image")
    for index, label in enumerate(labels):
        overlay = heatmap_overlay(image, rows_weights[index], grid, region_box=region_box)
        axes[index + 1].imshow(overlay)
        title = label if scores is None else f"{label} ({scores[index]:.3g})"
        axes[index + 1].set_title(title)
    for axis in axes:
        axis.set_axis_off()
    return figure


def _inside(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x, y = points[:, 0], points[:, 1]
    return (x >= boxes[:, 0]) & (x <= boxes[:, 2]) & (y >= boxes[:, 1]) & (y <= boxes[:, 3])


def _check_size(image_size: ImageSize) -> tuple[int, int]:
    width, height = (int(v) for v in image_size)
    if width < 1 or height < 1:
        raise AttentionError(f"image size must be positive (W, H), got {tuple(image_size)}")
    return width, height


def _check_weights(
    weights: np.ndarray | torch.Tensor, grid: Grid, *, batched: bool = False
) -> np.ndarray:
    """Weights as float32 NumPy, checked against the grid: finite and non-negative."""
    h, w = grid
    if h < 1 or w < 1:
        raise AttentionError(f"grid must be positive (h, w), got {grid}")
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().numpy()
    values = np.asarray(weights, dtype=np.float32)
    expected = 2 if batched else 1
    if values.ndim != expected or values.shape[-1] != h * w:
        shape = "(N, R)" if batched else "(R,)"
        raise AttentionError(
            f"attention weights must have shape {shape} with R = {h}*{w} = {h * w}, "
            f"got {values.shape}"
        )
    if not np.isfinite(values).all() or (values < 0).any():
        raise AttentionError("attention weights must be finite and non-negative")
    return values


def _pixel_box(region_box: Box | None, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``region_box`` rounded to whole pixels and clipped to the image."""
    width, height = image_size
    if region_box is None:
        return 0, 0, width, height
    x0, y0, x1, y1 = region_box
    if not (x0 < x1 and y0 < y1):
        raise AttentionError(f"region_box must have x0 < x1 and y0 < y1, got {region_box}")
    left, top = max(0, round(x0)), max(0, round(y0))
    right, bottom = min(width, round(x1)), min(height, round(y1))
    return left, top, right, bottom
