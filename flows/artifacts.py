"""How a run's results are shown: a console table and Prefect UI artifacts.

Metrics arrive as ``{method: {"zsl": {...}, "gzsl": {...}}}`` with fractions in [0, 1]; both the
console and the UI show them as percentages, the way the paper reports them.

The Prefect UI renders a Markdown artifact's images as ``<img src=...>`` with the link as
written, so a picture shows only if the browser can fetch it. Pictures up to
:data:`INLINE_IMAGE_BYTES` (a report's plots are ~50 kB) are embedded as ``data:`` URIs, from
any storage: they always render, never expire and carry no credential. Files (and larger
pictures) on S3 get presigned HTTP links when ``storage.presign_expiry_s`` is set (the S3
endpoint, or ``storage.public_endpoint_url``, must be reachable from the browser); otherwise,
and for local files (a browser does not open ``file://`` links from a web page), they are named
by their URL, to open where the storage is.
"""

from __future__ import annotations

import base64
import mimetypes
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from tasks.evaluation import EvaluationResult
from tasks.reports import PLOT_CAPTIONS
from tasks.storage import Storage, is_local

METRICS_ARTIFACT_KEY = "lesa-metrics"
SUMMARY_ARTIFACT_KEY = "lesa-summary"
REPORT_ARTIFACT_KEY = "lesa-report"
ABLATION_ARTIFACT_KEY = "lesa-ablation"
ATTENTION_ARTIFACT_KEY = "lesa-attention"

INLINE_IMAGE_BYTES = 2 * 1024 * 1024
"""Pictures up to this size are embedded in the artifact (a report's plots are ~50 kB)."""

MethodMetrics = Mapping[str, Mapping[str, Mapping[str, float]]]


def metric_names(metrics: MethodMetrics) -> list[str]:
    """Metric columns in first-seen order (``mAP``, ``P@3``, ``R@3``, ``F1@3``, ...)."""
    names: list[str] = []
    for settings in metrics.values():
        for values in settings.values():
            names.extend(name for name in values if name not in names)
    return names


def metrics_rows(metrics: MethodMetrics) -> list[dict[str, Any]]:
    """One row per (method, setting) with every metric in percent, rounded to 2 decimals."""
    names = metric_names(metrics)
    rows = []
    for method, settings in metrics.items():
        for setting, values in settings.items():
            row: dict[str, Any] = {"method": method, "setting": setting.upper()}
            row.update(
                {name: round(100 * values[name], 2) if name in values else None for name in names}
            )
            rows.append(row)
    return rows


