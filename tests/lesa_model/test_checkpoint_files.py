"""Checkpoint files: atomic writes, self-describing models, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lesa_model.checkpoint import load_checkpoint, load_model, model_payload, save_checkpoint
from lesa_model.config import ModelConfig
from lesa_model.model import LESA


def test_round_trip_rebuilds_the_same_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LESA(6, 4, ModelConfig(num_modules=2, feature_adapter=True), grid=(2, 2))
    path = save_checkpoint(
        tmp_path / "m.pt", {**model_payload(model), "metadata": {"labels": ["a", "b"]}}
    )
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind
    loaded, metadata = load_model(path)
    assert metadata == {"labels": ["a", "b"]}
    assert not loaded.training
    model.eval()
    features, vectors = torch.randn(3, 4, 6), torch.randn(2, 4)
    torch.testing.assert_close(loaded(features, vectors).scores, model(features, vectors).scores)


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", {"step": 1})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint(path, {"step": 2, "metadata": {"path": Path("x")}})
    with pytest.raises(AttributeError, match="pickle"):
        save_checkpoint(path, {"step": 2, "bad": lambda: None})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a LESA checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
