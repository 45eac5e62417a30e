"""The paper's ablation as one Prefect flow (flow ``lesa``, deployment ``lesa/ablation``).

    python -m flows.ablation --config configs/default.yaml

prepare dataset -> validate label table -> extract features -> embed labels (each reused from
the pipeline's earlier runs, as ``flows.full_pipeline`` prepares them), then every
(variant, seed) cell of the config's ``ablation`` section trains and is scored on the Dask
cluster of ``features.dask``, in parallel. The summary (mean and spread over seeds), a Markdown
table and a ZSL-against-GZSL plot are written under ``runs/<run>/ablation/`` and attached to the
flow run as artifacts. Finished cells are reused on rerun.
"""

from __future__ import annotations

import argparse

from flows.arguments import add_config_arguments, run_entry_point


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flows.ablation``."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.ablation",
        description=(
            "Run the paper's ablation on one config: each variant of its 'ablation' section "
            "(loss terms on/off, M, normalisation, selection rule) with every seed, in parallel "
            "on Dask, reusing the pipeline's dataset, features and label vectors. Prints the "
            "table and writes a Markdown + PNG report under runs/<run>/ablation/."
        ),
        epilog=(
            "examples:\n"
            "  python -m flows.ablation --config configs/default.yaml\n"
            "  python -m flows.ablation --config configs/tiny.yaml --set 'ablation.seeds=[0]'"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line: validate the config first, run the grid, print the ablation table."""
    return run_entry_point(build_parser(), argv, "flows.ablation_flow")


if __name__ == "__main__":
    raise SystemExit(main())
