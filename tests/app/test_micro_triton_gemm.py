"""keeplora_bench.micro.bench_triton_gemm: every Triton GEMM provider is correct on ragged shapes (TMA and pointer
paths), the smoke run writes complete rows and a verdict, and every GPU configuration compiles for sm_90.

Without a GPU the kernels run under the Triton interpreter, whose fp32 → bf16 conversion truncates instead of
rounding to nearest, so the bound on the Triton outputs is one bf16 spacing there, half of one on a GPU (bf16 keeps
8 significant bits: the spacing around v is at most 2⁻⁷·|v|).
"""

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from keeplora_bench.micro import bench_triton_gemm as btg
from support.triton_env import DEVICE, ON_GPU, triton  # noqa: F401  (skips without triton; sets TRITON_INTERPRET on CPU)

BF16_SPACING = 2.0**-7  # relative, an upper bound
ROUNDING = BF16_SPACING / 2 if ON_GPU else BF16_SPACING  # the output's conversion error, relative to |y|


def _operands(M, N, K):
    x = torch.randn(M, K, device=DEVICE).to(torch.bfloat16)
    w = (torch.randn(N, K, device=DEVICE) / K**0.5).to(torch.bfloat16)
    return x, w, x.float() @ w.float().t()


def _assert_close_to_fp32(y, ref):
    """Each output within its conversion error of the fp32 product (plus a little for fp32 summation order)."""
    assert y.shape == ref.shape and y.dtype == torch.bfloat16
    bound = ROUNDING * ref.abs() + 1e-5 * ref.abs().max()
    excess = ((y.float() - ref).abs() - bound).max().item()
    assert excess <= 0, excess


CONFIGS = btg.TMA_CONFIGS if ON_GPU else btg.SMOKE_CONFIGS


@pytest.mark.parametrize("M,N,K", [(40, 48, 40), (37, 45, 70), (1, 8, 200)])
@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=lambda c: c.name)
@pytest.mark.parametrize("use_tma", [None, False], ids=["auto", "pointer"])
def test_persistent_gemm_matches_fp32(M, N, K, cfg, use_tma):
    x, w, ref = _operands(M, N, K)
    call, path = btg.persistent_gemm(x, w, cfg, use_tma=use_tma)
    aligned = btg.tma_blocker(x, w, torch.empty(M, N, dtype=torch.bfloat16, device=DEVICE)) is None
    assert path == "tma" if use_tma is None and aligned else path.startswith("pointer")
    y = call()
    _assert_close_to_fp32(y, ref)
    assert torch.equal(call(), y)  # the persistent walk covers every tile exactly once: reruns are identical


def test_mainloop_gemm_matches_fp32():
    x, w, ref = _operands(37, 45, 70)
    call, name = btg.mainloop_gemm(x, w)
    _assert_close_to_fp32(call(), ref)
    assert name.count("x") == 2


def test_persistent_gemm_rejects_bad_input():
    x, w, _ = _operands(40, 48, 40)
    with pytest.raises(ValueError, match="x must be"):
        btg.persistent_gemm(x, w[:, :32], btg.SMOKE_CONFIGS[0])
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        btg.persistent_gemm(x.float(), w.float(), btg.SMOKE_CONFIGS[0])
    x70, w70, _ = _operands(40, 48, 70)  # 140-byte rows: no tensor descriptor
    with pytest.raises(ValueError, match="use_tma=True"):
        btg.persistent_gemm(x70, w70, btg.SMOKE_CONFIGS[0], use_tma=True)


def test_full_run_needs_cuda(tmp_path):
    if ON_GPU:
        pytest.skip("the full shapes run on a GPU")
    with pytest.raises(ValueError, match="smoke=True"):
        btg.run(tmp_path, quick=True)


def test_smoke_run_rows_and_verdict(tmp_path):
    summary = btg.run(tmp_path, quick=True, smoke=True)
    with (tmp_path / "triton_gemm.csv").open() as f:
        written = list(csv.DictReader(f))
    assert set(btg.COLUMNS) | {"op", "git_sha", "device", "timestamp"} <= set(written[0])
    verdicts = [r for r in written if r["provider"] == "verdict"]
    assert len(verdicts) == 1 and verdicts[0]["note"].split(":")[0] in ("go", "no-go")
    rows = [r for r in written if r["provider"] != "verdict"]
    per_shape = 2 + len(btg.SMOKE_CONFIGS if not ON_GPU else btg.TMA_CONFIGS)  # cublas, mainloop, each config
    assert len(rows) == len(btg.SMOKE_SHAPES) * per_shape
    paths = {r["path"] for r in rows if r["provider"] == "triton_tma_persistent"}
    assert "tma" in paths and any(p.startswith("pointer") for p in paths)  # both kernel paths ran
    for r in rows:
        err = float(r["max_rel_err"])
        assert 0 < err <= ROUNDING + 1e-4, r  # relative to max |ref|, bounded by the conversion error
        assert r["wrong"] == "False" and float(r["time_ms"]) > 0 and float(r["ratio"]) > 0, r
    assert len(summary) == len(written)
    assert all({"op", "time_ms", "ratio", "note"} <= set(s) for s in summary)


