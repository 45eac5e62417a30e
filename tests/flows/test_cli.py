"""Entry points: helpful --help, bad configs rejected before any work, the metrics table."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from flows.artifacts import metrics_rows, print_metrics
from flows.cli import run_command
from flows.full_pipeline import main as full_pipeline_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ENTRY_POINTS = [
    "flows.full_pipeline",
    "flows.evaluate",
    "flows.ablation",
    "flows.deployments",
    "flows.watch",
]

METRICS = {
    "LESA": {
        "zsl": {"mAP": 0.1234, "P@3": 0.5, "R@3": 0.25, "F1@3": 1 / 3},
        "gzsl": {"mAP": 0.05, "P@3": 0.2, "R@3": 0.1, "F1@3": 0.1333},
    },
    "random": {"zsl": {"mAP": 0.01}},
}


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_explains_the_command(module: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m {module}" in out
    assert "--config" in out
    assert "--set" in out


HEAVY = ("torch", "torchvision", "prefect", "dask", "distributed", "pandera", "pandas", "numpy",
         "gensim", "h5py", "s3fs", "boto3")  # fmt: skip
"""Libraries that take seconds to import; a command's parser must need none of them."""
EVERY_COMMAND = sorted(
    f"flows.{path.stem}"
    for path in (Path(__file__).resolve().parents[2] / "flows").glob("*.py")
    if 'if __name__ == "__main__":' in path.read_text()
)


