#!/usr/bin/env bash
# The library-layer tests on the lowest torch, transformers and peft that pyproject.toml declares:
#   bash scripts/test_min_versions.sh [pytest args]
# Builds a fresh virtual environment outside the repository with exactly those three versions (the rest resolved by
# pip), installs keeplora editable without the compiled extension (the PyTorch paths run) and runs the test files
# that exercise transformers and peft. The kernels tests do not depend on transformers or peft, so they are not here.
#   KEEPLORA_MIN_VENV  where the environment is built; removed and rebuilt on every run (default: a temp directory)
#   PYTHON             interpreter that creates it (default: python3, needs 3.10+)
#   TORCH_INDEX_URL    index for torch only, e.g. a CPU-only wheel index on a machine without CUDA (default: pip's)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${KEEPLORA_MIN_VENV:-${TMPDIR:-/tmp}/keeplora-min-venv}
case "$VENV" in "$ROOT"|"$ROOT"/*) echo "KEEPLORA_MIN_VENV must lie outside the repository: $VENV" >&2; exit 2;; esac

# the minimums are read from pyproject.toml so that the declaration and this check cannot drift apart
min_version() {
  local v
  v=$(sed -n "s/^ *\"$1>=\([0-9][0-9.]*\)\".*/\1/p" "$ROOT/pyproject.toml")
  if [ -z "$v" ]; then echo "pyproject.toml declares no \"$1>=X\" dependency" >&2; exit 2; fi
  echo "$v"
}
TORCH=$(min_version torch); TRANSFORMERS=$(min_version transformers); PEFT=$(min_version peft)
echo "[min-versions] torch==$TORCH transformers==$TRANSFORMERS peft==$PEFT in $VENV"

rm -rf "$VENV"
"${PYTHON:-python3}" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
_pip() { python -m pip --disable-pip-version-check -q "$@"; }
_pip install "setuptools>=77" wheel
# torch first and alone, so that resolving the other packages cannot replace it
if [ -n "${TORCH_INDEX_URL:-}" ]; then _pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH"
else _pip install "torch==$TORCH"; fi
_pip install "torch==$TORCH" "transformers==$TRANSFORMERS" "peft==$PEFT" accelerate safetensors numpy pyyaml tqdm \
  "pytest>=8" "triton>=3.2"
(cd "$ROOT" && KEEPLORA_BUILD_EXT=0 _pip install --no-build-isolation --no-deps -e .)
python -c "import torch, transformers, peft; print('[min-versions] installed: torch', torch.__version__,
  'transformers', transformers.__version__, 'peft', peft.__version__)"

cd "$ROOT"
export PYTHONPATH="$ROOT:$ROOT/python"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
python -m pytest -q -p no:cacheprovider \
  tests/engine/test_peft_integration.py tests/engine/test_guarantees.py tests/engine/test_checkpoint.py tests/engine/test_bad_input.py \
  tests/engine/test_compile.py tests/engine/test_memory_update.py tests/engine/test_statistics.py tests/engine/test_durable_state.py "$@"
