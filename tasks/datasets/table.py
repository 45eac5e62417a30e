"""The user's own data: a label table file plus a vocabulary file, in CSV or parquet.

Label table columns (one row per image):

- ``uri`` (required): absolute URL/path, or a path relative to ``images_prefix``
  (default: the folder holding the label table file);
- ``split`` (required): ``train``, ``val`` or ``test``;
- ``positives`` (required): labels present in the image;
- ``negatives`` (optional): labels verified absent;
- ``image_id`` (optional, default: ``uri`` without its extension), unique;
- ``complete`` (optional, default ``TableConfig.complete``): true when every label not listed
  as positive is absent (NUS-WIDE style); false when only the listed labels are known.

In CSV, label lists are one string separated by ``separator`` (default ``|``), e.g.
``cat|sofa``, empty for none. In parquet they may be such strings or list columns.

Vocabulary columns: ``label`` (required, unique), ``seen`` (required: true/false, 1/0,
yes/no or seen/unseen) and ``tokens`` (optional: the words used to embed the label, default the
label's own words).
"""

from __future__ import annotations

import io
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from lesa_model.config import StrictModel
from tasks.datasets.base import (
    DatasetArtifacts,
    DatasetError,
    DatasetName,
    absolute_url,
    input_checksums,
    label_tokens,
    load_prepared,
    write_dataset,
)
from tasks.storage import Storage

_TRUE = frozenset({"true", "1", "yes", "y", "t", "seen"})
_FALSE = frozenset({"false", "0", "no", "n", "f", "unseen", ""})


class TableConfig(StrictModel):
    """Where the user's label table and vocabulary are, and how to read them."""

    source: Literal["table"] = "table"
    name: DatasetName = "table"
    labels: str = Field(description="label table, .csv or .parquet (local, file:// or s3://)")
    vocabulary: str = Field(description="vocabulary, .csv or .parquet")
    images_prefix: str | None = Field(
        None, description="prefix for relative uris; default: the label table's folder"
    )
    separator: str = Field("|", min_length=1, description="separator of labels inside a cell")
    complete: bool = Field(True, description="default for images without a `complete` value")
    format: Literal["auto", "csv", "parquet"] = "auto"


def read_user_table(storage: Storage, url: str, fmt: str, what: str) -> pd.DataFrame:
    """Read a CSV (every cell as text) or parquet file, with a clear error if missing/broken."""
    if not storage.exists(url):
        raise DatasetError(f"missing {what}: {url} does not exist")
    kind = fmt if fmt != "auto" else ("parquet" if url.endswith((".parquet", ".pq")) else "csv")
    try:
        if kind == "parquet":
            return storage.read_parquet(url)
        return pd.read_csv(
            io.BytesIO(storage.read_bytes(url)), dtype=str, keep_default_na=False
        ).rename(columns=str.strip)
    except (ValueError, OSError, pd.errors.ParserError) as error:
        raise DatasetError(f"{what} {url} is not a readable {kind} file: {error}") from error


def _require_columns(frame: pd.DataFrame, required: set[str], url: str, what: str) -> None:
    missing = sorted(required - set(frame.columns))
    if missing:
        raise DatasetError(
            f"{what} {url} lacks column(s) {missing}; it has {sorted(map(str, frame.columns))}"
        )


def _split_labels(value: Any, separator: str) -> list[str]:
    if isinstance(value, list | tuple | np.ndarray):
        items = [str(item) for item in value]
    elif value is None or (isinstance(value, float) and np.isnan(value)):
        items = []
    else:
        items = str(value).split(separator)
    return [item.strip() for item in items if item.strip()]


def _parse_flags(series: pd.Series, column: str, url: str) -> pd.Series:
    if series.dtype == bool:
        return series
    text = series.map(lambda value: str(value).strip().lower())
    bad = ~text.isin(_TRUE | _FALSE)
    if bad.any():
        examples = series[bad].head(3).tolist()
        raise DatasetError(
            f"{url}: column {column!r} has values that are not true/false: {examples}"
        )
    return text.isin(_TRUE)


def parse_vocabulary(frame: pd.DataFrame, url: str) -> pd.DataFrame:
    """User vocabulary -> Vocabulary table.

    Empty or null ``tokens`` (a blank CSV cell, a parquet null) default to the label's words.
    """
    _require_columns(frame, {"label", "seen"}, url, "vocabulary")
    labels = frame["label"].astype(str).str.strip()
    tokens = (
        frame["tokens"].fillna("").astype(str).str.strip()
        if "tokens" in frame.columns
        else pd.Series("", index=frame.index)
    )
    return pd.DataFrame(
        {
            "label": labels,
            "seen": _parse_flags(frame["seen"], "seen", url).astype(bool),
            "tokens": [tok or label_tokens(lab) for tok, lab in zip(tokens, labels, strict=True)],
        }
    ).reset_index(drop=True)


def parse_label_table(frame: pd.DataFrame, url: str, config: TableConfig) -> pd.DataFrame:
    """User label table -> LabelTable rows (validation against the vocabulary happens later)."""
    _require_columns(frame, {"uri", "split", "positives"}, url, "label table")
    uris = frame["uri"].astype(str).str.strip()
    if (uris == "").any():
        rows = np.flatnonzero(uris == "")[:5].tolist()
        raise DatasetError(f"label table {url}: empty uri at row(s) {rows}")
    image_ids = (
        frame["image_id"].astype(str).str.strip()
        if "image_id" in frame.columns
        else uris.str.replace(r"\.[^./]+$", "", regex=True)
    )
    duplicated = image_ids.duplicated(keep=False)
    if duplicated.any():
        examples = sorted(set(image_ids[duplicated]))[:5]
        raise DatasetError(f"label table {url}: duplicate image ids {examples}")
    negatives = (
        frame["negatives"] if "negatives" in frame.columns else pd.Series(None, index=frame.index)
    )
    complete = (
        _parse_flags(frame["complete"], "complete", url)
        if "complete" in frame.columns
        else pd.Series(config.complete, index=frame.index)
    )
    return pd.DataFrame(
        {
            "image_id": image_ids,
            "uri": uris,
            "split": frame["split"].astype(str).str.strip().str.lower(),
            "positives": pd.Series(
                [_split_labels(v, config.separator) for v in frame["positives"]], dtype=object
            ).to_numpy(),
            "negatives": pd.Series(
                [_split_labels(v, config.separator) for v in negatives], dtype=object
            ).to_numpy(),
            "complete": complete.astype(bool).to_numpy(),
        }
    ).reset_index(drop=True)


def _parent(url: str) -> str:
    """The folder holding ``url`` (absolute for local paths)."""
    return absolute_url(url).rsplit("/", 1)[0]


def prepare_table(config: TableConfig, storage: Storage) -> DatasetArtifacts:
    """Read, check and write the user's tables (skipped when prepared from the same files)."""
    inputs = input_checksums(
        storage, {"label table": config.labels, "vocabulary": config.vocabulary}
    )
    prepared = load_prepared(storage, config.name, config, inputs)
    if prepared is not None:
        return prepared
    vocabulary = parse_vocabulary(
        read_user_table(storage, config.vocabulary, config.format, "vocabulary"),
        config.vocabulary,
    )
    labels = parse_label_table(
        read_user_table(storage, config.labels, config.format, "label table"),
        config.labels,
        config,
    )
    return write_dataset(
        storage,
        config,
        name=config.name,
        labels=labels,
        vocabulary=vocabulary,
        images_prefix=absolute_url(config.images_prefix or _parent(config.labels)),
        inputs=inputs,
    )
