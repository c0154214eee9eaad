"""The continual state as data: ``KeepLoRA.state``, ``KeepLoRA.from_state``, and states saved by an earlier keeplora.

``tests/engine/data/state_v1_mid_task`` was saved (format 1) by the keeplora before the state became a
``ContinualState``: a tiny BERT (``tiny_models.CASES["bert"]``, seed 0) with the config below, task 1 trained on
``batches(seed=1)`` and ended, task 2 begun on ``batches(seed=2)`` and trained two steps, then saved mid-task.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from keeplora import KeepLoRA, KeepLoRAConfig
from keeplora.state import ContinualState
from support.tiny_models import CASES

CASE = CASES["bert"]
FIXTURE = Path(__file__).parent / "data" / "state_v1_mid_task"


def config(**overrides) -> KeepLoRAConfig:
    cfg = dict(target_modules=CASE.targets, r=4, alpha=4.0, feature_energy=0.9, progress=False)
    cfg.update(overrides)
    return KeepLoRAConfig(**cfg)


def train(kl, data, steps=2):
    opt = torch.optim.AdamW(kl.trainable_parameters(), lr=5e-2)
    for step in range(steps):
        CASE.loss(kl.model, data[step % len(data)]).backward()
        opt.step()
        opt.zero_grad()


def _same_fingerprint(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(math.isclose(x, y, rel_tol=1e-12) for n in a for x, y in zip(a[n], b[n]))


# ----------------------------------------------------------------------------------------------- the saved format
def test_a_state_saved_by_the_earlier_keeplora_loads_with_identical_tensors(tmp_path):
    meta = json.loads((FIXTURE / "keeplora_state.json").read_text())
    bases = load_file(str(FIXTURE / "bases.safetensors"))
    weights = load_file(str(FIXTURE / "weights.safetensors"))
    adapter = load_file(str(FIXTURE / "adapter.safetensors"))
    kl = KeepLoRA.load(FIXTURE, CASE.model())
    assert kl.config == KeepLoRAConfig.from_dict(meta["config"])
    assert (kl.tasks_done, kl.in_task) == (1, True)
    assert kl.history == meta["history"] and kl.state.task_record == meta["task_record"]
    assert kl.initial_fingerprint == meta["initial_fingerprint"]
    assert sorted(kl.layers) == sorted(bases) and len(kl.layers) == 2
    for name, layer in kl.layers.items():
        assert torch.equal(kl.bases[name], bases[name])
        assert torch.equal(layer.base_layer.weight, weights[name])
        assert torch.equal(layer.lora_A["default"].weight, adapter[f"{name}.lora_A"])
        assert torch.equal(layer.lora_B["default"].weight, adapter[f"{name}.lora_B"])
        assert torch.equal(kl.state.b_start[name], adapter[f"{name}.lora_B_start"])
    # saved again, it is the same folder: the same entries and the same tensors
    kl.save(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "keeplora_state.json").read_text())
    assert again.keys() == meta.keys()
    for key in meta:
        if key.endswith("fingerprint"):
            assert _same_fingerprint(again[key], meta[key]), key
        elif key == "config":  # config fields added since the fixture was saved appear with their default values
            defaults = {f.name: f.default for f in dataclasses.fields(KeepLoRAConfig)}
            assert again[key] == {**{k: defaults[k] for k in again[key].keys() - meta[key].keys()}, **meta[key]}
        else:
            assert again[key] == meta[key], key
    for file in ("bases.safetensors", "weights.safetensors", "adapter.safetensors"):
        old, new = load_file(str(FIXTURE / file)), load_file(str(tmp_path / "again" / file))
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old), file
    # and the task it was saved in ends
    added = kl.end_task(CASE.batches(seed=2), CASE.loss)
    assert kl.tasks_done == 2 and not kl.in_task and kl.state.b_start == {}
    assert [h["task"] for h in kl.history] == [1, 2]
    assert all(kl.bases[n].shape[1] == bases[n].shape[1] + added[n] for n in kl.layers)


def test_the_fixture_is_untouched_by_loading(tmp_path):
    """Loading reads the folder only (a test that wrote into it would hide a format change)."""
    copy = Path(shutil.copytree(FIXTURE, tmp_path / "copy"))
    KeepLoRA.load(copy, CASE.model())
    for path in sorted(FIXTURE.iterdir()):
        assert path.read_bytes() == (copy / path.name).read_bytes(), path.name


# ----------------------------------------------------------------------------------------------- the engine's state
def test_the_engine_keeps_its_continual_state_in_one_object():
    data = CASE.batches(seed=1)
    kl = KeepLoRA(CASE.model(), config())
    state = kl.state
    assert isinstance(state, ContinualState) and state.tasks_done == 0 and not state.in_task
    assert kl.bases is state.bases and kl.basis_sizes() == state.basis_sizes()
    kl.begin_task(data, CASE.loss)
    assert kl.state is state and state.in_task and sorted(state.b_start) == sorted(kl.layers)
    assert state.task_record["task"] == 1 and sorted(state.task_record["adapter_rank"]) == sorted(kl.layers)
    for name, layer in kl.layers.items():
        assert torch.equal(state.b_start[name], layer.lora_B["default"].weight)
    train(kl, data)
    kl.end_task(data, CASE.loss)
    assert kl.state is state and (state.tasks_done, state.in_task, state.b_start) == (1, False, {})
    assert kl.bases is state.bases and kl.history is state.history and len(state.history) == 1
    assert state.history[0]["task"] == 1 and state.history[0]["basis_size"] == state.basis_sizes()
    kl.tasks_done = 3  # the properties write the state
    assert state.tasks_done == 3


@pytest.mark.parametrize("mid_task", [False, True])
def test_from_state_continues_exactly_like_the_run_it_was_taken_from(mid_task):
    data1, data2 = CASE.batches(seed=1), CASE.batches(seed=2)
    kl = KeepLoRA(CASE.model(), config())
    kl.begin_task(data1, CASE.loss)
    train(kl, data1)
    kl.end_task(data1, CASE.loss)
    if mid_task:
        kl.begin_task(data2, CASE.loss)
        train(kl, data2)
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in kl.layers.items()}
    adapters = None
    if mid_task:
        adapters = {
            n: (layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone())
            for n, layer in kl.layers.items()
        }
    copy = KeepLoRA.from_state(CASE.model(), kl.config, kl.state, weights=weights, adapters=adapters)
    assert copy.state is not kl.state and copy.state.bases is not kl.state.bases
    for k in (copy, kl):
        if not mid_task:
            k.begin_task(data2, CASE.loss)
            train(k, data2)
        if k is copy:  # the copy's progress leaves the state it was made from as it was
            assert (kl.tasks_done, kl.in_task, len(kl.history)) == (1, mid_task, 1)
        k.end_task(data2, CASE.loss)
    assert (kl.tasks_done, copy.tasks_done) == (2, 2)
    assert [h["added"] for h in copy.history] == [h["added"] for h in kl.history]
    for name in kl.layers:
        assert torch.equal(copy.bases[name], kl.bases[name])
        assert torch.equal(copy.layers[name].base_layer.weight, kl.layers[name].base_layer.weight)


def _bad_resumes(kl: KeepLoRA):
    """``(what, state, weights, adapters, exception, message)`` each of which from_state must refuse."""
    st = kl.state
    name = next(iter(kl.layers))
    d_out, d_in = kl.layers[name].base_layer.weight.shape
    r = kl.config.r
    fewer = ContinualState(
        bases={n: p for n, p in st.bases.items() if n != name}, initial_fingerprint=st.initial_fingerprint
    )
    wrong_rows = ContinualState(
        bases={**st.bases, name: torch.zeros(d_in + 1, 2)}, initial_fingerprint=st.initial_fingerprint
    )
    in_task = ContinualState(
        bases=st.bases,
        initial_fingerprint=st.initial_fingerprint,
        in_task=True,
        b_start={n: torch.zeros(layer.out_features, r) for n, layer in kl.layers.items()},
    )
    adapters = {
        n: (torch.zeros(r, layer.in_features), torch.zeros(layer.out_features, r)) for n, layer in kl.layers.items()
    }
    weights = {n: torch.zeros(layer.out_features, layer.in_features) for n, layer in kl.layers.items()}
    return [
        ("not a state", {"bases": st.bases}, None, None, TypeError, "state must be a keeplora.state.ContinualState"),
        ("a target missing", fewer, None, None, ValueError, "state.bases covers targets"),
        ("a basis of the wrong d_in", wrong_rows, None, None, ValueError, rf"state.bases\['{name}'\] must be"),
        ("in a task without adapters", in_task, None, None, ValueError, "adapters .* are required"),
        ("adapters between tasks", st, None, adapters, ValueError, "adapters are only accepted for a state in a task"),
        (
            "a weight of the wrong shape",
            st,
            {**weights, name: torch.zeros(d_in, d_out + 1)},
            None,
            ValueError,
            rf"weights\['{name}'\] must be a floating-point tensor of shape \({d_out}, {d_in}\)",
        ),
        (
            "an A of the wrong rank",
            in_task,
            None,
            {**adapters, name: (torch.zeros(r + 1, d_in), adapters[name][1])},
            ValueError,
            rf"adapters\['{name}'\]\[0\] \(A\) must be",
        ),
    ]


@pytest.mark.parametrize("case", range(7))
def test_from_state_refuses_a_state_that_does_not_fit_before_touching_the_model(case):
    kl = KeepLoRA(CASE.model(), config())
    what, state, weights, adapters, error, match = _bad_resumes(kl)[case]
    model = CASE.model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        KeepLoRA.from_state(model, kl.config, state, weights=weights, adapters=adapters)
    assert not any(isinstance(m, LoraLayer) for m in model.modules()), what
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items()), what


# ----------------------------------------------------------------------------------------------- module structure
def _imported(module: str) -> set[str]:
    tree = ast.parse(Path(importlib.import_module(f"keeplora.{module}").__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.add(node.module or "")
            names.update(alias.name for alias in node.names if node.module is None)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_checkpoint_and_state_do_not_import_the_engine():
    """One direction only: the engine uses checkpoint and state; neither reaches back into the engine."""
    for module in ("checkpoint", "state"):
        imported = _imported(module)
        assert "engine" not in imported and "keeplora.engine" not in imported, module
    assert {"checkpoint", "state"} <= _imported("engine")
