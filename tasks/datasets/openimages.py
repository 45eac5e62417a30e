"""Open Images (v4 layout) from its class list and human-verified image-level label CSVs.

Inputs (each a local path, ``file://`` or ``s3://`` URL):

- ``class-descriptions.csv``: ``/m/...,Display name`` (no header; a ``LabelName,DisplayName``
  header is accepted too);
- ``classes-trainable.txt``: one class id per line, the seen labels;
- the unseen class list: one class id per line (the paper uses 400 test classes disjoint from the
  trainable ones);
- ``*-annotations-human-imagelabels.csv`` per split: ``ImageID,Source,LabelName,Confidence``;
  confidence 1 = present (+1), 0 = verified absent (-1), no row = not annotated (0), so every
  image is ``complete=False``.

Labels are the display names (the words that get embedded); a name shared by two classes becomes
``Name (/m/id)``. Train and validation images keep seen labels only, so no unseen label is ever
trained on; test images keep both. Annotations of classes outside the vocabulary are ignored,
and an image left with no annotation at all is dropped (it can neither train nor be scored).
Image URIs are ``image_uri_template`` under ``images_prefix``, e.g. ``train/000a1249af2bc5f0.jpg``.

At the source: ``images_prefix`` can be the public bucket itself (``s3://open-images-dataset``,
laid out ``<split>/<ImageID>.jpg``) with ``storage.anonymous: true``; extraction then streams
every image from S3 on the Dask workers, with no download step. The official image-id CSVs
(``image_ids``) say which images exist and in which folder; labelled images they do not list
are dropped.
"""

from __future__ import annotations

import io
import logging
from typing import Literal

import pandas as pd
from pydantic import Field

from lesa_common import StrictModel
from tasks.datasets.base import (
    DatasetArtifacts,
    DatasetError,
    DatasetName,
    label_tokens,
    load_prepared,
    read_text,
    write_dataset,
)
from tasks.schemas import SourceFile
from tasks.storage import Storage
from tasks.versions import RecordingStorage

logger = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
_LABEL_COLUMNS = ("ImageID", "LabelName", "Confidence")
_ID_COLUMNS = ("ImageID", "Subset")
_OPEN_IMAGES_SPLIT: dict[str, str] = {"train": "train", "val": "validation", "test": "test"}


class OpenImagesConfig(StrictModel):
    """Where the Open Images metadata files and images are."""

    source: Literal["open-images"] = "open-images"
    name: DatasetName = "open-images"
    class_descriptions: str = Field(description="class-descriptions.csv (/m/id,Name)")
    trainable_classes: str = Field(description="classes-trainable.txt: seen class ids")
    unseen_classes: str = Field(description="file of unseen class ids, one per line")
    train_labels: str = Field(description="train-annotations-human-imagelabels.csv")
    val_labels: str | None = Field(None, description="validation-...-imagelabels.csv")
    test_labels: str = Field(description="test-annotations-human-imagelabels.csv")
    images_prefix: str = Field(description="folder or prefix holding the image files")
    image_uri_template: str = Field(
        "{split}/{image_id}.jpg",
        description="uri under images_prefix; {split} is train, validation or test",
    )
    image_ids: list[str] = Field(
        default_factory=list,
        description="the official image-id CSVs (ImageID, Subset, ...; e.g. "
        "train-images-boxable-with-rotation.csv): only the images they list are used, from "
        "the folder their Subset names; empty: every labelled image",
    )


