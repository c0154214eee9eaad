"""The torch backends of the keeplora_kernels ops against the test oracles (``ref_ops``: plain autograd, dense
linear algebra)."""

import importlib

import pytest
import torch

import keeplora_kernels as kk
from keeplora_kernels.lora_linear import LoRALinearFunction
from support.lora_checks import assert_saves_only_s
from support.ref_ops import lora_linear_ref, second_moment_ref
from support.tolerances import assert_close, assert_within_torch_error

SHAPES = [((37,), 70, 45), ((3, 11), 64, 33), ((1,), 16, 16)]  # (leading dims, d_in, d_out)


def _lora_inputs(lead, d_in, d_out, r, dtype=torch.float32, bias=True, transpose_x=False):
    if transpose_x:  # a non-contiguous x: the transpose of a (d_in, *lead) tensor
        x = torch.randn(d_in, *lead, dtype=dtype).movedim(0, -1)
    else:
        x = torch.randn(*lead, d_in, dtype=dtype)
    weight = torch.randn(d_out, d_in, dtype=dtype) / d_in**0.5
    b = torch.randn(d_out, dtype=dtype) if bias else None
    a = torch.linalg.qr(torch.randn(d_in, r, dtype=torch.float64)).Q.T.to(dtype).contiguous()
    lb = torch.randn(d_out, r, dtype=dtype)
    return x, weight, b, a, lb


