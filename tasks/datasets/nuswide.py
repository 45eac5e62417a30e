"""NUS-WIDE from its official metadata files, with the paper's 925 seen / 81 unseen split.

Expected layout under ``metadata`` (a local folder or an ``s3://`` prefix), as distributed by
NUS LMS::

    ImageList/Imagelist.txt, TrainImagelist.txt, TestImagelist.txt   (backslash paths)
    NUS_WID_Tags/TagList1k.txt                                       (1,000 tags)
    NUS_WID_Tags/AllTags1k.txt    (rows = Imagelist.txt, 0/1 + tab per tag, trailing tab)
      or NUS_WID_Tags/Train_Tags1k.dat + Test_Tags1k.dat (rows = the train / test lists)
    ConceptsList/Concepts81.txt                                      (81 concepts)
    Groundtruth/AllLabels/Labels_<concept>.txt  (rows = Imagelist.txt)
      or Groundtruth/TrainTestLabels/Labels_<concept>_Test.txt (rows = TestImagelist.txt)
    NUS-WIDE-urls.txt             (only needed to download images)

Each of the four folders may also be given as the zip NUS LMS distributes (``ImageList.zip``,
``NUS_WID_Tags.zip``, ``ConceptsList.zip``, ``Groundtruth.zip``); it is unpacked safely into
the storage cache.

Seen labels are the 1,000 tags minus those that are also concepts (925); unseen labels are the
81 concepts, annotated by humans. Train (and validation) images carry their seen tags and are
``complete`` (an absent seen tag is a negative); test images carry seen tags and concepts, also
complete. Validation is the first ``num_val`` images of the train list (the authors' release
uses 5,000).
"""

from __future__ import annotations

import io
import itertools
import logging
import re
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial
from typing import BinaryIO, Literal

import numpy as np
import pandas as pd
from pydantic import Field
from tqdm.auto import tqdm

from lesa_common import StrictModel
from tasks import schemas
from tasks.datasets.base import (
    IMAGES_DIR,
    DatasetArtifacts,
    DatasetError,
    DatasetName,
    absolute_url,
    dataset_url,
    join_url,
    label_tokens,
    load_prepared,
    read_text,
    write_dataset,
)
from tasks.download import (
    PLACEHOLDER_REASON,
    DownloadConfig,
    DownloadItem,
    DownloadResult,
    UnsafeArchiveError,
    download_many,
    unpacked_archive,
)
from tasks.images import FLICKR_PLACEHOLDER_SHA256, MIN_DOWNLOAD_BYTES, check_download
from tasks.storage import Storage
from tasks.versions import ABSENT, RecordingStorage, content_sha256, digest, stamp_size, stamps

logger = logging.getLogger(__name__)

IMAGE_LIST = "ImageList/Imagelist.txt"
TRAIN_LIST = "ImageList/TrainImagelist.txt"
TEST_LIST = "ImageList/TestImagelist.txt"
TAG_LIST = "NUS_WID_Tags/TagList1k.txt"
ALL_TAGS = "NUS_WID_Tags/AllTags1k.txt"
TRAIN_TAGS = "NUS_WID_Tags/Train_Tags1k.dat"
TEST_TAGS = "NUS_WID_Tags/Test_Tags1k.dat"
CONCEPT_LIST = "ConceptsList/Concepts81.txt"
ALL_LABELS = "Groundtruth/AllLabels/Labels_{concept}.txt"
TEST_LABELS = "Groundtruth/TrainTestLabels/Labels_{concept}_Test.txt"
URL_LIST = "NUS-WIDE-urls.txt"
ARCHIVED_FOLDERS = ("ImageList", "NUS_WID_Tags", "ConceptsList", "Groundtruth")

UrlSize = Literal["large", "middle", "small", "original"]
_URL_COLUMNS = ("path", "photo_id", "large", "middle", "small", "original")
_ROW_CHUNK = 16_384
_IMAGE_CHECK_STAGE = "images"


