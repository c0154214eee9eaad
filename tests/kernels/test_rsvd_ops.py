"""The ``torch.ops.keeplora`` building blocks of the randomized SVD (C++ extension), the CUDA kernels' CPU twins,
the GPU path (marked ``gpu``) and the compile-only CI check of every ``csrc/**/*.cu`` for sm_90.

Tests skip on whether an op is *registered* for a device, never on guesses about hardware.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import keeplora_kernels as kk
from keeplora_kernels import _dispatch, _extension
from keeplora_kernels.rsvd import cholesky_qr, gaussian_sketch, rsvd_torch, shifted_cholesky
from support.tolerances import assert_close

ROOT = Path(__file__).resolve().parents[2]


def _needs(op, device="cpu"):
    return pytest.mark.skipif(
        op not in _dispatch.extension_ops(device), reason=f"keeplora::{op} is not registered for {device}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Pure-PyTorch twins (always run).


def test_gaussian_sketch_statistics_and_prefix_property():
    omega = gaussian_sketch(123, 4001, 9)
    assert omega.shape == (4001, 9) and omega.dtype == torch.float32
    assert abs(omega.mean().item()) < 0.03 and abs(omega.std().item() - 1) < 0.03
    # column j depends only on (seed, rows, j): a wider sketch extends a narrower one
    assert torch.equal(gaussian_sketch(123, 4001, 13)[:, :9], omega)
    assert not torch.equal(gaussian_sketch(124, 4001, 9), omega)


@pytest.mark.parametrize("cond", [1e2, 1e6])
def test_cholesky_qr_on_ill_conditioned_blocks(cond):
    """Shifted CholeskyQR2 in float64 orthonormalises float32 data up to cond ~ 1/eps32 (plain CholeskyQR fails)."""
    m, l = 500, 24
    u = torch.linalg.qr(torch.randn(m, l, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(l, l, dtype=torch.float64)).Q
    y = ((u * torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), l, dtype=torch.float64)) @ v.T).float()
    q, r, info = cholesky_qr(y.unsqueeze(0))
    assert info.item() == 0
    assert (q[0].T @ q[0] - torch.eye(l, dtype=torch.float64)).abs().max() < 1e-12
    assert (q[0] @ r[0] - y.double()).abs().max() < 1e-12 * y.abs().max()
    assert torch.equal(r[0], r[0].triu())


def test_cholesky_qr_flags_an_exactly_rank_deficient_block():
    y = torch.randn(1, 50, 6, dtype=torch.float64)
    y[0, :, 3] = 0.0  # an exactly zero column stays zero (no arbitrary direction) and is flagged
    q, r, info = cholesky_qr(y, 2, 2)
    assert info.item() == 2 and torch.isfinite(q).all()
    assert q[0, :, 3].abs().max() == 0
    assert (q @ r - y).abs().max() < 1e-12


@pytest.mark.parametrize("impl", ["torch", "extension"])
def test_rsvd_repairs_flagged_blocks_on_the_host(impl):
    """On CPU a flagged block is redone by Householder QR, so U stays orthonormal even for an exactly rank-1 A."""
    if impl == "extension" and "rsvd" not in _dispatch.extension_ops("cpu"):
        pytest.skip("extension not built")
    a = torch.zeros(1, 40, 30, dtype=torch.float64)
    a[0, 0, :] = torch.randn(30, dtype=torch.float64)  # e_1·vᵀ: the sketch is exactly rank 1
    if impl == "torch":
        u, s, v, info = rsvd_torch(a, 3, oversample=3, power_iters=1, seed=0)
    else:
        u, s, v, info = torch.ops.keeplora.rsvd(a, 3, 3, 1, None, 0)
    assert int(info.item()) & 2
    assert_close(u[0].T @ u[0], torch.eye(3, dtype=torch.float64), torch.float64)
    assert_close(s[0], torch.tensor([torch.linalg.vector_norm(a).item(), 0.0, 0.0], dtype=torch.float64), torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Extension ops on CPU.


def test_extension_reports_its_ops():
    ops = _extension.registered_ops()
    if not ops:
        pytest.skip(f"extension not loaded: {_extension.status()}")
    assert {"rsvd", "gaussian_sketch", "jacobi_svd", "cholesky_qr", "shifted_cholesky", "split_operand"} <= set(ops)
    assert {"gram_of_sum", "split_product"} <= set(ops)
    # every op has a CPU kernel but the cuSOLVER launcher (CPU runs LAPACK or the Jacobi twin for that step)
    assert _extension.registered_ops("cpu") == ops - {"gesvdj_batched"}
    assert "gesvdj_batched" in _extension.library().registered_ops()
    if not _extension.library().built_with_cuda():
        assert _extension.registered_ops("cuda") == frozenset()
    assert _extension.registered_ops("mps") == frozenset()


@_needs("gaussian_sketch")
@pytest.mark.parametrize("seed,rows,cols", [(0, 1, 1), (5, 777, 13), (-3, 64, 7), (2**40 + 7, 33, 5)])
def test_extension_sketch_equals_pytorch_twin(seed, rows, cols):
    omega = torch.ops.keeplora.gaussian_sketch(torch.empty(0), seed, rows, cols)
    assert torch.equal(omega, gaussian_sketch(seed, rows, cols))
    omega64 = torch.ops.keeplora.gaussian_sketch(torch.empty(0, dtype=torch.float64), seed, rows, cols)
    assert omega64.dtype == torch.float64 and torch.equal(omega64, omega.double())


@_needs("jacobi_svd")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("l", [1, 2, 7, 24, 33])
def test_jacobi_svd_cpu_twin(dtype, l):
    a = torch.randn(5, l, l, dtype=torch.float64)
    a[1] = a[1] * torch.logspace(0, -8, l, dtype=torch.float64)  # graded columns: small σ to relative accuracy
    if l > 2:
        a[2, :, -1] = 0  # an exactly singular matrix
    u, s, v = torch.ops.keeplora.jacobi_svd(a.to(dtype))
    assert u.dtype == s.dtype == v.dtype == dtype
    exact = torch.linalg.svdvals(a)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (s.double() - exact).abs().max() <= tol * exact.max()
    assert torch.all(s[:, :-1] >= s[:, 1:])
    rebuilt = (u.double() * s.double().unsqueeze(-2)) @ v.double().mT
    assert (rebuilt - a).abs().max() <= tol * a.abs().max() * l
    eye = torch.eye(l, dtype=torch.float64)
    assert (v.double().mT @ v.double() - eye).abs().max() <= tol * l
    nonzero = s.double() > tol * exact.max() * l
    for i in range(5):
        k = int(nonzero[i].sum())
        ui = u[i, :, :k].double()
        assert (ui.T @ ui - eye[:k, :k]).abs().max() <= tol * l * 10
    if dtype == torch.float64:  # one-sided Jacobi: relative accuracy of the small singular values
        assert ((s[1] - exact[1]).abs() / exact[1]).max() < 1e-8


def _grams(batch, l, seed=0):
    """Gram matrices QᵀQ of random (3l × l) blocks with graded column scales: SPD, condition ~1e8."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, 3 * l, l, dtype=torch.float64, generator=gen)
    y = y * torch.logspace(0, -4, l, dtype=torch.float64)
    return y.mT @ y


