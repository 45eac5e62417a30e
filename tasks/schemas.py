"""The pipeline's tables as pandera models, validated at every stage boundary.

Each table has exactly one definition here (see docs/ARCHITECTURE.md, "Tables"); loaders,
feature extraction, training and evaluation import these models instead of re-describing
columns. :func:`validate` runs lazily so one failure report lists every broken rule, and its
:class:`SchemaError` names the stage, the column, the rule and example rows, so a bad input
stops the run before any later stage starts.

When the table was read from a file (:class:`SourceFile`), the message names the file and counts
rows the way a person finds them in it, from 1: in a text file with a header line (CSV), data
row 1 is **line 2**; in a file without lines (parquet) it is **row 1**.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from tasks.storage import Storage

SPLITS: tuple[str, ...] = ("train", "val", "test")
FEATURE_DTYPES: tuple[str, ...] = ("float16", "float32")
POSITIVE, NEGATIVE, UNKNOWN = 1, -1, 0
_NORM_TOLERANCE = 1e-3
_SHA256_PATTERN = r"^[0-9a-f]{64}$"
_EXAMPLES = 3
_DISJOINT = "positives and negatives are disjoint"
_ORDERED = "x0 < x1 and y0 < y1"
_TABLE_CHECK_COLUMNS: dict[str, tuple[str, ...]] = {
    _DISJOINT: ("positives", "negatives"),
    _ORDERED: ("x0", "y0", "x1", "y1"),
}


class SchemaError(ValueError):
    """A table broke its schema; the message names stage, column, rule and example rows."""

    def __init__(self, message: str, *, stage: str, failures: pd.DataFrame) -> None:
        super().__init__(message)
        self.stage = stage
        self.failures = failures


@dataclass(frozen=True)
class SourceFile:
    """The file a table was read from, so errors name it and its rows as a person counts them.

    ``header_lines`` is the number of lines before the first data row of a text file (1 for a
    CSV with a header line, 0 without one); ``None`` means a file without lines (parquet), whose
    rows are numbered from 1. The table's index must be the 0-based position of the row among
    the file's data rows (a ``RangeIndex`` as pandas reads it).
    """

    url: str
    header_lines: int | None = None

    def row(self, index: Any) -> str:
        """``line 7`` / ``row 6`` for the 0-based data row ``index``."""
        if not isinstance(index, int | np.integer):
            return f"row {index!r}"
        if self.header_lines is None:
            return f"row {int(index) + 1}"
        return f"line {int(index) + 1 + self.header_lines}"


def _index_label(index: Any) -> str:
    return f"row {index!r}"


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1)


def _is_str_list(value: Any) -> bool:
    return _is_sequence(value) and all(isinstance(item, str) and item for item in value)


def _is_finite_vector(value: Any) -> bool:
    if not _is_sequence(value) or len(value) == 0:
        return False
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return array.ndim == 1 and bool(np.isfinite(array).all())


class LabelTable(pa.DataFrameModel):
    """One row per image: where it is, which split, and its positive/negative labels.

    The annotation of label c is +1 if c is in ``positives``, -1 if in ``negatives``, else -1
    for a ``complete`` image (all absent labels verified) and 0 (unknown) otherwise.
    """

    image_id: Series[str] = pa.Field(unique=True, str_length={"min_value": 1})
    uri: Series[str] = pa.Field(str_length={"min_value": 1})
    split: Series[str] = pa.Field(isin=list(SPLITS))
    positives: Series[object]
    negatives: Series[object]
    complete: Series[bool]

    @pa.check("positives", "negatives", name="list of non-empty label strings")
    @classmethod
    def _label_lists(cls, series: pd.Series) -> pd.Series:
        return series.map(_is_str_list).astype(bool)

    @pa.dataframe_check(name=_DISJOINT)
    @classmethod
    def _disjoint(cls, frame: pd.DataFrame) -> pd.Series:
        def ok(pos: Any, neg: Any) -> bool:
            if not (_is_sequence(pos) and _is_sequence(neg)):
                return True
            return not set(pos) & set(neg)

        return pd.Series(
            [ok(p, n) for p, n in zip(frame["positives"], frame["negatives"], strict=True)],
            index=frame.index,
            dtype=bool,
        )


class Vocabulary(pa.DataFrameModel):
    """The label set: each label, whether it is seen in training, and the words that embed it.

    ``description`` (optional) is more text about the label, as phrases separated by ``;`` (the
    emoji's Unicode name and its family, a gloss): embedded only with ``embeddings.text:
    label+description``.
    """

    label: Series[str] = pa.Field(unique=True, str_length={"min_value": 1})
    seen: Series[bool]
    tokens: Series[str] = pa.Field(str_matches=r"\S")
    description: Series[str] | None = pa.Field(nullable=True)


class LabelEmbeddings(pa.DataFrameModel):
    """Label -> word vector (finite, one dimension for all labels, unit L2 norm)."""

    label: Series[str] = pa.Field(unique=True, str_length={"min_value": 1})
    vector: Series[object]

    @pa.check("vector", name="non-empty list of finite floats")
    @classmethod
    def _finite(cls, series: pd.Series) -> pd.Series:
        return series.map(_is_finite_vector).astype(bool)

    @pa.check("vector", name="same dimension for all labels")
    @classmethod
    def _fixed_dim(cls, series: pd.Series) -> pd.Series:
        lengths = series.map(lambda v: len(v) if _is_sequence(v) else -1)
        if lengths.empty:
            return pd.Series([], dtype=bool)
        return lengths == lengths.mode().iloc[0]

    @pa.check("vector", name=f"L2 norm 1 (tolerance {_NORM_TOLERANCE})")
    @classmethod
    def _unit_norm(cls, series: pd.Series) -> pd.Series:
        def unit(value: Any) -> bool:
            if not _is_finite_vector(value):
                return True
            return abs(float(np.linalg.norm(np.asarray(value, dtype=np.float64))) - 1.0) <= (
                _NORM_TOLERANCE
            )

        return series.map(unit).astype(bool)


class ObjectBoxes(pa.DataFrameModel):
    """Where each labelled object is in its image, in pixels (for attention localisation)."""

    image_id: Series[str] = pa.Field(str_length={"min_value": 1})
    label: Series[str] = pa.Field(str_length={"min_value": 1})
    x0: Series[float] = pa.Field(ge=0, coerce=True)
    y0: Series[float] = pa.Field(ge=0, coerce=True)
    x1: Series[float] = pa.Field(ge=0, coerce=True)
    y1: Series[float] = pa.Field(ge=0, coerce=True)

    @pa.dataframe_check(name=_ORDERED)
    @classmethod
    def _ordered(cls, frame: pd.DataFrame) -> pd.Series:
        return (frame["x0"] < frame["x1"]) & (frame["y0"] < frame["y1"])


class FeatureManifest(pa.DataFrameModel):
    """The committed HDF5 feature shards; a shard not listed here does not exist."""

    shard_index: Series[int] = pa.Field(ge=0, unique=True, coerce=True)
    shard_uri: Series[str] = pa.Field(unique=True, str_length={"min_value": 1})
    num_images: Series[int] = pa.Field(ge=0, coerce=True)
    backbone: Series[str] = pa.Field(str_length={"min_value": 1})
    preprocessing: Series[str]
    regions: Series[int] = pa.Field(gt=0, coerce=True)
    dim: Series[int] = pa.Field(gt=0, coerce=True)
    dtype: Series[str] = pa.Field(isin=list(FEATURE_DTYPES))
    sha256: Series[str] = pa.Field(str_matches=_SHA256_PATTERN)
    size_bytes: Series[int] = pa.Field(gt=0, coerce=True)
    ids_sha256: Series[str] = pa.Field(str_matches=_SHA256_PATTERN)
    images_sha256: Series[str] | None = pa.Field(str_matches=_SHA256_PATTERN)
    """Digest of the shard's images' stamps (missing in manifests written before it existed:
    such shards are recomputed)."""


class Rejects(pa.DataFrameModel):
    """Images a stage refused, and why (kept so nothing is lost silently)."""

    image_id: Series[str]
    uri: Series[str]
    stage: Series[str] = pa.Field(str_length={"min_value": 1})
    reason: Series[str] = pa.Field(str_length={"min_value": 1})


def _describe_failures(
    failures: pd.DataFrame, row: Callable[[Any], str] = _index_label
) -> list[str]:
    """One line per (column, rule) with a count and a few example rows (``row`` names one).

    Table-level checks report one failure per column of the row; they are folded back into one
    line naming the columns the rule is about.
    """
    lines = []
    whole = failures["index"].isna()
    for column, check, case in failures[whole][["column", "check", "failure_case"]].itertuples(
        index=False
    ):
        if check == "column_in_dataframe":
            lines.append(f"  column {case!r}, rule 'column_in_dataframe': the column is missing")
        else:
            where = _TABLE_CHECK_COLUMNS.get(str(check), (column,))
            names = ", ".join(repr(c) for c in where)
            lines.append(f"  column(s) {names}, rule {check!r}: could not be checked ({case})")
    failures = failures[~whole]
    table_level = failures["schema_context"].astype(str) == "DataFrameSchema"
    for check, group in failures[table_level].groupby("check", sort=False):
        columns = _TABLE_CHECK_COLUMNS.get(str(check), ())
        relevant = group[group["column"].isin(columns)] if columns else group
        rows = relevant.groupby("index", sort=False)
        examples = ", ".join(
            f"{row(index)}: {dict(zip(cases['column'], cases['failure_case'], strict=True))}"
            for index, cases in itertools.islice(rows, _EXAMPLES)
        )
        names = ", ".join(repr(c) for c in columns) or "<table>"
        lines.append(f"  columns {names}, rule {check!r}: {rows.ngroups} row(s), e.g. {examples}")
    column_level = failures[~table_level]
    keys = [column_level["column"].astype(object).fillna("<table>"), column_level["check"]]
    for (column, check), group in column_level.groupby(keys, sort=False):
        examples = ", ".join(
            f"{row(index)}: {case!r}"
            for index, case in zip(
                group["index"].head(_EXAMPLES), group["failure_case"].head(_EXAMPLES), strict=True
            )
        )
        count = len(group)
        lines.append(f"  column {column!r}, rule {check!r}: {count} failure(s), e.g. {examples}")
    return lines


def _heading(stage: str, model: type[pa.DataFrameModel], source: SourceFile | None) -> str:
    where = f" {source.url}" if source is not None else ""
    return f"{stage}: {model.__name__} table{where} is invalid:"


def validate(
    frame: pd.DataFrame,
    model: type[pa.DataFrameModel],
    *,
    stage: str,
    vocabulary: pd.DataFrame | None = None,
    source: SourceFile | str | None = None,
) -> pd.DataFrame:
    """Validate ``frame`` against ``model`` (lazily) and return the validated (coerced) frame.

    With ``vocabulary``, every label listed in a :class:`LabelTable` must be a vocabulary label.
    With ``source`` (a :class:`SourceFile`, or the URL of a parquet file), the message names that
    file and its rows counted from 1. Raises :class:`SchemaError` naming ``stage``, the columns,
    rules and example rows.
    """
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{stage}: expected a pandas DataFrame, got {type(frame).__name__}")
    if isinstance(source, str):
        source = SourceFile(source)
    row = source.row if source is not None else _index_label
    try:
        validated = model.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as error:
        failures = error.failure_cases
        message = "\n".join([_heading(stage, model, source), *_describe_failures(failures, row)])
        raise SchemaError(message, stage=stage, failures=failures) from None
    if vocabulary is not None:
        if model is not LabelTable:
            raise ValueError(f"{stage}: a vocabulary can only be checked against a LabelTable")
        _check_in_vocabulary(validated, vocabulary, stage=stage, source=source)
    return validated


def read_validated(
    storage: Storage,
    url: str,
    model: type[pa.DataFrameModel],
    *,
    stage: str,
    vocabulary: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Read the parquet table at ``url`` and :func:`validate` it, naming ``url`` in any error."""
    return validate(
        storage.read_parquet(url), model, stage=stage, vocabulary=vocabulary, source=url
    )


def _check_in_vocabulary(
    table: pd.DataFrame, vocabulary: pd.DataFrame, *, stage: str, source: SourceFile | None
) -> None:
    known = pd.Index(vocabulary["label"])
    rows = []
    for column in ("positives", "negatives"):
        exploded = table[column].explode().dropna()
        unknown = exploded[~exploded.isin(known)]
        rows.extend(
            {
                "schema_context": "Column",
                "column": column,
                "check": "label in vocabulary",
                "failure_case": label,
                "index": index,
            }
            for index, label in unknown.items()
        )
    if rows:
        failures = pd.DataFrame(rows)
        row = source.row if source is not None else _index_label
        message = "\n".join(
            [_heading(stage, LabelTable, source), *_describe_failures(failures, row)]
        )
        raise SchemaError(message, stage=stage, failures=failures)


def label_matrix(table: pd.DataFrame, labels: Sequence[str]) -> np.ndarray:
    """The (N, C) int8 annotation matrix in {1, -1, 0} of ``table`` for ``labels``, in order.

    Listed labels that are not in ``labels`` are ignored, so the same table yields the seen-only
    training matrix, the unseen-only ZSL matrix or the full GZSL matrix.
    """
    columns = pd.Index(list(labels))
    if columns.has_duplicates:
        duplicates = sorted(set(columns[columns.duplicated()]))
        raise ValueError(f"label_matrix: duplicate labels {duplicates[:_EXAMPLES]}")
    complete = table["complete"].to_numpy(dtype=bool)
    matrix = np.zeros((len(table), len(columns)), dtype=np.int8)
    matrix[complete] = NEGATIVE
    for column, value in (("negatives", NEGATIVE), ("positives", POSITIVE)):
        lists = table[column].tolist()
        lengths = np.fromiter((len(item) for item in lists), dtype=np.int64, count=len(lists))
        flat = list(itertools.chain.from_iterable(lists))
        rows = np.repeat(np.arange(len(lists)), lengths)
        cols = columns.get_indexer(flat) if flat else np.empty(0, dtype=np.intp)
        keep = cols >= 0
        matrix[rows[keep], cols[keep]] = value
    return matrix


def empty(model: type[pa.DataFrameModel]) -> pd.DataFrame:
    """A zero-row frame with ``model``'s columns and dtypes (e.g. "no rejects")."""
    columns = model.to_schema().columns
    return pd.DataFrame(
        {name: pd.Series([], dtype=column.dtype.type) for name, column in columns.items()}
    )