def test_smoke_run_without_interpreter_skips_triton(tmp_path, monkeypatch):
    if ON_GPU:
        pytest.skip("on a GPU the Triton providers always run")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    btg.run(tmp_path, smoke=True)
    with (tmp_path / "triton_gemm.csv").open() as f:
        written = list(csv.DictReader(f))
    skipped = [r for r in written if r["provider"].startswith("triton")]
    assert skipped and all("TRITON_INTERPRET=1" in r["note"] and not r["time_ms"] for r in skipped)
    assert [r for r in written if r["provider"] == "verdict"][0]["note"].startswith("no-go: no correct")


# Each GPU configuration through Triton's real compiler for sm_90 (TMA and pointer paths): the interpreter never
# lowers the kernel. Checks the operand ring fits the shared memory, wgmma and TMA are used, and nothing spills.
AOT_SCRIPT = textwrap.dedent(r"""
    import os, re, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from keeplora_bench.micro import bench_triton_gemm as btg

    CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    fn = btg._persistent_gemm_kernel
    ints = ("M", "N", "K", "stride_xm", "stride_wn", "stride_ym")
    for cfg in btg.TMA_CONFIGS:
        for tma in (True, False):
            blocks = dict(X=(cfg.block_m, cfg.block_k), W=(cfg.block_n, cfg.block_k),
                          Y=(cfg.block_m, cfg.block_n // (2 if cfg.split_epilogue else 1)))
            sig = {n: (f"tensordesc<bf16[{blocks[n][0]}, {blocks[n][1]}]>" if tma else "*bf16") if n in blocks
                   else "i32" if n in ints else "constexpr" for n in fn.arg_names}
            consts = dict(stride_xk=1, stride_wk=1, stride_yn=1, NUM_PROGRAMS=132, USE_TMA=tma, UPCAST=False,
                          OUT_DTYPE=triton.language.bfloat16, FLATTEN=cfg.flatten,
                          SPLIT_EPILOGUE=cfg.split_epilogue,
                          BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                     if n in ints or (not tma and n in blocks)}
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                               target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            ptx = k.asm["ptx"]
            assert k.metadata.shared <= btg.SM90_SMEM, (cfg.name, k.metadata.shared)
            assert "wgmma" in ptx and (("cp.async.bulk.tensor" in ptx) == tma), (cfg.name, tma)
            if os.path.exists(CUOBJDUMP):
                with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
                    f.write(k.asm["cubin"])
                out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
                os.unlink(f.name)
                use = {a: int(b) for a, b in re.findall(r"(STACK|LOCAL):(\d+)", out)}
                assert use.get("STACK") == 0 and use.get("LOCAL") == 0, (cfg.name, tma, use)
            print("compiled", cfg.name, "tma" if tma else "pointer", k.metadata.shared)
""")


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="with a GPU the configurations compile and run in the tests above")
@pytest.mark.skipif(
    not os.path.isdir(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia")),
    reason="this triton build has no NVIDIA backend",
)
def test_every_config_compiles_for_sm90():
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(root), str(root / "python"), str(root / "benchmarks"), env.get("PYTHONPATH", "")]
    )
    proc = subprocess.run(
        [sys.executable, "-c", AOT_SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("compiled") == 2 * len(btg.TMA_CONFIGS)


def test_verdict_threshold_and_wrong_rows():
    llama = "M=8192,N=4096,K=4096"

    def row(provider, ratio, wrong=False, shape=llama):
        return dict(shape=shape, provider=provider, config="c", ratio=ratio, wrong=wrong, time_ms=1.0, tflops=1.0)

    base = [row("cublas", 1.0), row("triton_mainloop", 0.8)]
    assert btg.verdict(base + [row("triton_tma_persistent", 0.96)], smoke=False)["note"].startswith("go:")
    assert btg.verdict(base + [row("triton_tma_persistent", 0.94)], smoke=False)["note"].startswith("no-go:")
    # a fast but wrong provider does not count, nor does a fast one at the other shape
    fast_wrong = row("triton_tma_persistent", 1.2, wrong=True)
    other_shape = row("triton_tma_persistent", 1.2, shape="M=12608,N=768,K=768")
    decided = btg.verdict(base + [fast_wrong, other_shape], smoke=False)
    assert decided["note"].startswith("no-go:") and decided["ratio"] == 0.8