@pytest.mark.parametrize("arguments", [["--help"], ["--no-such-option"]])
def test_a_command_answers_help_and_usage_errors_before_importing_anything_heavy(
    arguments: list[str],
) -> None:
    """``--help`` (exit 0) and a usage error (exit 2) answer from the parser alone, for every
    ``python -m flows.<name>``: one fresh interpreter runs each command as ``-m`` does and
    lists the heavy libraries that were imported by then."""
    script = (
        "import contextlib, io, runpy, sys\n"
        f"for name in {EVERY_COMMAND!r}:\n"
        f"    sys.argv = [name, *{arguments!r}]\n"
        "    with contextlib.redirect_stdout(io.StringIO()), "
        "contextlib.redirect_stderr(io.StringIO()):\n"
        "        try:\n"
        "            runpy.run_module(name, run_name='__main__', alter_sys=True)\n"
        "            code = None\n"
        "        except SystemExit as done:\n"
        "            code = done.code\n"
        f"    heavy = {{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})\n"
        "    print(name, code, sorted(heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    expected_code = 0 if arguments == ["--help"] else 2
    assert len(EVERY_COMMAND) >= 10  # the glob found the commands
    assert done.stdout.splitlines() == [f"{name} {expected_code} []" for name in EVERY_COMMAND]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_bad_config_fails_before_any_work(
    module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    data["storage"] = {"root": str(tmp_path / "store")}
    data["train"]["lr"] = "fast"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    started = time.monotonic()
    code = importlib.import_module(module).main(["--config", str(path)])
    assert code == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert "train.lr: Input should be a valid number" in err
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("module", ["flows.full_pipeline", "flows.evaluate", "flows.deployments"])
def test_missing_input_file_fails_before_any_work(
    module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    data["storage"] = {"root": str(tmp_path / "store")}
    (tmp_path / "vocabulary.csv").write_text("label,seen\ncat,true\n")
    data["dataset"] = {
        "source": "table",
        "labels": str(tmp_path / "labels.csv"),
        "vocabulary": str(tmp_path / "vocabulary.csv"),
    }
    path = tmp_path / "table.yaml"
    path.write_text(yaml.safe_dump(data))
    started = time.monotonic()
    assert importlib.import_module(module).main(["--config", str(path)]) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert f"dataset.labels: file not found: {tmp_path / 'labels.csv'}" in err
    assert "dataset.vocabulary" not in err
    assert not (tmp_path / "store").exists()


def test_missing_config_and_bad_override(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert full_pipeline_main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert (
        full_pipeline_main(["--config", str(CONFIGS / "tiny.yaml"), "--set", "model.num_modules=0"])
        == 2
    )
    assert "model.num_modules:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        full_pipeline_main(["--set", "no-equals-sign"])
    assert done.value.code == 2
    assert "key.path=value" in capsys.readouterr().err


def test_metrics_rows_are_percentages_per_method_and_setting() -> None:
    rows = metrics_rows(METRICS)
    assert [(row["method"], row["setting"]) for row in rows] == [
        ("LESA", "ZSL"),
        ("LESA", "GZSL"),
        ("random", "ZSL"),
    ]
    assert rows[0]["mAP"] == 12.34
    assert rows[0]["F1@3"] == 33.33
    assert rows[2]["P@3"] is None


def test_printed_table_holds_every_number() -> None:
    console = Console(record=True, width=120)
    print_metrics(METRICS, title="run x", console=console)
    text = console.export_text()
    assert "run x" in text
    for cell in ("12.34", "50.00", "25.00", "33.33", "5.00", "1.00"):
        assert cell in text
    assert "GZSL" in text


def test_too_large_k_fails_after_the_label_table_before_extraction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`evaluation.ks: [10, 20]` with 3 unseen labels was silently replaced by [3]."""
    data = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    data["storage"] = {"root": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")}
    (tmp_path / "labels.csv").write_text(
        "uri,split,positives\na.jpg,train,cat\nb.jpg,test,owl|cat\nc.jpg,test,emu\n"
    )
    (tmp_path / "vocabulary.csv").write_text(
        "label,seen\ncat,true\ndog,true\nowl,false\nemu,false\nyak,false\n"
    )
    data["dataset"] = {
        "source": "table",
        "labels": str(tmp_path / "labels.csv"),
        "vocabulary": str(tmp_path / "vocabulary.csv"),
    }
    data["evaluation"]["ks"] = [10, 20]
    data["train"]["select"] = "mAP"
    path = tmp_path / "table.yaml"
    path.write_text(yaml.safe_dump(data))
    assert full_pipeline_main(["--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "evaluation.ks = [10, 20]" in err and "the 3 unseen labels" in err
    assert (tmp_path / "store" / "datasets").exists()
    assert not (tmp_path / "store" / "features").exists(), "no feature was extracted"


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_a_secret_given_with_set_is_refused_before_any_work(
    module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "wJalrXUtnFEMI-not-a-real-key"
    args = ["--config", str(CONFIGS / "tiny.yaml"), "--set", f"storage.root={tmp_path / 's'}"]
    code = importlib.import_module(module).main([*args, "--set", f"storage.secret={secret}"])
    assert code == 2
    captured = capsys.readouterr()
    assert "override: storage.secret: secrets are not accepted" in captured.err
    assert "storage.credentials_block" in captured.err
    assert secret not in captured.out + captured.err
    assert not (tmp_path / "s").exists()


def test_run_command_shows_the_result_or_says_what_stopped_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    shown: list[Mapping[str, Any]] = []
    assert run_command(lambda: {"markdown": "| a |"}, failure="x", show=shown.append) == 0
    assert shown == [{"markdown": "| a |"}]

    def broken() -> Mapping[str, Any]:
        raise ValueError("no shards")

    assert run_command(broken, failure="the ablation failed", show=shown.append) == 1
    assert "error: the ablation failed: ValueError: no shards" in capsys.readouterr().err
    assert len(shown) == 1


def test_a_wide_table_is_printed_whole_on_a_narrow_console() -> None:
    """With threshold columns the table outgrew 80 columns and a log showed "6.…" for 6.04."""
    names = ["mAP", *(f"{m}@{k}" for k in (3, 5, "thr") for m in ("P", "R", "F1"))]
    wide = {"LESA": {"zsl": dict.fromkeys(names, 0.0604), "gzsl": dict.fromkeys(names, 0.4039)}}
    console = Console(record=True, width=60)
    print_metrics(wide, title="run x", console=console)
    text = console.export_text()
    assert "…" not in text
    assert text.count("6.04") == len(names) and text.count("40.39") == len(names)
