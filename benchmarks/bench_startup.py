"""Start-up of the commands: ``python -m flows.<name> --help`` against a bare interpreter, and
the imports a run pays before its first stage (target: ``--help`` under 2 s).

Each command's parser is built from modules that import nothing heavy (``flows.arguments``);
its flow, Prefect, torch and Dask load only once the arguments parsed. This script times, in
fresh processes, the median of ``--repeats`` runs of: ``python -c pass`` (the baseline), every
command's ``--help``, and importing the module that runs the full pipeline
(``flows.full_pipeline_flow``) and the temporary Prefect API's (``flows.temporary_api``), which
is what ``python -m flows.full_pipeline`` imports before its first stage. Usage::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

FLOWS = Path(__file__).resolve().parents[1] / "flows"


def commands() -> list[str]:
    """Every ``python -m flows.<name>`` command of the repository."""
    return sorted(
        f"flows.{path.stem}"
        for path in FLOWS.glob("*.py")
        if 'if __name__ == "__main__":' in path.read_text()
    )


def median_seconds(argv: list[str], repeats: int) -> float:
    """Median wall time of running ``argv`` in a fresh process ``repeats`` times."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, cwd=FLOWS.parent)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median)")
    args = parser.parse_args()
    bare = median_seconds([sys.executable, "-c", "pass"], args.repeats)
    print(f"bare interpreter: {bare:.2f} s")
    helps = {}
    for name in commands():
        helps[name] = median_seconds([sys.executable, "-m", name, "--help"], args.repeats)
        print(f"{name} --help: {helps[name]:.2f} s")
    imports = "import flows.full_pipeline_flow, flows.temporary_api"
    before_first_stage = median_seconds([sys.executable, "-c", imports], args.repeats)
    print(f"imports before the pipeline's first stage: {before_first_stage:.2f} s")
    slowest = max(helps, key=helps.__getitem__)
    print(f"slowest --help ({slowest}): {helps[slowest]:.2f} s (target < 2 s)")
    print(f"slowest --help / bare interpreter: {helps[slowest] / bare:.1f}")


if __name__ == "__main__":
    main()
