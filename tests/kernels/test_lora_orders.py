"""The GEMM orders of the torch LoRA path (``LoRALinearFunction``) and the compiled op: every combination exact
against autograd (fp64 gradcheck, fp32 and bf16 against the oracle ``ref_ops.lora_linear_ref``), saving only
``s = x·Aᵀ``. The experimental orders (fused_dy, stacked) are tested in ``test_lora_variants.py``."""

import pytest
import torch

import keeplora_kernels as kk
from keeplora_kernels import _dispatch
from keeplora_kernels.lora_linear import BACKWARD_ORDERS, FORWARD_ORDERS, LoRALinearFunction
from support.lora_checks import assert_matches_oracle, oracle_grads, seeded_inputs
from support.ref_ops import lora_linear_ref
from support.tolerances import assert_close, assert_within_torch_error

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ORDERS = [(f, b) for f in FORWARD_ORDERS for b in BACKWARD_ORDERS]
RAGGED = [((37,), 70, 45, 5), ((3, 11), 64, 33, 16), ((2,), 16, 17, 1)]  # (leading dims, d_in, d_out, r)


def _inputs(lead, d_in, d_out, r, dtype, bias=True, device=DEVICE, seed=0):
    return seeded_inputs(lead, d_in, d_out, r, dtype, bias, device, seed)


def _apply(variant, x, w, b, a, lb, scale):
    return LoRALinearFunction.apply(x, w, b, a, lb, scale, *variant)


VARIANTS = ORDERS


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v))
def test_variant_gradcheck_fp64(variant):
    x, w, b, a, lb = _inputs((2, 3), 9, 7, 3, torch.float64)
    x.requires_grad_()
    b.requires_grad_()
    lb.requires_grad_()
    assert torch.autograd.gradcheck(lambda x_, b_, lb_: _apply(variant, x_, w, b_, a, lb_, 0.7), (x, b, lb))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v))
@pytest.mark.parametrize("lead,d_in,d_out,r", RAGGED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_order_matches_the_oracle(variant, lead, d_in, d_out, r, dtype, bias):
    """Outputs and all gradients against the fp64 reference, within the dtype's tolerance; fp32 adapters under
    bf16 input (the engine's configuration) for bf16."""
    x, w, b, a, lb = _inputs(lead, d_in, d_out, r, dtype, bias)
    assert_matches_oracle(lambda *t: _apply(variant, *t, 0.5), x, w, b, a, lb, dtype)


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


def test_orders_env_selects_and_validates(monkeypatch):
    monkeypatch.setenv("KEEPLORA_LORA_ORDERS", "expand_first,expand_first")
    assert _dispatch.lora_orders(torch.device("cpu"), torch.float32) == ("expand_first", "expand_first")
    monkeypatch.setenv("KEEPLORA_LORA_ORDERS", "stacked,base_first")
    with pytest.raises(ValueError, match="KEEPLORA_LORA_ORDERS.*forward in"):
        _dispatch.lora_orders(torch.device("cpu"), torch.float32)
    monkeypatch.setenv("KEEPLORA_LORA_ORDERS", "expand_first,fused_dy")  # experimental: not an order of the op
    with pytest.raises(ValueError, match="experimental"):
        _dispatch.lora_orders(torch.device("cpu"), torch.float32)
    monkeypatch.delenv("KEEPLORA_LORA_ORDERS")
    assert _dispatch.lora_orders(torch.device("cpu"), torch.float32) == _dispatch.LORA_ORDERS["cpu"]


def test_lora_linear_follows_the_chosen_orders(monkeypatch):
    """``kk.lora_linear`` on the torch backend runs the orders ``lora_orders`` picks (here forced), stays exact."""
    monkeypatch.setenv("KEEPLORA_BACKEND", "torch")
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
    assert_close(y, lora_linear_ref(x, w, b, a, lb.detach(), 0.5))


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
@pytest.mark.parametrize(
    "variant", VARIANTS + [("ext", o) for o in ("base_first", "expand_first")], ids=lambda v: "-".join(v)
)
def test_variants_on_cuda_within_the_bf16_rule(variant):
    """Every order on a GPU (cuBLAS through LoRALinearFunction, and the extension op) at a ragged shape of
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
    refs = oracle_grads(x, w, b, a, lb, dy, torch.float64)
    lows = oracle_grads(x, w, b, a, lb, dy, torch.bfloat16)
    for got, low, ref in zip((y, *grads), lows[:3], refs[:3]):
        assert_within_torch_error(got, low, ref, torch.bfloat16)
