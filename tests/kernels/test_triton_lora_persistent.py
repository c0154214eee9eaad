"""The persistent Triton LoRA linear (``keeplora_kernels.experimental.triton_lora_persistent``) against the oracle
(``ref_ops``) and the torch backend, on both of its load paths: tensor descriptors (TMA on a GPU) and masked
pointers.

CPU: the kernels under the Triton interpreter (which implements the descriptors' loads and stores, zero fill
included); GPU: the same tests compiled, plus the ``gpu``-marked ones at larger shapes. The ahead-of-time compile
for sm_90 is in ``test_triton_compile.py``.
"""

import pytest
import torch

from keeplora_kernels._triton_utils import dot_mode, round_to
from keeplora_kernels.experimental import triton_lora_persistent as tlp
from keeplora_kernels.experimental.triton_lora_persistent import lora_linear_persistent
from keeplora_kernels.lora_linear import LoRALinearFunction
from support.lora_checks import assert_matches_oracle, assert_saves_only_s, compiled_graph_targets, seeded_inputs
from support.ref_ops import lora_linear_ref
from support.tolerances import assert_close, assert_within_torch_error
from support.triton_env import DEVICE, force_triton, triton  # noqa: F401  (skips without triton; fixture used below)

tl = triton.language

pytestmark = pytest.mark.usefixtures("force_triton")

# (leading dims, d_in, d_out): ragged against the interpreter's 32×32×32 tiles. A descriptor needs 16-byte row
# strides: the last shape's rows (70 and 33 elements) take the pointer path whatever is asked, and so do the
# second shape's 36-wide outputs in 16-bit dtypes (72 bytes)
SHAPES = [((37,), 64, 48), ((3, 11), 96, 36), ((5,), 70, 33)]


def _persistent(tma, fuse_db=True):
    return lambda x, w, b, a, lb, scale=0.5: lora_linear_persistent(x, w, b, a, lb, scale, tma=tma, fuse_db=fuse_db)


def _path(x, w, a, tma):
    """Whether the forward plan for these operands uses descriptors."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.empty(x2.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    a_ = a.to(x.dtype).contiguous()
    launch = tlp.plan_forward(
        x2, w, None, a_, torch.empty(w.shape[0], a.shape[0], dtype=x.dtype), 1.0, y, None, tma=tma
    )
    return launch.constexprs["USE_TMA"]


@pytest.mark.parametrize("lead,d_in,d_out", SHAPES)
@pytest.mark.parametrize("r", [1, 8, 16, 40])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tma", [None, False])
@pytest.mark.parametrize("fuse_db", [True, False])
def test_matches_the_oracle_fp32(lead, d_in, d_out, r, bias, tma, fuse_db):
    """Output, dX, dB and db; dB/db from the dX launch's own tiles (``fuse_db``) or from the torch path."""
    x, w, b, a, lb = seeded_inputs(lead, d_in, d_out, r, torch.float32, bias=bias, device=DEVICE, seed=r + d_in)
    assert _path(x, w, a, tma) == (tma is None and d_in % 4 == 0 and d_out % 4 == 0)
    assert_matches_oracle(_persistent(tma, fuse_db), x, w, b, a, lb, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,d_in,d_out", SHAPES[:2])
@pytest.mark.parametrize("r", [4, 16])
@pytest.mark.parametrize("tma", [None, False])
@pytest.mark.parametrize("fuse_db", [True, False])
def test_low_precision_within_twice_torch_error(dtype, lead, d_in, d_out, r, tma, fuse_db):
    """Output and every gradient within 2× PyTorch's own error at this dtype (bf16 with fp32 adapters, the
    engine's configuration)."""
    x, w, b, a, lb = seeded_inputs(lead, d_in, d_out, r, dtype, device=DEVICE, seed=3)
    assert_matches_oracle(_persistent(tma, fuse_db), x, w, b, a, lb, dtype)


@pytest.mark.parametrize("tma", [None, False])
def test_fp16_native_dot_path(monkeypatch, tma):
    """The GPU's arithmetic path on the CPU: fp16 tiles go to ``tl.dot`` unconverted (fp32 accumulation). The
    interpreter runs fp16 dots natively (not bf16: it stores bf16 as integers), so pretending not to interpret
    exercises those branches here."""
    from keeplora_kernels import _triton_utils

    if DEVICE.type == "cpu":
        monkeypatch.setattr(_triton_utils, "interpreted", lambda: False)
    assert _triton_utils.dot_mode(torch.float16)[0] is False
    x, w, b, a, lb = seeded_inputs((37,), 64, 48, 8, torch.float16, device=DEVICE, seed=5)
    assert_matches_oracle(_persistent(tma), x, w, b, a, lb, torch.float16)


def test_non_contiguous_input():
    """x whose last dim is not contiguous: flattened by a copy, then the descriptor path."""
    x = torch.randn(64, 2, 5, device=DEVICE).movedim(0, -1)  # (2, 5, 64), stride 1 along dim 0
    _, w, b, a, lb = seeded_inputs((1,), 64, 24, 8, torch.float32, device=DEVICE)
    assert_matches_oracle(_persistent(None), x, w, b, a, lb, torch.float32)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="Triton compiles no float64 tl.dot for a GPU")
