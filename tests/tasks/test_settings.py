"""Where a run's storage root and Dask scheduler come from: explicit > environment > file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import load_config
from tasks.settings import ENVIRONMENT_SETTINGS, environment_overrides

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
STACK = {"LESA_STORAGE_ROOT": "s3://lesa", "DASK_SCHEDULER_ADDRESS": "tcp://127.0.0.1:8786"}


def test_without_the_environment_the_config_file_decides() -> None:
    config = load_config(TINY)
    assert config.storage.root == ".lesa-data"
    assert config.features.dask.address is None


def test_the_environment_replaces_the_config_files_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in STACK.items():
        monkeypatch.setenv(name, value)
    config = load_config(TINY)
    assert config.storage.root == "s3://lesa"
    assert config.features.dask.address == "tcp://127.0.0.1:8786"
    assert config.features.dask.n_workers == 1  # the rest of the file's section is kept


@pytest.mark.parametrize(
    "overrides",
    [
        {"storage.root": "/tmp/mine", "features.dask.address": "tcp://10.0.0.1:8786"},
        {
            "storage": {"root": "/tmp/mine"},
            "features": {"dask": {"address": "tcp://10.0.0.1:8786"}},
        },
    ],
)
def test_explicit_overrides_beat_the_environment(
    monkeypatch: pytest.MonkeyPatch, overrides: dict
) -> None:
    for name, value in STACK.items():
        monkeypatch.setenv(name, value)
    config = load_config(TINY, overrides)
    assert config.storage.root == "/tmp/mine"
    assert config.features.dask.address == "tcp://10.0.0.1:8786"


def test_empty_variables_count_as_unset() -> None:
    assert environment_overrides({"LESA_STORAGE_ROOT": " ", "DASK_SCHEDULER_ADDRESS": ""}) == {}
    assert environment_overrides({"LESA_STORAGE_ROOT": "s3://b", "OTHER": "x"}) == {
        "storage.root": "s3://b"
    }


def test_every_setting_names_a_real_config_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENVIRONMENT_SETTINGS:
        monkeypatch.setenv(name, "s3://b" if "STORAGE" in name else "tcp://h:1")
    config = load_config(TINY).model_dump()
    for key in ENVIRONMENT_SETTINGS.values():
        node = config
        for part in key.split("."):
            node = node[part]
        assert node in ("s3://b", "tcp://h:1"), key