class NusWideConfig(StrictModel):
    """Where the NUS-WIDE files are and how to get its images."""

    source: Literal["nus-wide"] = "nus-wide"
    name: DatasetName = "nus-wide"
    metadata: str = Field(description="folder or s3:// prefix holding the official metadata")
    images: str | None = Field(
        None,
        description="folder or prefix holding <category>/<file>.jpg (NUS-WIDE's Flickr/ folder);"
        " None downloads the images from the URL list into datasets/<name>/images/",
    )
    check_images: bool = Field(
        True,
        description="with `images`: reject missing files, placeholders (placeholder_sha256) "
        "and files of <= 4000 bytes, as the authors' release does",
    )
    urls_file: str | None = Field(None, description="defaults to <metadata>/NUS-WIDE-urls.txt")
    url_sizes: list[UrlSize] = Field(
        default_factory=lambda: ["middle", "large", "original", "small"], min_length=1
    )
    placeholder_sha256: list[str] = Field(
        default_factory=lambda: sorted(FLICKR_PLACEHOLDER_SHA256),
        description="sha256 digests of Flickr's 'photo unavailable' image (rejected)",
    )
    num_val: int = Field(5000, ge=0)
    ground_truth: Literal["auto", "AllLabels", "TrainTestLabels"] = "auto"
    download: DownloadConfig = Field(default_factory=DownloadConfig)


@dataclass(frozen=True)
class NusWideMetadata:
    """The parsed metadata: image paths per split and boolean annotation matrices."""

    tags: list[str]
    concepts: list[str]
    train_paths: list[str]
    test_paths: list[str]
    train_tags: np.ndarray
    test_tags: np.ndarray
    test_concepts: np.ndarray


def relative_image_path(raw: str) -> str:
    """Normalise a listed path to ``<category>/<file>``.

    ``C:\\ImageData\\Flickr\\actor\\0001_2.jpg`` and ``actor\\0001_2.jpg`` both become
    ``actor/0001_2.jpg``.
    """
    path = raw.strip().replace("\\", "/")
    if "Flickr/" in path:
        path = path.rsplit("Flickr/", 1)[1]
    path = re.sub(r"^[A-Za-z]:", "", path)
    return path.lstrip("/")


def _image_id(path: str) -> str:
    stem, dot, suffix = path.rpartition(".")
    return stem if dot and "/" not in suffix else path


def _read_lines(storage: Storage, url: str, what: str) -> list[str]:
    """Non-empty lines of a list file; a blank line inside the list would misalign rows."""
    lines = [line.strip() for line in read_text(storage, url, what=what).splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    blank = [number for number, line in enumerate(lines, 1) if not line]
    if blank:
        raise DatasetError(f"{what} {url}: blank line(s) at {blank[:5]} inside the list")
    if not lines:
        raise DatasetError(f"{what} {url} is empty")
    return lines


def _unique_names(names: list[str], url: str, what: str) -> list[str]:
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise DatasetError(f"{what} {url}: duplicate names {duplicates[:5]}")
    return names


def _read_image_list(storage: Storage, url: str, what: str) -> list[str]:
    paths = [relative_image_path(line) for line in _read_lines(storage, url, what)]
    duplicated = pd.Index(paths).duplicated()
    if duplicated.any():
        examples = [paths[i] for i in np.flatnonzero(duplicated)[:5]]
        raise DatasetError(
            f"{what} {url}: {int(duplicated.sum())} duplicate images, e.g. {examples}"
        )
    return paths


def parse_binary_matrix(data: bytes, *, columns: int, what: str) -> np.ndarray:
    """Parse rows of 0/1 values separated by tabs or spaces into a bool (rows, columns) matrix.

    NUS-WIDE's files are fixed-width (one character per value plus a separator, AllTags1k with
    a trailing tab), which is parsed as a strided view of the raw bytes in row chunks: the full
    269,648 x 1,000 matrix takes seconds and about its own size in extra memory. Anything not
    fixed-width goes through pandas' whitespace parser.
    """
    if not data.strip():
        raise DatasetError(f"{what} is empty")
    if not data.endswith(b"\n"):
        data += b"\n"
    matrix = _parse_fixed_width(data, columns)
    return matrix if matrix is not None else _parse_delimited(data, columns, what)


def _parse_fixed_width(data: bytes, columns: int) -> np.ndarray | None:
    width = data.index(b"\n") + 1
    if len(data) % width:
        return None
    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, width)
    content = width - 1 - (width >= 2 and raw[0, width - 2] == ord("\r"))
    if content not in (2 * columns - 1, 2 * columns) or (raw[:, width - 1] != ord("\n")).any():
        return None
    matrix = np.empty((raw.shape[0], columns), dtype=bool)
    for start in range(0, raw.shape[0], _ROW_CHUNK):
        rows = raw[start : start + _ROW_CHUNK]
        values = rows[:, 0:content:2]
        separators = rows[:, 1:content:2]
        ones = values == ord("1")
        if not ((ones | (values == ord("0"))).all() and np.isin(separators, (9, 32)).all()):
            return None
        if content < width - 1 and (rows[:, content] != ord("\r")).any():
            return None
        matrix[start : start + len(rows)] = ones
    return matrix


