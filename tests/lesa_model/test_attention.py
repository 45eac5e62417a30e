"""Attention heatmaps and the pointing game, checked against skimage and hand-built maps."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage.transform import resize

from lesa_model.attention import (
    AttentionError,
    attention_grid_figure,
    centre_crop_box,
    heatmap_overlay,
    peak_points,
    pointing_game,
    upsample_attention,
)


def test_upsample_matches_skimage_bilinear() -> None:
    rng = np.random.default_rng(0)
    weights = rng.random(12).astype(np.float32)
    heat = upsample_attention(weights, (3, 4), (40, 30))
    reference = resize(
        weights.reshape(3, 4).astype(np.float64),
        (30, 40),
        order=1,
        mode="edge",
        anti_aliasing=False,
    )
    reference /= reference.max()
    assert heat.shape == (30, 40)
    assert heat.dtype == np.float32
    np.testing.assert_allclose(heat, reference, atol=1e-5)


def test_upsample_peak_is_one_and_sits_in_heaviest_cell() -> None:
    weights = np.full(49, 0.01, dtype=np.float32)
    weights[2 * 7 + 5] = 0.9
    heat = upsample_attention(weights, (7, 7), (70, 140))  # cells are 10 wide, 20 high
    row, col = np.unravel_index(heat.argmax(), heat.shape)
    assert heat.max() == pytest.approx(1.0)
    assert 2 * 20 <= row < 3 * 20
    assert 5 * 10 <= col < 6 * 10


def test_upsample_uniform_is_all_ones_and_zero_outside_region_box() -> None:
    heat = upsample_attention(np.ones(4), (2, 2), (10, 10), region_box=(2, 2, 8, 8))
    assert np.all(heat[2:8, 2:8] == pytest.approx(1.0))
    assert heat[:2].sum() == 0 and heat[8:].sum() == 0 and heat[:, :2].sum() == 0


def test_centre_crop_box_on_landscape_image() -> None:
    x0, y0, x1, y1 = centre_crop_box((300, 200), 224 / 256)
    assert (x1 - x0) == pytest.approx(175.0)
    assert (y1 - y0) == pytest.approx(175.0)
    assert (x0 + x1) / 2 == pytest.approx(150.0)
    assert (y0 + y1) / 2 == pytest.approx(100.0)


def test_heatmap_png_has_image_size_and_peaks_where_weights_peak() -> None:
    image = Image.new("RGB", (96, 64), (128, 128, 128))
    weights = np.zeros(16, dtype=np.float32)
    weights[1 * 4 + 3] = 1.0
    overlay = heatmap_overlay(image, weights, (4, 4), alpha=1.0)
    buffer = io.BytesIO()
    overlay.save(buffer, format="PNG")
    reloaded = Image.open(io.BytesIO(buffer.getvalue()))
    assert reloaded.size == image.size
    pixels = np.asarray(reloaded.convert("RGB"), dtype=np.int32)
    redness = pixels[..., 0] - pixels[..., 2]
    row, col = np.unravel_index(redness.argmax(), redness.shape)
    assert 16 <= row < 32
    assert 72 <= col < 96
    assert redness[0, 0] < 0


def test_heatmap_alpha_zero_returns_the_image() -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    overlay = heatmap_overlay(image, np.arange(4.0), (2, 2), alpha=0.0)
    np.testing.assert_array_equal(np.asarray(overlay), np.asarray(image))


def test_pointing_game_on_hand_built_maps() -> None:
    # 2x2 grid over a 100x100 image: region centres (25,25) (75,25) (25,75) (75,75).
    weights = np.array(
        [
            [0.7, 0.1, 0.1, 0.1],  # peak top-left   -> inside box 0 (hit)
            [0.1, 0.7, 0.1, 0.1],  # peak top-right  -> box 1 is bottom-left (miss)
            [0.1, 0.1, 0.1, 0.7],  # peak bottom-right -> inside box 2 (hit)
            [0.1, 0.1, 0.7, 0.1],  # peak bottom-left -> box 3 is top half (miss)
        ]
    )
    boxes = np.array(
        [
            [0, 0, 50, 50],
            [0, 50, 50, 100],
            [50, 50, 100, 100],
            [0, 0, 100, 50],
        ]
    )
    result = pointing_game(weights, (2, 2), boxes, (100, 100))
    assert result.pairs == 4
    np.testing.assert_array_equal(result.hits, [True, False, True, False])
    assert result.hit_rate == pytest.approx(0.5)
    assert result.chance == pytest.approx((0.25 + 0.25 + 0.25 + 0.5) / 4)
    assert result.chance_regions == pytest.approx((1 + 1 + 1 + 2) / 16)


def test_pointing_game_uses_region_box_and_per_pair_sizes() -> None:
    # The grid covers only the right half of a 200x100 image; region centres x = 125, 175.
    weights = np.array([[0.2, 0.8], [0.9, 0.1]])
    boxes = np.array([[150, 0, 200, 100], [0, 0, 120, 100]])
    region_boxes = np.array([[100, 0, 200, 100], [100, 0, 200, 100]])
    result = pointing_game(
        weights, (1, 2), boxes, np.array([[200, 100], [200, 100]]), region_boxes=region_boxes
    )
    np.testing.assert_array_equal(result.hits, [True, False])
    # Box 1 overlaps the covered area by 20 of 100 columns.
    assert result.chance == pytest.approx((0.5 + 0.2) / 2)
    np.testing.assert_allclose(peak_points(weights, (1, 2), region_boxes), [[175, 50], [125, 50]])


def test_pointing_game_matches_heatmap_peak_loop() -> None:
    """Loop reference: the upsampled heatmap's brightest pixel inside the box or not.

    Cells are 21 px square, so every region centre is a pixel centre and the map's brightest
    pixel is exactly the heaviest region's centre; box edges lie on cell boundaries.
    """
    rng = np.random.default_rng(3)
    grid, size = (5, 6), (126, 105)
    weights = rng.random((60, 30))
    x0 = 21 * rng.integers(0, 5, 60)
    y0 = 21 * rng.integers(0, 4, 60)
    boxes = np.column_stack(
        [x0, y0, x0 + 21 * rng.integers(1, 3, 60), y0 + 21 * rng.integers(1, 3, 60)]
    )
    expected = []
    for row, box in zip(weights, boxes, strict=True):
        heat = upsample_attention(row, grid, size)
        y, x = np.unravel_index(heat.argmax(), heat.shape)
        expected.append(box[0] <= x + 0.5 <= box[2] and box[1] <= y + 0.5 <= box[3])
    result = pointing_game(weights, grid, boxes, size)
    np.testing.assert_array_equal(result.hits, expected)
    assert 0 < result.hit_rate < 1


def test_pointing_game_rejects_bad_input() -> None:
    with pytest.raises(AttentionError, match="boxes must have shape"):
        pointing_game(np.ones((2, 4)), (2, 2), np.zeros((3, 4)), (10, 10))
    with pytest.raises(AttentionError, match="x0 < x1"):
        pointing_game(np.ones((1, 4)), (2, 2), np.array([[5, 0, 5, 3]]), (10, 10))
    with pytest.raises(AttentionError, match="R = 2\\*2"):
        pointing_game(np.ones((1, 5)), (2, 2), np.array([[0, 0, 5, 3]]), (10, 10))
    with pytest.raises(AttentionError, match="non-negative"):
        upsample_attention(np.array([1.0, -1.0, 0.0, 0.0]), (2, 2), (10, 10))


def test_attention_grid_figure_has_one_panel_per_label_plus_image() -> None:
    image = Image.new("RGB", (64, 64), (10, 200, 10))
    weights = np.random.default_rng(2).random((5, 16))
    labels = ["cat", "dog", "tree", "sky", "car"]
    figure = attention_grid_figure(image, labels, weights, (4, 4), scores=[0.9, 0.8, 0.5, 0.2, 0.1])
    titles = [axis.get_title() for axis in figure.axes if axis.get_title()]
    assert titles == [
        "image",
        "cat (0.9)",
        "dog (0.8)",
        "tree (0.5)",
        "sky (0.2)",
        "car (0.1)",
    ]
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    assert Image.open(io.BytesIO(buffer.getvalue())).size[0] > 0
    with pytest.raises(AttentionError, match="2 labels but 5 rows"):
        attention_grid_figure(image, ["a", "b"], weights, (4, 4))
