"""The same config and data give the same metrics in another process.

Two runs of the tiny config, each in its own ``python -m flows.full_pipeline`` process (the
second reusing the first's dataset and features under another run name, so it trains and
evaluates from scratch), must write identical metrics: initial weights, batch order and
evaluation are functions of the config alone, not of the process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _run(root: Path, run_name: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    done = subprocess.run(
        [
            sys.executable, "-m", "flows.full_pipeline", "--config", "configs/tiny.yaml",
            "--set", f"storage.root={root}", "--set", f"run_name={run_name}",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((root / "runs" / run_name / "reports" / "metrics.json").read_text())


def test_two_processes_give_identical_metrics(tmp_path: Path) -> None:
    first = _run(tmp_path, "repro-a")
    second = _run(tmp_path, "repro-b")
    assert first["metrics"] == second["metrics"]
    assert first["metrics"]["LESA"]["gzsl"]["mAP"] > 0
