#!/usr/bin/env bash
# The prepared GPU run, from the repository root of a checkout on a GPU machine:
#   bash benchmarks/gpu_check.sh            # results under $OUT; the summary table, then the open targets, print last
# (the Python part stops at GPU_CHECK_TIMEOUT, default 470 s, then the bundle is made)
# Uses the machine's preinstalled torch/triton/transformers/peft; nothing is installed there: the library, its kernels
# and the benchmark app (benchmarks/keeplora_bench) are imported from this checkout through PYTHONPATH.
# Everything is written to a work folder first and bundled at the end (few files to copy back), so $OUT gets gpu_check.tar.gz (all logs and CSVs) and summary.json (also inside the bundle).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/gpu_check_out}
WORK=${GPU_CHECK_WORK:-$(mktemp -d)}
PY=$(command -v python3 || command -v python)
export PYTHONPATH="$PWD:$PWD/python:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$WORK"
nvidia-smi > "$WORK/nvidia-smi.txt" 2>&1 || true
timeout "${GPU_CHECK_TIMEOUT:-470}" "$PY" -m keeplora_bench.gpu_check --out "$WORK" "$@"
rc=$?
# cut by the limit before its own end: the targets table (seconds) from the CSVs the finished steps wrote
[ $rc -eq 124 ] && "$PY" -m keeplora_bench.targets "$WORK" --write "$WORK/targets.md"
# The device's .git is the session's starting commit plus the working tree as uncommitted changes, so the sha in the
# rows reads "<start>-dirty". The tree hash of the files that ran identifies the commit: compare it with
# `git rev-parse <commit>^{tree}` where the run was launched.
{ git rev-parse HEAD; idx=$(mktemp); cp .git/index "$idx" 2>/dev/null
  GIT_INDEX_FILE=$idx git add -A . 2>/dev/null && echo "tree $(GIT_INDEX_FILE=$idx git write-tree)"; rm -f "$idx"
} > "$WORK/git_sha.txt" 2>/dev/null || true
tar czf "$OUT/gpu_check.tar.gz" -C "$WORK" . && cp "$WORK/summary.json" "$OUT/" 2>/dev/null
exit $rc
