"""How a run's results are shown: a console table and Prefect UI artifacts.

Metrics arrive as ``{method: {"zsl": {...}, "gzsl": {...}}}`` with fractions in [0, 1]; both the
console and the UI show them as percentages, the way the paper reports them.
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
from tasks.storage import Storage

METRICS_ARTIFACT_KEY = "lesa-metrics"
SUMMARY_ARTIFACT_KEY = "lesa-summary"
REPORT_ARTIFACT_KEY = "lesa-report"
ABLATION_ARTIFACT_KEY = "lesa-ablation"
ATTENTION_ARTIFACT_KEY = "lesa-attention"

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


def publish_run_artifacts(
    run_name: str, evaluation: EvaluationResult, summary_lines: Sequence[str]
) -> dict[str, Any]:
    """Attach the metrics table, a Markdown summary, the report and links to its files; return
    the run's result as the flows return it (metrics, summary, checkpoint, report files)."""
    create_table_artifact(
        key=METRICS_ARTIFACT_KEY,
        table=metrics_rows(evaluation.metrics),
        description=f"ZSL / GZSL metrics (%) of run {run_name}",
    )
    markdown = "\n".join(
        [
            f"# LESA run `{run_name}`",
            "",
            *summary_lines,
            "",
            "## Reports",
            "",
            *(f"- {name}: `{url}`" for name, url in evaluation.report_urls.items()),
        ]
    )
    create_markdown_artifact(
        key=SUMMARY_ARTIFACT_KEY, markdown=markdown, description=f"Summary of run {run_name}"
    )
    create_markdown_artifact(
        key=REPORT_ARTIFACT_KEY,
        markdown=evaluation.report_markdown,
        description=f"Report of run {run_name}",
    )
    for name, url in evaluation.report_urls.items():
        create_link_artifact(
            key=f"{REPORT_ARTIFACT_KEY}-{_slug(name)}",
            link=_as_link(url),
            link_text=name,
            description=f"{run_name}: {name}",
        )
    return {
        "run_name": run_name,
        "metrics": evaluation.metrics,
        "summary": list(summary_lines),
        "checkpoint": evaluation.checkpoint_url,
        "reports": evaluation.report_urls,
    }


def image_source(storage: Storage, url: str) -> str:
    """The picture at ``url`` as a ``data:`` URI: the Prefect UI renders a Markdown image only
    if the browser can fetch it, and it cannot open ``file://`` or unsigned ``s3://`` links."""
    kind = mimetypes.guess_type(url)[0] or "image/png"
    return f"data:{kind};base64,{base64.b64encode(storage.read_bytes(url)).decode('ascii')}"


def publish_images(
    storage: Storage, *, key: str, title: str, images: Mapping[str, str], description: str
) -> None:
    """One Markdown artifact showing pictures from storage (caption -> URL), e.g. attention
    maps: what any flow attaches when its output is images."""
    lines = [f"# {title}", ""]
    for caption, url in images.items():
        lines += [f"**{caption}**", "", f"![{caption}]({image_source(storage, url)})", ""]
    create_markdown_artifact(key=key, markdown="\n".join(lines), description=description)


def _slug(name: str) -> str:
    """An artifact key from a file name (keys allow lowercase letters, digits and dashes)."""
    return "".join(char if char.isalnum() else "-" for char in name.lower()).strip("-")


def _as_link(url: str) -> str:
    """Local paths become ``file://`` URLs so the UI renders them as links."""
    return f"file://{url}" if url.startswith("/") else url


def publish_ablation_artifacts(
    run_name: str, summary: pd.DataFrame, markdown: str, report_urls: Mapping[str, str]
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
    figure = [f"![ZSL against GZSL mAP per variant]({_as_link(plot)})", ""] if plot else []
    create_markdown_artifact(
        key=ABLATION_ARTIFACT_KEY,
        markdown="\n".join([markdown, *figure]),
        description=f"Ablation of run {run_name}",
    )
    for name, url in report_urls.items():
        create_link_artifact(
            key=f"{ABLATION_ARTIFACT_KEY}-{_slug(name)}",
            link=_as_link(url),
            link_text=name,
            description=f"{run_name} ablation: {name}",
        )
