"""The whole LESA pipeline as one Prefect flow, named ``lesa``.

    python -m flows.full_pipeline --config configs/default.yaml

prepare dataset -> validate label table -> extract features (Dask) -> embed labels -> train ->
evaluate. Every stage skips work that is already done (prepared tables, committed feature
shards, cached embeddings, a finished training run with the same inputs), so a rerun after a
failure continues where it stopped, and new unseen labels are scored without retraining.
Without ``PREFECT_API_URL`` the run uses a temporary local Prefect API; with it, the run shows
up in that server's UI (the ``lesa/full-pipeline`` deployment in ``flows.deployments`` runs
this same flow).
"""

from __future__ import annotations

import argparse

from flows.arguments import add_config_arguments, run_entry_point


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flows.full_pipeline``."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.full_pipeline",
        description=(
            "Run the whole LESA pipeline (dataset, features, embeddings, training, evaluation) "
            "on one YAML config and print ZSL / GZSL metrics. Finished stages are reused on "
            "rerun. Runs on a temporary local Prefect API unless PREFECT_API_URL is set."
        ),
        epilog=(
            "examples:\n"
            "  python -m flows.full_pipeline --config configs/default.yaml\n"
            "  python -m flows.full_pipeline --config configs/tiny.yaml "
            "--set storage.root=s3://bucket/lesa"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line: validate the config first, run the flow, print the metrics table."""
    return run_entry_point(build_parser(), argv, "flows.full_pipeline_flow")


if __name__ == "__main__":
    raise SystemExit(main())
