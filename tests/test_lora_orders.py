"""The GEMM orders of the PyTorch LoRA path and the stacked ``[W; A]`` variant: every combination exact against
autograd (fp64 gradcheck, fp32 and bf16 against the reference), saving only ``s = x·Aᵀ``; the ``fused_dy`` backward
(a Triton pass over dY) under the interpreter on CPU, compiled on a GPU."""

import pytest
import torch

import keeplora_kernels as kk
from keeplora_kernels import _dispatch
from keeplora_kernels.lora_linear import (BACKWARD_ORDERS, FORWARD_ORDERS, LoRALinearFunction,
                                          StackedLoRALinearFunction, stack_frozen)
from tolerances import assert_close, assert_within_torch_error
from triton_env import DEVICE

ORDERS = [(f, b) for f in FORWARD_ORDERS for b in BACKWARD_ORDERS]
RAGGED = [((37,), 70, 45, 5), ((3, 11), 64, 33, 16), ((2,), 16, 17, 1)]  # (leading dims, d_in, d_out, r)


def _inputs(lead, d_in, d_out, r, dtype, bias=True, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    b = torch.randn(d_out, generator=g, dtype=torch.float64) if bias else None
    a = torch.linalg.qr(torch.randn(d_in, r, generator=g, dtype=torch.float64)).Q.T.contiguous()
    lb = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return to(x), to(w), to(b), to(a), to(lb)


def _apply(variant, x, w, b, a, lb, scale):
    fwd, bwd = variant
    if fwd == "stacked":
        return StackedLoRALinearFunction.apply(x, stack_frozen(w, a), b, lb, scale, w.shape[0], bwd)
    return LoRALinearFunction.apply(x, w, b, a, lb, scale, fwd, bwd)


VARIANTS = ORDERS + [("stacked", b) for b in BACKWARD_ORDERS]


def _needs_triton(variant):
    return variant[1] == "fused_dy"


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v))
def test_variant_gradcheck_fp64(variant):
    if _needs_triton(variant) and DEVICE.type == "cuda":
        pytest.skip("Triton compiles no float64 dot for a GPU; the fp32/bf16 tests cover fused_dy there")
    x, w, b, a, lb = _inputs((2, 3), 9, 7, 3, torch.float64)
    x.requires_grad_()
    b.requires_grad_()
    lb.requires_grad_()
    assert torch.autograd.gradcheck(lambda x_, b_, lb_: _apply(variant, x_, w, b_, a, lb_, 0.7), (x, b, lb))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v))
@pytest.mark.parametrize("lead,d_in,d_out,r", RAGGED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_variant_matches_reference(variant, lead, d_in, d_out, r, dtype, bias):
    """Outputs and all gradients against the fp64 reference, within the dtype's tolerance; fp32 adapters under
    bf16 input (the engine's configuration) for bf16."""
    x, w, b, a, lb = _inputs(lead, d_in, d_out, r, dtype, bias)
    if dtype == torch.bfloat16:
        a, lb = a.float(), lb.float()
    xs, ls = x.clone().requires_grad_(), lb.clone().requires_grad_()
    bs = None if b is None else b.clone().requires_grad_()
    y = _apply(variant, xs, w, bs, a, ls, 0.5)
    assert y.dtype == dtype and y.shape == (*lead, d_out)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for t in (xs, ls, bs) if t is not None], dy)
    refs = _reference(x, w, b, a, lb, dy, torch.float64)
    if dtype == torch.float32:
        assert_close(y, refs[0].to(dtype))
        for got, ref in zip(grads, refs[1:]):
            assert_close(got, ref.to(got.dtype))
    else:  # the suite's low-precision rule: within 2× the error of PyTorch's own ops at this dtype
        lows = _reference(x, w, b, a, lb, dy, dtype)
        for got, low, ref in zip((y,) + grads, lows, refs):
            assert_within_torch_error(got, low, ref, dtype)
    assert grads[1].dtype == lb.dtype


def _reference(x, w, b, a, lb, dy, dtype):
    """``(y, dX, dB[, db])`` of :func:`kk.lora_linear_ref` with every operand in ``dtype`` (plain autograd)."""
    xr, lr = x.to(dtype).requires_grad_(), lb.to(dtype).requires_grad_()
    br = None if b is None else b.to(dtype).requires_grad_()
    yr = kk.lora_linear_ref(xr, w.to(dtype), br, a.to(dtype), lr, 0.5)
    return (yr,) + torch.autograd.grad(yr, [t for t in (xr, lr, br) if t is not None], dy.to(dtype))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v))
