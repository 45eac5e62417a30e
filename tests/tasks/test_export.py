"""Portable checkpoints and the library API: identical scores, refused recipes, no orchestration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesa_model import Tagger
from lesa_model.backbones import FeatureRecipe, load_backbone
from lesa_model.calibration import Thresholds
from lesa_model.config import ModelConfig
from lesa_model.portable import CARD_FILE, WEIGHTS_FILE, PortableError
from lesa_model.tagger import RecipeMismatchError, TaggerError
from tasks.embeddings import KumoGlove, load_keyed_vectors
from tasks.export import export_checkpoint
from tasks.feature_config import FeaturesConfig
from tasks.prediction import load_predictor, predict_images
from tasks.storage import Storage, StorageConfig
from tasks.thresholds import thresholds_url
from tasks.versions import file_version
from tests.helpers.checkpoints import write_checkpoint

FEATURES = FeaturesConfig(backbone="efficientnet-lite0", weights="none", image_size=64)
SEEN = ["cat", "dog", "tree"]
UNSEEN = ["fish"]
ORCHESTRATION = ("prefect", "dask", "distributed", "s3fs", "pandera", "tasks", "flows")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    checkpoint = write_checkpoint(
        root / "best.pt", FEATURES, SEEN, UNSEEN, model=ModelConfig(num_modules=3, hidden_dim=16)
    )
    storage = Storage(StorageConfig(root=str(root / "store")))
    fitted = Thresholds(SEEN, [-1e9, 1e9, 0.0], [True, True, False], global_threshold=1e9)
    document = {**fitted.document(), "checkpoint_version": file_version(storage, str(checkpoint))}
    storage.write_json(thresholds_url(str(checkpoint)), document)
    card = export_checkpoint(str(checkpoint), str(root / "exported"), storage)
    images = []
    for seed, size in ((1, (80, 60)), (2, (50, 90)), (3, (64, 64))):
        pixels = np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{seed}.png")
        images.append(root / f"{seed}.png")
    return {"root": root, "checkpoint": checkpoint, "card": Path(card), "images": images}


def test_exported_checkpoint_scores_exactly_as_the_pipeline_predictor(exported) -> None:
    storage = Storage(StorageConfig(root=str(exported["root"] / "store")))
    predictor = load_predictor(str(exported["checkpoint"]), storage)
    labels = [*SEEN, *UNSEEN]
    uris = [str(path) for path in exported["images"]]
    pipeline = predict_images(predictor, uris, labels, storage, top_k=2)
    tagger = Tagger.from_checkpoint(exported["card"].parent)
    scores, _ = tagger.scores(exported["images"], labels)
    assert np.array_equal(scores, pipeline.scores)
    from_pt = Tagger.from_checkpoint(
        exported["checkpoint"], word_vectors=load_keyed_vectors(KumoGlove())
    )
    assert np.array_equal(from_pt.scores(exported["images"], labels)[0], pipeline.scores)
    tags = tagger.tag(exported["images"], labels, top_k=2)
    for index, image_tags in enumerate(tags):
        assert [tag.label for tag in image_tags] == [labels[c] for c in pipeline.top[index]]
        assert [tag.seen for tag in image_tags] == [tag.label in SEEN for tag in image_tags]
        assert all(0 <= tag.module < 3 for tag in image_tags)


def test_card_carries_config_labels_recipe_thresholds_and_code_version(exported) -> None:
    card = json.loads(exported["card"].read_text())
    assert [row["label"] for row in card["labels"]] == [*SEEN, *UNSEEN]
    assert [row["seen"] for row in card["labels"]] == [True, True, True, False]
    assert FeatureRecipe.from_dict(card["features"]) == FEATURES.recipe()
    assert card["model_config"]["num_modules"] == 3
    assert card["thresholds"]["global_threshold"] == 1e9
    assert card["metrics"] is None
    assert card["code_version"]["package"] == "0.1.0"
    assert card["provenance"]["checkpoint"] == str(exported["checkpoint"])


def test_calibrated_thresholds_and_new_labels_through_the_tagger(exported) -> None:
    tagger = Tagger.from_checkpoint(exported["card"].parent)
    tags = tagger.tag(exported["images"], ["cat", "dog", "fish"], threshold="calibrated")
    assert [[tag.label for tag in image] for image in tags] == [["cat"]] * 3
    with pytest.raises(TaggerError, match="pass word_vectors"):
        tagger.tag(exported["images"], ["cat", "zebra"], top_k=1)
    keyed = load_keyed_vectors(KumoGlove())
    with_words = Tagger.from_checkpoint(exported["card"].parent, word_vectors=keyed)
    tagged = with_words.tag(exported["images"][:1], ["cat", "zebra"], top_k=2)[0]
    assert {tag.label for tag in tagged} == {"cat", "zebra"}
    pt = Tagger.from_checkpoint(exported["checkpoint"], word_vectors=keyed)
    with pytest.raises(TaggerError, match="no calibrated thresholds"):
        pt.tag(exported["images"], ["cat"], threshold="calibrated")


def test_features_of_another_recipe_are_refused_naming_both(exported) -> None:
    other = load_backbone("efficientnet-lite0", weights="none", image_size=96)
    with pytest.raises(RecipeMismatchError) as error:
        Tagger.from_checkpoint(exported["card"].parent, backbone=other)
    message = str(error.value)
    assert "96px" in message and "64px" in message
    tagger = Tagger.from_checkpoint(exported["card"].parent)
    features = tagger.features(exported["images"][:1])
    float32 = FeatureRecipe(**{**FEATURES.recipe().__dict__, "dtype": "float32"})
    with pytest.raises(RecipeMismatchError, match=r"float32.*float16"):
        tagger.score_features(features, ["cat"], recipe=float32)
    scores, _ = tagger.score_features(features, ["cat"], recipe=FEATURES.recipe())
    assert scores.shape == (1, 1)


def test_a_tampered_or_incomplete_export_is_refused(exported, tmp_path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / CARD_FILE).write_bytes(exported["card"].read_bytes())
    with pytest.raises(PortableError, match="missing"):
        Tagger.from_checkpoint(copy)
    data = bytearray((exported["card"].parent / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 1
    (copy / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(PortableError, match="not the file"):
        Tagger.from_checkpoint(copy)


def test_the_library_api_imports_no_orchestration_package(exported) -> None:
    script = (
        "import sys\n"
        "from lesa_model import Tagger\n"
        f"tags = Tagger.from_checkpoint({str(exported['card'].parent)!r}).tag(\n"
        f"    [{str(exported['images'][0])!r}], ['cat', 'fish'], top_k=1)\n"
        "print(tags[0][0].label)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({ORCHESTRATION!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    label, loaded = result.stdout.strip().splitlines()[-2:]
    assert label in {"cat", "fish"}
    assert loaded == "[]"


def test_the_readme_example_runs(exported, tmp_path, monkeypatch, capsys) -> None:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = text.split("<!-- tagger-example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "emoji-default").symlink_to(exported["card"].parent)
    Image.open(exported["images"][0]).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    label, _, seen = capsys.readouterr().out.split()
    assert label in {"cat", "dog"} and seen == "seen"


def test_export_command_line(exported, tmp_path, capsys) -> None:
    from flows.export import main

    out = tmp_path / "cli"
    assert main(["--checkpoint", str(exported["checkpoint"]), "--out", str(out)]) == 0
    assert (out / CARD_FILE).is_file() and (out / WEIGHTS_FILE).is_file()
    assert main(["--checkpoint", str(tmp_path / "none.pt"), "--out", str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