def read_class_descriptions(storage: Storage, url: str) -> pd.Series:
    """Class id -> display name, checked for duplicates and empty names."""
    text = read_text(storage, url, what="class descriptions")
    try:
        frame = pd.read_csv(io.StringIO(text), header=None, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame(columns=["mid", "name"])
    except (ValueError, pd.errors.ParserError) as error:
        raise DatasetError(f"class descriptions {url} are malformed: {error}") from error
    if frame.shape[1] != 2:
        # With fixed names pandas would silently turn a third column into the index.
        raise DatasetError(
            f"class descriptions {url}: rows have {frame.shape[1]} fields, expected 2 (/m/id,Name)"
        )
    frame.columns = ["mid", "name"]
    frame = frame[frame["mid"].str.strip() != "LabelName"]
    frame = frame.assign(mid=frame["mid"].str.strip(), name=frame["name"].str.strip())
    if frame.empty or (frame["name"] == "").any() or (frame["mid"] == "").any():
        raise DatasetError(f"class descriptions {url}: expected non-empty '/m/id,Name' rows")
    duplicated = frame["mid"].duplicated()
    if duplicated.any():
        raise DatasetError(
            f"class descriptions {url}: duplicate class ids "
            f"{frame.loc[duplicated, 'mid'].head().tolist()}"
        )
    return frame.set_index("mid")["name"]


def _read_class_ids(storage: Storage, url: str, what: str, known: pd.Series) -> list[str]:
    ids = [line.strip() for line in read_text(storage, url, what=what).splitlines()]
    ids = list(dict.fromkeys(i for i in ids if i))
    if not ids:
        raise DatasetError(f"{what} {url} lists no classes")
    unknown = [i for i in ids if i not in known.index]
    if unknown:
        raise DatasetError(
            f"{what} {url}: {len(unknown)} class ids are not in the class descriptions, "
            f"e.g. {unknown[:5]}"
        )
    return ids


def openimages_vocabulary(
    names: pd.Series, seen_ids: list[str], unseen_ids: list[str]
) -> pd.DataFrame:
    """Vocabulary plus a ``mid`` column (class id), dropped before writing."""
    overlap = sorted(set(seen_ids) & set(unseen_ids))
    if overlap:
        raise DatasetError(f"unseen classes must not be trainable; both: {overlap[:5]}")
    mids = [*seen_ids, *unseen_ids]
    display = names.reindex(mids)
    shared = display.duplicated(keep=False).to_numpy()
    labels = [
        f"{name} ({mid})" if clash else name
        for mid, name, clash in zip(mids, display, shared, strict=True)
    ]
    return pd.DataFrame(
        {
            "mid": mids,
            "label": labels,
            "seen": [True] * len(seen_ids) + [False] * len(unseen_ids),
            "tokens": [label_tokens(name) for name in display],
        }
    )


def read_image_labels(storage: Storage, url: str, known: pd.Series) -> pd.DataFrame:
    """One split's human image-level labels as (ImageID, LabelName, positive: bool) rows."""
    if not storage.exists(url):
        raise DatasetError(f"missing image labels: {url} does not exist")
    try:
        with storage.open(url, "rb") as handle:
            frame = pd.read_csv(
                handle,
                dtype=str,
                keep_default_na=False,
                skip_blank_lines=False,
                usecols=lambda c: c in _LABEL_COLUMNS,
            )
    except (ValueError, pd.errors.ParserError) as error:
        raise DatasetError(f"image labels {url} are malformed: {error}") from error
    missing = [column for column in _LABEL_COLUMNS if column not in frame.columns]
    if missing:
        raise DatasetError(
            f"image labels {url} lack column(s) {missing}; expected the header "
            "ImageID,Source,LabelName,Confidence"
        )
    frame = frame[list(_LABEL_COLUMNS)]
    frame = frame[(frame != "").any(axis=1)]  # blank lines, kept in the index until here
    source = SourceFile(url, header_lines=1)
    confidence = pd.to_numeric(frame["Confidence"], errors="coerce")
    bad = ~confidence.isin([0.0, 1.0])
    if bad.any():
        where = ", ".join(source.row(index) for index in frame.index[bad.to_numpy()][:5])
        raise DatasetError(
            f"image labels {url}: Confidence must be 0 or 1; {int(bad.sum())} rows are not, "
            f"e.g. {where} = {frame.loc[bad, 'Confidence'].head().tolist()}"
        )
    unknown = ~frame["LabelName"].isin(known.index)
    if unknown.any():
        raise DatasetError(
            f"image labels {url}: {int(unknown.sum())} rows name classes missing from the class "
            f"descriptions, e.g. {sorted(set(frame.loc[unknown, 'LabelName']))[:5]}"
        )
    if (frame["ImageID"] == "").any():
        raise DatasetError(f"image labels {url}: empty ImageID in some rows")
    rows = pd.DataFrame(
        {
            "ImageID": frame["ImageID"],
            "LabelName": frame["LabelName"],
            "positive": confidence == 1.0,
        }
    ).drop_duplicates()
    conflicting = rows.duplicated(["ImageID", "LabelName"], keep=False)
    if conflicting.any():
        examples = rows.loc[conflicting, ["ImageID", "LabelName"]].head(3).values.tolist()
        raise DatasetError(
            f"image labels {url}: the same (image, class) is both present and absent, e.g. "
            f"{examples}"
        )
    return rows


def read_image_ids(storage: Storage, url: str) -> pd.Series:
    """ImageID -> Subset (train, validation, test) from one official image-id CSV."""
    try:
        with storage.open(url, "rb") as handle:
            frame = pd.read_csv(
                handle, dtype=str, keep_default_na=False, usecols=lambda c: c in _ID_COLUMNS
            )
    except FileNotFoundError as error:
        raise DatasetError(f"missing image-id list: {url} does not exist") from error
    except (ValueError, pd.errors.ParserError) as error:
        raise DatasetError(f"image-id list {url} is malformed: {error}") from error
    missing = [column for column in _ID_COLUMNS if column not in frame.columns]
    if missing:
        raise DatasetError(f"image-id list {url} lacks column(s) {missing} (ImageID,Subset,...)")
    subsets = set(frame["Subset"]) - set(_OPEN_IMAGES_SPLIT.values())
    if subsets:
        raise DatasetError(f"image-id list {url}: unknown Subset values {sorted(subsets)[:5]}")
    return frame.drop_duplicates("ImageID").set_index("ImageID")["Subset"]


def _listed_images(labels: pd.DataFrame, reads: Storage, config: OpenImagesConfig) -> pd.DataFrame:
    """Keep the images the image-id CSVs list, each under the folder of its Subset."""
    if not config.image_ids:
        return labels
    subset = pd.concat([read_image_ids(reads, url) for url in config.image_ids])
    subset = subset[~subset.index.duplicated()]
    listed = labels["image_id"].isin(subset.index)
    if not listed.all():
        logger.info(
            "open-images: %d labelled image(s) are not in the image-id lists; dropped, e.g. %s",
            int((~listed).sum()),
            labels.loc[~listed, "image_id"].head(3).tolist(),
        )
    kept = labels[listed].reset_index(drop=True)
    folders = kept["image_id"].map(subset)
    kept["uri"] = [
        config.image_uri_template.format(split=folder, image_id=image_id)
        for folder, image_id in zip(folders, kept["image_id"], strict=True)
    ]
    return kept


def _split_table(
    rows: pd.DataFrame, split: Split, vocabulary: pd.DataFrame, config: OpenImagesConfig
) -> pd.DataFrame:
    """Group one split's annotations into LabelTable rows."""
    allowed = vocabulary if split == "test" else vocabulary[vocabulary["seen"]]
    label_of = allowed.set_index("mid")["label"]
    kept = rows[rows["LabelName"].isin(label_of.index)]
    unseen = rows[rows["LabelName"].isin(vocabulary.loc[~vocabulary["seen"], "mid"])]
    if split != "test" and len(unseen):
        logger.warning(
            "open-images %s: %d annotation(s) of unseen classes on %d image(s) ignored (unseen "
            "labels are never trained on), e.g. %s",
            split,
            len(unseen),
            unseen["ImageID"].nunique(),
            sorted(set(unseen["LabelName"]))[:5],
        )
    kept = kept.assign(label=kept["LabelName"].map(label_of))
    images = pd.Index(sorted(kept["ImageID"].unique()), name="ImageID")
    dropped = rows["ImageID"].nunique() - len(images)
    if dropped:
        logger.info(
            "open-images %s: %d images have no vocabulary annotation; dropped", split, dropped
        )

    def lists(positive: bool) -> pd.Series:
        grouped = kept[kept["positive"] == positive].groupby("ImageID", sort=False)["label"]
        return grouped.agg(list).reindex(images).map(lambda v: v if isinstance(v, list) else [])

    folder = _OPEN_IMAGES_SPLIT[split]
    return pd.DataFrame(
        {
            "image_id": images.to_numpy(dtype=object),
            "uri": [config.image_uri_template.format(split=folder, image_id=i) for i in images],
            "split": split,
            "positives": lists(True).to_numpy(),
            "negatives": lists(False).to_numpy(),
            "complete": False,
        }
    )


def prepare_openimages(config: OpenImagesConfig, storage: Storage) -> DatasetArtifacts:
    """Parse the class lists and label CSVs, and write the validated tables.

    Every file is read through a :class:`~tasks.versions.RecordingStorage`, so a label CSV
    edited in place (a confidence turned from 1 to 0, say) rebuilds the dataset on rerun.
    """
    prepared = load_prepared(storage, config.name, config)
    if prepared is not None:
        return prepared
    reads = RecordingStorage(storage)
    names = read_class_descriptions(reads, config.class_descriptions)
    seen = _read_class_ids(reads, config.trainable_classes, "trainable classes", names)
    unseen = _read_class_ids(reads, config.unseen_classes, "unseen classes", names)
    vocabulary = openimages_vocabulary(names, seen, unseen)
    sources: list[tuple[Split, str | None]] = [
        ("train", config.train_labels),
        ("val", config.val_labels),
        ("test", config.test_labels),
    ]
    tables = [
        _split_table(read_image_labels(reads, url, names), split, vocabulary, config)
        for split, url in sources
        if url is not None
    ]
    labels = _listed_images(pd.concat(tables, ignore_index=True), reads, config)
    duplicated = labels["image_id"].duplicated(keep=False)
    if duplicated.any():
        raise DatasetError(
            "open-images: images appear in more than one split, e.g. "
            f"{sorted(set(labels.loc[duplicated, 'image_id']))[:5]}"
        )
    return write_dataset(
        storage,
        config,
        name=config.name,
        labels=labels,
        vocabulary=vocabulary.drop(columns="mid"),
        images_prefix=config.images_prefix,
        inputs=reads.inputs,
    )
