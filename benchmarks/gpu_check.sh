#!/usr/bin/env bash
# The GPU checks of issue 12, prepared for a session that is lent a CUDA machine (H100/H200).
#
#   bash benchmarks/gpu_check.sh [OUTPUT_FOLDER]     (default: $OUT, else ./gpu-check)
#
# Runs, from the repository root, each with its own time limit (about 8 minutes in all):
#   1. bench_training_input.py --device cuda: training img/s end to end from HDF5 shards on local
#      disk (NUS-WIDE shape, bf16 autocast) vs the same steps on batches already on the device;
#      target >= 20,000 img/s and `end-to-end / in-memory` >= 0.9;
#   2. bench_training_gpu.py: the model's own steps, fp32 vs bf16, batches 32 / 128 / 512;
#   3. bench_extraction_gpu.py: VGG-19 half-precision extraction img/s (backbone and pipeline).
# Everything printed goes to OUTPUT_FOLDER/gpu-check.txt (and the console); a failed step is
# recorded and the next one still runs. PYTHON overrides the interpreter (.venv/bin/python).
set -u
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
log="$out/gpu-check.txt"
python="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1

run() {
  local limit="$1"; shift
  echo "== $* (limit ${limit}s)" | tee -a "$log"
  timeout "$limit" "$python" "$@" 2>&1 | tee -a "$log"
  echo "== exit ${PIPESTATUS[0]}" | tee -a "$log"
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } 2>&1 | tee "$log"
run 240 benchmarks/bench_training_input.py --device cuda --images 16384 --shard-size 1024 \
  --window-chunks 64 --steps 1500 --repeats 3 --folder "${TMPDIR:-/tmp}"
run 120 benchmarks/bench_training_gpu.py --batches 32 128 512
run 150 benchmarks/bench_extraction_gpu.py --images 512
echo "saved $log"