@_needs("shifted_cholesky")
@pytest.mark.parametrize("l", [1, 2, 7, 33, 64])
@pytest.mark.parametrize("factor", [1e-10, 2.0**-53])
def test_shifted_cholesky_cpu_twin_equals_library_path(l, factor):
    g = _grams(4, l)
    info = torch.zeros(4, dtype=torch.int32)
    r, r_inv = torch.ops.keeplora.shifted_cholesky(g, factor, True, info)
    info_ref = torch.zeros(4, dtype=torch.int32)
    r_ref, r_inv_ref = shifted_cholesky(g, factor, True, info_ref)
    assert torch.equal(info, info_ref) and not info.any()
    assert torch.equal(r, r.triu()) and torch.equal(r_inv, r_inv.triu())
    assert_close(r, r_ref, torch.float64)
    eye = torch.eye(l, dtype=torch.float64).expand(4, l, l)
    assert (r @ r_inv - eye).abs().max() < 1e-9  # cond(R) <= ~1e4 here
    shift = factor * g.diagonal(0, -2, -1).sum(-1) + 1e-290
    rebuilt = r.mT @ r - shift.view(4, 1, 1) * eye
    assert ((rebuilt - g).abs().amax((-2, -1)) <= 1e-14 * l * g.abs().amax((-2, -1))).all()


