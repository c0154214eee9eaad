"""Triton residual projection ``g − P·(Pᵀ·g)`` against the dense fp64 projector (the oracle)."""

import pytest
import torch

import keeplora_kernels as kk
from keeplora_kernels import _dispatch
from support.ref_ops import residual_project_ref
from support.tolerances import assert_close, assert_within_torch_error
from support.triton_env import DEVICE, force_triton  # noqa: F401  (skips without triton; the fixture is used below)

pytestmark = pytest.mark.usefixtures("force_triton")


def _basis(*lead, d, k, dtype=torch.float32):
    return torch.linalg.qr(torch.randn(*lead, d, k, dtype=torch.float64)).Q.to(dtype).to(DEVICE)


def test_dispatch_picks_triton():
    assert _dispatch.select("residual_project", DEVICE) == "triton"


@pytest.mark.parametrize("d,n", [(37, 45), (70, 33)])
@pytest.mark.parametrize("k", [1, 5, 64])
@pytest.mark.parametrize("batch", [None, "shared_basis", "batched_basis"])
def test_matches_dense_projector_fp32(d, n, k, batch):
    k = min(k, d)
    lead = () if batch is None else (3,)
    basis = _basis(*((3,) if batch == "batched_basis" else ()), d=d, k=k)
    g = torch.randn(*lead, d, n, device=DEVICE)
    p64 = basis.double()
    dense = (torch.eye(d, dtype=torch.float64, device=DEVICE) - p64 @ p64.mT) @ g.double()
    out = kk.residual_project(g, basis)
    assert out.dtype == g.dtype and out.shape == g.shape
    assert_close(out, dense.float())


@pytest.mark.parametrize("batched", [False, True])
def test_inplace_writes_into_g(batched):
    lead = (2,) if batched else ()
    basis = _basis(d=40, k=6)
    g = torch.randn(*lead, 40, 50, device=DEVICE)
    expected = residual_project_ref(g.double(), basis.double())
    out = kk.residual_project(g, basis, inplace=True)
    assert out.data_ptr() == g.data_ptr()
    assert_close(g, expected.float())


def test_non_contiguous_g_in_and_out_of_place():
    basis = _basis(d=48, k=7)
    g = torch.randn(36, 48, device=DEVICE).T  # (48, 36), column-major
    expected = residual_project_ref(g.double(), basis.double()).float()
    assert_close(kk.residual_project(g, basis), expected)
    kk.residual_project(g, basis, inplace=True)
    assert_close(g, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_torch_error(dtype):
    d, n, k = 70, 45, 12
    basis = _basis(d=d, k=k)  # fp32 basis, as KeepLoRA keeps it
    g = torch.randn(d, n, device=DEVICE).to(dtype)
    out = kk.residual_project(g, basis)
    assert out.dtype == dtype
    p_low = basis.to(dtype)
    torch_low = g - p_low @ (p_low.T @ g)  # the projection in PyTorch ops at this dtype
    exact = residual_project_ref(g.double(), basis.double())
    assert_within_torch_error(out, torch_low, exact, dtype)


@pytest.mark.parametrize("inplace", [False, True])
def test_wide_basis_takes_the_gemm_path(inplace):
    from keeplora_kernels.triton_residual_project import FUSED_MAX_K

    d, n, k = 200, 17, FUSED_MAX_K + 6
    basis = _basis(d=d, k=k)
    g = torch.randn(d, n, device=DEVICE)
    expected = residual_project_ref(g.double(), basis.double()).float()
    out = kk.residual_project(g, basis, inplace=inplace)
    assert_close(out, expected)
    assert (out.data_ptr() == g.data_ptr()) == inplace


def test_empty_basis_returns_g():
    g = torch.randn(10, 4, device=DEVICE)
    basis = torch.empty(10, 0, device=DEVICE)
    assert torch.equal(kk.residual_project(g, basis), g)
    assert kk.residual_project(g, basis, inplace=True) is g


def test_projected_columns_are_orthogonal_to_the_basis():
    basis = _basis(d=64, k=20)
    out = kk.residual_project(torch.randn(64, 30, device=DEVICE), basis)
    assert (basis.T @ out).abs().max() < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [16, 184, 300])
def test_gpu_large(dtype, k):
    d, n = 4096, 4096
    basis = torch.linalg.qr(torch.randn(d, k, device="cuda")).Q
    g = torch.randn(d, n, device="cuda").to(dtype)
    out = kk.residual_project(g, basis)
    exact = residual_project_ref(g.double(), basis.double())
    if dtype == torch.float32:
        assert_close(out, exact.float())
    else:
        p_low = basis.to(dtype)
        assert_within_torch_error(out, g - p_low @ (p_low.T @ g), exact, dtype)
