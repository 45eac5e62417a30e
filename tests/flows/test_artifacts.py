"""What a finished run attaches to the Prefect UI: metrics table, summary, report, file links."""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import pytest
from PIL import Image

from flows import artifacts
from flows.artifacts import (
    METRICS_ARTIFACT_KEY,
    REPORT_ARTIFACT_KEY,
    SUMMARY_ARTIFACT_KEY,
    publish_run_artifacts,
)
from tasks.evaluation import EvaluationResult
from tasks.storage import Storage, StorageConfig

REPORTS = {
    "metrics.json": "/data/runs/r1/reports/metrics.json",
    "report.md": "/data/runs/r1/reports/report.md",
    "labels-best-worst.png": "s3://bucket/lesa/runs/r1/reports/labels-best-worst.png",
    "prf-vs-k.png": "/data/runs/r1/reports/prf-vs-k.png",
}


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """Publish one run's artifacts, recording each call by its key instead of sending it."""
    calls: dict[str, dict[str, Any]] = {}

    def record(kind: str):
        def create(**kwargs: Any) -> None:
            assert kwargs["key"] not in calls, f"artifact key {kwargs['key']} used twice"
            calls[kwargs["key"]] = {"kind": kind, **kwargs}

        return create

    for kind in ("table", "markdown", "link"):
        monkeypatch.setattr(artifacts, f"create_{kind}_artifact", record(kind))
    evaluation = EvaluationResult(
        checkpoint_url="/data/runs/r1/checkpoints/best.pt",
        metrics={
            "LESA": {"zsl": {"mAP": 0.25}, "gzsl": {"mAP": 0.4}},
            "random": {"zsl": {"mAP": 0.05}, "gzsl": {"mAP": 0.01}},
        },
        report_urls=REPORTS,
        report_markdown="# LESA evaluation report\n\n| LESA | 25.00 |\n",
        num_images=10,
        seen_labels=["cat"],
        unseen_labels=["fish"],
    )
    publish_run_artifacts("r1", evaluation, ["- Training: 12 steps", "- LESA ZSL mAP 25.00%"])
    return calls


def test_metrics_table_summary_and_report_are_attached(published: dict) -> None:
    table = published[METRICS_ARTIFACT_KEY]
    assert table["kind"] == "table"
    assert [(row["method"], row["setting"], row["mAP"]) for row in table["table"]] == [
        ("LESA", "ZSL", 25.0),
        ("LESA", "GZSL", 40.0),
        ("random", "ZSL", 5.0),
        ("random", "GZSL", 1.0),
    ]
    summary = published[SUMMARY_ARTIFACT_KEY]
    assert summary["kind"] == "markdown"
    assert "- Training: 12 steps\n- LESA ZSL mAP 25.00%" in summary["markdown"]
    for url in REPORTS.values():
        assert url in summary["markdown"]
    report = published[REPORT_ARTIFACT_KEY]
    assert report["kind"] == "markdown"
    assert report["markdown"].startswith("# LESA evaluation report")


def test_every_report_file_gets_a_link_the_ui_can_open(published: dict) -> None:
    links = {call["link_text"]: call for call in published.values() if call["kind"] == "link"}
    assert set(links) == set(REPORTS)
    assert links["prf-vs-k.png"]["link"] == "file:///data/runs/r1/reports/prf-vs-k.png"
    assert links["labels-best-worst.png"]["link"] == REPORTS["labels-best-worst.png"]
    for key in published:
        assert re.fullmatch(r"[a-z0-9-]+", key), f"{key!r} is not a valid Prefect artifact key"


def test_published_images_are_embedded_so_the_ui_renders_them(monkeypatch, tmp_path) -> None:
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(artifacts, "create_markdown_artifact", lambda **kw: sent.append(kw))
    storage = Storage(StorageConfig(root=str(tmp_path)))
    pictures = {}
    for index, colour in enumerate(("red", "blue")):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
        url = storage.url(f"{index}.png")
        storage.write_bytes(url, buffer.getvalue())
        pictures[f"img{index}: cat, fish*"] = url
    artifacts.publish_images(
        storage, key="lesa-attention", title="Attention", images=pictures, description="grids"
    )
    [artifact] = sent
    assert artifact["key"] == "lesa-attention"
    embedded = re.findall(
        r"!\[([^\]]+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", artifact["markdown"]
    )
    assert [caption for caption, _ in embedded] == list(pictures)
    for (_, data), url in zip(embedded, pictures.values(), strict=True):
        assert base64.b64decode(data) == storage.read_bytes(url)
