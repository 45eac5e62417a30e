"""Config sections: the paper's defaults, and errors that name the offending key."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lesa_model.config import LossConfig, ModelConfig, TrainerConfig


def test_defaults_are_the_papers() -> None:
    assert ModelConfig().num_modules == 10
    assert ModelConfig().first_layer == "per-module"
    assert (LossConfig().div, LossConfig().rel, LossConfig().dist) == (1e-2, 1e-3, 1e-1)
    assert (TrainerConfig().lr, TrainerConfig().batch_size) == (1e-3, 32)
    assert TrainerConfig().optimizer == "paper"


def test_unknown_key_is_named() -> None:
    with pytest.raises(ValidationError, match="num_moduls"):
        ModelConfig.model_validate({"num_moduls": 3})


def test_wrong_type_is_named() -> None:
    with pytest.raises(ValidationError, match="batch_size"):
        TrainerConfig.model_validate({"batch_size": "many"})
    with pytest.raises(ValidationError, match="pooling"):
        ModelConfig(pooling="max")
