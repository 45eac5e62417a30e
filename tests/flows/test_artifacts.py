"""What a finished run attaches to the Prefect UI: metrics table, summary, the report with its
plots shown, file links, for local storage (pictures inline) and S3 (presigned links that
really download from the S3 server)."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image

from flows import artifacts
from flows.artifacts import (
    METRICS_ARTIFACT_KEY,
    REPORT_ARTIFACT_KEY,
    SUMMARY_ARTIFACT_KEY,
    publish_images,
    publish_run_artifacts,
)
from tasks.evaluation import EvaluationResult
from tasks.reports import LABELS_PLOT_FILE, PLOT_CAPTIONS, TOPK_PLOT_FILE
from tasks.storage import Storage, StorageConfig
from tests.helpers.services import S3Server

Published = dict[str, dict[str, Any]]
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buffer, format="PNG")
    return buffer.getvalue()


PLOTS = {LABELS_PLOT_FILE: png("red"), TOPK_PLOT_FILE: png("blue")}


@pytest.fixture
def record(monkeypatch: pytest.MonkeyPatch) -> Published:
    """Every artifact created, by key, instead of sending it to an API."""
    calls: Published = {}

    def recorder(kind: str) -> Callable[..., None]:
        def create(**kwargs: Any) -> None:
            assert kwargs["key"] not in calls, f"artifact key {kwargs['key']} used twice"
            calls[kwargs["key"]] = {"kind": kind, **kwargs}

        return create

    for kind in ("table", "markdown", "link"):
        monkeypatch.setattr(artifacts, f"create_{kind}_artifact", recorder(kind))
    return calls


def publish(storage: Storage, calls: Published) -> dict[str, str]:
    """Write a run's report files to ``storage`` and publish them; the files by name."""
    prefix = storage.url("runs", "r1", "reports")
    files = {"metrics.json": f"{prefix}/metrics.json", "report.md": f"{prefix}/report.md"}
    storage.write_bytes(files["metrics.json"], b"{}")
    storage.write_bytes(files["report.md"], b"# report\n")
    for name, data in PLOTS.items():
        files[name] = f"{prefix}/{name}"
        storage.write_bytes(files[name], data)
    evaluation = EvaluationResult(
        checkpoint_url=storage.url("runs", "r1", "checkpoints", "best.pt"),
        metrics={
            "LESA": {"zsl": {"mAP": 0.25}, "gzsl": {"mAP": 0.4}},
            "random": {"zsl": {"mAP": 0.05}, "gzsl": {"mAP": 0.01}},
        },
        report_urls=files,
        report_markdown="# LESA evaluation report\n\n| LESA | 25.00 |\n",
        num_images=10,
        seen_labels=["cat"],
        unseen_labels=["fish"],
    )
    publish_run_artifacts(
        "r1", evaluation, ["- Training: 12 steps", "- LESA ZSL mAP 25.00%"], storage
    )
    return files


def report_images(calls: Published) -> dict[str, str]:
    return dict(IMAGE.findall(calls[REPORT_ARTIFACT_KEY]["markdown"]))


def test_metrics_table_summary_and_report_are_attached(tmp_path: Path, record: Published) -> None:
    files = publish(Storage(StorageConfig(root=str(tmp_path))), record)
    table = record[METRICS_ARTIFACT_KEY]
    assert table["kind"] == "table"
    assert [(row["method"], row["setting"], row["mAP"]) for row in table["table"]] == [
        ("LESA", "ZSL", 25.0),
        ("LESA", "GZSL", 40.0),
        ("random", "ZSL", 5.0),
        ("random", "GZSL", 1.0),
    ]
    summary = record[SUMMARY_ARTIFACT_KEY]
    assert summary["kind"] == "markdown"
    assert "- Training: 12 steps\n- LESA ZSL mAP 25.00%" in summary["markdown"]
    for url in files.values():
        assert f"file://{url}" in summary["markdown"]
    assert "expire" not in summary["markdown"]
    report = record[REPORT_ARTIFACT_KEY]
    assert report["markdown"].startswith("# LESA evaluation report")
    for key in record:
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


def test_local_plots_are_inline_pictures_and_files_are_file_links(
    tmp_path: Path, record: Published
) -> None:
    files = publish(Storage(StorageConfig(root=str(tmp_path))), record)
    images = report_images(record)
    assert set(images) == set(PLOT_CAPTIONS.values())
    for name, caption in PLOT_CAPTIONS.items():
        kind, _, data = images[caption].partition(",")
        assert kind == "data:image/png;base64"
        assert base64.b64decode(data) == PLOTS[name]
    links = {call["link_text"]: call["link"] for call in record.values() if call["kind"] == "link"}
    assert links == {name: f"file://{url}" for name, url in files.items()}


