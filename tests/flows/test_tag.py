"""python -m flows.tag: the flow on a real Prefect API and Dask cluster, its artifacts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from flows.tag import main
from flows.tag_flow import SUMMARY_ARTIFACT_KEY
from lesa_model.config import ModelConfig
from tasks.feature_config import FeaturesConfig
from tests.helpers.checkpoints import write_checkpoint

FEATURES = FeaturesConfig(backbone="efficientnet-lite0", weights="none", image_size=64)


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_help_names_the_options(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--checkpoint", "--images", "--out", "--top-k", "--threshold", "--shard-size"):
        assert option in text


@pytest.mark.slow
def test_flow_tags_a_folder_on_two_workers_with_progress_and_summary(
    tmp_path: Path, prefect_api, capsys
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in range(3):
        pixels = np.random.default_rng(seed).integers(0, 256, (50, 70, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"{seed}.png")
    checkpoint = write_checkpoint(
        tmp_path / "best.pt", FEATURES, ["cat", "dog"], ["fish"], model=ModelConfig(num_modules=2)
    )
    out = tmp_path / "tags"
    arguments = ["--checkpoint", str(checkpoint), "--images", str(photos), "--out", str(out)]
    options = ["--top-k", "2", "--shard-size", "2", "--config", "configs/tiny.yaml"]
    settings = [
        "--set",
        f"storage.root={tmp_path / 'store'}",
        "--set",
        "features.dask.dashboard=false",
    ]
    code = main([*arguments, *options, *settings])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "3 tagged in this run in 2 shard(s)" in captured.out
    tags = pd.read_parquet(out / "tags.parquet")
    assert len(tags) == 6 and set(tags["label"]) <= {"cat", "dog", "fish"}
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    summary = [artifact for artifact in artifacts if artifact.key == SUMMARY_ARTIFACT_KEY]
    assert summary and "Batch tagging" in summary[0].data
    progress = [a for a in artifacts if a.type == "progress" and a.description == "tagging shards"]
    assert progress and progress[0].data == 100.0
