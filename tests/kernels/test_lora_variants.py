"""The experimental LoRA orders (``keeplora_kernels.experimental.lora_variants``): the ``fused_dy`` backward (a
Triton pass over dY, under the interpreter on CPU, compiled on a GPU) and the stacked ``[W; A]`` forward, exact
against autograd (fp64 gradcheck, fp32 and bf16 against the oracle), saving only ``s = x·Aᵀ``, traced whole by
``torch.compile``."""

import pytest
import torch

from keeplora_kernels import _dispatch
from keeplora_kernels.experimental import (
    BACKWARD_ORDERS,
    LoRALinearVariantFunction,
    StackedLoRALinearFunction,
    stack_frozen,
)
from keeplora_kernels.lora_linear import FORWARD_ORDERS, LoRALinearFunction
from support.lora_checks import assert_matches_oracle, compiled_graph_targets, oracle_grads, seeded_inputs
from support.ref_ops import lora_linear_ref
from support.tolerances import assert_close, assert_within_torch_error
from support.triton_env import DEVICE  # skips without triton

VARIANTS = [(f, "fused_dy") for f in FORWARD_ORDERS] + [("stacked", b) for b in BACKWARD_ORDERS]
RAGGED = [((37,), 70, 45, 5), ((3, 11), 64, 33, 16), ((2,), 16, 17, 1)]  # (leading dims, d_in, d_out, r)


def _inputs(lead, d_in, d_out, r, dtype, bias=True, device=DEVICE, seed=0):
    return seeded_inputs(lead, d_in, d_out, r, dtype, bias, device, seed)


def _apply(variant, x, w, b, a, lb, scale):
    fwd, bwd = variant
    if fwd == "stacked":
        return StackedLoRALinearFunction.apply(x, stack_frozen(w, a), b, lb, scale, w.shape[0], bwd)
    return LoRALinearVariantFunction.apply(x, w, b, a, lb, scale, fwd, bwd)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v))
def test_variant_gradcheck_fp64(variant):
    if variant[1] == "fused_dy" and DEVICE.type == "cuda":
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
def test_variant_matches_the_oracle(variant, lead, d_in, d_out, r, dtype, bias):
    """Outputs and all gradients against the fp64 oracle, within the dtype's tolerance; fp32 adapters under bf16
    input (the engine's configuration) for bf16."""
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


@pytest.mark.parametrize("order", ["base_first", "expand_first"])
def test_variant_function_equals_the_production_function_on_its_orders(order):
    """On the production orders the variant Function is LoRALinearFunction: bitwise equal outputs and gradients."""
    x, w, b, a, lb = _inputs((3, 7), 20, 11, 4, torch.float32)
    dy = torch.randn(3, 7, 11, device=DEVICE)
    results = []
    for fn in (LoRALinearVariantFunction.apply, LoRALinearFunction.apply):
        xs, ls, bs = x.clone().requires_grad_(), lb.clone().requires_grad_(), b.clone().requires_grad_()
        y = fn(xs, w, bs, a, ls, 0.5, "expand_first", order)
        results.append((y, *torch.autograd.grad(y, (xs, ls, bs), dy)))
    for got, ref in zip(*results):
        assert torch.equal(got, ref)


def test_stacked_output_is_a_strided_view_that_reshapes():
    """Y shares the stacked GEMM's storage (row stride d_out + r); leading dims come back as a view."""
    x, w, b, a, lb = _inputs((3, 5), 16, 12, 4, torch.float32)
    y = StackedLoRALinearFunction.apply(x, stack_frozen(w, a), b, lb, 1.0, 12, "base_first")
    assert y.shape == (3, 5, 12) and y.stride()[-2] == 16
    assert_close(y, lora_linear_ref(x, w, b, a, lb, 1.0))


