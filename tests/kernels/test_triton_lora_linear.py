"""The experimental Triton frozen-A LoRA linear (``keeplora_kernels.experimental.triton_lora_linear``, single and
shared-input forms) against the oracle (``ref_ops``) and the torch backend.

CPU: kernels under the Triton interpreter; GPU: the same tests compiled, plus the ``gpu``-marked ones at larger
shapes. The kernels are called through their own entry points: the dispatcher never selects them.
"""

import pytest
import torch

import keeplora_kernels as kk
from keeplora_kernels import _dispatch
from keeplora_kernels.experimental.triton_lora_linear import lora_linear_shared_triton, lora_linear_triton
from keeplora_kernels.lora_linear import LoRALinearFunction
from support.lora_checks import assert_saves_only_s
from support.ref_ops import lora_linear_ref, lora_linear_shared_ref
from support.tolerances import assert_close, assert_within_torch_error
from support.triton_env import DEVICE, force_triton  # noqa: F401  (skips without triton; the fixture is used below)

pytestmark = pytest.mark.usefixtures("force_triton")

SHAPES = [((37,), 70, 45), ((3, 11), 64, 33), ((5,), 40, 24)]  # (leading dims, d_in, d_out); T=5 takes split-K


def _inputs(lead, d_in, d_out, r, dtype=torch.float32, adapter_dtype=None, bias=True, transpose_x=False, device=DEVICE):
    adapter_dtype = adapter_dtype or dtype
    if transpose_x:  # non-contiguous: the leading dims and d_in of a (d_in, *lead) tensor, moved
        x = torch.randn(d_in, *lead, dtype=dtype, device=device).movedim(0, -1)
    else:
        x = torch.randn(*lead, d_in, dtype=dtype, device=device)
    w = (torch.randn(d_out, d_in, device=device) / d_in**0.5).to(dtype)
    b = torch.randn(d_out, device=device).to(dtype) if bias else None
    a = (torch.randn(r, d_in, device=device) / d_in**0.5).to(adapter_dtype)
    lb = torch.randn(d_out, r, device=device).to(adapter_dtype)
    return x, w, b, a, lb


def _run(fn, x, w, b, a, lb, scale, dy, cast=None):
    """Forward + backward; returns (y, dx, dB, dbias). ``cast`` converts the inputs first (e.g. to fp64)."""
    cast = cast or (lambda t: t)
    x_ = cast(x).detach().requires_grad_()
    lb_ = cast(lb).detach().requires_grad_()
    b_ = None if b is None else cast(b).detach().requires_grad_()
    y = fn(x_, cast(w), b_, cast(a), lb_, scale)
    y.backward(cast(dy))
    return y.detach(), x_.grad, lb_.grad, None if b is None else b_.grad


def test_dispatch_never_picks_the_experimental_kernels():
    """Even with ``KEEPLORA_BACKEND=triton`` (the fixture) the LoRA ops keep the automatic choice."""
    assert "triton" not in _dispatch.implemented("lora_linear")
    assert _dispatch.select("lora_linear", DEVICE, torch.float32) in ("torch", "extension")
    assert _dispatch.select("lora_linear_shared", DEVICE, torch.float32) == "torch"


