"""The kernel benchmark runs end to end on the CPU (tiny shapes), with "ours" through the Triton interpreter."""

import csv

import pytest

from triton_env import force_triton  # noqa: F401  (skips without triton; the fixture is used below)


@pytest.mark.usefixtures("force_triton")
def test_cpu_smoke_run_writes_complete_rows(tmp_path):
    from benchmarks import bench_kernels

    rows = bench_kernels.run(tmp_path, quick=True, device="cpu", smoke=True)
    ops = {(r["op"], r["provider"]) for r in rows}
    for provider in ("base", "reference", "peft-float32", "unfused", "ours"):
        assert ("lora_linear", provider) in ops
    for provider in ("unfused", "ours-3-calls", "ours-shared"):
        assert ("lora_qkv", provider) in ops
    assert ("residual_project", "ours") in ops and ("residual_project", "dense") in ops
    assert ("second_moment", "ours") in ops
    timed = [r for r in rows if r.get("backend") != "unavailable"]
    assert all(r["time_ms"] > 0 and r["floor_ms"] > 0 for r in timed)
    ours = [r for r in timed if r["provider"].startswith("ours")]
    assert ours and all(r["backend"] == "triton" for r in ours)
    # the fp32 reference check made in the same run: ours agrees to fp32 rounding
    assert all(r["max_rel_err"] < 1e-5 for r in ours if r.get("max_rel_err") is not None)
    lora_ours = [r for r in ours if r["op"] == "lora_linear"]
    assert {r["mode"] for r in lora_ours} == {"forward", "backward", "step"}
    # the saved activation of the fused op is s alone: T×r fp32 = 64·8·4 bytes
    assert all(round(r["saved_MB"] * 2**20) == 64 * 8 * 4 for r in lora_ours)
    files = list(tmp_path.glob("bench_kernels*.csv"))
    assert files
    with files[0].open() as f:
        written = list(csv.DictReader(f))
    assert len(written) >= len(timed) and {"git_sha", "device", "torch", "triton"} <= set(written[0])