def test_bad_orders_are_refused(monkeypatch):
    x, w, b, a, lb = _inputs((4,), 8, 6, 2, torch.float32)
    with pytest.raises(ValueError, match="backward_order must be one of"):
        LoRALinearVariantFunction.apply(x, w, b, a, lb, 1.0, "expand_first", "dy_first")
    monkeypatch.setattr(_dispatch, "triton_runs", lambda device, dtypes=(): False)
    with pytest.raises(RuntimeError, match="fused_dy backward needs Triton"):
        LoRALinearVariantFunction.apply(x, w, b, a, lb, 1.0, "expand_first", "fused_dy")
    with pytest.raises(RuntimeError, match="fused_dy backward needs Triton"):
        StackedLoRALinearFunction.apply(x, stack_frozen(w, a), b, lb, 1.0, 6, "fused_dy")


def test_dy_pass_op_matches_the_oracle():
    """The registered Triton op alone: ``(scale·dY·B, scale·dYᵀ·s, Σ dY)`` in fp32 on ragged shapes."""
    from keeplora_kernels.experimental.triton_lora_linear import lora_dy_pass

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


# ------------------------------------------------------------------------------------------- torch.compile
def _layer_step(x, w, b, a, lb):
    return (LoRALinearVariantFunction.apply(x, w, b, a, lb, 0.5, "expand_first", "fused_dy") ** 2).sum()


def test_compiled_fused_dy_has_no_graph_break_and_equals_eager():
    torch._dynamo.reset()
    x, w, b, a, lb = _inputs((3, 10), 24, 20, 4, torch.float32)
    explained = torch._dynamo.explain(_layer_step)(x, w, b, a, lb.requires_grad_())
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    results = []
    for fn in (_layer_step, torch.compile(_layer_step, backend="aot_eager", fullgraph=True)):
        xs, ls, bs = x.clone().requires_grad_(), lb.detach().clone().requires_grad_(), b.clone().requires_grad_()
        loss = fn(xs, w, bs, a, ls)
        results.append((loss.detach(), *torch.autograd.grad(loss, (xs, ls, bs))))
    for got, ref in zip(results[1], results[0]):
        assert_close(got, ref)


def test_compiled_backward_graph_contains_the_registered_dy_pass():
    """The backward graph calls the registered op (not an opaque Python call)."""
    x, w, b, a, lb = _inputs((3, 10), 24, 20, 4, torch.float32)
    seen = compiled_graph_targets(_layer_step, x, w, b, a, lb.requires_grad_())
    assert any("lora_dy_pass" in t for t in seen), sorted(seen)[:20]


# ---------------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v))
def test_variants_on_cuda_within_the_bf16_rule(variant):
    """Every experimental variant compiled on a GPU at a ragged shape of realistic width, bf16 input with fp32
    adapters: y, dX, dB within 2× PyTorch's own bf16 error."""
    x, w, b, a, lb = _inputs((3, 411), 768, 1000, 16, torch.bfloat16, device=torch.device("cuda"))
    a, lb = a.float(), lb.float()
    xs, ls = x.clone().requires_grad_(), lb.clone().requires_grad_()
    y = _apply(variant, xs, w, b, a, ls, 0.5)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (xs, ls), dy)
    refs = oracle_grads(x, w, b, a, lb, dy, torch.float64)
    lows = oracle_grads(x, w, b, a, lb, dy, torch.bfloat16)
    for got, low, ref in zip((y, *grads), lows[:3], refs[:3]):
        assert_within_torch_error(got, low, ref, torch.bfloat16)


@pytest.mark.gpu
def test_reduce_overhead_captures_the_fused_dy_step_on_cuda():
    """``mode="reduce-overhead"``: a layer step with the registered Triton op is replayed from CUDA graphs (no
    cudagraph skip) and equals eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x, w, b, a, lb = _inputs((4, 256), 512, 384, 16, torch.bfloat16, device=torch.device("cuda"))
    a, lb = a.float(), lb.float().requires_grad_()

    def loss_and_grad(fn):
        loss = fn(x, w, b, a, lb)
        return (loss.detach(),) + torch.autograd.grad(loss, (lb,))

    eager = loss_and_grad(_layer_step)
    compiled = torch.compile(_layer_step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        got = loss_and_grad(compiled)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    for g, ref in zip(got, eager):
        assert_close(g, ref)
