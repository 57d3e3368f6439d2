#!/usr/bin/env bash
# The MoE benchmark on one GPU (bf16), within 5 minutes on an H100-class card.
# Usage: benchmarks/gpu_moe.sh [extra bench_moe.py args]
# Writes benchmarks/results/bench_moe_cuda.json and .png, and prints the table, the measured
# bf16 matmul rate (for achieved-TFLOP/s ratios) and the ratios to the dense floor and to
# transformers' grouped_mm.
#
# effilm_reference and hf_eager loop over experts in Python and are left out by default (they do
# not bear on the targets); hf_batched_mm is skipped by the script itself above --max-gather-gb.
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_moe.sh: no CUDA device visible to torch")
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
# fail fast on a broken CUDA path before the sweep: tiny agreement check of every arm
PYTHONPATH=src timeout 120 python benchmarks/bench_moe.py --device cuda --T 256 --E 8 --skew-E --repeats 1 \
    --arms effilm_fast effilm_reference hf_grouped_mm dense_floor --out /tmp/bench_moe_cuda_smoke.json
PYTHONPATH=src timeout 240 python benchmarks/bench_moe.py --device cuda --repeats 10 --slow-s 2 \
    --arms effilm_fast hf_grouped_mm hf_batched_mm dense_floor "$@"
