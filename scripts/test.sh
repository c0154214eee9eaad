#!/usr/bin/env bash
# The test suite, on a fresh machine or a prepared one: bash scripts/test.sh [pytest args]
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KEEPLORA_ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q "$@"