def _parse_delimited(data: bytes, columns: int, what: str) -> np.ndarray:
    try:
        frame = pd.read_csv(io.BytesIO(data), sep=r"\s+", header=None, dtype=np.float32, engine="c")
    except (ValueError, pd.errors.ParserError) as error:
        raise DatasetError(f"{what} is malformed: {error}") from error
    if frame.shape[1] != columns:
        raise DatasetError(f"{what}: rows have {frame.shape[1]} values, expected {columns}")
    values = frame.to_numpy()
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        raise DatasetError(
            f"{what}: {int(bad.sum())} values are not 0/1 (or missing), first at row {row + 1}, "
            f"column {column + 1}"
        )
    return values == 1.0


def _stream_fixed_width(handle: BinaryIO, size: int, columns: int) -> np.ndarray | None:
    """Parse a fixed-width file block by block, so the raw bytes (~540 MB for AllTags1k) are
    never all in memory; ``None`` when the file turns out not to be fixed-width."""
    first = handle.readline()
    width = len(first)
    if not first.endswith(b"\n") or (size % width and (size + 1) % width):
        return None
    matrix = np.empty((-(-size // width), columns), dtype=bool)
    block, filled = first + handle.read((_ROW_CHUNK - 1) * width), 0
    while block:
        if not block.endswith(b"\n"):
            block += b"\n"
        part = _parse_fixed_width(block, columns)
        if part is None or filled + len(part) > len(matrix):
            return None
        matrix[filled : filled + len(part)] = part
        filled += len(part)
        block = handle.read(_ROW_CHUNK * width)
    return matrix[:filled]


def _read_matrix(storage: Storage, url: str, *, rows: int, columns: int, what: str) -> np.ndarray:
    if not storage.exists(url):
        raise DatasetError(f"missing {what}: {url} does not exist")
    with storage.open(url, "rb") as handle:
        matrix = _stream_fixed_width(handle, storage.size(url), columns)
    if matrix is None:
        matrix = parse_binary_matrix(storage.read_bytes(url), columns=columns, what=f"{what} {url}")
    if matrix.shape[0] != rows:
        raise DatasetError(
            f"row-count mismatch: {what} {url} has {matrix.shape[0]} rows but its image list has"
            f" {rows} images"
        )
    return matrix


def _positions(paths: list[str], index: pd.Index, what: str) -> np.ndarray:
    positions = index.get_indexer(paths)
    missing = positions < 0
    if missing.any():
        examples = [paths[i] for i in np.flatnonzero(missing)[:5]]
        raise DatasetError(
            f"{int(missing.sum())} images of the {what} are not in {IMAGE_LIST}, e.g. {examples}"
        )
    return positions


def metadata_resolver(storage: Storage, metadata: str) -> Callable[[str], str]:
    """Map an official relative path (``NUS_WID_Tags/AllTags1k.txt``) to a readable URL.

    NUS LMS distributes each folder as a zip (``ImageList.zip``, ``NUS_WID_Tags.zip``,
    ``ConceptsList.zip``, ``Groundtruth.zip``). A folder that is missing under ``metadata`` but
    present as ``<folder>.zip`` is unpacked once per archive version into the storage cache
    (safely: zip-slip is refused) and read from there; unpacked folders are used as they are.
    """
    roots: dict[str, str] = {}
    for folder in ARCHIVED_FOLDERS:
        archive = join_url(metadata, f"{folder}.zip")
        if storage.exists(join_url(metadata, folder)) or not storage.exists(archive):
            continue
        try:
            roots[folder] = str(unpacked_archive(storage, archive, folder))
        except UnsafeArchiveError:
            raise
        except ValueError as error:
            raise DatasetError(f"{folder}.zip: {error}") from error
    return lambda relative: join_url(roots.get(relative.split("/")[0], metadata), relative)


def _ground_truth_layout(
    storage: Storage, url: Callable[[str], str], concepts: list[str], choice: str
) -> Literal["AllLabels", "TrainTestLabels"]:
    candidates = {
        "AllLabels": url(ALL_LABELS.format(concept=concepts[0])),
        "TrainTestLabels": url(TEST_LABELS.format(concept=concepts[0])),
    }
    if choice != "auto":
        return choice  # type: ignore[return-value]
    for layout, url in candidates.items():
        if storage.exists(url):
            return layout  # type: ignore[return-value]
    raise DatasetError(
        f"missing concept ground truth: neither {candidates['AllLabels']} nor "
        f"{candidates['TrainTestLabels']} exists"
    )


def read_label_lists(storage: Storage, metadata: str) -> tuple[list[str], list[str]]:
    """The 1,000 tags of TagList1k.txt and the 81 concepts of Concepts81.txt, in file order."""
    return _read_name_lists(storage, metadata_resolver(storage, metadata))


def _read_name_lists(storage: Storage, url: Callable[[str], str]) -> tuple[list[str], list[str]]:
    tags = _unique_names(_read_lines(storage, url(TAG_LIST), "tag list"), url(TAG_LIST), "tag list")
    concepts = _unique_names(
        _read_lines(storage, url(CONCEPT_LIST), "concept list"), url(CONCEPT_LIST), "concept list"
    )
    return tags, concepts


def read_nuswide_metadata(
    storage: Storage,
    metadata: str,
    *,
    ground_truth: Literal["auto", "AllLabels", "TrainTestLabels"] = "auto",
) -> NusWideMetadata:
    """Parse and cross-check the official files (row counts, duplicates, list membership)."""
    url = metadata_resolver(storage, metadata)
    tags, concepts = _read_name_lists(storage, url)
    train_paths = _read_image_list(storage, url(TRAIN_LIST), "train image list")
    test_paths = _read_image_list(storage, url(TEST_LIST), "test image list")
    overlap = set(train_paths) & set(test_paths)
    if overlap:
        raise DatasetError(
            f"{len(overlap)} images are in both the train and the test list, e.g. "
            f"{sorted(overlap)[:5]}"
        )
    layout = _ground_truth_layout(storage, url, concepts, ground_truth)
    all_tags_present = storage.exists(url(ALL_TAGS))
    index: pd.Index | None = None
    if all_tags_present or layout == "AllLabels":
        index = pd.Index(_read_image_list(storage, url(IMAGE_LIST), "image list"))
        train_at = _positions(train_paths, index, "train list")
        test_at = _positions(test_paths, index, "test list")
    if all_tags_present:
        all_tags = _read_matrix(
            storage, url(ALL_TAGS), rows=len(index), columns=len(tags), what="tag matrix"
        )
        train_tags, test_tags = all_tags[train_at], all_tags[test_at]
        del all_tags
    else:
        train_tags = _read_matrix(
            storage, url(TRAIN_TAGS), rows=len(train_paths), columns=len(tags), what="tag matrix"
        )
        test_tags = _read_matrix(
            storage, url(TEST_TAGS), rows=len(test_paths), columns=len(tags), what="tag matrix"
        )
    test_concepts = np.empty((len(test_paths), len(concepts)), dtype=bool)
    for column, concept in enumerate(tqdm(concepts, desc="concept labels", unit="concept")):
        if layout == "AllLabels":
            labels = _read_matrix(
                storage,
                url(ALL_LABELS.format(concept=concept)),
                rows=len(index),
                columns=1,
                what="concept labels",
            )[test_at, 0]
        else:
            labels = _read_matrix(
                storage,
                url(TEST_LABELS.format(concept=concept)),
                rows=len(test_paths),
                columns=1,
                what="concept labels",
            )[:, 0]
        test_concepts[:, column] = labels
    return NusWideMetadata(
        tags=tags,
        concepts=concepts,
        train_paths=train_paths,
        test_paths=test_paths,
        train_tags=train_tags,
        test_tags=test_tags,
        test_concepts=test_concepts,
    )


def seen_tag_mask(tags: Sequence[str], concepts: Sequence[str]) -> np.ndarray:
    """True for the tags that stay seen labels: those that are not also a concept
    (compared case-insensitively; 925 of the 1,000 in the real data)."""
    concept_keys = {concept.lower() for concept in concepts}
    return np.array([tag.lower() not in concept_keys for tag in tags], dtype=bool)


def nuswide_vocabulary(tags: Sequence[str], concepts: Sequence[str]) -> pd.DataFrame:
    """Seen labels = tags that are not concepts, unseen labels = the concepts."""
    seen = [tag for tag, keep in zip(tags, seen_tag_mask(tags, concepts), strict=True) if keep]
    labels = [*seen, *concepts]
    return pd.DataFrame(
        {
            "label": labels,
            "seen": [True] * len(seen) + [False] * len(concepts),
            "tokens": [label_tokens(label) for label in labels],
        }
    )


def _label_lists(matrix: np.ndarray, names: Sequence[str]) -> list[list[str]]:
    """Row-wise lists of the names whose column is set (vectorised, no per-cell Python)."""
    rows, cols = np.nonzero(matrix)
    flat = np.asarray(names, dtype=object)[cols].tolist()
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(matrix)))]).tolist()
    return [flat[start:end] for start, end in itertools.pairwise(offsets)]


