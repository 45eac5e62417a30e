"""Evaluation report: the numbers a person reads after a run, as JSON, Markdown and PNG plots.

The evaluation stage computes scores; this module turns them into tables (per-label AP, P/R/F1
against K) and writes ``metrics.json``, ``report.md`` and the plots under one storage prefix
(``runs/<run>/reports``). Metrics arrive as fractions in [0, 1] (``lesa_model.metrics``) and are
shown as percentages, the way the paper reports them.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from pydantic import BaseModel, ConfigDict

from lesa_model.attention import PointingGameResult
from lesa_model.metrics import average_precision, precision_recall_f1_at_k
from tasks.provenance import Provenance
from tasks.storage import Storage

SettingMetrics = Mapping[str, Mapping[str, float]]
"""``{"zsl": {"mAP": ..., "F1@3": ...}, "gzsl": {...}}`` as ``evaluate_zero_shot`` returns it."""

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
LABELS_PLOT_FILE = "labels-best-worst.png"
TOPK_PLOT_FILE = "prf-vs-k.png"
PLOT_CAPTIONS = {
    LABELS_PLOT_FILE: "Best and worst labels by AP",
    TOPK_PLOT_FILE: "Precision, recall and F1 against K",
}
"""Each plot file's caption, in report.md and in the UI's report artifact."""

LESA_METHOD = "LESA"
CURVE_KS: tuple[int, ...] = tuple(range(1, 21))
"""K = 1..20 for the P/R/F1 curves (covers both NUS-WIDE's 3/5 and Open Images' 10/20)."""
BAR_LABELS = 10
"""Best and worst labels shown in the bar chart, each."""
SPLIT_COLOURS = {"seen": "tab:blue", "unseen": "tab:orange"}


class ReportError(ValueError):
    """Report inputs that do not fit together (shapes, missing settings, empty tables)."""


class RejectSummary(BaseModel):
    """How many images a stage could not use, and why (from its ``rejects.parquet``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    reasons: dict[str, int]
    """Count per reason, most frequent first."""

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def describe(self) -> str:
        """One line: ``Rejected images: 3 (corrupt 2, missing 1), listed in `url` ``."""
        if not self.total:
            return "Rejected images: none"
        counts = ", ".join(f"{reason} {count}" for reason, count in self.reasons.items())
        return f"Rejected images: {self.total} ({counts}), listed in `{self.url}`"


def reject_summary(storage: Storage, url: str) -> RejectSummary:
    """Count the rows of a Rejects table by reason (no file: nothing was rejected)."""
    if not storage.exists(url):
        return RejectSummary(url=url, reasons={})
    reasons = storage.read_parquet(url)["reason"].astype(str).value_counts()
    ordered = sorted(reasons.items(), key=lambda item: (-item[1], item[0]))
    return RejectSummary(url=url, reasons={reason: int(count) for reason, count in ordered})


def _reject_lines(rejects: RejectSummary) -> list[str]:
    if not rejects.total:
        return ["No image was rejected: every image of the label table has features."]
    rows = [f"| {reason} | {count} |" for reason, count in rejects.reasons.items()]
    return [
        f"{rejects.total} image(s) could not be used and are left out of training and "
        f"evaluation; each is listed with its reason in `{rejects.url}`.",
        "",
        "| reason | images |",
        "|---|---:|",
        *rows,
    ]


class ReportArtifacts(BaseModel):
    """Where the report files were written (URLs under the report prefix)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metrics_url: str
    report_url: str
    plot_urls: dict[str, str]

    def urls(self) -> dict[str, str]:
        """Every file by its name, e.g. for links attached to the flow run."""
        return {METRICS_FILE: self.metrics_url, REPORT_FILE: self.report_url, **self.plot_urls}


def label_ap_table(
    scores: np.ndarray, labels: np.ndarray, names: Sequence[str], seen: np.ndarray
) -> pd.DataFrame:
    """Per-label AP with its split and how many test images carry it, best first.

    A label's AP ranks images by that label's score alone, so it is the same number in ZSL and
    GZSL; the ZSL mAP is the mean over the unseen rows, the GZSL mAP over all rows.
    """
    scores, labels, seen = _check_scores(scores, labels, seen)
    if len(names) != scores.shape[1]:
        raise ReportError(f"{len(names)} label names for {scores.shape[1]} score columns")
    table = pd.DataFrame(
        {
            "label": list(names),
            "split": np.where(seen, "seen", "unseen"),
            "ap": average_precision(scores, labels).astype(np.float64),
            "positives": (labels == 1).sum(axis=0).astype(np.int64),
        }
    )
    return table.sort_values(["ap", "label"], ascending=[False, True], ignore_index=True)


def topk_curve(
    scores: np.ndarray,
    labels: np.ndarray,
    seen: np.ndarray,
    ks: Sequence[int] = CURVE_KS,
) -> pd.DataFrame:
    """Overall P/R/F1@K for each K, ZSL (unseen labels ranked alone) and GZSL (all labels).

    Ks larger than a setting's label count are dropped (top-K of fewer labels is undefined).
    """
    scores, labels, seen = _check_scores(scores, labels, seen)
    settings = {"zsl": ~seen, "gzsl": np.ones_like(seen)}
    rows = []
    for setting, columns in settings.items():
        count = int(columns.sum())
        for k in ks:
            if k > count:
                continue
            precision, recall, f1 = precision_recall_f1_at_k(
                scores[:, columns], labels[:, columns], k
            )
            rows.append(
                {
                    "setting": setting,
                    "k": int(k),
                    "precision": float(precision),
                    "recall": float(recall),
                    "f1": float(f1),
                }
            )
    return pd.DataFrame(rows, columns=["setting", "k", "precision", "recall", "f1"])


def report_markdown(
    metrics: SettingMetrics,
    *,
    baselines: Mapping[str, SettingMetrics] | None = None,
    label_ap: pd.DataFrame | None = None,
    pointing: PointingGameResult | None = None,
    plots: Mapping[str, str] | None = None,
    title: str = "LESA evaluation report",
    rejects: RejectSummary | None = None,
    provenance: Provenance | None = None,
) -> str:
    """The report as Markdown: summary tables, baselines, rejected images, pointing game,
    per-label AP, plots.

    ``plots`` maps a caption to an image link (relative to the report); without it the text
    stands alone, which is what a Prefect artifact needs.
    """
    methods = {LESA_METHOD: metrics, **(baselines or {})}
    lines = [f"# {title}", ""]
    if provenance is not None:
        lines += ["## Provenance", "", *provenance.markdown(), ""]
    for setting, heading in (("zsl", "ZSL (unseen labels only)"), ("gzsl", "GZSL (all labels)")):
        lines += [f"## {heading}", "", *_summary_table(methods, setting), ""]
    if baselines:
        lines += ["## LESA against the baselines", "", *_ratio_lines(metrics, baselines), ""]
    if rejects is not None:
        lines += ["## Rejected images", "", *_reject_lines(rejects), ""]
    if pointing is not None:
        lines += ["## Attention localisation (pointing game)", "", *_pointing_lines(pointing), ""]
    if label_ap is not None:
        lines += ["## Per-label AP", "", *_label_ap_lines(label_ap)]
    for caption, link in (plots or {}).items():
        lines += [f"![{caption}]({link})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    metrics: SettingMetrics,
    *,
    label_ap: pd.DataFrame,
    curve: pd.DataFrame,
    storage: Storage,
    prefix: str,
    baselines: Mapping[str, SettingMetrics] | None = None,
    pointing: PointingGameResult | None = None,
    rejects: RejectSummary | None = None,
    provenance: Provenance | None = None,
) -> ReportArtifacts:
    """Write metrics.json, report.md and the two PNG plots under ``prefix`` (a storage URL).

    ``label_ap`` comes from :func:`label_ap_table`, ``curve`` from :func:`topk_curve`,
    ``rejects`` from :func:`reject_summary` (the images left out, by reason).
    """
    _check_setting_metrics(LESA_METHOD, metrics)
    for name, values in (baselines or {}).items():
        _check_setting_metrics(name, values)
    if label_ap.empty:
        raise ReportError("the per-label AP table is empty: no labels were evaluated")
    base = prefix.rstrip("/")
    plot_urls = {
        LABELS_PLOT_FILE: f"{base}/{LABELS_PLOT_FILE}",
        TOPK_PLOT_FILE: f"{base}/{TOPK_PLOT_FILE}",
    }
    storage.write_bytes(plot_urls[LABELS_PLOT_FILE], _png(best_worst_figure(label_ap)))
    storage.write_bytes(plot_urls[TOPK_PLOT_FILE], _png(topk_figure(curve)))
    document = {
        "provenance": None if provenance is None else provenance.model_dump(mode="json"),
        "metrics": {
            LESA_METHOD: _plain(metrics),
            **{k: _plain(v) for k, v in (baselines or {}).items()},
        },
        "pointing_game": None if pointing is None else pointing_summary(pointing),
        "rejected_images": None if rejects is None else rejects.model_dump(),
        "per_label_ap": _records(label_ap),
        "topk_curve": _records(curve),
    }
    metrics_url = f"{base}/{METRICS_FILE}"
    storage.write_json(metrics_url, document)
    markdown = report_markdown(
        metrics,
        baselines=baselines,
        label_ap=label_ap,
        pointing=pointing,
        rejects=rejects,
        provenance=provenance,
        plots={caption: name for name, caption in PLOT_CAPTIONS.items()},
    )
    report_url = f"{base}/{REPORT_FILE}"
    storage.write_bytes(report_url, markdown.encode("utf-8"))
    return ReportArtifacts(metrics_url=metrics_url, report_url=report_url, plot_urls=plot_urls)


def pointing_summary(result: PointingGameResult) -> dict[str, float | int]:
    """The pointing game's numbers without the per-pair hits (for JSON and tables)."""
    return {
        "hit_rate": result.hit_rate,
        "chance": result.chance,
        "chance_regions": result.chance_regions,
        "pairs": result.pairs,
    }


def _shown_labels(rows: pd.DataFrame, count: int) -> tuple[pd.DataFrame, str]:
    """The ``count`` best and ``count`` worst of one split (all when there are few)."""
    ranked = rows.sort_values(["ap", "label"], ascending=[False, True], ignore_index=True)
    if len(ranked) > 2 * count:
        return pd.concat([ranked.head(count), ranked.tail(count)], ignore_index=True), (
            f"best and worst {count} of {len(ranked)}"
        )
    return ranked, f"all {len(ranked)}"


def best_worst_figure(label_ap: pd.DataFrame, count: int = BAR_LABELS) -> Figure:
    """Horizontal bars of the best and worst labels by AP, one panel per split (seen, unseen).

    Labels without a test positive are left out (their AP is 0 by convention, not a failure),
    and the panel says how many; a bar whose AP equals another label's in its split is hatched
    and its name marked ``=`` (ties: its order among them is alphabetical, not a ranking).
    """
    scored = label_ap[label_ap["positives"] > 0]
    splits = [split for split in SPLIT_COLOURS if (scored["split"] == split).any()]
    if not splits:
        raise ReportError("no label has a test positive: nothing to rank by AP")
    heights = [min(len(scored[scored["split"] == s]), 2 * count) for s in splits]
    figure = Figure(figsize=(7.0 * len(splits), 0.3 * max(heights) + 1.8), layout="constrained")
    for axis, split in zip(figure.subplots(1, len(splits), squeeze=False)[0], splits, strict=True):
        rows = scored[scored["split"] == split]
        shown, which = _shown_labels(rows, count)
        tied = shown["ap"].map(rows["ap"].value_counts()).to_numpy() > 1
        positions = np.arange(len(shown))[::-1]
        bars = axis.barh(
            positions, 100 * shown["ap"].to_numpy(dtype=float), color=SPLIT_COLOURS[split]
        )
        for bar, tie in zip(bars, tied, strict=True):
            bar.set_hatch("//" if tie else None)
        names = [
            f"= {label}" if tie else str(label)
            for label, tie in zip(shown["label"], tied, strict=True)
        ]
        axis.set_yticks(positions, names)
        axis.set_xlabel("AP (%)")
        axis.set_xlim(0, 100)
        left_out = int(((label_ap["split"] == split) & (label_ap["positives"] == 0)).sum())
        note = f"; {left_out} without a test positive left out" if left_out else ""
        axis.set_title(f"{split} labels by AP: {which}{note}", fontsize="medium")
        if tied.any():
            axis.legend(
                handles=[Patch(hatch="//", fill=False, label="= tied AP")], loc="lower right"
            )
    return figure


def topk_figure(curve: pd.DataFrame) -> Figure:
    """P, R and F1 (%) against K, one panel per setting (ZSL, GZSL)."""
    settings = [s for s in ("zsl", "gzsl") if (curve["setting"] == s).any()]
    if not settings:
        raise ReportError("the P/R/F1 curve has no zsl or gzsl rows")
    figure = Figure(figsize=(5.0 * len(settings), 3.8), layout="constrained")
    axes = figure.subplots(1, len(settings), squeeze=False)[0]
    for axis, setting in zip(axes, settings, strict=True):
        rows = curve[curve["setting"] == setting].sort_values("k")
        for column, name in (("precision", "P@K"), ("recall", "R@K"), ("f1", "F1@K")):
            axis.plot(rows["k"], 100 * rows[column].to_numpy(dtype=float), marker="o", label=name)
        axis.set_title(setting.upper())
        axis.set_xlabel("K")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel("%")
        axis.set_ylim(0, 100)
        axis.legend()
    return figure


def _summary_table(methods: Mapping[str, SettingMetrics], setting: str) -> list[str]:
    names: list[str] = []
    for values in methods.values():
        names.extend(name for name in values.get(setting, {}) if name not in names)
    lines = [
        "| method | " + " | ".join(f"{name} (%)" for name in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for method, values in methods.items():
        row = values.get(setting, {})
        cells = [_percent(row[name]) if name in row else "-" for name in names]
        lines.append(f"| {_cell(method)} | " + " | ".join(cells) + " |")
    return lines


def _ratio_lines(metrics: SettingMetrics, baselines: Mapping[str, SettingMetrics]) -> list[str]:
    lines = []
    for name, values in baselines.items():
        parts = []
        for setting in ("zsl", "gzsl"):
            ours = metrics.get(setting, {}).get("mAP")
            theirs = values.get(setting, {}).get("mAP")
            if ours is None or theirs is None:
                continue
            ratio = f"{ours / theirs:.2f}x" if theirs > 0 else "n/a (baseline mAP is 0)"
            parts.append(f"{setting.upper()} mAP {ratio}")
        if parts:
            lines.append(f"- LESA / {name}: " + ", ".join(parts))
    return lines


def _pointing_lines(result: PointingGameResult) -> list[str]:
    return [
        "Share of (image, present label) pairs whose selected attention peaks inside the "
        "label's box.",
        "",
        "| pairs | hit rate (%) | chance: box area (%) | chance: random region (%) |",
        "|---:|---:|---:|---:|",
        f"| {result.pairs} | {_percent(result.hit_rate)} | {_percent(result.chance)} | "
        f"{_percent(result.chance_regions)} |",
    ]


def _label_ap_lines(label_ap: pd.DataFrame) -> list[str]:
    lines = []
    for split in ("unseen", "seen"):
        rows = label_ap[label_ap["split"] == split].sort_values("ap", ascending=False)
        if rows.empty:
            continue
        mean_ap = _percent(rows["ap"].mean())
        lines += [
            f"### {split.capitalize()} labels ({len(rows)}, mean AP {mean_ap}%)",
            "",
            "| label | AP (%) | positive images |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {_cell(row.label)} | {_percent(row.ap)} | {int(row.positives)} |"
            for row in rows.itertuples(index=False)
        ]
        lines.append("")
    return lines


def _cell(text: object) -> str:
    """Text safe inside a Markdown table cell (a label may contain a pipe)."""
    return str(text).replace("|", "\\|")


def _percent(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _plain(metrics: SettingMetrics) -> dict[str, dict[str, float]]:
    return {
        setting: {k: float(v) for k, v in values.items()} for setting, values in metrics.items()
    }


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts (NumPy scalars and pandas strings become plain Python)."""
    return [
        {
            key: (value.item() if isinstance(value, np.generic) else value)
            for key, value in row.items()
        }
        for row in frame.astype(object).to_dict(orient="records")
    ]


def _check_setting_metrics(name: str, metrics: SettingMetrics) -> None:
    missing = [s for s in ("zsl", "gzsl") if s not in metrics]
    if missing:
        raise ReportError(f"metrics of {name!r} lack the setting(s) {missing}")


def _check_scores(
    scores: np.ndarray, labels: np.ndarray, seen: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float32)
    labels = np.asarray(labels)
    seen = np.asarray(seen, dtype=bool)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ReportError(f"scores {scores.shape} and labels {labels.shape} must be equal (N, C)")
    if seen.shape != (scores.shape[1],):
        raise ReportError(f"seen mask must have shape ({scores.shape[1]},), got {seen.shape}")
    return scores, labels, seen