def print_metrics(metrics: MethodMetrics, *, title: str, console: Console | None = None) -> None:
    """Print the ZSL and GZSL metrics of every method as one table (percent)."""
    rows = metrics_rows(metrics)
    names = metric_names(metrics)
    table = Table(title=f"{title} (metrics in %)")
    table.add_column("method", no_wrap=True)
    table.add_column("setting", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    for row in rows:
        cells = ["-" if row[name] is None else f"{row[name]:.2f}" for name in names]
        table.add_row(row["method"], row["setting"], *cells)
    console = console or Console()
    # Never narrower than the table: rich would cut the numbers to "6.…" (a log, a pipe, CI).
    needed = Measurement.get(console, console.options.update_width(10_000), table).maximum
    console.width = max(console.width, needed)
    console.print(table)


def print_run(result: Mapping[str, Any], *, title: str) -> None:
    """Print a finished run's metrics table and summary lines (an entry point's last output)."""
    console = Console()
    print_metrics(result["metrics"], title=title, console=console)
    for line in result["summary"]:
        console.print(line, markup=False)


def browser_link(storage: Storage, url: str) -> str | None:
    """A URL a browser opens from the Prefect UI: ``s3://`` objects presigned (when
    ``storage.presign_expiry_s`` is set), ``http(s)`` as they are; None otherwise."""
    if is_local(url):
        return None
    if url.startswith(("s3://", "s3a://")):
        return storage.presign(url) if storage.config.presign_expiry_s else None
    return url


def image_source(storage: Storage, url: str) -> str:
    """What a Markdown image should point at so the UI shows it: the picture itself as a
    ``data:`` URI when small enough, else a browser link, else its URL."""
    if storage.size(url) > INLINE_IMAGE_BYTES:
        return browser_link(storage, url) or _file_link(url)
    kind = mimetypes.guess_type(url)[0] or "image/png"
    return f"data:{kind};base64,{base64.b64encode(storage.read_bytes(url)).decode('ascii')}"


def images_markdown(storage: Storage, images: Mapping[str, str]) -> list[str]:
    """Markdown lines showing each picture (caption -> storage URL) in the Prefect UI."""
    lines = []
    for caption, url in images.items():
        lines += [f"**{caption}**", "", f"![{caption}]({image_source(storage, url)})", ""]
    return lines


def publish_images(
    storage: Storage, *, key: str, title: str, images: Mapping[str, str], description: str
) -> None:
    """One Markdown artifact showing pictures from storage (caption -> URL), e.g. attention
    maps: what any flow attaches when its output is images."""
    create_markdown_artifact(
        key=key,
        markdown="\n".join([f"# {title}", "", *images_markdown(storage, images)]),
        description=description,
    )


def _links(storage: Storage, urls: Mapping[str, str]) -> dict[str, str | None]:
    """Each file's browser link (made once: a presigned URL differs each second)."""
    return {name: browser_link(storage, url) for name, url in urls.items()}


def _file_lines(urls: Mapping[str, str], links: Mapping[str, str | None]) -> list[str]:
    """One Markdown list item per file: a link the browser opens, else the file's URL."""
    return [
        f"- [{name}]({links[name]})" if links[name] else f"- {name}: `{_file_link(url)}`"
        for name, url in urls.items()
    ]


def _expiry_note(storage: Storage, urls: Mapping[str, str]) -> list[str]:
    if not storage.config.presign_expiry_s or all(is_local(url) for url in urls.values()):
        return []
    hours = storage.config.presign_expiry_s / 3600
    return ["", f"_Links are presigned and expire {hours:g} h after the run published them._"]


def publish_run_artifacts(
    run_name: str,
    evaluation: EvaluationResult,
    summary_lines: Sequence[str],
    storage: Storage,
) -> dict[str, Any]:
    """Attach the metrics table, a Markdown summary, the report with its plots shown, and links
    to its files; return the run's result as the flows return it (metrics, summary,
    checkpoint, report files)."""
    create_table_artifact(
        key=METRICS_ARTIFACT_KEY,
        table=metrics_rows(evaluation.metrics),
        description=f"ZSL / GZSL metrics (%) of run {run_name}",
    )
    files = evaluation.report_urls
    links = _links(storage, files)
    markdown = [
        f"# LESA run `{run_name}`",
        "",
        *summary_lines,
        "",
        "## Reports",
        "",
        *_file_lines(files, links),
        *_expiry_note(storage, files),
    ]
    create_markdown_artifact(
        key=SUMMARY_ARTIFACT_KEY,
        markdown="\n".join(markdown),
        description=f"Summary of run {run_name}",
    )
    plots = {caption: files[name] for name, caption in PLOT_CAPTIONS.items() if name in files}
    create_markdown_artifact(
        key=REPORT_ARTIFACT_KEY,
        markdown="\n".join(
            [evaluation.report_markdown, "## Plots", "", *images_markdown(storage, plots)]
        ),
        description=f"Report of run {run_name}",
    )
    _publish_links(REPORT_ARTIFACT_KEY, files, links, f"{run_name}: ")
    return {
        "run_name": run_name,
        "metrics": evaluation.metrics,
        "summary": list(summary_lines),
        "checkpoint": evaluation.checkpoint_url,
        "reports": files,
    }


def _publish_links(
    key: str, urls: Mapping[str, str], links: Mapping[str, str | None], prefix: str
) -> None:
    """One link artifact per file, keyed ``<key>-<file>``."""
    for name, url in urls.items():
        create_link_artifact(
            key=f"{key}-{_slug(name)}",
            link=links[name] or _file_link(url),
            link_text=name,
            description=f"{prefix}{name}",
        )


def _slug(name: str) -> str:
    """An artifact key from a file name (keys allow lowercase letters, digits and dashes)."""
    return "".join(char if char.isalnum() else "-" for char in name.lower()).strip("-")


def _file_link(url: str) -> str:
    """A local path as a ``file://`` URL (opens on the machine holding it, not from the UI)."""
    return f"file://{url}" if url.startswith("/") else url


def publish_ablation_artifacts(
    run_name: str,
    summary: pd.DataFrame,
    markdown: str,
    report_urls: Mapping[str, str],
    storage: Storage,
) -> None:
    """Attach the ablation: its summary table, the Markdown report with the plot, file links."""
    create_table_artifact(
        key=f"{ABLATION_ARTIFACT_KEY}-table",
        table=[
            {key: round(100 * value, 2) if isinstance(value, float) else value
             for key, value in row.items()}
            for row in summary.to_dict(orient="records")
        ],
        description=f"Ablation of run {run_name}: mean and std over seeds (%)",
    )  # fmt: skip
    plot = report_urls.get("ablation.png")
    figure = images_markdown(storage, {"ZSL against GZSL mAP per variant": plot}) if plot else []
    create_markdown_artifact(
        key=ABLATION_ARTIFACT_KEY,
        markdown="\n".join([markdown, *figure]),
        description=f"Ablation of run {run_name}",
    )
    links = _links(storage, report_urls)
    _publish_links(ABLATION_ARTIFACT_KEY, report_urls, links, f"{run_name} ablation: ")