@pytest.mark.parametrize("lead,d_in,d_out", SHAPES)
@pytest.mark.parametrize("r", [1, 8, 16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("transpose_x", [False, True])
def test_lora_linear_matches_autograd(lead, d_in, d_out, r, bias, transpose_x):
    r = min(r, d_in)
    x, w, b, a, lb = _lora_inputs(lead, d_in, d_out, r, bias=bias, transpose_x=transpose_x)
    x1, lb1 = x.clone().requires_grad_(), lb.clone().requires_grad_()
    x2, lb2 = x.clone().requires_grad_(), lb.clone().requires_grad_()
    b1 = b2 = None
    if bias:
        b1, b2 = b.clone().requires_grad_(), b.clone().requires_grad_()
    y1 = kk.lora_linear(x1, w, b1, a, lb1, 0.5)
    y2 = lora_linear_ref(x2, w, b2, a, lb2, 0.5)
    assert_close(y1, y2)
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    assert_close(x1.grad, x2.grad)
    assert_close(lb1.grad, lb2.grad)
    if bias:
        assert_close(b1.grad, b2.grad)


def test_lora_linear_saves_only_the_shrunk_activation():
    lead, d_in, d_out, r = (5, 7), 48, 40, 4
    assert_saves_only_s(*_lora_inputs(lead, d_in, d_out, r))


def test_lora_linear_refuses_trainable_frozen_operands():
    x, w, b, a, lb = _lora_inputs((4,), 8, 8, 2)
    with pytest.raises(RuntimeError, match="frozen"):
        LoRALinearFunction.apply(x, w.requires_grad_(), b, a, lb, 1.0)


def test_lora_linear_without_grad_skips_the_function():
    """No graph to build (no_grad, or nothing requires grad): the plain forward, equal to the Function's output;
    a trainable frozen operand is still refused when grad is on."""
    x, w, b, a, lb = _lora_inputs((3, 5), 12, 9, 3)
    expected = LoRALinearFunction.apply(x, w, b, a, lb, 0.5)
    with torch.no_grad():
        y = kk.lora_linear(x.requires_grad_(), w, b, a, lb, 0.5)
    assert y.grad_fn is None and torch.equal(y, expected)
    assert torch.equal(kk.lora_linear(x.detach(), w, b, a, lb, 0.5), expected)
    with pytest.raises(RuntimeError, match="frozen"):
        kk.lora_linear(x.detach(), w.requires_grad_(), b, a, lb, 0.5)


def test_lora_linear_gradcheck_fp64():
    x, w, b, a, lb = _lora_inputs((6,), 9, 7, 3, dtype=torch.float64)
    x.requires_grad_()
    lb.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda x_, b_, lb_: LoRALinearFunction.apply(x_, w, b_, a, lb_, 0.7), (x, b, lb))


def test_lora_linear_fp32_adapter_under_bf16_input():
    """bf16 x with fp32 adapters (the engine's configuration): dtypes as documented, and y, dX, dB within the suite's
    low-precision rule against the fp64 computation (PyTorch's own all-bf16 path sets the error to beat)."""
    x, w, b, a, lb = _lora_inputs((10,), 32, 24, 4)
    xb, wb, bb = x.bfloat16().requires_grad_(), w.bfloat16(), b.bfloat16()
    lb = lb.requires_grad_()
    y = kk.lora_linear(xb, wb, bb, a, lb, 1.0)
    assert y.dtype == torch.bfloat16
    dy = torch.randn_like(y)
    y.backward(dy)
    assert lb.grad.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    results = {}
    for dtype in (torch.float64, torch.bfloat16):
        xr, lr = xb.detach().to(dtype).requires_grad_(), lb.detach().to(dtype).requires_grad_()
        yr = lora_linear_ref(xr, wb.to(dtype), bb.to(dtype), a.to(dtype), lr, 1.0)
        results[dtype] = (yr,) + torch.autograd.grad(yr, (xr, lr), dy.to(dtype))
    for got, low, exact in zip((y, xb.grad, lb.grad), results[torch.bfloat16], results[torch.float64]):
        assert_within_torch_error(got, low, exact, torch.bfloat16)


def test_lora_linear_backward_reuses_the_forward_casts(monkeypatch):
    """bf16 x with fp32 adapters: backward casts nothing (A and B were cast once in forward); dB is fp32. With the
    CUDA mixed-dtype GEMM (checked on meta tensors: its kernel exists only in CUDA builds) dB comes out of one
    fp32-output GEMM."""
    from torch.profiler import ProfilerActivity, profile

    lora_module = importlib.import_module("keeplora_kernels.lora_linear")  # the package attribute is the function

    x, w, b, a, lb = _lora_inputs((10,), 32, 24, 4)
    xb = x.bfloat16().requires_grad_()
    lb.requires_grad_()
    y = LoRALinearFunction.apply(xb, w.bfloat16(), b.bfloat16(), a, lb, 0.5)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        grads = torch.autograd.grad(y, (xb, lb), torch.ones_like(y))
    assert grads[1].dtype == torch.float32
    casts = [e.input_shapes[0] for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes[0]]
    assert casts == [[24, 4]]  # the fp32 dB (CPU path); no adapter cast (scalar wrapping of `scale` not counted)
    monkeypatch.setattr(lora_module._dispatch, "mixed_dtype_gemm", lambda op, device_type: True)
    meta = lora_module._scaled_outer(
        torch.empty(37, 24, device="meta", dtype=torch.bfloat16),
        torch.empty(37, 4, device="meta", dtype=torch.bfloat16),
        0.5,
        torch.float32,
    )
    assert meta.shape == (24, 4) and meta.dtype == torch.float32


@pytest.mark.parametrize("k", [0, 1, 5])
@pytest.mark.parametrize("batched", [False, True])
def test_residual_project_equals_dense_projector(k, batched):
    lead = (3,) if batched else ()
    d, n = 37, 45
    basis = torch.linalg.qr(torch.randn(*lead, d, max(k, 1), dtype=torch.float64)).Q[..., :k]
    g = torch.randn(*lead, d, n, dtype=torch.float64)
    dense = (torch.eye(d, dtype=torch.float64) - basis @ basis.mT) @ g
    assert_close(kk.residual_project(g, basis), dense)
    g32 = g.float()
    out = kk.residual_project(g32, basis.float(), inplace=True)
    assert out.data_ptr() == g32.data_ptr()
    assert_close(g32, dense.float())


def test_residual_project_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="rows"):
        kk.residual_project(torch.randn(5, 3), torch.randn(4, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_second_moment_masks_rows(dtype):
    x = torch.randn(4, 9, 33).to(dtype)
    mask = torch.rand(4, 9) > 0.4
    acc = torch.full((33, 33), 0.5, dtype=torch.float32)
    kk.second_moment_update(acc, x, mask)
    assert_close(acc.double(), second_moment_ref(x, mask) + 0.5, torch.float32)


def _matrix_with_spectrum(m, n, spectrum, dtype=torch.float64):
    u = torch.linalg.qr(torch.randn(m, len(spectrum), dtype=dtype)).Q
    v = torch.linalg.qr(torch.randn(n, len(spectrum), dtype=dtype)).Q
    return u @ torch.diag(torch.as_tensor(spectrum, dtype=dtype)) @ v.T


@pytest.mark.parametrize("spectrum", ["fast", "rank_deficient"])
def test_rsvd_recovers_top_singular_triplets(spectrum):
    m, n, rank = 90, 70, 6
    s = [0.7**i for i in range(40)] if spectrum == "fast" else [5, 4, 3, 2, 1, 0.5]
    a = _matrix_with_spectrum(m, n, s)
    u, sv, v = kk.rsvd(a, rank, oversample=8, power_iters=4)
    assert_close(sv, torch.as_tensor(s[:rank], dtype=torch.float64).clone(), torch.float32)
    assert_close(u.T @ u, torch.eye(rank, dtype=torch.float64), torch.float32)
    approx = u @ torch.diag(sv) @ v.T
    exact_u, exact_s, exact_vh = torch.linalg.svd(a)
    best = exact_u[:, :rank] @ torch.diag(exact_s[:rank]) @ exact_vh[:rank]
    assert torch.linalg.norm(approx - best) <= 1e-6 * torch.linalg.norm(a)


def test_rsvd_implicit_projection_equals_explicit_and_is_deterministic():
    a = torch.randn(3, 50, 40, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(3, 50, 7, dtype=torch.float64)).Q
    explicit = a - basis @ (basis.mT @ a)
    _, s_exp, _ = torch.linalg.svd(explicit)
    u, s, v = kk.rsvd(a, 4, oversample=10, power_iters=6, project_out=basis, seed=3)
    assert_close(s, s_exp[:, :4], torch.float32)
    assert (basis.mT @ u).abs().max() < 1e-8
    u2, s2, v2 = kk.rsvd(a, 4, oversample=10, power_iters=6, project_out=basis, seed=3)
    assert torch.equal(u, u2) and torch.equal(s, s2) and torch.equal(v, v2)
    for i in range(3):  # batched equals per-matrix
        ui, si, _ = kk.rsvd(a[i], 4, oversample=10, power_iters=6, project_out=basis[i], seed=3)
        assert_close(si, s[i], torch.float32)


def test_rsvd_validates_rank():
    with pytest.raises(ValueError, match="rank"):
        kk.rsvd(torch.randn(5, 4), 5)


@pytest.mark.parametrize("energy", [0.0, 0.3, 0.85, 0.99, 1.0])
def test_principal_subspace_energy_rule_matches_brute_force(energy):
    w = _matrix_with_spectrum(30, 20, [0.8**i for i in range(20)]).float()
    basis = kk.principal_subspace(w, energy)
    s = torch.linalg.svdvals(w.double())
    frac = (s**2).cumsum(0) / (s**2).sum()
    # brute force: smallest p ≥ 1 with frac[p-1] ≥ energy (none for energy 0)
    expected = 0 if energy == 0 else next(p for p in range(1, 21) if frac[p - 1] >= energy - 1e-12)
    assert basis.shape == (20, expected)
    if expected:
        assert_close(basis.T @ basis, torch.eye(expected), torch.float32)
        vh = torch.linalg.svd(w.double())[2]
        # same subspace as the leading right singular vectors
        assert torch.linalg.matrix_norm(basis.double().T @ vh[:expected].T, ord=2) == pytest.approx(1, abs=1e-5)


def test_energy_rank_strict_keeps_less():
    sq = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumulative 0.4, 0.7, 0.9, 1.0
    assert kk.energy_rank(sq, 0.7) == 2
    assert kk.energy_rank(sq, 0.7, strict=True) == 1
    assert kk.energy_rank(sq, 0.0) == 0
    assert kk.energy_rank(sq, 1.0) == 4