def test_gradcheck_fp64():
    """The kernels themselves in fp64 (the interpreter runs fp64 ``tl.dot`` through numpy), both load paths."""
    x, w, b, a, lb = seeded_inputs((6,), 16, 10, 3, torch.float64, device=DEVICE)
    for tma in (None, False):
        for fuse_db in (True, False):
            args = (x.clone().requires_grad_(), b.clone().requires_grad_(), lb.clone().requires_grad_())
            fn = _persistent(tma, fuse_db)
            assert torch.autograd.gradcheck(lambda x_, b_, lb_: fn(x_, w, b_, a, lb_, 0.7), args)


def test_descriptor_path_equals_pointer_path():
    """Same tiles, same products in the same order: the two load paths give the same bits."""
    x, w, b, a, lb = seeded_inputs((50,), 64, 40, 16, torch.float32, device=DEVICE, seed=7)
    dy = torch.randn(50, 40, device=DEVICE)
    outs = []
    for tma in (True, False):
        xs, ls = x.clone().requires_grad_(), lb.clone().requires_grad_()
        y = lora_linear_persistent(xs, w, b, a, ls, 0.5, tma=tma)
        y.backward(dy)
        outs.append((y, xs.grad, ls.grad))
    for got, ref in zip(*outs):
        assert torch.equal(got, ref)


def test_tma_required_on_operands_it_cannot_describe():
    x, w, b, a, lb = seeded_inputs((5,), 70, 40, 4, torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="tma=True but row stride 280 B"):
        lora_linear_persistent(x, w, b, a, lb, 1.0, tma=True)


def test_saves_only_the_shrunk_activation():
    x, w, b, a, lb = seeded_inputs((5, 7), 64, 40, 4, torch.float32, device=DEVICE)
    y = assert_saves_only_s(x, w, b, a, lb, _persistent(None))
    y.sum().backward()  # backward runs from s alone
    assert x.grad is not None and lb.grad is not None


def test_only_the_needed_gradients():
    """x frozen (a first layer): only dB; B frozen: only dX; no bias gradient without a bias that wants one."""
    x, w, b, a, lb = seeded_inputs((9,), 32, 18, 3, torch.float32, device=DEVICE)
    dy = torch.randn(9, 18, device=DEVICE)
    lb1, lb2 = lb.clone().requires_grad_(), lb.clone().requires_grad_()
    lora_linear_persistent(x, w, b, a, lb1, 0.5).backward(dy)
    lora_linear_ref(x, w, b, a, lb2, 0.5).backward(dy)
    assert_close(lb1.grad, lb2.grad)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    lora_linear_persistent(x1, w, b, a, lb, 0.5).backward(dy)
    lora_linear_ref(x2, w, b, a, lb, 0.5).backward(dy)
    assert_close(x1.grad, x2.grad)


def test_fp32_adapters_under_bf16_input_return_fp32_grad():
    x, w, b, a, lb = seeded_inputs((10,), 32, 24, 4, torch.bfloat16, device=DEVICE)
    lb = lb.float().requires_grad_()
    y = lora_linear_persistent(x, w, b, a.float(), lb, 1.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lb.grad.dtype == torch.float32


def test_empty_token_batch():
    x, w, b, a, lb = seeded_inputs((0,), 16, 8, 2, torch.float32, device=DEVICE)
    x.requires_grad_()
    lb.requires_grad_()
    y = lora_linear_persistent(x, w, b, a, lb, 1.0)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 16) and torch.count_nonzero(lb.grad) == 0


def test_refuses_bad_input():
    x, w, b, a, lb = seeded_inputs((4,), 16, 16, 2, torch.float32, device=DEVICE)
    with pytest.raises(RuntimeError, match="frozen"):
        lora_linear_persistent(x, w.clone().requires_grad_(), b, a, lb, 1.0)
    with pytest.raises(ValueError, match=r"rank 65 outside 1\.\.64"):
        lora_linear_persistent(x, w, b, torch.zeros(65, 16), torch.zeros(16, 65), 1.0)
    with pytest.raises(ValueError, match=r"lora_b must be \(16, 2\)"):
        lora_linear_persistent(x, w, b, a, lb.T, 1.0)
    with pytest.raises(TypeError, match="x must be bfloat16, float16, float32 or float64"):
        lora_linear_persistent(x.to(torch.int32), w, b, a, lb, 1.0)


