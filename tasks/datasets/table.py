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
yes/no or seen/unseen), ``tokens`` (optional: the words used to embed the label, default the
label's own words) and ``description`` (optional: more text about the label, phrases separated by
``;``, embedded with ``embeddings.text: label+description``).
"""

from __future__ import annotations

import io
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from lesa_common import StrictModel
from tasks import schemas
from tasks.datasets.base import (
    DatasetArtifacts,
    DatasetError,
    DatasetName,
    absolute_url,
    label_tokens,
    load_prepared,
    write_dataset,
)
from tasks.storage import Storage
from tasks.versions import RecordingStorage

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


def read_user_table(
    storage: Storage, url: str, fmt: str, what: str
) -> tuple[pd.DataFrame, schemas.SourceFile]:
    """Read a CSV (every cell as text) or parquet file, with a clear error if missing/broken.

    Blank CSV lines are dropped but keep their place in the index, so the index stays the
    0-based data row and errors can name the line a person sees in an editor (the returned
    :class:`~tasks.schemas.SourceFile`).
    """
    if not storage.exists(url):
        raise DatasetError(f"missing {what}: {url} does not exist")
    kind = fmt if fmt != "auto" else ("parquet" if url.endswith((".parquet", ".pq")) else "csv")
    try:
        if kind == "parquet":
            return storage.read_parquet(url), schemas.SourceFile(url)
        frame = pd.read_csv(
            io.BytesIO(storage.read_bytes(url)),
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
        ).rename(columns=str.strip)
    except (ValueError, OSError, pd.errors.ParserError) as error:
        raise DatasetError(f"{what} {url} is not a readable {kind} file: {error}") from error
    blank = (frame.apply(lambda column: column.str.strip()) == "").all(axis=1)
    return frame[~blank], schemas.SourceFile(url, header_lines=1)


def _rows(source: schemas.SourceFile, mask: pd.Series) -> str:
    """The first few rows where ``mask`` holds, as the file counts them (``line 3, line 7``)."""
    return ", ".join(source.row(index) for index in mask.index[mask.to_numpy()][:5])


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


def _parse_flags(series: pd.Series, column: str, source: schemas.SourceFile) -> pd.Series:
    if series.dtype == bool:
        return series
    text = series.map(lambda value: str(value).strip().lower())
    bad = ~text.isin(_TRUE | _FALSE)
    if bad.any():
        examples = series[bad].head(3).tolist()
        raise DatasetError(
            f"{source.url}: column {column!r} has values that are not true/false: {examples} "
            f"at {_rows(source, bad)}"
        )
    return text.isin(_TRUE)


def _text(series: pd.Series) -> pd.Series:
    """Cells as stripped text, a null (parquet ``None``/NaN) as the empty string."""
    return series.map(lambda value: "" if pd.isna(value) else str(value).strip())


def parse_vocabulary(frame: pd.DataFrame, source: schemas.SourceFile) -> pd.DataFrame:
    """User vocabulary -> Vocabulary table (index kept: the file's data rows).

    Empty or null ``tokens`` (a blank CSV cell, a parquet null) default to the label's words; an
    empty or null label, or no label at all, is an error naming the file (and the lines).
    """
    url = source.url
    _require_columns(frame, {"label", "seen"}, url, "vocabulary")
    if frame.empty:
        raise DatasetError(f"vocabulary {url} lists no labels")
    labels = _text(frame["label"])
    empty = labels == ""
    if empty.any():
        raise DatasetError(f"vocabulary {url}: empty or null label at {_rows(source, empty)}")
    tokens = _text(frame["tokens"]) if "tokens" in frame.columns else labels.map(lambda _: "")
    columns = {
        "label": labels,
        "seen": _parse_flags(frame["seen"], "seen", source).astype(bool),
        "tokens": [tok or label_tokens(lab) for tok, lab in zip(tokens, labels, strict=True)],
    }
    if "description" in frame.columns:
        columns["description"] = _text(frame["description"])
    return pd.DataFrame(columns, index=frame.index)


def parse_label_table(
    frame: pd.DataFrame, source: schemas.SourceFile, config: TableConfig
) -> pd.DataFrame:
    """User label table -> LabelTable rows (index kept; checked against the vocabulary later)."""
    url = source.url
    _require_columns(frame, {"uri", "split", "positives"}, url, "label table")
    if frame.empty:
        raise DatasetError(f"label table {url} lists no images")
    uris = _text(frame["uri"])
    if (uris == "").any():
        raise DatasetError(f"label table {url}: empty uri at {_rows(source, uris == '')}")
    image_ids = (
        _text(frame["image_id"])
        if "image_id" in frame.columns
        else uris.str.replace(r"\.[^./]+$", "", regex=True)
    )
    duplicated = image_ids.duplicated(keep=False)
    if duplicated.any():
        examples = sorted(set(image_ids[duplicated]))[:5]
        raise DatasetError(
            f"label table {url}: duplicate image ids {examples} at {_rows(source, duplicated)}"
        )
    negatives = (
        frame["negatives"] if "negatives" in frame.columns else pd.Series(None, index=frame.index)
    )
    complete = (
        _parse_flags(frame["complete"], "complete", source)
        if "complete" in frame.columns
        else pd.Series(config.complete, index=frame.index)
    )
    return pd.DataFrame(
        {
            "image_id": image_ids,
            "uri": uris,
            "split": _text(frame["split"]).str.lower(),
            "positives": pd.Series(
                [_split_labels(v, config.separator) for v in frame["positives"]],
                index=frame.index,
                dtype=object,
            ),
            "negatives": pd.Series(
                [_split_labels(v, config.separator) for v in negatives],
                index=frame.index,
                dtype=object,
            ),
            "complete": complete.astype(bool),
        },
        index=frame.index,
    )


def _parent(url: str) -> str:
    """The folder holding ``url`` (absolute for local paths)."""
    return absolute_url(url).rsplit("/", 1)[0]


def prepare_table(config: TableConfig, storage: Storage) -> DatasetArtifacts:
    """Read, check and write the user's tables (skipped when prepared from the same files).

    Both files are read through a :class:`~tasks.versions.RecordingStorage`, so their versions
    are the dataset's version: rewriting either in place rebuilds it.
    """
    prepared = load_prepared(storage, config.name, config)
    if prepared is not None:
        return prepared
    reads = RecordingStorage(storage)
    frame, vocabulary_source = read_user_table(
        reads, config.vocabulary, config.format, "vocabulary"
    )
    vocabulary = schemas.validate(
        parse_vocabulary(frame, vocabulary_source),
        schemas.Vocabulary,
        stage="dataset",
        source=vocabulary_source,
    )
    frame, labels_source = read_user_table(reads, config.labels, config.format, "label table")
    labels = schemas.validate(
        parse_label_table(frame, labels_source, config),
        schemas.LabelTable,
        stage="dataset",
        vocabulary=vocabulary,
        source=labels_source,
    )
    return write_dataset(
        storage,
        config,
        name=config.name,
        labels=labels.reset_index(drop=True),
        vocabulary=vocabulary.reset_index(drop=True),
        images_prefix=absolute_url(config.images_prefix or _parent(config.labels)),
        inputs=reads.inputs,
    )