def test_variant_saves_only_s(variant):
    x, w, b, a, lb = _inputs((40,), 32, 24, 4, torch.float32)
    x.requires_grad_()
    lb.requires_grad_()
    frozen = {w.untyped_storage().data_ptr(), a.untyped_storage().data_ptr()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _apply(variant, x, w, b, a, lb, 1.0)
    activations = [tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() not in frozen and t.shape[0] == 40]
    assert activations == [(40, 4)]


def test_stacked_output_is_a_strided_view_that_reshapes():
    """Y shares the stacked GEMM's storage (row stride d_out + r); leading dims come back as a view."""
    x, w, b, a, lb = _inputs((3, 5), 16, 12, 4, torch.float32)
    y = StackedLoRALinearFunction.apply(x, stack_frozen(w, a), b, lb, 1.0, 12, "base_first")
    assert y.shape == (3, 5, 12) and y.stride()[-2] == 16
    assert_close(y, kk.lora_linear_ref(x, w, b, a, lb, 1.0))


def test_orders_env_selects_and_validates(monkeypatch):
    monkeypatch.setenv("KEEPLORA_LORA_ORDERS", "expand_first,expand_first")
    assert _dispatch.lora_orders(torch.device("cpu"), torch.float32) == ("expand_first", "expand_first")
    monkeypatch.setenv("KEEPLORA_LORA_ORDERS", "stacked,base_first")
    with pytest.raises(ValueError, match="KEEPLORA_LORA_ORDERS.*forward in"):
        _dispatch.lora_orders(torch.device("cpu"), torch.float32)
    monkeypatch.delenv("KEEPLORA_LORA_ORDERS")
    assert _dispatch.lora_orders(torch.device("cpu"), torch.float32) == _dispatch.LORA_ORDERS["cpu"]


def test_lora_linear_follows_the_chosen_orders(monkeypatch):
    """``kk.lora_linear`` on the PyTorch path runs the orders ``lora_orders`` picks (here forced), stays exact."""
    monkeypatch.setenv("KEEPLORA_BACKEND", "reference")
    x, w, b, a, lb = _inputs((9,), 20, 11, 3, torch.float32, device=torch.device("cpu"))
    seen = []
    original = LoRALinearFunction.forward

    def spy(ctx, *args):
        seen.append(args[6:8])
        return original(ctx, *args)

    monkeypatch.setattr(LoRALinearFunction, "forward", staticmethod(spy))
    monkeypatch.setenv("KEEPLORA_LORA_ORDERS", "expand_first,expand_first")
    lb.requires_grad_()
    y = kk.lora_linear(x, w, b, a, lb, 0.5)
    assert seen == [("expand_first", "expand_first")]
    assert_close(y, kk.lora_linear_ref(x, w, b, a, lb.detach(), 0.5))


def test_dy_pass_op_matches_its_reference():
    """The registered Triton op alone: ``(scale·dY·B, scale·dYᵀ·s, Σ dY)`` in fp32 on ragged shapes."""
    from keeplora_kernels.triton_lora_linear import lora_dy_pass

    g = torch.Generator().manual_seed(3)
    for T, N, R in [(37, 45, 5), (70, 33, 16)]:
        dy = torch.randn(T, N, generator=g).to(DEVICE)
        s = torch.randn(T, R, generator=g).to(DEVICE)
        b = torch.randn(N, R, generator=g).to(DEVICE)
        ds, db, dbias = lora_dy_pass(dy, s, b, 0.25, True)
        assert_close(ds, 0.25 * dy.double() @ b.double())
        assert_close(db, 0.25 * dy.double().t() @ s.double())
        assert_close(dbias, dy.double().sum(0))
        assert torch.ops.keeplora.lora_dy_pass.default is not None


# ------------------------------------------------------------------- the compiled op (csrc/lora_linear.cpp)
def _extension_op():
    from keeplora_kernels import _extension

    if "lora_linear" not in _extension.registered_ops("cpu"):
        pytest.skip("the compiled extension (keeplora::lora_linear) is not built")
    return torch.ops.keeplora.lora_linear


EXT_ORDERS = [(f, b) for f in FORWARD_ORDERS for b in ("base_first", "expand_first")]


@pytest.mark.parametrize("orders", EXT_ORDERS, ids=lambda v: "-".join(v))
def test_extension_op_gradcheck_fp64(orders):
    op = _extension_op()
    x, w, b, a, lb = _inputs((2, 3), 9, 7, 3, torch.float64, device=torch.device("cpu"))
    x.requires_grad_()
    b.requires_grad_()
    lb.requires_grad_()
    assert torch.autograd.gradcheck(lambda x_, b_, lb_: op(x_, w, b_, a, lb_, 0.7, *orders), (x, b, lb))


@pytest.mark.parametrize("orders", EXT_ORDERS, ids=lambda v: "-".join(v))
@pytest.mark.parametrize("lead,d_in,d_out,r", RAGGED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_extension_op_equals_the_python_function(orders, lead, d_in, d_out, r, dtype, bias):
    """The same GEMMs in the same order: outputs and every gradient bitwise equal to LoRALinearFunction (fp32
    adapters under bf16 input, as the engine runs it)."""
    op = _extension_op()
    x, w, b, a, lb = _inputs(lead, d_in, d_out, r, dtype, bias, device=torch.device("cpu"))
    if dtype == torch.bfloat16:
        a, lb = a.float(), lb.float()
    dy = torch.randn(*lead, d_out).to(dtype)
    results = []
    for fn in (lambda *t: op(*t, *orders), lambda *t: LoRALinearFunction.apply(*t, *orders)):
        xs, ls = x.clone().requires_grad_(), lb.clone().requires_grad_()
        bs = None if b is None else b.clone().requires_grad_()
        y = fn(xs, w, bs, a, ls, 0.5)
        results.append((y, *torch.autograd.grad(y, [t for t in (xs, ls, bs) if t is not None], dy)))
    for got, ref in zip(*results):
        assert got.dtype == ref.dtype and torch.equal(got, ref)


def test_extension_op_refuses_bad_input():
    op = _extension_op()
    x, w, b, a, lb = _inputs((4,), 8, 6, 2, torch.float32, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="forward_order must be 'base_first' or 'expand_first'"):
        op(x, w, b, a, lb, 1.0, "stacked", "base_first")
    with pytest.raises(RuntimeError, match="backward_order must be"):
        op(x, w, b, a, lb, 1.0, "base_first", "fused_dy")
    with pytest.raises(RuntimeError, match="shapes do not match"):
        op(x, w, b, a[:, :5], lb, 1.0, "base_first", "base_first")
    with pytest.raises(RuntimeError, match="frozen"):
        op(x, w.clone().requires_grad_(), b, a, lb, 1.0, "base_first", "base_first")


def test_auto_dispatch_takes_the_extension_op_when_built(monkeypatch):
    """CPU, auto backend: kk.lora_linear runs the compiled op (eager) with the orders lora_orders picks."""
    _extension_op()
    monkeypatch.delenv("KEEPLORA_BACKEND", raising=False)
    assert _dispatch.select("lora_linear", torch.device("cpu"), torch.float32) == "extension"
    x, w, b, a, lb = _inputs((5,), 8, 6, 2, torch.float32, device=torch.device("cpu"))
    y = kk.lora_linear(x, w, b, a, lb.requires_grad_(), 1.0)
    assert type(y.grad_fn).__name__ == "CppFunction"  # the C++ autograd function, not LoRALinearFunction


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_grad", [True, False])
def test_extension_op_backward_accumulates_like_the_function(bias, x_grad):
    """``.backward()`` through the engine (not ``autograd.grad``): every combination of a missing bias and an input
    that needs no gradient, as the first adapted layer of a model sees it."""
    op = _extension_op()
    x, w, b, a, lb = _inputs((3, 4), 8, 6, 2, torch.float32, bias, device=torch.device("cpu"))
    grads = []
    for fn in (lambda *t: op(*t, "base_first", "base_first"), LoRALinearFunction.apply):
        xs, ls = x.clone().requires_grad_(x_grad), lb.clone().requires_grad_()
        bs = None if b is None else b.clone().requires_grad_()
        (fn(xs, w, bs, a, ls, 0.5) ** 2).sum().backward()
        grads.append([t.grad for t in (xs, ls, bs) if t is not None])
    for got, ref in zip(*grads):
        assert (got is None and ref is None) or torch.equal(got, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS + [("ext", o) for o in ("base_first", "expand_first")],
                         ids=lambda v: "-".join(v))
def test_variants_on_cuda_within_the_bf16_rule(variant):
    """Every variant compiled on a GPU (cuBLAS orders, the Triton dY pass, the extension op) at a ragged shape of
    realistic width, bf16 input with fp32 adapters: y, dX, dB within 2× PyTorch's own bf16 error."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dev = torch.device("cuda")
    if variant[0] == "ext" and "lora_linear" not in _dispatch.extension_ops("cuda"):
        pytest.skip("the extension is not built with CUDA")
    x, w, b, a, lb = _inputs((3, 411), 768, 1000, 16, torch.bfloat16, device=dev)
    a, lb = a.float(), lb.float()
    xs, ls = x.clone().requires_grad_(), lb.clone().requires_grad_()
    if variant[0] == "ext":
        y = torch.ops.keeplora.lora_linear(xs, w, b, a, ls, 0.5, "expand_first", variant[1])
    else:
        y = _apply(variant, xs, w, b, a, ls, 0.5)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (xs, ls), dy)
    refs = _reference(x, w, b, a, lb, dy, torch.float64)
    lows = _reference(x, w, b, a, lb, dy, torch.bfloat16)
    for got, low, ref in zip((y, *grads), lows[:3], refs[:3]):
        assert_within_torch_error(got, low, ref, torch.bfloat16)
