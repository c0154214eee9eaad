"""``outer_sum``: acc + dyᵀ·x for the gradient pass (converted inputs on CPU, mixed-dtype addmm on CUDA), against
the fp64 oracle; its path is chosen in ``_dispatch``."""

import importlib

import pytest
import torch

import keeplora_kernels as kk
from keeplora_kernels import _dispatch
from support.ref_ops import outer_sum_ref
from support.tolerances import assert_close

outer_sum_module = importlib.import_module("keeplora_kernels.outer_sum")  # the package's name is the function


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_adds_the_transposed_product_in_the_accumulator_dtype(in_dtype):
    dy, x = torch.randn(37, 11).to(in_dtype), torch.randn(37, 5).to(in_dtype)
    acc = torch.randn(11, 5, dtype=torch.float64)
    expected = outer_sum_ref(acc, dy, x)
    out = kk.outer_sum(acc, dy, x)
    assert out.dtype == torch.float64
    assert_close(out, expected)
    acc32 = torch.zeros(11, 5)
    out32 = kk.outer_sum(acc32, dy, x)
    assert out32.data_ptr() == acc32.data_ptr()  # the CPU paths work in place
    assert_close(out32, outer_sum_ref(torch.zeros(11, 5), dy, x).float())


def test_rejects_bad_shapes_and_accumulators():
    with pytest.raises(ValueError, match="acc"):
        kk.outer_sum(torch.zeros(3, 4), torch.randn(5, 3), torch.randn(6, 4))
    with pytest.raises(ValueError, match="float32 or float64"):
        kk.outer_sum(torch.zeros(3, 4, dtype=torch.bfloat16), torch.randn(5, 3), torch.randn(5, 4))


def test_mixed_dtype_path_call_is_well_formed(monkeypatch):
    """The CUDA path's call on meta tensors (its kernel exists only in CUDA builds): shape and dtype of the result."""
    monkeypatch.setattr(_dispatch, "mixed_dtype_gemm", lambda op, device_type: True)
    acc = torch.empty(11, 5, device="meta")
    out = kk.outer_sum(
        acc,
        torch.empty(37, 11, device="meta", dtype=torch.bfloat16),
        torch.empty(37, 5, device="meta", dtype=torch.bfloat16),
    )
    assert out.shape == (11, 5) and out.dtype == torch.float32
    assert out is acc  # written into the accumulator: no second d_out × d_in buffer


def test_converted_inputs_are_added_in_chunks_no_larger_than_the_accumulator(monkeypatch):
    """bf16 inputs on CPU: fp32 copies of at most acc.numel() elements at a time; the sum is the oracle's."""
    seen = []
    convert_and_add = outer_sum_module._addmm_converted

    def spy(acc, dy, x):
        seen.append(dy.shape[0] * (dy.shape[1] + x.shape[1]))
        return convert_and_add(acc, dy, x)

    monkeypatch.setattr(outer_sum_module, "_addmm_converted", spy)
    dy, x = torch.randn(301, 7).bfloat16(), torch.randn(301, 6).bfloat16()
    acc = torch.randn(7, 6)
    expected = outer_sum_ref(acc, dy, x)
    out = kk.outer_sum(acc, dy, x)
    assert out is acc and len(seen) > 1 and max(seen) <= acc.numel()
    assert_close(out, expected.float())


def test_path_is_chosen_in_dispatch(monkeypatch):
    """Which torch path runs for which dtypes and devices; ``keeplora info`` shows it."""
    path = _dispatch.outer_sum_path
    assert path("cpu", torch.float32, torch.bfloat16, torch.bfloat16) == "converted_chunks"  # no CPU kernel
    assert path("cpu", torch.float32, torch.float32, torch.float32) == "addmm"
    assert path("cpu", torch.float64, torch.float64, torch.float64) == "addmm"
    assert path("cpu", torch.float64, torch.float32, torch.float32) == "converted_chunks"
    monkeypatch.setattr(_dispatch, "mixed_dtype_gemm", lambda op, device_type: device_type == "cuda")
    assert path("cuda", torch.float32, torch.bfloat16, torch.bfloat16) == "mixed_dtype_addmm"
    assert path("cuda", torch.float32, torch.float16, torch.float16) == "mixed_dtype_addmm"
    assert path("cuda", torch.float64, torch.bfloat16, torch.bfloat16) == "converted_chunks"  # fp64 acc: convert
    assert path("cuda", torch.float32, torch.bfloat16, torch.float16) == "converted_chunks"  # mixed inputs
    assert _dispatch.select("outer_sum", torch.device("cpu"), torch.bfloat16) == "torch"
    row = _dispatch.choices(torch.device("cuda"))["outer_sum"]
    assert row == {"bfloat16": "torch (mixed_dtype_addmm)", "float32": "torch (addmm)", "float64": "torch (addmm)"}


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_same_kernels_as_one_converted_addmm_per_chunk(in_dtype):
    """Bitwise: the CPU paths are exactly ``acc.addmm_`` of the converted inputs, chunk by chunk (the chunk rule
    written out here)."""
    dy, x = torch.randn(301, 7).to(in_dtype), torch.randn(301, 6).to(in_dtype)
    for acc_dtype in (torch.float32, torch.float64):
        acc = torch.randn(7, 6, dtype=acc_dtype)
        expected = acc.clone()
        if in_dtype == acc_dtype:
            expected.addmm_(dy.t(), x)
        else:
            rows = expected.numel() // (7 + 6)
            for start in range(0, 301, rows):
                expected.addmm_(dy[start : start + rows].t().to(acc_dtype), x[start : start + rows].to(acc_dtype))
        assert torch.equal(kk.outer_sum(acc, dy, x), expected)


@pytest.mark.gpu
def test_cuda_bf16_sum_is_far_more_accurate_than_a_bf16_weight_gradient():
    """What the authors' pipeline reads (a bf16 model's autograd dW, rounded to bf16) vs ours, against fp64."""
    # the tensor-core path is really the one taken here
    assert _dispatch.outer_sum_path("cuda", torch.float32, torch.bfloat16, torch.bfloat16) == "mixed_dtype_addmm"
    dy = torch.randn(8192, 1024, device="cuda").bfloat16()
    x = torch.randn(8192, 768, device="cuda").bfloat16()
    exact = outer_sum_ref(torch.zeros(1024, 768, device="cuda"), dy, x)
    ours = kk.outer_sum(torch.zeros(1024, 768, device="cuda"), dy, x)
    autograd_bf16 = dy.t() @ x
    err = (ours.double() - exact).norm() / exact.norm()
    err_bf16 = (autograd_bf16.double() - exact).norm() / exact.norm()
    assert err <= 0.25 * err_bf16, (err.item(), err_bf16.item())
