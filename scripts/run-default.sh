#!/usr/bin/env bash
# Set up (idempotent), then run the whole LESA pipeline on the embedded default dataset
# (emoji-scenes, EfficientNet-Lite0, offline GloVe) and print the ZSL / GZSL metrics.
# Extra arguments go to the pipeline, e.g.: bash scripts/run-default.sh --set train.steps=500
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m flows.full_pipeline --config configs/default.yaml "$@"
