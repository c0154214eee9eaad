"""The peers InfLoRA and O-LoRA in the benchmark: their defining properties (InfLoRA's designed A orthogonal to its
memory, frozen, only B trained, the memory growing orthonormal; O-LoRA's penalty and its gradient, earlier adapters
frozen and still active), their keys, and runs through the runner (outputs, wall time, resume == uninterrupted)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from keeplora_bench.continual.methods import build_method
from keeplora_bench.continual.peers.adapters import TaskLoRALinear
from keeplora_bench.continual.peers.inflora import A_SCALE, design_down_projection
from keeplora_bench.continual.peers.olora import olora_penalty
from keeplora_bench.continual.runconfig import ConfigError, load_config
from keeplora_bench.continual.runner import Runner, prepare_output, run
from support.app_fixtures import tiny_config

PEERS = [{"name": "inflora", "type": "inflora"}, {"name": "olora", "type": "olora"}]


def _config(world: Path, tmp_path: Path, methods: list[dict], **extra) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config(world / "bert", world / "cache", methods, **extra), sort_keys=False))
    return path


def _runner(world: Path, tmp_path: Path, methods: list[dict]) -> Runner:
    cfg = load_config(_config(world, tmp_path, methods))
    return Runner(cfg, prepare_output(cfg, tmp_path / "run", resume=False), progress=False, log=lambda _: None)


def _orthonormal(d: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))[0]


# ----------------------------------------------------------------------------------------------- keys
def test_peer_keys_defaults_sections_and_errors(tmp_path, world):
    methods = PEERS + [{"name": "inflora flat", "type": "inflora", "feature_energy_end": 0.9}]
    cfg = load_config(_config(world, tmp_path, methods, olora={"lambda_orth": 2.0}))
    inflora, olora, flat = cfg["methods"]
    assert {k: inflora[k] for k in ("feature_energy", "feature_energy_end", "memory_rule", "num_tasks")} == {
        "feature_energy": 0.95,
        "feature_energy_end": 1.0,
        "memory_rule": "authors",
        "num_tasks": 3,
    }
    assert (inflora["r"], inflora["alpha"]) == (4, 4.0)  # the shared adapter keys apply
    assert (olora["lambda_orth"], olora["lambda_l2"], olora["orth_penalty"]) == (2.0, 0.0, "squared")
    assert flat["feature_energy_end"] == 0.9
    with pytest.raises(ConfigError, match=r"unknown keys \['lambda_orth'\] for type inflora"):
        load_config(_config(world, tmp_path, [{"name": "x", "type": "inflora", "lambda_orth": 1.0}]))
    from keeplora_bench.continual.sweep import parse_params

    assert parse_params(["lambda_orth=0.1,1", "memory_rule=authors,gpm"]) == {
        "lambda_orth": [0.1, 1],
        "memory_rule": ["authors", "gpm"],
    }
    # refused when the config is loaded (not when the method's turn comes, after the earlier methods ran)
    for bad, message in [
        ({"type": "inflora", "memory_rule": "svd"}, r"'x': memory_rule must be one of \('authors', 'gpm'\), got 'svd'"),
        ({"type": "inflora", "feature_energy_end": 1.5}, r"feature_energy_end must be a number in \[0, 1\], got 1.5"),
        ({"type": "olora", "orth_penalty": "l1"}, r"orth_penalty must be one of \('squared', 'abs'\), got 'l1'"),
        ({"type": "olora", "lambda_orth": -1.0}, r"lambda_orth must be a number >= 0, got -1.0"),
        ({"type": "olora", "lambda_l2": "big"}, r"lambda_l2 must be a number >= 0, got 'big'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(_config(world, tmp_path, [{"name": "x", **bad}]))


# ----------------------------------------------------------------------------------------------- adapters
def test_task_adapters_sum_every_task():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = TaskLoRALinear(base, scale=0.5)
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), base(x))
    pairs = [(torch.randn(2, 6), torch.randn(5, 2)) for _ in range(3)]
    for a, b in pairs:
        layer.add_adapter(a, b)
    expected = base(x) + 0.5 * sum(x @ a.t() @ b.t() for a, b in pairs)
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(ValueError, match=r"A must be \(r, 6\) and B \(5, r\)"):
        layer.add_adapter(torch.randn(2, 5), torch.randn(5, 2))


# ----------------------------------------------------------------------------------------------- InfLoRA
def test_inflora_design_is_the_residual_top_directions_orthogonal_to_the_memory():
    gen = torch.Generator().manual_seed(0)
    d, k, r = 12, 4, 3
    x = torch.randn(40, d, generator=gen, dtype=torch.float64)
    c = x.t() @ x / 40
    memory = _orthonormal(d, k, gen)
    a = design_down_projection(c, memory, r, gen)
    assert a.shape == (r, d)
    assert (a @ memory).abs().max() < 1e-12
    torch.testing.assert_close(a @ a.t(), torch.eye(r, dtype=a.dtype) / 3)
    # the rows span the top-r left singular subspace of (I − M·Mᵀ)·C
    residual = c - memory @ (memory.t() @ c)
    u = torch.linalg.svd(residual).U[:, :r]
    torch.testing.assert_close(a.t() @ a * 3, u @ u.t())
    # a residual of rank 1 < r: the missing rows are still orthogonal to the memory (the authors' SVD is not)
    v = torch.randn(d, 1, generator=gen, dtype=torch.float64)
    low = memory @ memory.t() + v @ v.t()
    a = design_down_projection(low, memory, r, gen)
    assert (a @ memory).abs().max() < 1e-12
    torch.testing.assert_close(a @ a.t(), torch.eye(r, dtype=a.dtype) / 3)
    # fewer free directions than r: the rest of A is zero
    a = design_down_projection(c, _orthonormal(d, d - 2, gen), r, gen)
    assert a[2:].abs().max() == 0 and torch.allclose(a[:2] @ a[:2].t(), torch.eye(2, dtype=a.dtype) / 3)


def test_inflora_a_orthogonal_to_memory_frozen_only_b_trains(world, tmp_path):
    runner = _runner(world, tmp_path, PEERS[:1])
    spec = runner.cfg["methods"][0]
    method = build_method(spec, runner._fresh_encoder(), runner.seed)
    pristine = {k: v.clone() for k, v in method.model.state_dict().items()}
    designed, memories = [], []
    begin = method.begin_task

    def recording_begin(task, data, loader):
        memories.append({n: m.clone() for n, m in method.memory.items()})
        begin(task, data, loader)
        designed.append({n: layer.lora_A[-1].detach().clone() for n, layer in method.layers.items()})
        trainable = {id(p) for p in method.parameters(task)}
        assert trainable == {id(layer.lora_B[-1]) for layer in method.layers.values()}
        assert all(not layer.lora_A[-1].requires_grad for layer in method.layers.values())

    method.begin_task = recording_begin
    for t in range(2):
        runner.train_task(method, t)
    sizes = [info["basis_sizes"] for info in method.info]
    for t in range(2):
        for name, layer in method.layers.items():
            a = layer.lora_A[t].detach().double()
            assert torch.equal(layer.lora_A[t].detach(), designed[t][name])  # frozen through training
            assert layer.lora_B[t].abs().max() > 0  # B trained from zero
            if t == 1:  # A_2 ⟂ the memory after task 1 (task 1 starts with an empty memory)
                before = memories[1][name]
                assert before.shape[1] > 0
                assert (a @ before).abs().max() < 1e-5, name
    for name, memory in method.memory.items():
        assert sizes[1][name] >= sizes[0][name] and memory.shape[1] == sizes[1][name] <= memory.shape[0]
        torch.testing.assert_close(memory.t() @ memory, torch.eye(memory.shape[1], dtype=memory.dtype))
    assert sum(sizes[1].values()) > sum(sizes[0].values())
    # query, key and value read the same input: one design and one memory for the three
    for i in range(2):
        qkv = [f"encoder.layer.{i}.attention.self.{p}" for p in ("query", "key", "value")]
        assert all(torch.equal(method.layers[n].lora_A[1], method.layers[qkv[0]].lora_A[1]) for n in qkv)
        assert all(torch.equal(method.memory[n], method.memory[qkv[0]]) for n in qkv)
        assert not torch.equal(
            method.layers[f"encoder.layer.{i}.attention.output.dense"].lora_A[1][:1],
            method.layers[qkv[0]].lora_A[1][:1],
        )
    # nothing but the adapters changed
    for key, value in method.model.state_dict().items():
        if ".lora_" not in key:
            assert torch.equal(value, pristine[key.replace(".base_layer.", ".")]), key


def test_inflora_threshold_schedule_and_rules():
    from keeplora_bench.continual.peers.inflora import InfLoRA

    method = InfLoRA.__new__(InfLoRA)
    method.energy_start, method.energy_end, method.num_tasks = 0.95, 1.0, 10
    assert [method.threshold(t) for t in (0, 5, 9)] == pytest.approx([0.95, 0.975, 0.995])
    assert A_SCALE == pytest.approx(1 / math.sqrt(3))


# ----------------------------------------------------------------------------------------------- O-LoRA
def test_olora_penalty_value_by_hand():
    prev = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    a = torch.tensor([[1.0, 2.0, 0.0]])
    b = torch.tensor([[3.0], [4.0]])
    # A_prev·A_tᵀ = [1, 2]ᵀ: squared 1 + 4 = 5, abs 1 + 2 = 3; ‖A_t‖ = √5, ‖B_t‖ = 5
    assert float(olora_penalty([(prev, a, b)], 0.5, 0.1)) == pytest.approx(0.5 * 5 + 0.1 * (math.sqrt(5) + 5))
    assert float(olora_penalty([(prev, a, b)], 0.5, 0.1, "abs")) == pytest.approx(0.5 * 3 + 0.1 * (math.sqrt(5) + 5))
    # first task: no earlier A, only the L2 term; two layers add up
    assert float(olora_penalty([(None, a, b)], 0.5, 0.1)) == pytest.approx(0.1 * (math.sqrt(5) + 5))
    assert float(olora_penalty([(prev, a, b), (prev, a, b)], 0.5, 0.0)) == pytest.approx(2 * 2.5)
    # against the per-task sum of the formula Σ_s ‖A_s·A_tᵀ‖²
    gen = torch.Generator().manual_seed(0)
    earlier = [torch.randn(3, 7, generator=gen) for _ in range(3)]
    a, b = torch.randn(3, 7, generator=gen), torch.randn(5, 3, generator=gen)
    by_task = sum(((s @ a.t()) ** 2).sum() for s in earlier)
    torch.testing.assert_close(olora_penalty([(torch.cat(earlier), a, b)], 1.0, 0.0), by_task)
    with pytest.raises(ValueError, match="orth_penalty must be one of"):
        olora_penalty([(prev, a, b)], 1.0, 0.0, "cosine")


@pytest.mark.parametrize("kind", ["squared", "abs"])
def test_olora_penalty_gradient(kind):
    gen = torch.Generator().manual_seed(1)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)

    prev, a, b, prev2, a2, b2 = leaf(4, 6), leaf(2, 6), leaf(5, 2), leaf(2, 3), leaf(2, 3), leaf(3, 2)
    assert torch.autograd.gradcheck(
        lambda *t: olora_penalty([(t[0], t[1], t[2]), (t[3], t[4], t[5])], 0.7, 0.3, kind),
        (prev, a, b, prev2, a2, b2),
    )


def test_olora_earlier_adapters_frozen_and_active(world, tmp_path):
    runner = _runner(world, tmp_path, PEERS[1:])
    method = build_method(runner.cfg["methods"][0], runner._fresh_encoder(), runner.seed)
    runner.train_task(method, 0)
    first = {
        n: (layer.lora_A[0].detach().clone(), layer.lora_B[0].detach().clone()) for n, layer in method.layers.items()
    }
    begin = method.begin_task

    def checking_begin(task, data, loader):
        begin(task, data, loader)
        params = {id(p) for p in method.parameters(task)}
        for layer in method.layers.values():
            assert not layer.lora_A[0].requires_grad and not layer.lora_B[0].requires_grad
            assert id(layer.lora_A[0]) not in params and id(layer.lora_B[0]) not in params
            assert {id(layer.lora_A[1]), id(layer.lora_B[1])} <= params
        # the training loss is the task loss plus the penalty
        batch = loader[0]
        method.model.eval()  # no dropout: the two forward passes compare exactly
        plain = super(type(method), method).loss_fn(task)(method.model, batch)
        torch.testing.assert_close(method.loss_fn(task)(method.model, batch), plain + method.penalty())
        assert float(method.penalty().detach()) > 0  # λ₁ > 0 and random A_2 overlaps A_1

    method.begin_task = checking_begin
    runner.train_task(method, 1)
    for name, layer in method.layers.items():
        assert torch.equal(layer.lora_A[0].detach(), first[name][0]) and torch.equal(
            layer.lora_B[0].detach(), first[name][1]
        )
        assert layer.lora_B[0].abs().max() > 0 and layer.lora_B[1].abs().max() > 0
    # inference with no task id: the model's function after task 2 includes task 1's adapter
    batch = runner.datas[0].batches("test", 16)[0]
    method.model.eval()
    with torch.no_grad():
        both = method.encoder.embed(batch.input_ids, batch.attention_mask)
        saved = [layer.lora_B[0].detach().clone() for layer in method.layers.values()]
        for layer in method.layers.values():
            layer.lora_B[0].zero_()
        without_first = method.encoder.embed(batch.input_ids, batch.attention_mask)
        for layer, b in zip(method.layers.values(), saved):
            layer.lora_B[0].copy_(b)
        again = method.encoder.embed(batch.input_ids, batch.attention_mask)
    assert not torch.allclose(both, without_first)
    assert torch.equal(both, again)
    assert method.info[1]["orthogonality"] >= 0


# ----------------------------------------------------------------------------------------------- runs
def test_peers_run_end_to_end_with_wall_time_and_resume(world, tmp_path):
    cfg = _config(world, tmp_path, PEERS)
    reference = run(cfg, output=tmp_path / "reference", progress=False, log=lambda _: None)
    saved = json.loads((tmp_path / "reference" / "results.json").read_text())
    assert [r["method"] for r in saved["methods"]] == ["inflora", "olora"]
    for row in saved["methods"]:
        assert row["seconds"] > 0 and row["seconds"] == reference.wall_s[row["method"]]
        assert reference.matrices[row["method"]].shape == (3, 3)
    assert "wall s" in (tmp_path / "reference" / "results.md").read_text()
    info = json.loads((tmp_path / "reference" / "methods" / "inflora" / "accuracy.json").read_text())["info"]
    assert len(info) == 3 and all(set(i["basis_sizes"]) == set(i["d_in"]) for i in info)
    # resume from the checkpoint after task 2 (the previous one): the last task is recomputed, identically
    out = tmp_path / "resumed"
    shutil.copytree(tmp_path / "reference", out)
    for slug in ("inflora", "olora"):
        final = out / "checkpoints" / slug
        shutil.rmtree(final)
        (out / "checkpoints" / f"{slug}.previous").rename(final)
    resumed = run(cfg, output=out, resume=True, progress=False, log=lambda _: None)
    tasks = [(r["method"], r["task"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]
    assert len(tasks) == 8 and tasks[6:] == [("inflora", "novel"), ("olora", "novel")]
    for slug in ("inflora", "olora"):
        assert resumed.matrices[slug].tolist() == reference.matrices[slug].tolist()
        a = torch.load(tmp_path / "reference" / "checkpoints" / slug / "state.pt", weights_only=False)
        b = torch.load(out / "checkpoints" / slug / "state.pt", weights_only=False)
        assert a["tensors"].keys() == b["tensors"].keys() and any(".lora_B.2" in k for k in a["tensors"])
        assert all(torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"]), slug
        if slug == "inflora":
            assert all(torch.equal(a["extra"]["memory"][n], m) for n, m in b["extra"]["memory"].items())