@_needs("shifted_cholesky")
@pytest.mark.parametrize("twin", ["extension", "torch"])
def test_shifted_cholesky_flags_failure_and_rank_loss_in_place(twin):
    call = torch.ops.keeplora.shifted_cholesky if twin == "extension" else shifted_cholesky
    g = _grams(4, 6)
    g[1, 2, 2] = float("nan")  # a factorisation that cannot succeed
    g[2, 4, :] = 0.0  # an exactly zero column of Q: its column of Q·R⁻¹ stays zero
    g[2, :, 4] = 0.0
    info = torch.tensor([0, 0, 0, 4], dtype=torch.int32)  # bits already set are kept
    r, r_inv = call(g, 2.0**-53, True, info)
    assert info.tolist() == [0, 1, 2, 4]
    eye = torch.eye(6, dtype=torch.float64)
    assert torch.equal(r[1], eye) and torch.equal(r_inv[1], eye)  # the failed pass leaves Q unchanged
    info_no_check = torch.zeros(4, dtype=torch.int32)
    call(g, 2.0**-53, False, info_no_check)
    assert info_no_check.tolist() == [0, 1, 0, 0]


@_needs("shifted_cholesky")
def test_shifted_cholesky_validates_inputs():
    with pytest.raises(RuntimeError, match="info"):
        torch.ops.keeplora.shifted_cholesky(_grams(2, 3), 1e-10, True, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.keeplora.shifted_cholesky(_grams(2, 3).half(), 1e-10, True, torch.zeros(2, dtype=torch.int32))


@_needs("rsvd")
def test_rsvd_beyond_the_one_block_cholesky_takes_the_library_path():
    """Sketch width l > 256 (the kernel's limit): the same pass through cholesky_ex and a triangular solve."""
    a = torch.randn(1, 300, 260, dtype=torch.float64)
    u, s, v, info = torch.ops.keeplora.rsvd(a, 260, 0, 0, None, 0)  # l = min(m, n): exact path, orth(A)
    assert not info.any()
    assert_close(s[0], torch.linalg.svdvals(a[0]), torch.float64)
    assert_close(u[0].T @ u[0], torch.eye(260, dtype=torch.float64), torch.float64)


@_needs("rsvd")
def test_a_power_iteration_costs_two_gemms_and_two_shifted_passes():
    """Launch overhead per power iteration, counted on the CPU path (keeplora_bench.micro.harness.library_calls): per
    product, a cast and a GEMM (2); per intermediate basis (one shifted CholeskyQR pass), a cast, the Gram GEMM,
    one shifted_cholesky call and the Q·R⁻¹ GEMM (4), plus the CPU-only Householder-repair check (3). With
    CholeskyQR2 for every basis it was 2 · (7 + 3) per iteration; the library-call version of a pass was 12 calls."""
    from keeplora_bench.micro.harness import library_calls

    a = torch.randn(3, 96, 80)
    calls = [library_calls(lambda q=q: torch.ops.keeplora.rsvd(a, 8, 8, q, None, 0))["calls"] for q in (1, 2)]
    assert calls[1] - calls[0] <= 2 * 2 + 2 * (4 + 3)


@_needs("split_operand")
@pytest.mark.parametrize("dtype,scale", [(torch.bfloat16, 256.0), (torch.float16, 2048.0)])
@pytest.mark.parametrize("source", [torch.float32, torch.float64])
def test_split_operand_keeps_sixteen_bits(dtype, scale, source):
    x = torch.randn(2, 37, 5, dtype=source)
    parts = torch.ops.keeplora.split_operand(x, dtype, scale)
    assert parts.shape == (2, 37, 10) and parts.dtype == dtype
    hi, lo = parts[..., :5].float(), parts[..., 5:].float()
    assert torch.equal(hi, x.float().to(dtype).float())
    rebuilt = hi + lo / scale
    eps = torch.finfo(dtype).eps
    assert ((rebuilt - x.float()).abs() <= eps * eps * x.float().abs()).all()
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        torch.ops.keeplora.split_operand(x, torch.float32, scale)


def _split_gemm_output(batch, rows, w, parts, seed=0):
    """What a float32-output GEMM on a split operand returns: [hi | lo] blocks (parts 2) or one block."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, rows, parts * w, generator=g)


@_needs("gram_of_sum")
@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("rows,w", [(1, 1), (37, 5), (300, 32), (70, 64)])
def test_split_basis_ops_are_the_library_path_formulas(parts, rows, w):
    """gram_of_sum and split_product give what the library path's intermediate CholeskyQR pass gives: the Gram of
    y's combined columns in float64, and split_operand of (those columns) · R^-1."""
    y = _split_gemm_output(3, rows, w, parts, seed=rows + w)
    lo_scale = 1.0 / 256.0
    v = y if parts == 1 else y[..., :w].add(y[..., w:], alpha=lo_scale)
    g = torch.ops.keeplora.gram_of_sum(y, parts, lo_scale)
    assert g.dtype == torch.float64 and g.shape == (3, w, w)
    assert torch.equal(g, v.double().mT @ v.double())
    r_inv = torch.linalg.inv(torch.linalg.cholesky(g + 1e-3 * torch.eye(w, dtype=torch.float64), upper=True))
    out = torch.ops.keeplora.split_product(y, parts, lo_scale, r_inv, torch.bfloat16, 256.0)
    assert torch.equal(out, torch.ops.keeplora.split_operand(v.double() @ r_inv, torch.bfloat16, 256.0))


@_needs("gram_of_sum")
def test_split_basis_ops_validate_inputs_and_have_meta_shapes():
    y = torch.randn(2, 10, 8)
    r_inv = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    with pytest.raises(RuntimeError, match="parts must be 1 or 2"):
        torch.ops.keeplora.gram_of_sum(y, 3, 1.0)
    with pytest.raises(RuntimeError, match="w must be in"):
        torch.ops.keeplora.gram_of_sum(torch.randn(2, 10, 130), 2, 1.0)
    with pytest.raises(RuntimeError, match="float32 y"):
        torch.ops.keeplora.gram_of_sum(y.double(), 2, 1.0)
    with pytest.raises(RuntimeError, match="r_inv"):
        torch.ops.keeplora.split_product(y, 2, 1.0, r_inv.float(), torch.bfloat16, 256.0)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        torch.ops.keeplora.split_product(y, 2, 1.0, r_inv, torch.float32, 256.0)
    meta = y.to("meta")
    assert torch.ops.keeplora.gram_of_sum(meta, 2, 1.0).shape == (2, 4, 4)
    out = torch.ops.keeplora.split_product(meta, 2, 1.0, r_inv.to("meta"), torch.float16, 2048.0)
    assert out.shape == (2, 10, 8) and out.dtype == torch.float16


@_needs("split_product")
def test_fused_range_finder_formulas_give_the_library_path_basis():
    """The fused range finder (csrc/rsvd.cpp, KEEPLORA_RSVD_FUSED_BASIS=1, CUDA only) written with the CPU ops, the
    bf16 GEMMs emulated (bf16 values multiplied in float32): it computes what the library path computes
    (orthonormalize's intermediate passes, then split_operand of Q), without ever forming Q."""
    torch.manual_seed(0)
    b, m, n, l, q, scale = 2, 300, 200, 12, 2, 256.0
    spectrum = torch.tensor([0.85**i for i in range(n)])
    a = (torch.linalg.qr(torch.randn(b, m, n)).Q * spectrum) @ torch.linalg.qr(torch.randn(b, n, n)).Q.mT
    a = a.to(torch.bfloat16)

    def gemm(mat, xs):  # a bf16 GEMM with float32 output on [hi | lo]
        return mat.float() @ xs.float()

    def shift(rows, w):
        return 11.0 * (rows * w + w * (w + 1)) * 2.0**-53

    def fused_next(y, parts):
        w = y.shape[-1] // parts
        info = torch.zeros(b, dtype=torch.int32)
        _, r_inv = torch.ops.keeplora.shifted_cholesky(
            torch.ops.keeplora.gram_of_sum(y, parts, 1 / scale), shift(y.shape[1], w), False, info
        )
        return torch.ops.keeplora.split_product(y, parts, 1 / scale, r_inv, torch.bfloat16, scale)

    def library_next(y):  # orthonormalize's intermediate pass, then split_operand of Q
        q64, _, _ = torch.ops.keeplora.cholesky_qr(y, 1, 0)
        return torch.ops.keeplora.split_operand(q64, torch.bfloat16, scale)

    def combined(y2):
        w = y2.shape[-1] // 2
        return y2[..., :w].add(y2[..., w:], alpha=1 / scale)

    omega = torch.ops.keeplora.gaussian_sketch(a, 0, n, l).to(torch.bfloat16)
    ends = []
    for step in (
        lambda y, parts: fused_next(y, parts),
        lambda y, parts: library_next(y if parts == 1 else combined(y)),
    ):
        xs = step(a.float() @ omega.float(), 1)
        for it in range(q):
            y2 = gemm(a, step(gemm(a.mT, xs), 2))
            if it + 1 < q:
                xs = step(y2, 2)
        ends.append(combined(y2))
    fused, library = ends
    # on the CPU both compute the same float64 products in the same order: the last A·z agrees to the bit
    assert torch.equal(fused, library) and fused.abs().max() > 0


@_needs("rsvd")
def test_rsvd_meta_shapes():
    a = torch.empty(4, 70, 50, device="meta", dtype=torch.bfloat16)
    p = torch.empty(4, 70, 6, device="meta")
    u, s, v, info = torch.ops.keeplora.rsvd(a, 5, 8, 2, p, 0)
    assert (u.shape, s.shape, v.shape, info.shape) == ((4, 70, 5), (4, 5), (4, 50, 5), (4,))
    assert u.dtype == torch.float32 and info.dtype == torch.int32
    with pytest.raises(RuntimeError, match="rank"):
        torch.ops.keeplora.rsvd(a, 51, 8, 2, None, 0)


@_needs("rsvd")
def test_rsvd_op_validates_inputs():
    with pytest.raises(RuntimeError, match="project_out"):
        torch.ops.keeplora.rsvd(torch.randn(2, 10, 8), 2, 2, 1, torch.randn(2, 9, 3), 0)
    with pytest.raises(RuntimeError, match="orthonormalize"):
        torch.ops.keeplora.rsvd(torch.randn(2, 10, 8), 2, 2, 1, None, 0, "gram-schmidt")


# ---------------------------------------------------------------------------------------------------------------
# CUDA (a device and a CUDA build of the extension are needed; marked gpu).


def _decaying_batch(dtype: torch.dtype) -> torch.Tensor:
    """Six 256×192 matrices with singular values 0.8^i (seeded), in ``dtype`` on the CPU."""
    torch.manual_seed(0)
    spectrum = torch.tensor([0.8**i for i in range(96)], dtype=torch.float64)
    u0 = torch.linalg.qr(torch.randn(6, 256, 96, dtype=torch.float64)).Q
    v0 = torch.linalg.qr(torch.randn(6, 192, 96, dtype=torch.float64)).Q
    return ((u0 * spectrum) @ v0.mT).to(dtype)


def _rsvd_without_host_sync(*args):
    """``keeplora::rsvd(*args)`` on CUDA after one warm-up call (library handles, allocator), failing if it
    synchronises with the host."""
    torch.ops.keeplora.rsvd(*args)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return torch.ops.keeplora.rsvd(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@_needs("rsvd", "cuda")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rsvd_cuda_matches_cpu_without_host_sync(dtype):
    a = _decaying_batch(dtype)
    p = torch.zeros(6, 256, 10)
    p[:, :, :7] = torch.linalg.qr(torch.randn(6, 256, 7)).Q
    u, s, v, info = _rsvd_without_host_sync(a.cuda(), 8, 8, 2, p.cuda(), 3)
    u_c, s_c, v_c, _ = torch.ops.keeplora.rsvd(a, 8, 8, 2, p, 3)
    assert (info.cpu() & 1).sum() == 0
    tol = 1e-5 if dtype == torch.float32 else 1e-3  # bf16: CPU converts to fp32, CUDA uses the split bf16 GEMM
    assert (s.cpu() - s_c).abs().max() <= tol * s_c.max()
    assert (
        (u.cpu() * s.cpu().unsqueeze(-2)) @ v.cpu().mT - (u_c * s_c.unsqueeze(-2)) @ v_c.mT
    ).abs().max() <= tol * s_c.max() * 10


@pytest.mark.gpu
@_needs("gaussian_sketch", "cuda")
def test_sketch_cuda_equals_cpu():
    cpu = torch.ops.keeplora.gaussian_sketch(torch.empty(0), 9, 4099, 40)
    gpu = torch.ops.keeplora.gaussian_sketch(torch.empty(0, device="cuda"), 9, 4099, 40).cpu()
    assert (gpu - cpu).abs().max() <= 1e-6 * cpu.abs().max()  # libm last-bit differences only


@pytest.mark.gpu
@_needs("shifted_cholesky", "cuda")
@pytest.mark.parametrize("l", [1, 5, 32, 64, 200])
def test_shifted_cholesky_cuda_matches_cpu_twin(l):
    g = _grams(37, l, seed=l)
    g[3, l - 1, l - 1] = float("nan")  # a failed factorisation in the batch (the last diagonal entry: l may be 1)
    info, info_c = torch.zeros(37, dtype=torch.int32, device="cuda"), torch.zeros(37, dtype=torch.int32)
    r, r_inv = torch.ops.keeplora.shifted_cholesky(g.cuda(), 2.0**-53, True, info)
    r_c, r_inv_c = torch.ops.keeplora.shifted_cholesky(g, 2.0**-53, True, info_c)
    assert torch.equal(info.cpu(), info_c) and info_c[3] == 1
    assert ((r.cpu() - r_c).abs().amax((-2, -1)) <= 1e-13 * l * r_c.abs().amax((-2, -1))).all()
    assert ((r_inv.cpu() - r_inv_c).abs().amax((-2, -1)) <= 1e-9 * l * r_inv_c.abs().amax((-2, -1))).all()


@pytest.mark.gpu
@_needs("split_operand", "cuda")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("source", [torch.float32, torch.float64])
def test_split_operand_cuda_equals_cpu(dtype, source):
    x = torch.randn(3, 129, 40, dtype=source)
    scale = 256.0 if dtype == torch.bfloat16 else 2048.0
    assert torch.equal(
        torch.ops.keeplora.split_operand(x.cuda(), dtype, scale).cpu(),
        torch.ops.keeplora.split_operand(x, dtype, scale),
    )


@pytest.mark.gpu
@_needs("split_product", "cuda")
@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("batch,rows,w", [(1, 1, 1), (3, 4099, 32), (2, 1000, 17), (33, 513, 64)])
def test_split_basis_ops_cuda_match_cpu(parts, batch, rows, w):
    y = _split_gemm_output(batch, rows, w, parts, seed=rows)
    g_c = torch.ops.keeplora.gram_of_sum(y, parts, 1 / 256)
    g = torch.ops.keeplora.gram_of_sum(y.cuda(), parts, 1 / 256).cpu()
    assert ((g - g_c).abs() <= 1e-12 * rows * g_c.abs().amax((-2, -1), keepdim=True)).all()
    r_inv = torch.linalg.inv(torch.linalg.cholesky(g_c + 1e-3 * torch.eye(w, dtype=torch.float64), upper=True))
    for dtype, scale in ((torch.bfloat16, 256.0), (torch.float16, 2048.0)):
        out = torch.ops.keeplora.split_product(y.cuda(), parts, 1 / 256, r_inv.cuda(), dtype, scale).cpu()
        ref = torch.ops.keeplora.split_product(y, parts, 1 / 256, r_inv, dtype, scale)
        value, value_ref = (t[..., :w].double() + t[..., w:].double() / scale for t in (out, ref))
        # another summation order of q = v R^-1 may round q's float32 value to its neighbour: 16 bits agree
        assert ((value - value_ref).abs() <= 2.0**-15 * value_ref.abs().amax(-1, keepdim=True)).all()


@pytest.mark.gpu
@_needs("rsvd", "cuda")
def test_rsvd_with_the_fused_basis_matches_the_library_path_on_cuda(monkeypatch):
    a = _decaying_batch(torch.bfloat16).cuda()
    monkeypatch.delenv("KEEPLORA_RSVD_FUSED_BASIS", raising=False)
    u0, s0, v0, _ = torch.ops.keeplora.rsvd(a, 8, 8, 2, None, 3)
    monkeypatch.setenv("KEEPLORA_RSVD_FUSED_BASIS", "1")
    u, s, v, info = _rsvd_without_host_sync(a, 8, 8, 2, None, 3)
    assert (info.cpu() & 1).sum() == 0
    assert (s - s0).abs().max() <= 1e-3 * s0.max()
    assert ((u * s.unsqueeze(-2)) @ v.mT - (u0 * s0.unsqueeze(-2)) @ v0.mT).abs().max() <= 1e-2 * s0.max()


@pytest.mark.gpu
@_needs("jacobi_svd", "cuda")
@pytest.mark.parametrize("l", [3, 24, 64, 130])  # 130 (fp64) does not fit shared memory: global workspace path
def test_jacobi_svd_cuda_matches_cpu_twin(l):
    a = torch.randn(37, l, l, dtype=torch.float64)
    u, s, v = torch.ops.keeplora.jacobi_svd(a.cuda())
    u_c, s_c, v_c = torch.ops.keeplora.jacobi_svd(a)
    assert (s.cpu() - s_c).abs().max() <= 1e-12 * s_c.max()
    assert ((u.cpu() * s.cpu().unsqueeze(-2)) @ v.cpu().mT - a).abs().max() <= 1e-11 * a.abs().max() * l


@pytest.mark.gpu
@_needs("rsvd", "cuda")
def test_principal_subspace_cuda_matches_cpu():
    w = [torch.randn(192, 128) * torch.logspace(0, -3, 128), torch.randn(128, 192)]
    cpu = kk.principal_subspace(w, 0.9)
    gpu = kk.principal_subspace([x.cuda() for x in w], 0.9)
    for c, g in zip(cpu, gpu):
        assert c.shape == g.shape
        diff = c.double() @ c.double().T - g.cpu().double() @ g.cpu().double().T
        assert torch.linalg.matrix_norm(diff, ord=2) < 1e-3


# ---------------------------------------------------------------------------------------------------------------
# CI compile check of the CUDA sources (the CUDA path cannot rot on CPU-only machines).


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_every_cuda_source_compiles_for_sm90(tmp_path):
    sources = sorted((ROOT / "csrc").rglob("*.cu"))
    assert sources, "no .cu sources under csrc/"
    for src in sources:
        obj = tmp_path / (src.stem + ".o")
        cmd = [
            "nvcc",
            "-gencode=arch=compute_90,code=sm_90",
            "-std=c++17",
            "-O3",
            "-Xcompiler",
            "-Wall",
            "-c",
            str(src),
            "-o",
            str(obj),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{src.relative_to(ROOT)} failed to compile:\n{done.stderr}"
        assert obj.stat().st_size > 0


def _nvcc_include_dir():
    probe = subprocess.run(["nvcc", "--dryrun", "-c", "probe.cu"], capture_output=True, text=True, timeout=60)
    for line in (probe.stdout + probe.stderr).splitlines():
        if "INCLUDES=" in line and "SYSTEM" not in line:
            return line.split('"')[1].removeprefix("-I")
    return None


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("c++") is None, reason="nvcc or c++ missing")
def test_cuda_glue_compiles_against_installed_torch_headers():
    """csrc/cuda_glue.cpp (the ATen side of the CUDA kernels) is only compiled by CUDA builds; check its syntax
    here against the installed torch headers. It uses c10/cuda only (no cuBLAS headers); a CPU wheel lacks the
    generated cuda_cmake_macros.h, which C10_USING_CUSTOM_GENERATED_MACROS skips."""
    from torch.utils.cpp_extension import include_paths

    cuda_include = _nvcc_include_dir()
    if cuda_include is None or not (Path(cuda_include) / "cuda_runtime.h").exists():
        pytest.skip("CUDA runtime headers not found next to nvcc")
    cmd = [
        "c++",
        "-std=c++17",
        "-fsyntax-only",
        "-DKEEPLORA_WITH_CUDA",
        "-DC10_USING_CUSTOM_GENERATED_MACROS",
        *(f"-I{p}" for p in include_paths()),
        f"-I{cuda_include}",
        f"-I{ROOT / 'csrc'}",
        str(ROOT / "csrc" / "cuda_glue.cpp"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


# ---------------------------------------------------------------------------------------------------------------
# The alternative small-SVD launcher (cuSOLVER gesvdjBatched, l <= 32).


@_needs("rsvd")
def test_small_svd_method_is_validated_and_settable():
    from keeplora_kernels.rsvd import small_svd_method

    before = small_svd_method()
    assert before in ("jacobi", "cusolver")
    with pytest.raises(ValueError, match="must be one of"):
        small_svd_method("gesvd")
    try:
        assert small_svd_method("cusolver") == "cusolver"
        a = torch.randn(2, 64, 48)  # CPU: the setting does not apply (LAPACK), the result is unchanged
        for got, want in zip(
            torch.ops.keeplora.rsvd(a, 4, 4, 1, None, 0), rsvd_torch(a, 4, oversample=4, power_iters=1)
        ):
            assert got.shape == want.shape
        assert small_svd_method("jacobi") == "jacobi"
    finally:
        small_svd_method(before)


def test_small_svd_environment_variable_is_validated(tmp_path):
    """KEEPLORA_SMALL_SVD is read once by the library; a bad value names the accepted ones."""
    if "rsvd" not in _dispatch.extension_ops("cpu"):
        pytest.skip("extension not built")
    import os
    import sys

    code = "from keeplora_kernels.rsvd import small_svd_method; print(small_svd_method())"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'python'}"}
    good = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "KEEPLORA_SMALL_SVD": "cusolver"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert good.returncode == 0 and good.stdout.strip() == "cusolver", good.stderr[-2000:]
    bad = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "KEEPLORA_SMALL_SVD": "qr"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "must be 'jacobi' or 'cusolver'" in bad.stderr


@pytest.mark.gpu
@_needs("gesvdj_batched", "cuda")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("l", [1, 7, 24, 32])
def test_gesvdj_batched_matches_the_jacobi_kernel(dtype, l):
    a = torch.randn(37, l, l, dtype=torch.float64)
    a[5] *= torch.logspace(0, -6, l, dtype=torch.float64)  # graded columns: small singular values
    a = a.to(dtype).cuda()
    u, s, v = torch.ops.keeplora.gesvdj_batched(a)
    u_j, s_j, v_j = torch.ops.keeplora.jacobi_svd(a)
    eps = torch.finfo(dtype).eps
    assert (s[:, :-1] >= s[:, 1:]).all()  # descending, like the Jacobi kernel
    assert ((s - s_j).abs() <= 50 * l * eps * s_j[:, :1]).all()
    recon = (u * s.unsqueeze(-2)) @ v.mT
    assert ((recon - a).abs().amax((-2, -1)) <= 50 * l * eps * s_j[:, 0]).all()
    # singular vectors are determined to about eps·κ (κ = s_max/s_min of each matrix): orthonormal to that level
    eye = torch.eye(l, dtype=dtype, device="cuda")
    kappa = (s_j[:, 0] / s_j[:, -1].clamp_min(torch.finfo(dtype).tiny)).clamp_max(1 / eps)
    for w in (u, v):
        assert ((w.mT @ w - eye).abs().amax((-2, -1)) <= 50 * l * eps * kappa).all()


@pytest.mark.gpu
@_needs("gesvdj_batched", "cuda")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rsvd_with_the_cusolver_small_svd_matches_jacobi_without_host_sync(dtype):
    from keeplora_kernels.rsvd import small_svd_method

    a = _decaying_batch(dtype).cuda()
    before = small_svd_method()
    try:
        small_svd_method("jacobi")
        u_j, s_j, v_j, _ = torch.ops.keeplora.rsvd(a, 8, 8, 2, None, 3)
        small_svd_method("cusolver")
        torch.ops.keeplora.rsvd(a, 8, 8, 2, None, 3)  # warm-up: cuSOLVER handle, workspace
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            u, s, v, info = torch.ops.keeplora.rsvd(a, 8, 8, 2, None, 3)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        small_svd_method(before)
    assert (info.cpu() & 1).sum() == 0
    assert (s - s_j).abs().max() <= 1e-5 * s_j.max()
    assert ((u * s.unsqueeze(-2)) @ v.mT - (u_j * s_j.unsqueeze(-2)) @ v_j.mT).abs().max() <= 1e-4 * s_j.max()