def test_a_large_local_picture_is_named_not_inlined(
    tmp_path: Path, record: Published, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(artifacts, "INLINE_IMAGE_BYTES", min(map(len, PLOTS.values())) - 1)
    files = publish(Storage(StorageConfig(root=str(tmp_path))), record)
    images = report_images(record)
    assert images[PLOT_CAPTIONS[TOPK_PLOT_FILE]] == f"file://{files[TOPK_PLOT_FILE]}"


def s3_storage_with(s3_server: S3Server, tmp_path: Path, **options: Any) -> Storage:
    return Storage(
        StorageConfig(
            root=f"s3://{s3_server.bucket}/artifacts-{tmp_path.name}",
            endpoint_url=s3_server.endpoint_url,
            cache_dir=str(tmp_path / "cache"),
            **options,
        )
    )


def test_s3_plots_are_inline_and_files_presigned_links_that_download(
    s3_server: S3Server, tmp_path: Path, record: Published
) -> None:
    storage = s3_storage_with(s3_server, tmp_path, presign_expiry_s=900)
    files = publish(storage, record)
    images = report_images(record)
    for name, caption in PLOT_CAPTIONS.items():
        assert base64.b64decode(images[caption].split(",", 1)[1]) == PLOTS[name]
    links = {call["link_text"]: call["link"] for call in record.values() if call["kind"] == "link"}
    assert set(links) == set(files)
    for link in links.values():
        assert link.startswith(f"{s3_server.endpoint_url}/{s3_server.bucket}/"), link
        assert parse_qs(urlsplit(link).query)["X-Amz-Expires"] == ["900"]
    for name, data in PLOTS.items():
        response = httpx.get(links[name])
        assert response.status_code == 200
        assert response.content == data
    assert httpx.get(links["report.md"]).content == b"# report\n"
    summary = record[SUMMARY_ARTIFACT_KEY]["markdown"]
    assert f"- [metrics.json]({links['metrics.json']})" in summary
    assert "expire 0.25 h after" in summary


def test_without_presigning_s3_files_are_named_and_no_key_is_published(
    s3_server: S3Server, tmp_path: Path, record: Published
) -> None:
    files = publish(s3_storage_with(s3_server, tmp_path), record)
    links = {call["link_text"]: call["link"] for call in record.values() if call["kind"] == "link"}
    assert links == files
    published = repr(record)
    assert s3_server.key not in published.replace(s3_server.bucket, "")
    assert "X-Amz" not in published and "expire" not in published
    assert set(report_images(record)) == set(PLOT_CAPTIONS.values())


def test_a_large_s3_picture_is_shown_by_a_presigned_link(
    s3_server: S3Server, tmp_path: Path, record: Published, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(artifacts, "INLINE_IMAGE_BYTES", 10)
    publish(s3_storage_with(s3_server, tmp_path, presign_expiry_s=60), record)
    url = report_images(record)[PLOT_CAPTIONS[TOPK_PLOT_FILE]]
    assert httpx.get(url).content == PLOTS[TOPK_PLOT_FILE]


def test_presigned_links_use_the_public_endpoint(s3_server: S3Server, tmp_path: Path) -> None:
    """A browser may reach S3 by another name than the flows do: links are signed for it."""
    public = s3_server.endpoint_url.replace("127.0.0.1", "localhost")
    storage = s3_storage_with(
        s3_server, tmp_path, public_endpoint_url=public, presign_expiry_s=7 * 24 * 3600
    )
    url = storage.url("picture.png")
    storage.write_bytes(url, PLOTS[TOPK_PLOT_FILE])
    link = storage.presign(url)
    assert link.startswith(f"{public}/")
    assert parse_qs(urlsplit(link).query)["X-Amz-Expires"] == [str(7 * 24 * 3600)]
    assert httpx.get(link).content == PLOTS[TOPK_PLOT_FILE]


def test_presign_refuses_local_files_when_off_and_beyond_s3s_limit(
    s3_server: S3Server, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="only s3:// objects"):
        Storage(StorageConfig(root=str(tmp_path))).presign(str(tmp_path / "x.png"))
    storage = s3_storage_with(s3_server, tmp_path)
    with pytest.raises(ValueError, match="presign_expiry_s is 0"):
        storage.presign(storage.url("x.png"))
    with pytest.raises(ValueError, match="presign_expiry_s"):
        StorageConfig(presign_expiry_s=7 * 24 * 3600 + 1)


def test_publish_images_shows_every_picture(tmp_path: Path, record: Published) -> None:
    storage = Storage(StorageConfig(root=str(tmp_path)))
    urls = {}
    for name, data in PLOTS.items():
        urls[f"map {name}"] = storage.url(name)
        storage.write_bytes(urls[f"map {name}"], data)
    publish_images(storage, key="lesa-maps", title="Maps", images=urls, description="d")
    markdown = record["lesa-maps"]["markdown"]
    assert markdown.startswith("# Maps")
    shown = dict(IMAGE.findall(markdown))
    assert {caption: base64.b64decode(src.split(",", 1)[1]) for caption, src in shown.items()} == {
        f"map {name}": data for name, data in PLOTS.items()
    }
