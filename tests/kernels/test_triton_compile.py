"""Every Triton kernel variant compiles for the H200 (sm_90) ahead of time, without a GPU.

The interpreter runs the kernels' arithmetic on CPU but never lowers them; this test runs Triton's real compiler
(TTIR → TTGIR → LLVM → PTX → cubin with the ptxas that ships in the triton wheel) on the launches the launchers
plan with the GPU tile sizes, so type errors, unsupported ops, shared-memory overflows and register spills
(``cuobjdump -res-usage`` of the cubin: an empty stack frame) show up here. It runs
in a subprocess because the kernels must be imported without ``TRITON_INTERPRET``.

The GPU machine's Triton may be older than this one's: ``KEEPLORA_AOT_TRITON=<folder>`` puts another Triton first on
the subprocess's path (e.g. ``pip install --no-deps --target <folder> triton==<its version>``), so the same check runs
against the compiler the GPU will use.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from support.triton_env import ON_GPU, triton  # skips without triton

NVIDIA_BACKEND = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia")

SCRIPT = textwrap.dedent(r"""
    import torch
    from keeplora_kernels._triton_utils import aot_compile
    from keeplora_kernels import triton_residual_project as trp, triton_second_moment as tsm
    from keeplora_kernels.experimental import triton_lora_linear as tll, triton_lora_persistent as tlp

    import os, re, subprocess, tempfile
    import triton

    SM90_SMEM = 232448  # bytes of shared memory a block may use on sm_90
    CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    checked = 0

    def resources(cubin):
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(cubin)
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        return {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", out)}

    def check(launches, label, tensor_cores=False, tma=False):
        global checked
        for launch in launches:
            compiled = aot_compile(launch, capability=90)
            assert "cubin" in compiled.asm, label
            ptx = compiled.asm["ptx"]
            assert not tensor_cores or "wgmma" in ptx, (label, launch.kernel.__name__, "no wgmma")
            assert ("cp.async.bulk.tensor" in ptx) == tma, (label, launch.kernel.__name__, "TMA loads")
            assert compiled.metadata.shared <= SM90_SMEM, (label, compiled.metadata.shared)
            if os.path.exists(CUOBJDUMP):  # no register spills (they land in the stack frame)
                use = resources(compiled.asm["cubin"])
                assert use.get("STACK") == 0 and use.get("LOCAL") == 0, (label, launch.kernel.__name__, use)
            checked += 1

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        T, K, N, r = 512, 768, 384, 16
        x = torch.empty(T, K, dtype=dtype)
        w = torch.empty(N, K, dtype=dtype)
        b = torch.empty(N, dtype=dtype)
        a = torch.empty(r, K, dtype=torch.float32)      # peft's fp32 adapters under low-precision x
        lb = torch.empty(N, r, dtype=torch.float32)
        dy = torch.empty(T, N, dtype=dtype)
        check(tll.planned_launches(x, w, b, a, lb, 0.5, dy), f"lora_linear {dtype}")
        check(tll.planned_launches(x, w, None, a[:8].to(dtype), lb[:, :8].to(dtype), 0.5, dy),
              f"lora_linear r=8 {dtype}")
        for rank in (16, 64):  # one and four 16-wide rank blocks (the wide ones take fewer stages)
            for tma in (True, False):
                a_r, lb_r = torch.empty(rank, K), torch.empty(N, rank)
                launches = tlp.planned_launches(x, w, b, a_r, lb_r, 0.5, dy, tma=tma)
                assert all(launch.constexprs["USE_TMA"] == tma for launch in launches)
                check(launches, f"persistent r={rank} tma={tma} {dtype}", dtype != torch.float32, tma)
        g = torch.empty(2, 512, 256, dtype=dtype)
        for k in (16, 64, 100, 184):
            check(trp.plan_project(g, torch.empty(1, 512, k), g, on_gpu=True), f"project k={k} {dtype}")
        acc = torch.empty(768, 768)
        xs = torch.empty(1000, 768, dtype=dtype)
        mask = torch.empty(1000, dtype=torch.int8)
        check(tsm.plan_second_moment(acc, xs, mask, split=1, on_gpu=True)[0], f"second moment {dtype}")
        check(tsm.plan_second_moment(acc, xs, None, split=3, on_gpu=True)[0], f"second moment split {dtype}")
    print("compiled", checked)
""")


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="with a GPU the kernels compile and run in the other test_triton_* modules")
@pytest.mark.skipif(not os.path.isdir(NVIDIA_BACKEND), reason="this triton build has no NVIDIA backend")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if os.environ.get("KEEPLORA_AOT_TRITON"):
        env["PYTHONPATH"] = os.pathsep.join([os.environ["KEEPLORA_AOT_TRITON"], *sys.path])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "compiled" in proc.stdout
    count = int(proc.stdout.split("compiled")[-1].split()[0])
    # per dtype: 2 × (2 shrink, fwd, dY, 2 dX) + 4 project + 2 moment, and 2 ranks × 2 load paths × (fwd, dX, and
    # for 16-bit dtypes dX with dB) of the persistent kernels
    assert count == 3 * (2 * 6 + 4 + 2) + 2 * 12 + 8
