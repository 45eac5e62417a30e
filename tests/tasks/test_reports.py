"""Report tables against sklearn and hand-computed loops; report files contain the numbers."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba
from PIL import Image
from sklearn.metrics import average_precision_score

from lesa_model.attention import PointingGameResult
from tasks.reports import (
    LABELS_PLOT_FILE,
    METRICS_FILE,
    REPORT_FILE,
    SPLIT_COLOURS,
    TOPK_PLOT_FILE,
    ReportError,
    best_worst_figure,
    label_ap_table,
    report_markdown,
    topk_curve,
    write_report,
)
from tasks.storage import Storage, StorageConfig
from tests.helpers.reference_metrics import loop_prf_at_k

NAMES = ["cat", "dog", "fish", "tree", "whale"]
SEEN = np.array([True, True, False, True, False])


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.choice(np.array([1, -1, -1, 0], dtype=np.int8), size=(40, 5))
    labels[0, :] = 1
    scores = rng.normal(size=(40, 5)).astype(np.float32) + 0.8 * (labels == 1)
    return scores, labels


METRICS = {
    "zsl": {"mAP": 0.4321, "P@3": 0.25, "R@3": 0.5, "F1@3": 0.3333},
    "gzsl": {"mAP": 0.1234, "P@3": 0.2, "R@3": 0.4, "F1@3": 0.2667},
}
BASELINES = {
    "mean-pool": {"zsl": {"mAP": 0.2}, "gzsl": {"mAP": 0.04}},
    "random": {"zsl": {"mAP": 0.1}, "gzsl": {"mAP": 0.02}},
}
POINTING = PointingGameResult(
    hit_rate=0.625, chance=0.125, chance_regions=0.1, pairs=8, hits=np.ones(8, dtype=bool)
)


def test_label_ap_table_matches_sklearn_on_annotated_images() -> None:
    scores, labels = _data()
    table = label_ap_table(scores, labels, NAMES, SEEN)
    assert list(table.columns) == ["label", "split", "ap", "positives"]
    assert table["ap"].is_monotonic_decreasing
    for index, name in enumerate(NAMES):
        known = labels[:, index] != 0
        expected = average_precision_score(labels[known, index] == 1, scores[known, index])
        row = table[table["label"] == name].iloc[0]
        assert row["ap"] == pytest.approx(expected, abs=1e-6)
        assert row["split"] == ("seen" if SEEN[index] else "unseen")
        assert row["positives"] == (labels[:, index] == 1).sum()


def test_topk_curve_matches_loop_for_zsl_and_gzsl() -> None:
    scores, labels = _data(1)
    curve = topk_curve(scores, labels, SEEN, ks=(1, 2, 3, 4))
    # ZSL has only 2 labels: K = 3 and 4 are dropped there.
    assert curve[curve["setting"] == "zsl"]["k"].tolist() == [1, 2]
    assert curve[curve["setting"] == "gzsl"]["k"].tolist() == [1, 2, 3, 4]
    for row in curve.itertuples(index=False):
        columns = ~SEEN if row.setting == "zsl" else np.ones(5, dtype=bool)
        expected = loop_prf_at_k(scores[:, columns], labels[:, columns], row.k)
        assert (row.precision, row.recall, row.f1) == pytest.approx(expected, abs=1e-6)


def test_write_report_writes_files_with_the_numbers(tmp_path) -> None:
    scores, labels = _data(2)
    storage = Storage(StorageConfig(root=str(tmp_path)))
    prefix = storage.url("runs", "r1", "reports")
    label_ap = label_ap_table(scores, labels, NAMES, SEEN)
    curve = topk_curve(scores, labels, SEEN)
    artifacts = write_report(
        METRICS,
        label_ap=label_ap,
        curve=curve,
        storage=storage,
        prefix=prefix,
        baselines=BASELINES,
        pointing=POINTING,
    )
    assert set(artifacts.urls()) == {METRICS_FILE, REPORT_FILE, LABELS_PLOT_FILE, TOPK_PLOT_FILE}
    for url in artifacts.urls().values():
        assert url.startswith(prefix) and storage.exists(url)

    document = storage.read_json(artifacts.metrics_url)
    assert document["metrics"]["LESA"]["zsl"]["mAP"] == pytest.approx(0.4321)
    assert document["metrics"]["random"]["gzsl"]["mAP"] == pytest.approx(0.02)
    assert document["pointing_game"] == {
        "hit_rate": 0.625,
        "chance": 0.125,
        "chance_regions": 0.1,
        "pairs": 8,
    }
    assert len(document["per_label_ap"]) == 5
    assert document["per_label_ap"][0]["ap"] == pytest.approx(label_ap["ap"].iloc[0])
    assert {row["setting"] for row in document["topk_curve"]} == {"zsl", "gzsl"}

    text = storage.read_bytes(artifacts.report_url).decode()
    for needle in ("43.21", "12.34", "33.33", "62.50", "12.50", "LESA / mean-pool: ZSL mAP 2.16x"):
        assert needle in text
    assert "GZSL mAP 3.08x" in text
    for row in label_ap.itertuples(index=False):
        assert f"| {row.label} | {100 * row.ap:.2f} | {row.positives} |" in text
    assert f"]({LABELS_PLOT_FILE})" in text and f"]({TOPK_PLOT_FILE})" in text

    for name in (LABELS_PLOT_FILE, TOPK_PLOT_FILE):
        png = Image.open(io.BytesIO(storage.read_bytes(artifacts.plot_urls[name])))
        assert png.format == "PNG" and png.size[0] > 100


def _bars(axis) -> list[tuple[str, object]]:
    """(tick label, bar) top to bottom."""
    ticks = sorted(zip(axis.get_yticks(), axis.get_yticklabels(), strict=True), key=lambda t: -t[0])
    bars = {bar.get_y() + bar.get_height() / 2: bar for bar in axis.patches}
    return [(label.get_text(), bars[position]) for position, label in ticks]


def test_bar_chart_ranks_seen_and_unseen_apart_without_labels_lacking_positives() -> None:
    rng = np.random.default_rng(4)
    label_ap = pd.DataFrame(
        {
            "label": [f"l{i:02d}" for i in range(40)],
            "split": ["unseen" if i % 4 == 0 else "seen" for i in range(40)],
            "ap": rng.permutation(np.linspace(0.01, 0.9, 40)),
            "positives": [0 if i in (1, 4) else 5 for i in range(40)],
        }
    )
    seen_axis, unseen_axis = best_worst_figure(label_ap).axes
    for axis, split in ((seen_axis, "seen"), (unseen_axis, "unseen")):
        rows = label_ap[(label_ap["split"] == split) & (label_ap["positives"] > 0)]
        ranked = rows.sort_values("ap", ascending=False)["label"].tolist()
        shown = _bars(axis)
        expected = ranked[:10] + ranked[-10:] if len(ranked) > 20 else ranked
        assert [name for name, _ in shown] == expected
        by_label = label_ap.set_index("label")
        for name, bar in shown:
            assert bar.get_width() == pytest.approx(100 * by_label.loc[name, "ap"])
            assert bar.get_facecolor() == pytest.approx(to_rgba(SPLIT_COLOURS[split]))
        assert "1 without a test positive left out" in axis.get_title()


def test_bar_chart_marks_tied_labels() -> None:
    label_ap = pd.DataFrame(
        {
            "label": ["a", "b", "c", "d"],
            "split": ["seen", "seen", "seen", "unseen"],
            "ap": [0.5, 0.5, 0.2, 0.3],
            "positives": [3, 2, 1, 4],
        }
    )
    seen_axis, unseen_axis = best_worst_figure(label_ap).axes
    shown = _bars(seen_axis)
    assert [name for name, _ in shown] == ["= a", "= b", "c"]
    assert [bar.get_hatch() for _, bar in shown] == ["//", "//", None]
    assert [name for name, _ in _bars(unseen_axis)] == ["d"]


def test_report_markdown_for_artifact_has_no_image_links() -> None:
    text = report_markdown(METRICS, baselines=BASELINES)
    assert "![" not in text
    assert "| LESA | 43.21 | 25.00 | 50.00 | 33.33 |" in text
    assert "| random | 10.00 | - | - | - |" in text


def test_report_rejects_bad_input(tmp_path) -> None:
    storage = Storage(StorageConfig(root=str(tmp_path)))
    empty = pd.DataFrame(columns=["label", "split", "ap", "positives"])
    curve = pd.DataFrame(columns=["setting", "k", "precision", "recall", "f1"])
    with pytest.raises(ReportError, match="lack the setting"):
        write_report({"zsl": {}}, label_ap=empty, curve=curve, storage=storage, prefix="x")
    with pytest.raises(ReportError, match="per-label AP table is empty"):
        write_report(METRICS, label_ap=empty, curve=curve, storage=storage, prefix="x")
    scores, labels = _data()
    with pytest.raises(ReportError, match="seen mask"):
        label_ap_table(scores, labels, NAMES, SEEN[:3])
    with pytest.raises(ReportError, match="4 label names"):
        label_ap_table(scores, labels, NAMES[:4], SEEN)


@pytest.mark.slow
def test_write_report_to_s3(s3_server) -> None:
    scores, labels = _data(3)
    storage = Storage(
        StorageConfig(root=f"s3://{s3_server.bucket}/lesa", endpoint_url=s3_server.endpoint_url)
    )
    artifacts = write_report(
        METRICS,
        label_ap=label_ap_table(scores, labels, NAMES, SEEN),
        curve=topk_curve(scores, labels, SEEN),
        storage=storage,
        prefix=storage.url("runs", "s3run", "reports"),
    )
    assert artifacts.report_url == f"s3://{s3_server.bucket}/lesa/runs/s3run/reports/report.md"
    assert "43.21" in storage.read_bytes(artifacts.report_url).decode()
    listed = storage.ls(storage.url("runs", "s3run", "reports"))
    assert sorted(listed) == sorted(artifacts.urls().values())
