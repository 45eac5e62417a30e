"""Open Images: miniature v4-format CSVs parse to the expected {1, -1, 0} annotations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks import schemas
from tasks.datasets.base import DatasetError
from tasks.datasets.openimages import OpenImagesConfig, prepare_openimages
from tasks.storage import Storage, StorageConfig

CLASSES = {
    "/m/01": "Ankle boot",
    "/m/02": "Human face",
    "/m/03": "Hot dog",
    "/m/04": "Crane",
    "/m/05": "Crane",
    "/m/06": "Tortoise",
    "/m/07": "Unused, with comma",
}
TRAINABLE = ["/m/01", "/m/02", "/m/04"]
UNSEEN = ["/m/03", "/m/05", "/m/06"]
HEADER = "ImageID,Source,LabelName,Confidence"
TRAIN = [
    "img1,verification,/m/01,1",
    "img1,verification,/m/02,0",
    "img1,verification,/m/03,1",  # unseen class on a train image: dropped
    "img1,verification,/m/01,1",  # exact duplicate: harmless
    "img2,crowdsource-verification,/m/04,1",
    "img3,verification,/m/07,1",  # class outside the vocabulary only: image dropped
]
VAL = ["img4,verification,/m/02,1"]
TEST = [
    "img5,verification,/m/03,1",
    "img5,verification,/m/05,0",
    "img5,verification,/m/01,1",
    "img6,verification,/m/06,0",
]


def write_openimages(root: Path, *, train: list[str] = TRAIN, header: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = [f'{mid},"{name}"' for mid, name in CLASSES.items()]
    (root / "class-descriptions.csv").write_text(
        "\n".join((["LabelName,DisplayName"] if header else []) + lines) + "\n"
    )
    (root / "classes-trainable.txt").write_text("\n".join(TRAINABLE) + "\n")
    (root / "unseen.txt").write_text("\n".join(UNSEEN) + "\n")
    for name, rows in (("train", train), ("validation", VAL), ("test", TEST)):
        (root / f"{name}-annotations-human-imagelabels.csv").write_text(
            "\n".join([HEADER, *rows]) + "\n"
        )
    return root


def config_for(root: Path, **update: object) -> OpenImagesConfig:
    fields: dict[str, object] = {
        "name": "oi-mini",
        "class_descriptions": str(root / "class-descriptions.csv"),
        "trainable_classes": str(root / "classes-trainable.txt"),
        "unseen_classes": str(root / "unseen.txt"),
        "train_labels": str(root / "train-annotations-human-imagelabels.csv"),
        "val_labels": str(root / "validation-annotations-human-imagelabels.csv"),
        "test_labels": str(root / "test-annotations-human-imagelabels.csv"),
        "images_prefix": "s3://open-images/images",
    }
    return OpenImagesConfig.model_validate(fields | update)


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(StorageConfig(root=str(tmp_path / "store"), cache_dir=str(tmp_path / "c")))


@pytest.mark.parametrize("header", [False, True])
def test_parses_to_expected_annotations(
    tmp_path: Path, storage: Storage, header: bool, caplog: pytest.LogCaptureFixture
) -> None:
    root = write_openimages(tmp_path / "oi", header=header)
    with caplog.at_level("WARNING"):
        artifacts = prepare_openimages(config_for(root), storage)
    assert "open-images train: 1 annotation(s) of unseen classes on 1 image(s) ignored" in (
        caplog.text
    )
    labels = storage.read_parquet(artifacts.label_table_url)
    vocabulary = storage.read_parquet(artifacts.vocabulary_url)

    names = ["Ankle boot", "Human face", "Crane (/m/04)", "Hot dog", "Crane (/m/05)", "Tortoise"]
    assert vocabulary["label"].tolist() == names
    assert vocabulary["seen"].tolist() == [True, True, True, False, False, False]
    assert vocabulary["tokens"].tolist()[:4] == ["ankle boot", "human face", "crane", "hot dog"]
    assert labels["image_id"].tolist() == ["img1", "img2", "img4", "img5", "img6"]
    assert labels["split"].tolist() == ["train", "train", "val", "test", "test"]
    assert labels["uri"].tolist()[2:4] == ["validation/img4.jpg", "test/img5.jpg"]
    assert not labels["complete"].any()
    expected = np.array(
        [
            # boot face crane4 hotdog crane5 tortoise
            [1, -1, 0, 0, 0, 0],  # img1: unseen /m/03 dropped from a train image
            [0, 0, 1, 0, 0, 0],
            [0, 1, 0, 0, 0, 0],
            [1, 0, 0, 1, -1, 0],
            [0, 0, 0, 0, 0, -1],
        ],
        dtype=np.int8,
    )
    np.testing.assert_array_equal(schemas.label_matrix(labels, names), expected)
    assert artifacts.images_prefix == "s3://open-images/images"


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (["img1,v,/m/01,0.5"], r"Confidence must be 0 or 1.*\['0.5'\]"),
        (["img1,v,/m/99,1"], r"missing from the class descriptions.*/m/99"),
        (["img1,v,/m/01,1", "img1,v,/m/01,0"], "both present and absent"),
    ],
)
def test_bad_label_rows_are_named(
    tmp_path: Path, storage: Storage, rows: list[str], match: str
) -> None:
    root = write_openimages(tmp_path / "oi", train=rows)
    with pytest.raises(DatasetError, match=match):
        prepare_openimages(config_for(root), storage)


def test_missing_columns_and_files_are_named(tmp_path: Path, storage: Storage) -> None:
    root = write_openimages(tmp_path / "oi")
    (root / "test-annotations-human-imagelabels.csv").write_text("ImageID,Label\nimg,/m/01\n")
    with pytest.raises(DatasetError, match=r"lack column\(s\) \['LabelName', 'Confidence'\]"):
        prepare_openimages(config_for(root), storage)
    with pytest.raises(DatasetError, match=r"missing image labels: .*nope\.csv"):
        prepare_openimages(config_for(root, test_labels=str(root / "nope.csv")), storage)


def test_image_in_two_splits_and_trainable_unseen_overlap(tmp_path: Path, storage: Storage) -> None:
    root = write_openimages(tmp_path / "oi", train=[*TRAIN, "img5,v,/m/01,1"])
    with pytest.raises(DatasetError, match=r"more than one split.*img5"):
        prepare_openimages(config_for(root), storage)
    root = write_openimages(tmp_path / "oi2")
    (root / "unseen.txt").write_text("/m/01\n/m/03\n")
    with pytest.raises(DatasetError, match=r"must not be trainable.*/m/01"):
        prepare_openimages(config_for(root), storage)
    (root / "unseen.txt").write_text("/m/42\n")
    with pytest.raises(DatasetError, match=r"unseen classes .* not in the class descriptions"):
        prepare_openimages(config_for(root), storage)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("/m/01,Ankle boot,extra\n/m/02,Human face,extra\n", "rows have 3 fields, expected 2"),
        ("/m/01\n/m/02\n", "rows have 1 fields, expected 2"),
        ("/m/01,Ankle boot\n/m/02,Human face,extra\n", "malformed.*Expected 2 fields"),
        ("/m/01,Ankle boot\n/m/01,Boot\n", r"duplicate class ids \['/m/01'\]"),
        ("/m/01,\n", "expected non-empty '/m/id,Name' rows"),
        ("", "expected non-empty '/m/id,Name' rows"),
    ],
)
def test_malformed_class_descriptions_are_named(
    tmp_path: Path, storage: Storage, text: str, match: str
) -> None:
    root = write_openimages(tmp_path / "oi")
    (root / "class-descriptions.csv").write_text(text)
    with pytest.raises(DatasetError, match=rf"class descriptions .*{match}"):
        prepare_openimages(config_for(root), storage)
    assert not storage.exists(storage.url("datasets", "oi-mini", "dataset.json"))


def test_a_label_csv_edited_in_place_drops_the_old_positive(
    tmp_path: Path, storage: Storage
) -> None:
    root = write_openimages(tmp_path / "oi")
    config = config_for(root)
    names = ["Ankle boot", "Human face", "Crane (/m/04)"]

    def img2() -> list[int]:
        labels = storage.read_parquet(prepare_openimages(config, storage).label_table_url)
        return schemas.label_matrix(labels[labels["image_id"] == "img2"], names)[0].tolist()

    assert img2() == [0, 0, 1]
    train = root / "train-annotations-human-imagelabels.csv"
    train.write_text(train.read_text().replace("/m/04,1", "/m/04,0"))  # same size
    assert img2() == [0, 0, -1]


def test_bad_confidence_names_the_line_of_the_csv(tmp_path: Path, storage: Storage) -> None:
    """Line numbers count like an editor: the header is line 1, a blank line counts too."""
    root = write_openimages(tmp_path / "oi", train=["img1,v,/m/01,1", "", "img2,v,/m/02,yes"])
    with pytest.raises(DatasetError, match=r"e\.g\. line 4 = \['yes'\]"):
        prepare_openimages(config_for(root), storage)
