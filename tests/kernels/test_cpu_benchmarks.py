"""CPU micro-benchmarks of the production paths next to their baselines, through pytest-benchmark.

In the suite each case runs once and checks its result (``--benchmark-disable`` in the pytest configuration); timed:

    python -m pytest tests/kernels/test_cpu_benchmarks.py --benchmark-enable --benchmark-group-by=group

The GPU measurements (against the roofline floor) are ``keeplora bench kernels|rsvd``; these rows are the CPU side of
the same comparisons at sizes of the embedded default (MiniLM-L6: d = 384, 1536).
"""

import pytest
import torch
import torch.nn.functional as F

import keeplora_kernels as kk
from support.ref_ops import lora_linear_ref, outer_sum_ref, residual_project_ref
from support.tolerances import assert_close, assert_within_torch_error

D, FF, TOKENS, R = 384, 1536, 512, 8


def _lora_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, D, generator=g)
    w = torch.randn(D, D, generator=g) / D**0.5
    b = torch.randn(D, generator=g)
    a = torch.linalg.qr(torch.randn(D, R, generator=g)).Q.t().contiguous()
    lb = (0.1 * torch.randn(D, R, generator=g)).requires_grad_()
    dy = torch.randn(TOKENS, D, generator=g)
    return x, w, b, a, lb, dy


@pytest.mark.parametrize("provider", ["keeplora", "unfused"])
def test_lora_linear_step(benchmark, provider):
    """Forward + backward (dX, dB) of the frozen-A LoRA linear; the authors' unfused path as the baseline."""
    benchmark.group = "lora_linear step, T=512 d=384 r=8"
    x, w, b, a, lb, dy = _lora_inputs()
    fn = kk.lora_linear if provider == "keeplora" else kk.lora_linear_unfused

    def step():
        xg = x.detach().requires_grad_()
        y = fn(xg, w, b, a, lb, 0.5)
        return (y, *torch.autograd.grad(y, (xg, lb), dy))

    y, dx, dlb = benchmark(step)
    xr = x.detach().requires_grad_()
    lbr = lb.detach().requires_grad_()
    yr = lora_linear_ref(xr, w, b, a, lbr, 0.5)
    for got, want in zip((y, dx, dlb), (yr, *torch.autograd.grad(yr, (xr, lbr), dy))):
        assert_close(got, want)


@pytest.mark.parametrize("provider", ["keeplora", "dense"])
def test_residual_project(benchmark, provider):
    """``(I − P·Pᵀ)·G`` for a 1536-wide weight's gradient against a 64-column basis; dense: the d×d projector."""
    benchmark.group = "residual_project d=384 n=1536 k=64"
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(D, FF, generator=g)
    basis = torch.linalg.qr(torch.randn(D, 64, generator=g)).Q
    if provider == "keeplora":
        out = benchmark(lambda: kk.residual_project(grad, basis))
    else:
        out = benchmark(lambda: (torch.eye(D) - basis @ basis.t()) @ grad)
    assert_close(out, residual_project_ref(grad, basis).float())


def test_outer_sum(benchmark):
    """The gradient pass's per-batch ``acc + dyᵀ·x`` of one 1536×384 target, bf16 activations, fp32 sums."""
    benchmark.group = "outer_sum T=512 1536x384 bf16"
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(TOKENS, FF, generator=g).bfloat16()
    x = torch.randn(TOKENS, D, generator=g).bfloat16()
    out = benchmark(lambda: kk.outer_sum(torch.zeros(FF, D), dy, x))
    # sums of 512 products of magnitude ~1 (|entries| up to ~100): measured against the exact sum with the suite's
    # rule for fp32 results (at most 2x the error of torch's own fp32 GEMM), whose summation order varies by CPU
    torch_fp32 = torch.zeros(FF, D) + dy.float().t() @ x.float()
    assert_within_torch_error(out, torch_fp32, outer_sum_ref(torch.zeros(FF, D), dy, x), torch.float32)


@pytest.mark.parametrize("provider", ["keeplora", "svd_lowrank_loop"])
def test_batched_rsvd(benchmark, provider):
    """Rank-8 factors of half of MiniLM-L6's 24 square targets at once; the authors' loop of ``torch.svd_lowrank``."""
    benchmark.group = "rsvd 12 x 384x384 rank 8"
    g = torch.Generator().manual_seed(3)
    spectrum = 0.8 ** torch.arange(D, dtype=torch.float32)
    q1 = torch.linalg.qr(torch.randn(12, D, D, generator=g)).Q
    q2 = torch.linalg.qr(torch.randn(12, D, D, generator=g)).Q
    mats = q1 * spectrum @ q2.mT
    if provider == "keeplora":
        _, s, _ = benchmark(lambda: kk.rsvd(mats, 8))
    else:
        s = benchmark(lambda: torch.stack([torch.svd_lowrank(m, q=32, niter=4)[1][:8] for m in mats]))
    torch.testing.assert_close(s, spectrum[:8].expand(12, 8), rtol=1e-4, atol=1e-5)


def test_lora_baseline_is_the_plain_formula():
    """The unfused baseline timed above computes the same function as the op (a guard on the comparison)."""
    x, w, b, a, lb, _ = _lora_inputs()
    assert_close(kk.lora_linear_unfused(x, w, b, a, lb, 0.5), F.linear(x, w, b) + 0.5 * (x @ a.t()) @ lb.t())