def build_nuswide_tables(
    metadata: NusWideMetadata, *, num_val: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Label table and vocabulary for the paper's zero-shot split."""
    vocabulary = nuswide_vocabulary(metadata.tags, metadata.concepts)
    seen_names = vocabulary.loc[vocabulary["seen"], "label"].tolist()
    seen_columns = np.flatnonzero(seen_tag_mask(metadata.tags, metadata.concepts))
    train_positives = _label_lists(metadata.train_tags[:, seen_columns], seen_names)
    test_positives = _label_lists(
        np.hstack([metadata.test_tags[:, seen_columns], metadata.test_concepts]),
        [*seen_names, *metadata.concepts],
    )
    paths = [*metadata.train_paths, *metadata.test_paths]
    splits = ["train"] * len(metadata.train_paths) + ["test"] * len(metadata.test_paths)
    labels = pd.DataFrame(
        {
            "image_id": [_image_id(path) for path in paths],
            "uri": paths,
            "split": splits,
            "positives": pd.Series([*train_positives, *test_positives], dtype=object),
            "negatives": pd.Series([[] for _ in paths], dtype=object),
            "complete": True,
        }
    )
    duplicated = labels["image_id"].duplicated()
    if duplicated.any():
        raise DatasetError(
            f"{int(duplicated.sum())} duplicate image ids, e.g. "
            f"{labels.loc[duplicated, 'image_id'].head().tolist()}"
        )
    return assign_validation(labels, num_val), vocabulary


def assign_validation(labels: pd.DataFrame, num_val: int) -> pd.DataFrame:
    """The first ``num_val`` images of the train list (in its order) become the val split.

    Called again after unavailable images are dropped, so validation is the first ``num_val``
    *usable* training images, as in the release (its validation set is the first 5,000 records
    of the feature file, written after tiny and placeholder images were skipped).
    """
    train_list = np.flatnonzero(labels["split"].isin(["train", "val"]).to_numpy())
    if num_val >= len(train_list):
        raise DatasetError(
            f"num_val={num_val} leaves no training images (the train list has "
            f"{len(train_list)} usable images)"
        )
    splits = labels["split"].to_numpy(dtype=object).copy()
    splits[train_list] = "train"
    splits[train_list[:num_val]] = "val"
    return labels.assign(split=splits)


def read_url_list(storage: Storage, url: str) -> pd.DataFrame:
    """NUS-WIDE-urls.txt: a header line, then path, photo id and four URLs (``null`` = none)."""
    text = read_text(storage, url, what="URL list")
    try:
        frame = pd.read_csv(
            io.StringIO(text), sep=r"\s+", skiprows=1, header=None, dtype=str, keep_default_na=False
        )
    except pd.errors.EmptyDataError as error:
        raise DatasetError(f"URL list {url} lists no images") from error
    except (ValueError, pd.errors.ParserError) as error:
        raise DatasetError(f"URL list {url} is malformed: {error}") from error
    expected = f"expected {len(_URL_COLUMNS)} (path, photo id, large, middle, small, original)"
    if frame.shape[1] != len(_URL_COLUMNS):
        raise DatasetError(f"URL list {url}: lines have {frame.shape[1]} fields, {expected}")
    short = np.flatnonzero((frame == "").any(axis=1).to_numpy())
    if len(short):
        raise DatasetError(f"URL list {url}: line {short[0] + 2} has too few fields, {expected}")
    frame.columns = list(_URL_COLUMNS)
    frame["path"] = frame["path"].map(relative_image_path)
    return frame.drop_duplicates("path", keep="first").set_index("path")


def _download_images(
    labels: pd.DataFrame,
    config: NusWideConfig,
    storage: Storage,
    reads: Storage,
    images_prefix: str,
) -> DownloadResult:
    """Fetch every listed image into ``images_prefix``; the URL list is read through ``reads``
    (it is an input of the dataset), the images go through ``storage``."""
    urls = read_url_list(reads, config.urls_file or join_url(config.metadata, URL_LIST))
    candidates = urls.reindex(labels["uri"])[config.url_sizes]
    items = [
        DownloadItem(
            key=image_id,
            urls=tuple(u for u in row if isinstance(u, str) and u.startswith(("http", "s3://"))),
            target=join_url(images_prefix, uri),
        )
        for image_id, uri, row in zip(
            labels["image_id"], labels["uri"], candidates.itertuples(index=False), strict=True
        )
    ]
    check = partial(check_download, placeholder_sha256=frozenset(config.placeholder_sha256))
    return download_many(items, storage, config.download, check=check, description="NUS-WIDE")


def images_version(urls: Sequence[str], object_stamps: Sequence[str]) -> str:
    """One version for a set of images: the digest of every (URL, stamp), in URL order."""
    return digest(f"{url}\t{st}" for url, st in sorted(zip(urls, object_stamps, strict=True)))


def check_images(
    labels: pd.DataFrame,
    urls: Sequence[str],
    object_stamps: Sequence[str],
    storage: Storage,
    *,
    placeholder_sha256: Collection[str],
) -> pd.DataFrame:
    """The authors' release rules, in its order, for every image whether local or downloaded:
    a missing file is ``missing``, bytes identical to a known placeholder are ``placeholder``
    (whatever their size), and a file of <= 4000 bytes is ``too-small-file`` (a file whose bytes
    cannot be read for the placeholder check is ``unreadable``).

    ``urls`` and ``object_stamps`` are the images of ``labels``' rows; a placeholder check reads
    each image once per version (its hash is cached by stamp, see :mod:`tasks.versions`).
    """
    digests = (
        content_sha256(storage, urls, object_stamps, description="check images")
        if placeholder_sha256
        else [None] * len(urls)
    )
    placeholders = frozenset(placeholder_sha256)

    def reason(object_stamp: str, sha256: str | None) -> str:
        if object_stamp == ABSENT:
            return "missing"
        if placeholders and sha256 is None:
            return "unreadable"
        if sha256 in placeholders:
            return PLACEHOLDER_REASON
        size = stamp_size(object_stamp)
        return "too-small-file" if size is not None and size < MIN_DOWNLOAD_BYTES else ""

    reasons = pd.Series(
        [reason(st, sha) for st, sha in zip(object_stamps, digests, strict=True)],
        index=labels.index,
    )
    rejected = reasons != ""
    return pd.DataFrame(
        {
            "image_id": labels.loc[rejected, "image_id"].to_numpy(),
            "uri": labels.loc[rejected, "uri"].to_numpy(),
            "stage": _IMAGE_CHECK_STAGE,
            "reason": reasons[rejected].to_numpy(),
        }
    )


def _images_prefix(config: NusWideConfig, storage: Storage) -> str:
    if config.images is not None:
        return absolute_url(config.images)
    return dataset_url(storage, config.name, IMAGES_DIR)


def _checks_images(config: NusWideConfig) -> bool:
    """Whether the dataset depends on the images' content (downloads are always checked)."""
    return config.images is None or config.check_images


def _current_images_version(storage: Storage, config: NusWideConfig) -> str:
    """The version of the listed images as they are now (for a rerun's reuse check)."""
    url = metadata_resolver(storage, config.metadata)
    paths = [
        *_read_image_list(storage, url(TRAIN_LIST), "train image list"),
        *_read_image_list(storage, url(TEST_LIST), "test image list"),
    ]
    prefix = _images_prefix(config, storage)
    urls = [join_url(prefix, path) for path in paths]
    return images_version(urls, stamps(storage, urls))


def _get_images(
    labels: pd.DataFrame, config: NusWideConfig, storage: Storage, reads: Storage
) -> tuple[pd.DataFrame, str | None]:
    """Download (when there is no images folder) and check the images; return the rejects and
    the version of the images checked (None when the images are not checked)."""
    prefix = _images_prefix(config, storage)
    urls = [join_url(prefix, uri) for uri in labels["uri"]]
    checked = labels
    rejects = [schemas.empty(schemas.Rejects)]
    if config.images is None:
        result = _download_images(labels, config, storage, reads, prefix)
        rejects.append(result.rejects)
        # Fresh downloads were checked on the way in; files already there are checked here.
        checked = labels[labels["image_id"].isin(result.skipped)]
    elif not config.check_images:
        return rejects[0], None
    # Stamped before the check, so a file rewritten meanwhile is seen as changed next time.
    object_stamps = stamps(storage, urls)
    at = labels.index.get_indexer(checked.index)
    rejects.append(
        check_images(
            checked,
            [urls[i] for i in at],
            [object_stamps[i] for i in at],
            storage,
            placeholder_sha256=config.placeholder_sha256,
        )
    )
    frame = pd.concat([r for r in rejects if len(r)] or rejects[:1], ignore_index=True)
    return frame.astype(str), images_version(urls, object_stamps)


def prepare_nuswide(config: NusWideConfig, storage: Storage) -> DatasetArtifacts:
    """Parse the metadata, get or check the images, and write the validated tables.

    Every metadata file is read through a :class:`~tasks.versions.RecordingStorage`, and the
    checked images are versioned by their stamps, so an edited tag or ground-truth file, a
    rejected image fixed in place or an accepted one replaced rebuilds the dataset on rerun.
    """
    prepared = load_prepared(
        storage,
        config.name,
        config,
        images_version=(
            partial(_current_images_version, storage, config) if _checks_images(config) else None
        ),
    )
    if prepared is not None:
        return prepared
    reads = RecordingStorage(storage)
    metadata = read_nuswide_metadata(reads, config.metadata, ground_truth=config.ground_truth)
    labels, vocabulary = build_nuswide_tables(metadata, num_val=config.num_val)
    del metadata
    rejects, version = _get_images(labels, config, storage, reads)
    labels = labels[~labels["image_id"].isin(rejects["image_id"])].reset_index(drop=True)
    if len(rejects) and (labels["split"] != "test").any():
        labels = assign_validation(labels, config.num_val)
    _check_kept(labels, rejects, config.name)
    return write_dataset(
        storage,
        config,
        name=config.name,
        labels=labels,
        vocabulary=vocabulary,
        images_prefix=_images_prefix(config, storage),
        rejects=rejects,
        inputs=reads.inputs,
        images_version=version,
    )


def _check_kept(labels: pd.DataFrame, rejects: pd.DataFrame, name: str) -> None:
    """Log the rejects; fail when they leave no image, or no train or no test image."""
    reasons = rejects["reason"].value_counts().to_dict()
    if reasons:
        logger.warning("dataset %s: %d images rejected %s", name, len(rejects), reasons)
    if labels.empty:
        hint = (
            " (no image host could be reached: is this machine offline?)"
            if set(reasons) <= {"connection-error", "timeout"}
            else ""
        )
        raise DatasetError(f"dataset {name}: every image was rejected {reasons}{hint}")
    emptied = sorted({"train", "test"} - set(labels["split"]))
    if emptied:
        raise DatasetError(
            f"dataset {name}: every {' and '.join(emptied)} image was rejected {reasons}"
        )
