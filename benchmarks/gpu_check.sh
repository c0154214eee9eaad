#!/usr/bin/env bash
# Run on a lent GPU machine (device tool), from the repository root:
#   bash benchmarks/gpu_check.sh            # writes everything under $OUT, prints the summary table last
# Uses the machine's preinstalled torch/triton/transformers/peft; nothing is installed there.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OUT=${OUT:-$PWD/gpu_check_out} PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
timeout 470 python benchmarks/gpu_check.py --out "$OUT" "$@"
