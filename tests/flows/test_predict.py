"""``python -m flows.predict``: the command line end to end, through the Prefect flow."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from prefect.testing.utilities import prefect_test_harness

from flows.predict import main
from lesa_model.calibration import Thresholds
from lesa_model.config import ModelConfig
from tasks.feature_config import FeaturesConfig
from tasks.storage import Storage
from tasks.thresholds import thresholds_url
from tasks.versions import file_version
from tests.helpers.checkpoints import write_checkpoint

FEATURES = FeaturesConfig(backbone="efficientnet-lite0", weights="none", image_size=64)


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    """One temporary Prefect API for this module's flow runs, patient with a busy machine."""
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    checkpoint = write_checkpoint(
        root / "best.pt",
        FEATURES,
        ["cat", "dog"],
        ["fish"],
        model=ModelConfig(num_modules=2, hidden_dim=8),
    )
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("one.png", (70, 50)), ("two.jpg", (64, 64))):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            images / name
        )
    (images / "three.jpg").write_bytes(b"not a picture")
    return {"root": root, "checkpoint": checkpoint, "images": images}


def test_help_describes_the_options(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = ("--checkpoint", "--images", "--labels", "--top-k", "--threshold", "--out")
    for option in (*options, "--attention-maps"):
        assert option in text


def tag_images(inputs: dict[str, Path], *options: str) -> int:
    """``python -m flows.predict`` on the test checkpoint and image folder, with ``options``."""
    return main(
        ["--checkpoint", str(inputs["checkpoint"]), "--images", str(inputs["images"]), *options]
    )


def test_empty_label_list_fails_before_any_work(inputs, capsys) -> None:
    code = tag_images(inputs, "--labels", " , ")
    assert code == 2
    assert "holds no labels" in capsys.readouterr().err


def test_bad_arguments_exit_with_usage_error(inputs) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", "x.pt", "--images", "a.jpg", "--top-k", "0"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", "x.pt", "--images", "a.jpg", "--set", "train.steps=3"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", "x.pt", "--images", "a.jpg", "--threshold", "high"])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_cli_tags_a_folder_with_new_labels(inputs, prefect_api, capsys) -> None:
    out = inputs["root"] / "out"
    code = tag_images(
        inputs,
        "--labels",
        "cat,zebra,hot dog",
        "--top-k",
        "2",
        "--out",
        str(out),
        "--attention-maps",
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "one.png" in captured.out and "two.jpg" in captured.out
    assert "three.jpg" in captured.out and "corrupt" in captured.out
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == 4
    assert set(table["label"]) <= {"cat", "zebra", "hot dog"}
    document = json.loads((out / "predictions.json").read_text())
    assert [Path(item["image"]).name for item in document["skipped"]] == ["three.jpg"]
    heatmaps = sorted((out / "attention").glob("*/0*.png"))
    assert len(heatmaps) == 4
    one = [path for path in heatmaps if "-one" in path.parent.name]
    assert Image.open(one[0]).size == (70, 50)
    assert len(list((out / "attention").glob("*/grid.png"))) == 2


@pytest.mark.slow
def test_cli_unembeddable_label_is_a_clear_error(inputs, prefect_api, capsys) -> None:
    code = tag_images(
        inputs,
        "--labels",
        "cat,blorptangle",
        "--top-k",
        "1",
        "--out",
        str(inputs["root"] / "never"),
    )
    assert code == 2
    assert "blorptangle" in capsys.readouterr().err
    assert not (inputs["root"] / "never").exists()


@pytest.mark.slow
def test_cli_tags_by_the_calibrated_thresholds_stored_with_the_checkpoint(
    inputs, prefect_api, capsys
) -> None:
    out = inputs["root"] / "calibrated"
    assert tag_images(inputs, "--threshold", "calibrated", "--out", str(out)) == 2
    assert "no calibrated thresholds" in capsys.readouterr().err
    storage = Storage()
    checkpoint = str(inputs["checkpoint"])
    labels = ["cat", "dog"]
    fitted = Thresholds(labels, [-1e9, 1e9], [True, True], global_threshold=1e9)
    document = {**fitted.document(), "checkpoint_version": file_version(storage, checkpoint)}
    storage.write_json(thresholds_url(checkpoint), document)
    code = tag_images(
        inputs, "--labels", "cat,dog,zebra", "--threshold", "calibrated", "--out", str(out)
    )
    assert code == 0, capsys.readouterr().err
    table = pd.read_csv(out / "predictions.csv")
    assert set(table["label"]) == {"cat"}
    assert len(table) == 2
