"""The ablation grid on a real Dask LocalCluster: every cell trained, scored, summarised, reused."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from distributed import LocalCluster
from PIL import Image
from pydantic import ValidationError

from tasks.ablation import (
    cell_config,
    cell_run_name,
    run_ablation,
    summarise,
    write_ablation_report,
)
from tasks.ablation_config import AblationConfig, AblationVariant
from tasks.feature_config import DaskConfig
from tests.helpers.training_inputs import Synthetic, synthetic


@pytest.fixture(scope="module")
def dask_config() -> Iterator[DaskConfig]:
    """2 worker processes x 1 thread on 127.0.0.1, reached by address as a remote cluster is
    (a generous start timeout: worker processes import torch, slow on a busy machine)."""
    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        death_timeout=180,
    )
    try:
        yield DaskConfig(address=cluster.scheduler_address, dashboard=False)
    finally:
        cluster.close(timeout=180)


def _with_grid(inputs: Synthetic, grid: AblationConfig) -> Synthetic:
    # The synthetic dataset has 2 unseen labels: ZSL top-K needs K <= 2.
    evaluation = inputs.config.evaluation.model_copy(update={"ks": [2]})
    config = inputs.config.model_copy(update={"ablation": grid, "evaluation": evaluation})
    return Synthetic(config, inputs.storage, inputs.inputs)


def _run(inputs: Synthetic, dask: DaskConfig) -> list[dict]:
    return run_ablation(inputs.config, inputs.storage, inputs.inputs, dask=dask)


def test_tiny_grid_runs_in_parallel_and_is_reused(tmp_path: Path, dask_config: DaskConfig) -> None:
    grid = AblationConfig(
        seeds=[0, 1],
        variants=[
            AblationVariant(name="LESA"),
            AblationVariant(name="M=1", set={"model.num_modules": 1}),
        ],
    )
    inputs = _with_grid(synthetic(str(tmp_path / "store"), cache_dir=tmp_path / "c"), grid)
    results = _run(inputs, dask_config)
    assert [(r["variant"], r["seed"]) for r in results] == [
        (v, s) for v in ("LESA", "M=1") for s in (0, 1)
    ]
    assert not any(r["reused"] for r in results)
    assert len({r["run_name"] for r in results}) == 4
    zsl = {(r["variant"], r["seed"]): r["metrics"]["zsl"]["mAP"] for r in results}
    assert zsl["LESA", 0] != zsl["LESA", 1]  # the seed changes the run
    assert zsl["LESA", 0] != zsl["M=1", 0]  # and so does the variant

    summary = summarise(results)
    assert summary["variant"].tolist() == ["LESA", "M=1"]
    lesa = [zsl["LESA", 0], zsl["LESA", 1]]
    row = summary.iloc[0]
    assert row["ZSL mAP mean"] == pytest.approx(np.mean(lesa))
    assert row["ZSL mAP std"] == pytest.approx(np.std(lesa, ddof=1))
    assert row["seeds"] == 2

    urls = write_ablation_report(results, inputs.storage, run_name=inputs.config.run_name)
    markdown = inputs.storage.read_bytes(urls["ablation.md"]).decode()
    for name in ("LESA", "M=1"):
        assert f"| {name} | 2 |" in markdown
    assert f"{100 * np.mean(lesa):.2f} ± {100 * np.std(lesa, ddof=1):.2f}" in markdown
    with Image.open(io.BytesIO(inputs.storage.read_bytes(urls["ablation.png"]))) as image:
        assert image.format == "PNG" and image.width > 300
    assert len(inputs.storage.read_json(urls["ablation.json"])["runs"]) == 4

    again = _run(inputs, dask_config)
    assert all(r["reused"] for r in again)
    assert [r["metrics"] for r in again] == [r["metrics"] for r in results]


def test_variants_are_checked_before_anything_runs(tmp_path: Path, dask_config: DaskConfig) -> None:
    with pytest.raises(ValidationError, match="may only change"):
        AblationVariant(name="other data", set={"dataset.name": "x"})
    with pytest.raises(ValidationError, match="unique"):
        AblationConfig(variants=[AblationVariant(name="a"), AblationVariant(name="a")])
    inputs = synthetic(str(tmp_path / "store"), cache_dir=tmp_path / "c")
    bad = AblationConfig(seeds=[0], variants=[AblationVariant(name="x", set={"train.lr": -1})])
    with pytest.raises(ValueError, match="ablation variant 'x'"):
        _run(_with_grid(inputs, bad), dask_config)
    assert not inputs.storage.exists(inputs.storage.url("runs"))


def test_cell_config_applies_the_variant_and_the_seed(tmp_path: Path) -> None:
    inputs = synthetic(str(tmp_path / "store"), cache_dir=tmp_path / "c")
    variant = AblationVariant(
        name="select mix", set={"train.select": "mix", "train.holdout_share": 0.25}
    )
    cell = cell_config(inputs.config, variant, seed=4)
    assert cell.train.select == "mix" and cell.train.holdout_share == 0.25
    assert cell.train.select_seen == inputs.config.train.select  # the run's own seen rule
    assert cell.train.seed == 4 and cell.evaluation.baselines == []
    assert cell.run_name == cell_run_name(inputs.config.run_name, "select mix", 4)
    assert cell.run_name.endswith(".ablation.select-mix.s4")
    assert cell.model == inputs.config.model