@pytest.mark.parametrize("lead,d_in,d_out", SHAPES)
@pytest.mark.parametrize("r", [1, 8, 16, 64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("transpose_x", [False, True])
def test_matches_the_oracle_fp32(lead, d_in, d_out, r, bias, transpose_x):
    x, w, b, a, lb = _inputs(lead, d_in, d_out, r, bias=bias, transpose_x=transpose_x)
    dy = torch.randn(*lead, d_out, device=DEVICE)
    got = _run(lora_linear_triton, x, w, b, a, lb, 0.5, dy)
    ref = _run(lora_linear_ref, x, w, b, a, lb, 0.5, dy)
    for g, e in zip(got, ref):
        if e is None:
            assert g is None
            continue
        assert g.shape == e.shape and g.dtype == e.dtype
        assert_close(g, e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", [8, 64])
@pytest.mark.parametrize("adapter_dtype", [None, torch.float32])
def test_low_precision_within_twice_torch_error(dtype, r, adapter_dtype):
    """flash-attn rule on y, dx, dB, dbias: |ours − exact| ≤ 2·|torch at this dtype − exact| + floor, with
    exact = the fp64 computation on the same (rounded) inputs. adapter_dtype=fp32 is peft's default under bf16."""
    lead, d_in, d_out = (37,), 70, 45
    x, w, b, a, lb = _inputs(lead, d_in, d_out, r, dtype=dtype, adapter_dtype=adapter_dtype)
    dy = torch.randn(*lead, d_out, device=DEVICE).to(dtype)
    got = _run(lora_linear_triton, x, w, b, a, lb, 0.25, dy)
    low = _run(LoRALinearFunction.apply, x, w, b, a, lb, 0.25, dy)  # PyTorch ops at this dtype
    exact = _run(lora_linear_ref, x, w, b, a, lb, 0.25, dy, cast=lambda t: t.double())
    names = ["y", "dx", "dB", "dbias"]
    for name, g, t, e in zip(names, got, low, exact):
        assert g.dtype == t.dtype, name  # y, dx in x's dtype; dB in B's dtype; dbias in the bias dtype
        assert_within_torch_error(g, t, e, dtype)


@pytest.mark.parametrize("adapter_dtype", [None, torch.float32])
def test_fp16_native_dot_path(monkeypatch, adapter_dtype):
    """The GPU's arithmetic path on the CPU: fp16 tiles go to ``tl.dot`` unconverted (fp32 accumulation), mixed
    operands are cast to x's dtype in the kernel. The interpreter runs fp16 dots natively (not bf16: it stores
    bf16 as integers), so pretending not to interpret exercises those branches here."""
    from keeplora_kernels import _triton_utils

    if DEVICE.type == "cpu":
        monkeypatch.setattr(_triton_utils, "interpreted", lambda: False)
    assert _triton_utils.dot_mode(torch.float16)[0] is False
    lead, d_in, d_out, r = (37,), 70, 45, 8
    x, w, b, a, lb = _inputs(lead, d_in, d_out, r, dtype=torch.float16, adapter_dtype=adapter_dtype)
    dy = torch.randn(*lead, d_out, device=DEVICE).to(torch.float16)
    got = _run(lora_linear_triton, x, w, b, a, lb, 0.25, dy)
    low = _run(LoRALinearFunction.apply, x, w, b, a, lb, 0.25, dy)
    exact = _run(lora_linear_ref, x, w, b, a, lb, 0.25, dy, cast=lambda t: t.double())
    for g, t, e in zip(got, low, exact):
        assert_within_torch_error(g, t, e, torch.float16)


def test_fp32_adapters_under_bf16_input_return_fp32_grad():
    x, w, b, a, lb = _inputs((10,), 32, 24, 4, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    lb.requires_grad_()
    y = lora_linear_triton(x, w, b, a, lb, 1.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lb.grad.dtype == torch.float32


def test_gradcheck_fp64():
    """The Triton kernels themselves in fp64 (the interpreter runs fp64 tl.dot through numpy)."""
    x, w, b, a, lb = _inputs((4,), 8, 5, 2, dtype=torch.float64)
    x.requires_grad_()
    b.requires_grad_()
    lb.requires_grad_()
    assert torch.autograd.gradcheck(lambda x_, b_, lb_: lora_linear_triton(x_, w, b_, a, lb_, 0.7), (x, b, lb))


def test_saves_only_the_shrunk_activation():
    lead, d_in, d_out, r = (5, 7), 48, 40, 4
    x, w, b, a, lb = _inputs(lead, d_in, d_out, r)
    y = assert_saves_only_s(x, w, b, a, lb, lora_linear_triton)
    y.sum().backward()  # backward runs from s alone
    assert x.grad is not None and lb.grad is not None


def test_refuses_trainable_frozen_operands():
    x, w, b, a, lb = _inputs((4,), 16, 16, 2)
    with pytest.raises(RuntimeError, match="frozen"):
        lora_linear_triton(x, w.requires_grad_(), b, a, lb, 1.0)
    with pytest.raises(RuntimeError, match="frozen"):
        lora_linear_triton(x, w.detach(), b, a.requires_grad_(), lb, 1.0)


def test_only_the_needed_gradients():
    """x frozen (a first layer): only dB; B frozen: only dx."""
    x, w, b, a, lb = _inputs((9,), 20, 18, 3)
    dy = torch.randn(9, 18, device=DEVICE)
    lb1 = lb.clone().requires_grad_()
    lora_linear_triton(x, w, b, a, lb1, 0.5).backward(dy)
    lb2 = lb.clone().requires_grad_()
    lora_linear_ref(x, w, b, a, lb2, 0.5).backward(dy)
    assert_close(lb1.grad, lb2.grad)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    lora_linear_triton(x1, w, b, a, lb, 0.5).backward(dy)
    lora_linear_ref(x2, w, b, a, lb, 0.5).backward(dy)
    assert_close(x1.grad, x2.grad)


def test_empty_token_batch():
    x, w, b, a, lb = _inputs((0,), 16, 8, 2)
    x.requires_grad_()
    lb.requires_grad_()
    y = lora_linear_triton(x, w, b, a, lb, 1.0)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 16) and torch.count_nonzero(lb.grad) == 0


@pytest.mark.parametrize("split_k", [1, 2, 4])
def test_shrink_split_k_equals_one_pass(split_k):
    from keeplora_kernels.experimental.triton_lora_linear import plan_shrink

    x = torch.randn(5, 100, device=DEVICE)
    a = torch.randn(12, 100, device=DEVICE)
    s = torch.empty(5, 12, device=DEVICE)
    launches, finish = plan_shrink(x, a, s, split_k=split_k)
    assert launches[0].grid[2] == split_k
    for launch in launches:
        launch()
    finish()
    assert_close(s, x @ a.T)


# ------------------------------------------------------------------------------------------------ shared form
def _shared_inputs(d_in, outs, ranks, biases, dtype=torch.float32, lead=(3, 7)):
    x = torch.randn(*lead, d_in, dtype=dtype, device=DEVICE)
    ws = [(torch.randn(n, d_in, device=DEVICE) / d_in**0.5).to(dtype) for n in outs]
    bs = [torch.randn(n, device=DEVICE).to(dtype) if has else None for n, has in zip(outs, biases)]
    as_ = [(torch.randn(r, d_in, device=DEVICE) / d_in**0.5).to(dtype) for r in ranks]
    lbs = [torch.randn(n, r, device=DEVICE).to(dtype) for n, r in zip(outs, ranks)]
    return x, ws, bs, as_, lbs


def _shared_run(fn, x, ws, bs, as_, lbs, scales, dys, used):
    x_ = x.detach().clone().requires_grad_()
    lbs_ = [lb.detach().clone().requires_grad_() for lb in lbs]
    bs_ = [None if b is None else b.detach().clone().requires_grad_() for b in bs]
    ys = fn(x_, ws, bs_, as_, lbs_, scales)
    loss = sum((ys[i] * dys[i]).sum() for i in used)
    loss.backward()
    return ys, x_.grad, [lb.grad for lb in lbs_], [None if b is None else b.grad for b in bs_]


@pytest.mark.parametrize("n_proj,used", [(3, (0, 1, 2)), (3, (0, 2)), (5, (0, 1, 2, 3, 4))])
def test_shared_matches_the_oracle(n_proj, used):
    d_in = 40
    outs = [33, 17, 40, 24, 16][:n_proj]
    ranks = [1, 8, 16, 4, 2][:n_proj]
    biases = [True, False, True, True, False][:n_proj]
    scales = [0.5, 2.0, 1 / 16, 1.0, 0.3][:n_proj]
    x, ws, bs, as_, lbs = _shared_inputs(d_in, outs, ranks, biases)
    dys = [torch.randn(*x.shape[:-1], n, device=DEVICE) for n in outs]
    got = _shared_run(lora_linear_shared_triton, x, ws, bs, as_, lbs, scales, dys, used)
    ref = _shared_run(lora_linear_shared_ref, x, ws, bs, as_, lbs, scales, dys, used)
    for g, e in zip(got[0], ref[0]):
        assert_close(g, e)
    assert_close(got[1], ref[1])
    for i in range(n_proj):
        if i in used:
            assert_close(got[2][i], ref[2][i])
            if biases[i]:
                assert_close(got[3][i], ref[3][i])
        else:  # an unused output: zero gradient for its adapter
            assert got[2][i] is None or torch.count_nonzero(got[2][i]) == 0


def test_shared_saves_one_concatenated_activation():
    x, ws, bs, as_, lbs = _shared_inputs(32, [32, 32, 32], [4, 8, 4], [True, True, True], lead=(6,))
    x.requires_grad_()
    for lb in lbs:
        lb.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear_shared_triton(x, ws, bs, as_, lbs, [1.0, 1.0, 1.0])
    activations = [tuple(t.shape) for t in saved if t.shape[0] == 6]
    assert activations == [(6, 16)]


def test_shared_validates_lengths():
    x, ws, bs, as_, lbs = _shared_inputs(16, [16, 16], [2, 2], [True, True])
    with pytest.raises(ValueError, match="one entry per projection"):
        kk.lora_linear_shared(x, ws, bs[:1], as_, lbs, [1.0, 1.0])


# ---------------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1000, 768, 768, 16), (257, 1024, 3072, 64), (4096, 4096, 4096, 16)])
def test_gpu_low_precision_within_twice_torch_error(dtype, shape):
    T, d_in, d_out, r = shape
    x, w, b, a, lb = _inputs((T,), d_in, d_out, r, dtype=dtype, adapter_dtype=torch.float32, device="cuda")
    dy = torch.randn(T, d_out, device="cuda").to(dtype)
    got = _run(lora_linear_triton, x, w, b, a, lb, 2.0, dy)
    low = _run(LoRALinearFunction.apply, x, w, b, a, lb, 2.0, dy)
    exact = _run(lora_linear_ref, x, w, b, a, lb, 2.0, dy, cast=lambda t: t.double())
    for g, t, e in zip(got, low, exact):
        assert_within_torch_error(g, t, e, dtype)