def test_gpu_tiles_fit_the_h200():
    """Every GPU tile's operand ring and output staging fit the shared memory of one sm_90 block (the compile test
    checks what the compiler actually allocates)."""
    for tiles, elem, block_r in [
        (tlp.GPU_TILES_TMA, 2, 16),
        (tlp.GPU_TILES_TMA_WIDE_RANK, 2, 64),
        (tlp.GPU_TILES_POINTER, 2, 64),
        (tlp.GPU_TILES_32BIT, 4, 64),
    ]:
        assert tiles.smem_bytes(elem, block_r) <= tlp.SM90_SMEM, tiles


# ------------------------------------------------------------------------------------------- torch.compile
def _layer_step(x, w, b, a, lb):
    return (lora_linear_persistent(x, w, b, a, lb, 0.5) ** 2).sum()


def test_compiled_has_no_graph_break_and_equals_eager():
    torch._dynamo.reset()
    x, w, b, a, lb = seeded_inputs((3, 10), 64, 40, 8, torch.float32, device=DEVICE)
    explained = torch._dynamo.explain(_layer_step)(x, w, b, a, lb.clone().requires_grad_())
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    results = []
    for fn in (_layer_step, torch.compile(_layer_step, backend="aot_eager", fullgraph=True)):
        xs, ls, bs = x.clone().requires_grad_(), lb.clone().requires_grad_(), b.clone().requires_grad_()
        loss = fn(xs, w, bs, a, ls)
        results.append((loss.detach(), *torch.autograd.grad(loss, (xs, ls, bs))))
    for got, ref in zip(results[1], results[0]):
        assert_close(got, ref)


def test_compiled_graphs_call_the_registered_ops():
    """Forward and backward graphs call ``keeplora::lora_persistent_forward`` / ``_backward`` (not opaque Python)."""
    x, w, b, a, lb = seeded_inputs((3, 10), 64, 40, 8, torch.float32, device=DEVICE)
    seen = compiled_graph_targets(_layer_step, x.requires_grad_(), w, b, a, lb.requires_grad_())
    assert any("lora_persistent_forward" in t for t in seen), sorted(seen)[:20]
    assert any("lora_persistent_backward" in t for t in seen), sorted(seen)[:20]


# ---------------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1000, 768, 768, 16), (257, 1024, 3072, 64), (4096, 4096, 4096, 16)])
def test_gpu_low_precision_within_twice_torch_error(dtype, shape):
    T, d_in, d_out, r = shape
    x, w, b, a, lb = seeded_inputs((T,), d_in, d_out, r, dtype, device="cuda")
    x, w, b, a = x.to(dtype), w.to(dtype), b.to(dtype), a.float()
    lb = lb.float()
    dy = torch.randn(T, d_out, device="cuda").to(dtype)

    def run(fn, cast=lambda t: t):
        xs, ls, bs = (cast(t).detach().clone().requires_grad_() for t in (x, lb, b))
        y = fn(xs, cast(w), bs, cast(a), ls, 2.0)
        y.backward(cast(dy))
        return y.detach(), xs.grad, ls.grad, bs.grad

    got = run(lora_linear_persistent)
    low = run(LoRALinearFunction.apply)
    exact = run(lora_linear_ref, cast=lambda t: t.double())
    for g, t, e in zip(got, low, exact):
        assert_within_torch_error(g, t, e, dtype)


@triton.jit
def _round_kernel(X, Y, N, UPCAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N, other=0.0)
    tl.store(Y + offs, round_to(x, tl.bfloat16, UPCAST), mask=offs < N)


def test_round_to_bf16_is_round_to_nearest_even():
    """The kernels' bf16 rounding (``_triton_utils.round_to``) gives torch's bits, ties and exponent carries
    included, on both devices (under the interpreter it rounds the bits itself)."""
    ties = [1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 2.0 - 2**-9, 2.0 - 2**-10, 255.5, 3.0e38]
    x = torch.cat([torch.tensor(ties), torch.randn(1000) * 10.0 ** torch.randint(-6, 6, (1000,))]).to(DEVICE)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _round_kernel[(1,)](x, y, x.numel(), UPCAST=dot_mode(torch.bfloat16)[0], BLOCK=1024)
    assert torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
