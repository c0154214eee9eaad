"""The peer methods OSF (from PEFT), MagMax and the no-protection control: each one's defining property on a tiny
model, and each end to end through the runner (outputs, wall time, resume from a per-task checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from keeplora_bench.continual import runner as R
from keeplora_bench.continual.methods import build_method
from keeplora_bench.continual.peers.magmax import MagMax, max_magnitude
from keeplora_bench.continual.peers.osf import OSFFineTuning, osf_missing, preserved_leak
from keeplora_bench.continual.runconfig import ConfigError, load_config
from support.app_fixtures import tiny_config, write_config
from support.tiny_models import CASES, sgd_pass

BERT = CASES["bert"]
PEERS = [
    {"name": "osf", "type": "osf", "lr": 1e-3},
    {"name": "magmax", "type": "magmax"},
    {"name": "no-protection", "type": "keeplora", "weight_energy": 0.0, "feature_energy": 0.0},
]


def _encoder(seed: int = 0) -> SimpleNamespace:
    """What the methods use of a TextEncoder: its ``model``."""
    return SimpleNamespace(model=BERT.model(seed))


def _targets(model) -> dict[str, torch.Tensor]:
    return {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in BERT.targets)
    }


# ---------------------------------------------------------------------------------------------------- OSF
needs_osf = pytest.mark.skipif(osf_missing() is not None, reason=str(osf_missing()))


def _osf(**keys) -> OSFFineTuning:
    spec = {"name": "osf", "type": "osf", "target_modules": BERT.targets, "effective_rank": 8, "rank_step": 4} | keys
    return OSFFineTuning(spec, _encoder(), seed=0)


def _osf_task(method: OSFFineTuning, task: int, optimizer: str) -> None:
    batches = BERT.batches(4, seed=task)
    method.begin_task(task, None, batches)
    params = method.parameters(task)
    assert params and all("osf_svd_params" in n for n, p in method.model.named_parameters() if p.requires_grad)
    if optimizer == "sgd":
        sgd_pass(method.model, params, batches, BERT.loss, lr=0.5)
    else:  # the runner's optimizer
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
        method.model.train()
        for b in batches:
            BERT.loss(method.model, b).backward()
            opt.step()
            opt.zero_grad()
        method.model.eval()
    method.end_task(task, None, batches)


@needs_osf
def test_osf_keeps_the_preserved_singular_directions_and_raises_their_rank_per_task():
    """Under gradient descent each task leaves the top-k_t singular pairs (u_i, σ_i, v_i) of every adapted weight
    as they were (PEFT's projection), moves the rest, and k_t follows the recipe (8, 12, 16 of 32)."""
    method = _osf()
    for task, k in enumerate((8, 12, 16)):
        before = _targets(method.model)
        _osf_task(method, task, "sgd")
        after = _targets(method.model)
        assert method.info[-1]["preserved_rank"] == {n: k for n in before}
        assert not any("osf" in n for n, _ in method.model.named_modules()), "the adapter must be merged and removed"
        for name, w0 in before.items():
            u, s, vh = torch.linalg.svd(w0.double())
            w1 = after[name].double()
            assert (w1 - w0.double()).norm() > 1e-3 * w0.norm(), f"{name}: the task trained nothing"
            torch.testing.assert_close(u[:, :k].T @ w1, torch.diag(s[:k]) @ vh[:k], atol=1e-5, rtol=0)
            torch.testing.assert_close(w1 @ vh[:k].T, u[:, :k] @ torch.diag(s[:k]), atol=1e-5, rtol=0)
            # the relative leak is fp32 rounding of the merged weight: eps · ‖W‖ / ‖ΔW‖ times a small factor
            bound = 64 * torch.finfo(torch.float32).eps * float(w0.norm() / (w1 - w0.double()).norm())
            assert preserved_leak(w0, after[name], k) < bound, name
        leaks = [preserved_leak(w0, after[n], k) for n, w0 in before.items()]
        assert method.info[-1]["preserved_leak"] == max(leaks)


@needs_osf
def test_osf_under_adamw_records_how_far_its_update_leaks_into_the_preserved_directions():
    method = _osf()
    before = _targets(method.model)
    _osf_task(method, 0, "adamw")
    after = _targets(method.model)
    leaks = [preserved_leak(before[n], after[n], 8) for n in before]
    assert method.info[0]["preserved_leak"] == max(leaks)
    assert max(leaks) > 1e-3  # Adam rescales the projected gradient coordinate-wise: the guarantee is not exact


def test_preserved_leak_measures_the_update_inside_the_top_directions():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    outside = u[:, 2:] @ torch.randn(3, 3, generator=g, dtype=torch.float64) @ vh[2:]
    assert preserved_leak(w, w + outside, 2) < 1e-12
    assert preserved_leak(w, w + 0.3 * torch.outer(u[:, 0], vh[0]), 2) == pytest.approx(1.0)
    assert preserved_leak(w, w, 2) == 0.0


@needs_osf
def test_osf_rank_schedule_fractions_and_cap():
    m = _osf(effective_rank=0.25, rank_step=0.25)
    assert set(m.preserved_ranks(0).values()) == {8} and set(m.preserved_ranks(2).values()) == {24}
    assert set(m.preserved_ranks(5).values()) == {31}  # capped: one direction stays trainable
    assert set(_osf(effective_rank=3, rank_step=0).preserved_ranks(7).values()) == {3}
    with pytest.raises(RuntimeError, match="match no linear module"):
        _osf(target_modules=["nothing"]).preserved_ranks(0)


def test_osf_without_peft_support_is_refused_by_name_and_skipped_by_the_runner(world, tmp_path, monkeypatch):
    reason = "method type 'osf' needs peft >= 0.18 (peft.OSFConfig); the installed peft is 0.17.1"
    monkeypatch.setattr("keeplora_bench.continual.peers.osf.osf_missing", lambda: reason)
    monkeypatch.setattr(R, "osf_missing", lambda: reason)
    with pytest.raises(RuntimeError, match=r"'osf'.*needs peft >= 0\.18"):
        _osf()
    lines = []
    cfg = tiny_config(
        world / "bert", world / "cache", [{"name": "osf", "type": "osf"}, {"name": "zs", "type": "zero_shot"}]
    )
    result = R.run(write_config(cfg, tmp_path / "c.yaml"), output=tmp_path / "r", progress=False, log=lines.append)
    assert set(result.matrices) == {"zs"}
    assert any(line.startswith("[keeplora] skipping ['osf']") and reason in line for line in lines)


# ---------------------------------------------------------------------------------------------------- MagMax
def test_max_magnitude_picks_the_largest_delta_per_entry_with_its_sign():
    d1 = torch.tensor([1.0, -3.0, 0.5, 2.0, 0.0, -1.0])
    d2 = torch.tensor([-2.0, 1.0, 0.5, -2.0, 0.0, 1.0])
    d3 = torch.tensor([0.5, 2.5, -0.75, 1.0, 0.0, -1.0])
    merged = max_magnitude(max_magnitude(max_magnitude(None, d1), d2), d3)
    assert merged.tolist() == [-2.0, -3.0, -0.75, -2.0, 0.0, -1.0]
    # ties go to the later task (the authors' >=): entries 3 (2 vs -2: -2 from task 2) and 5 (-1, 1, -1: task 3)
    assert max_magnitude(d1, d2).tolist() == [-2.0, -3.0, 0.5, -2.0, 0.0, 1.0]
    brute = torch.stack([d1, d2, d3])
    order = brute.abs().flip(0).argmax(0)  # the last index of the maximum
    assert torch.equal(merged, brute.flip(0).gather(0, order[None])[0])


def _magmax_task(method: MagMax, task: int) -> None:
    batches = BERT.batches(3, seed=task)
    method.begin_task(task, None, batches)
    sgd_pass(method.model, method.parameters(task), batches, BERT.loss, lr=0.5)
    method.end_task(task, None, batches)


def test_magmax_evaluates_the_merged_model_and_trains_on_from_the_chain():
    spec = {"name": "magmax", "type": "magmax", "r": 4, "alpha": 4.0, "target_modules": BERT.targets}
    spec["merge_scale"] = 0.5
    method = MagMax(spec, _encoder(), seed=0)
    theta0 = _targets(method.model)
    with method.eval_model():  # nothing trained yet: the pre-trained model
        assert all(torch.equal(w, theta0[n]) for n, w in _targets(method.model).items())
    chain = []
    for task in range(3):
        _magmax_task(method, task)
        chain.append(_targets(method.model))
        taus = [{n: c[n] - theta0[n] for n in theta0} for c in chain]
        with method.eval_model():
            evaluated = _targets(method.model)
        for name, w in evaluated.items():
            merged = None
            for tau in taus:
                merged = max_magnitude(merged, tau[name])
            torch.testing.assert_close(w, theta0[name] + 0.5 * merged, rtol=0, atol=0)
            assert torch.equal(_targets(method.model)[name], chain[-1][name]), "the chain must be restored"
        assert method.info[-1]["merged_tensors"] == len(theta0)
    # task 2 started from the chain after task 1 (not from the merged model): LoRA wrapped those weights
    method.begin_task(3, None, BERT.batches(1))
    bases = {n[: -len(".base_layer")]: m.weight for n, m in method.model.named_modules() if n.endswith(".base_layer")}
    assert bases and all(torch.equal(bases[n], chain[-1][n]) for n in bases)


# ---------------------------------------------------------------------------------------------------- no protection
def test_no_protection_protects_nothing_and_trains_b():
    spec = {
        "name": "no-protection",
        "type": "keeplora",
        "target_modules": BERT.targets,
        "r": 4,
        "alpha": 4.0,
        "weight_energy": 0.0,
        "feature_energy": 0.0,
        "b_init": "gradient",
        "a_init": "gradient",
        "grad_data_fraction": 1.0,
    }
    method = build_method(spec, _encoder(), seed=0)
    method.setup()
    for task in range(2):
        batches = BERT.batches(3, seed=task)
        method.kl.begin_task(batches, loss_fn=BERT.loss)  # what begin_task does, with the tiny model's loss
        assert method.kl.bases and all(b.shape[1] == 0 for b in method.kl.bases.values())
        params = method.parameters(task)
        start = [p.detach().clone() for p in params]
        sgd_pass(method.model, params, batches, BERT.loss, lr=0.5)
        assert all(not torch.equal(p, s) for p, s in zip(params, start)), "every B must move"
        method.kl.end_task(batches, loss_fn=BERT.loss)
        assert all(b.shape[1] == 0 for b in method.kl.bases.values()), "ε_f = 0 adds no task memory"


# ---------------------------------------------------------------------------------------------------- end to end
class _Stop(Exception):
    pass


def test_peers_end_to_end_and_resume_equals_uninterrupted(world, tmp_path, monkeypatch):
    methods = PEERS if osf_missing() is None else PEERS[1:]
    cfg_path = write_config(tiny_config(world / "bert", world / "cache", methods), tmp_path / "cfg.yaml")
    clean = R.run(cfg_path, output=tmp_path / "clean", progress=False, log=lambda _: None)
    saved = json.loads((tmp_path / "clean" / "results.json").read_text())
    for m in methods:
        row = next(r for r in saved["methods"] if r["method"] == m["name"])
        assert row["seconds"] > 0 and clean.wall_s[m["name"]] == row["seconds"]
        assert len(saved["matrices"][m["name"]]) == 3
        info = json.loads((tmp_path / "clean" / "methods" / m["name"] / "accuracy.json").read_text())["info"]
        assert len(info) == 3
    info = {
        m["name"]: json.loads((tmp_path / "clean" / "methods" / m["name"] / "accuracy.json").read_text())["info"]
        for m in methods
    }
    assert all(v == 0 for t in info["no-protection"] for v in t["basis_sizes"].values())
    if "osf" in info:
        assert [sorted(set(t["preserved_rank"].values())) for t in info["osf"]] == [[8], [12], [16]]
    # a run stopped right after each method's first checkpoint and resumed each time computes what the
    # uninterrupted run did (every method continues from its task-1 checkpoint once)
    save = R.Runner.save_checkpoint

    def save_then_stop(self, method, pristine, state):
        save(self, method, pristine, state)
        if state["tasks_done"] == 1:
            raise _Stop

    monkeypatch.setattr(R.Runner, "save_checkpoint", save_then_stop)
    stops = []
    for attempt in range(len(methods) + 1):
        try:
            resumed = R.run(
                cfg_path, output=tmp_path / "stopped", resume=attempt > 0, progress=False, log=lambda _: None
            )
            break
        except _Stop:
            stops.append(json.loads((tmp_path / "stopped" / "progress.json").read_text()))
    assert len(stops) == len(methods) and stops[-1] == {m["name"]: 3 for m in methods[:-1]} | {methods[-1]["name"]: 1}
    for m in methods:
        assert resumed.matrices[m["name"]].tolist() == clean.matrices[m["name"]].tolist(), m["name"]
    log = [
        (r["method"], r["task"]) for r in map(json.loads, (tmp_path / "stopped" / "log.jsonl").read_text().splitlines())
    ]
    assert len(log) == len(set(log)) == 3 * len(methods)


def test_peer_keys_are_resolved_and_checked(world, tmp_path):
    cfg = tiny_config(world / "bert", world / "cache", PEERS)
    resolved = {m["name"]: m for m in load_config(write_config(cfg, tmp_path / "c.yaml"))["methods"]}
    assert resolved["osf"]["effective_rank"] == 8 and resolved["osf"]["rank_step"] == 4
    assert "r" not in resolved["osf"] and resolved["osf"]["target_modules"] == resolved["magmax"]["target_modules"]
    assert resolved["magmax"]["merge_scale"] == 0.5 and resolved["magmax"]["r"] == 4
    bad = [
        ({"effective_rank": 0}, r"effective_rank: an integer >= 1"),
        ({"effective_rank": 1.5}, r"effective_rank: an integer >= 1 .* got 1.5"),
        ({"rank_step": -1}, r"rank_step: an integer >= 0"),
        ({"merge_scale": 0}, r"merge_scale must be a number > 0"),
        ({"lambda": 1}, r"unknown keys \['lambda'\]"),
    ]
    for keys, message in bad:
        kind = "magmax" if "merge_scale" in keys else "osf"
        cfg = tiny_config(world / "bert", world / "cache", [{"name": "p", "type": kind} | keys])
        with pytest.raises(ConfigError, match=message):
            load_config(write_config(cfg, tmp_path / "bad.yaml"))


def test_peers_config_lists_the_peers():
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "peers.yaml", quick=True)
    kinds = {m["name"]: m["type"] for m in cfg["methods"]}
    assert cfg["name"] == "peers" and {"zero-shot", "lora-ft", "keeplora"} <= set(kinds)
    assert kinds["osf"] == "osf" and kinds["magmax"] == "magmax" and kinds["no-protection"] == "keeplora"
    no_protection = next(m for m in cfg["methods"] if m["name"] == "no-protection")
    assert no_protection["weight_energy"] == 0 and no_protection["feature_energy"] == 0
