"""The kernel benchmark runs end to end on the CPU (tiny shapes), with "ours" through the Triton interpreter."""

import csv

import pytest
import torch

from support.tolerances import ATOL_FLOOR
from support.triton_env import force_triton  # noqa: F401  (skips without triton; the fixture is used below)


@pytest.mark.usefixtures("force_triton")
def test_cpu_smoke_run_writes_complete_rows(tmp_path):
    from keeplora_bench.micro import bench_kernels

    rows = bench_kernels.run(tmp_path, quick=True, device="cpu", smoke=True, trace=True)
    trace = (tmp_path / "trace_kernels.txt").read_text()  # the per-kernel profile of the Triton LoRA step
    assert "lora_linear Triton step x5, T=64 d=48 r=8" in trace and "LoRALinearTritonFunction" in trace
    ops = {(r["op"], r["provider"]) for r in rows}
    for provider in ("base", "reference", "peft-float32", "unfused", "ours", "experimental-triton"):
        assert ("lora_linear", provider) in ops
    for provider in ("unfused", "ours-3-calls", "ours-shared", "experimental-shared-triton"):
        assert ("lora_qkv", provider) in ops
    assert ("residual_project", "ours") in ops and ("residual_project", "dense") in ops
    assert ("second_moment", "ours") in ops
    timed = [r for r in rows if r.get("backend") != "unavailable"]
    assert all(r["time_ms"] > 0 and r["floor_ms"] > 0 for r in timed)
    # the Triton rows: the dispatched projection and second moment (forced), the experimental LoRA kernels
    ours = [r for r in timed if r["provider"].startswith(("ours", "experimental")) and r["backend"] == "triton"]
    assert {r["op"] for r in ours} == {"lora_linear", "lora_qkv", "residual_project", "second_moment"}
    # the smoke run is bf16, as on the GPU; the fp32 reference check made in the same run: ours is within the
    # suite's low-precision rule (≤ 2× PyTorch's own bf16 error, the plain-autograd "reference" row, + floor)
    torch_err = {r["op"]: r["max_rel_err"] for r in timed if r["provider"] == "reference" and r.get("max_rel_err")}
    assert torch_err and {r["dtype"] for r in rows if r["op"] == "lora_linear"} == {"bfloat16"}
    for r in ours:
        if r.get("max_rel_err") is None:
            continue
        if r["dtype"] == "float32":  # the fp32 smoke shapes (projection): fp32 rounding
            assert r["max_rel_err"] < 1e-5, r
        else:
            assert r["max_rel_err"] <= 2 * torch_err[r["op"]] + ATOL_FLOOR[torch.bfloat16], r
    lora_ours = [r for r in ours if r["op"] == "lora_linear"]
    assert {r["provider"] for r in lora_ours} == {"experimental-triton"}
    assert {r["mode"] for r in lora_ours} == {"forward", "backward", "step"}
    # the saved activation of the fused op is s alone: T×r bf16 = 64·8·2 bytes
    assert all(round(r["saved_MB"] * 2**20) == 64 * 8 * 2 for r in lora_ours)
    files = list(tmp_path.glob("bench_kernels*.csv"))
    assert files
    with files[0].open() as f:
        written = list(csv.DictReader(f))
    assert len(written) >= len(timed) and {"git_sha", "device", "torch", "triton"} <= set(written[0])


@pytest.mark.usefixtures("force_triton")
def test_tile_sweep_checks_times_and_restores_the_tables(tmp_path, monkeypatch):
    from keeplora_bench.micro import tune_triton
    from keeplora_kernels.experimental import triton_lora_linear as tll

    before = {k: dict(v) for k, v in tll.INTERPRETER_TILES.items()}
    bad = dict(BLOCK_T=24, BLOCK_N=32, BLOCK_K=32, GROUP_T=4, num_warps=4, num_stages=1)  # not a power of two
    monkeypatch.setitem(tune_triton.SMOKE_CANDIDATES, "gemm", tune_triton.SMOKE_CANDIDATES["gemm"][:1] + [bad])
    rows = tune_triton.tune(tmp_path, smoke=True, device="cpu")
    assert tll.INTERPRETER_TILES == before
    assert [r["entry"] for r in rows] == ["gemm", "gemm", "dy_pass", "dy_pass"]
    assert rows[1]["status"].startswith("error") and rows[1]["step_ms"] is None
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 3 and all(r["step_ms"] > 0 and r["err"] <= 2 * r["torch_err"] + 1e-2 for r in ok)
    assert {w["entry"] for w in tune_triton.best(rows)} == {"gemm", "dy_pass"}
    assert len((tmp_path / "tune_triton.csv").read_text().splitlines()) == 1 + len(rows)
