"""The LoRA-variants benchmark runs end to end on the CPU (tiny shapes, fused_dy through the Triton interpreter):
every provider has rows, and every variant is within the suite's low-precision rule of the fp32 reference."""

import csv

import torch

from support.tolerances import ATOL_FLOOR
from support.triton_env import DEVICE  # noqa: F401  (skips without triton)


def test_cpu_smoke_run_writes_complete_rows(tmp_path):
    from keeplora_bench.micro import bench_lora_variants as blv
    from keeplora_kernels.experimental import BACKWARD_ORDERS
    from keeplora_kernels.lora_linear import FORWARD_ORDERS

    summary = blv.run(tmp_path, device="cpu", smoke=True)
    with (tmp_path / "lora_variants.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert not [r for r in rows if r["note"].startswith("FAILED")]
    single = {r["provider"] for r in rows if r["op"] == "lora_linear"}
    variants = {f"{f}/{b}" for f in (*FORWARD_ORDERS, "stacked") for b in BACKWARD_ORDERS}
    assert {"base", "unfused", "peft-bfloat16", "triton-full", "triton-persistent"} | variants <= single
    from keeplora_kernels import _dispatch

    if "lora_linear" in _dispatch.extension_ops("cpu"):
        assert {"ext:base_first/base_first", "ext:expand_first/expand_first"} <= single
    assert {"base", "unfused", "triton-shared", "triton-persistent", "expand_first/fused_dy"} <= {
        r["provider"] for r in rows if r["op"] == "lora_qkv"
    }
    assert {(r["mode"], r["timing"]) for r in rows} == {(m, "eager") for m in ("forward", "backward", "step")}
    assert all(float(r["time_ms"]) > 0 for r in rows)
    # the same run's fp32 reference: each variant's error in y, dX, dB is within 2× the error of PyTorch's own bf16
    # path (the authors' unfused autograd) + the bf16 floor
    lora = [r for r in rows if r["op"] == "lora_linear" and r["mode"] == "step"]
    unfused = next(r for r in lora if r["provider"] == "unfused")
    for r in lora:
        if r["provider"] in variants or r["provider"].startswith(("ext:", "triton-persistent")):
            for col in ("err_y", "err_dx", "err_db"):
                assert float(r[col]) <= 2 * float(unfused[col]) + ATOL_FLOOR[torch.bfloat16], (r["provider"], col)
            assert float(r["saved_MB"]) <= float(unfused["saved_MB"])
    assert (tmp_path / "trace_lora_variants.txt").read_text().startswith("== fastest variant")
    assert summary and all(" step " in s["op"] for s in summary)
