"""Triton streaming second moment ``acc += Xᵀ·X`` over unmasked rows, against the exact fp64 sum."""

import pytest
import torch

import keeplora_kernels as kk
from keeplora_kernels import _dispatch
from support.tolerances import assert_close, assert_within_torch_error
from support.triton_env import DEVICE, force_triton  # noqa: F401  (skips without triton; the fixture is used below)

pytestmark = pytest.mark.usefixtures("force_triton")


def _exact(acc0, x, mask):
    rows = x.reshape(-1, x.shape[-1]).double()
    if mask is not None:
        rows = rows[mask.reshape(-1).bool()]
    return acc0.double() + rows.T @ rows


def _symmetric_start(d, dtype=torch.float32):
    c = torch.randn(d, d, dtype=torch.float64)
    return (c + c.T).to(dtype).to(DEVICE)


def test_dispatch_picks_triton():
    assert _dispatch.select("second_moment_update", DEVICE) == "triton"


@pytest.mark.parametrize("shape,d", [((4, 9), 33), ((70,), 70), ((3, 5, 7), 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_exact_sum(shape, d, dtype, masked):
    x = torch.randn(*shape, d, device=DEVICE).to(dtype)
    mask = (torch.rand(*shape, device=DEVICE) > 0.4) if masked else None
    acc = _symmetric_start(d)
    expected = _exact(acc, x, mask)
    out = kk.second_moment_update(acc, x, mask)
    assert out is acc
    # products of fp16/bf16 values are exact in fp32, so every dtype must meet the fp32 tolerance
    assert_close(acc.double(), expected, torch.float32)
    assert torch.equal(acc, acc.T), "one symmetric pass: the update must be exactly symmetric"


@pytest.mark.parametrize("split", [1, 2, 3])
def test_row_split_partials_equal_one_pass(split):
    from keeplora_kernels.triton_second_moment import second_moment_update_triton

    x = torch.randn(150, 40, device=DEVICE)
    mask = torch.rand(150, device=DEVICE) > 0.3
    acc = _symmetric_start(40)
    expected = _exact(acc, x, mask)
    second_moment_update_triton(acc, x, mask, split=split)
    assert_close(acc.double(), expected, torch.float32)


def test_non_contiguous_features_and_int_mask():
    x = torch.randn(48, 30, device=DEVICE).T  # (30 rows, 48 features), strided
    mask = (torch.rand(30, device=DEVICE) > 0.5).to(torch.int64) * 3
    acc = torch.zeros(48, 48, device=DEVICE)
    kk.second_moment_update(acc, x, mask)
    assert_close(acc.double(), _exact(torch.zeros(48, 48), x.cpu(), mask.cpu()).to(DEVICE), torch.float32)


def test_fp16_native_dot_path(monkeypatch):
    """fp16 tiles straight into ``tl.dot`` as on a GPU (see test_triton_lora_linear.test_fp16_native_dot_path)."""
    from keeplora_kernels import _triton_utils

    if DEVICE.type == "cpu":
        monkeypatch.setattr(_triton_utils, "interpreted", lambda: False)
    x = torch.randn(3, 23, 40, device=DEVICE).half()
    mask = torch.rand(3, 23, device=DEVICE) > 0.3
    acc = _symmetric_start(40)
    expected = _exact(acc, x, mask)
    kk.second_moment_update(acc, x, mask)
    assert_close(acc.double(), expected, torch.float32)
    assert torch.equal(acc, acc.T)


def test_all_rows_masked_leaves_acc_unchanged():
    x = torch.randn(2, 8, 20, device=DEVICE)
    acc = _symmetric_start(20)
    before = acc.clone()
    kk.second_moment_update(acc, x, torch.zeros(2, 8, dtype=torch.bool, device=DEVICE))
    assert torch.equal(acc, before)


def test_fp64_accumulator():
    x = torch.randn(37, 24, dtype=torch.float64, device=DEVICE)
    acc = torch.zeros(24, 24, dtype=torch.float64, device=DEVICE)
    kk.second_moment_update(acc, x)
    assert_close(acc, x.T @ x)


def test_streaming_equals_one_shot():
    chunks = [torch.randn(n, 36, device=DEVICE) for n in (5, 17, 1, 40)]
    acc = torch.zeros(36, 36, device=DEVICE)
    for chunk in chunks:
        kk.second_moment_update(acc, chunk)
    full = torch.cat(chunks).double()
    assert_close(acc.double(), full.T @ full, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,d", [(8192, 4096), (12608, 768)])
def test_gpu_large(dtype, n, d):
    x = torch.randn(n, d, device="cuda").to(dtype)
    mask = torch.rand(n, device="cuda") > 0.1
    acc = torch.zeros(d, d, device="cuda")
    kk.second_moment_update(acc, x, mask)
    rows = x.float() * mask[:, None]
    torch_fp32 = rows.T @ rows  # what the torch backend computes
    exact = rows.double().T @ rows.double()
    assert_within_torch_error(acc, torch_fp32, exact, torch.float32)
    assert torch.equal(acc, acc.T)
