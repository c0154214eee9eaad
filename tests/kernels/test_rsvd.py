"""Batched randomized SVD (``keeplora_kernels.rsvd``) and the energy-rule principal subspace, on both backends.

Every test runs twice: with the compiled extension (``KEEPLORA_BACKEND=extension``; skipped when it is not built)
and with the PyTorch implementation of the same algorithm (``KEEPLORA_BACKEND=torch``).
"""

import math

import pytest
import torch

import keeplora_kernels as kk
from keeplora_kernels import _dispatch
from keeplora_kernels.rsvd import rsvd_torch
from support.properties import energy_rank_loop
from support.ref_subspace import principal_subspace_ref, rsvd_ref
from support.tolerances import assert_close, assert_within_torch_error


@pytest.fixture(params=["extension", "torch"])
def backend(request, monkeypatch):
    if request.param == "extension" and "rsvd" not in _dispatch.extension_ops("cpu"):
        pytest.skip("the C++ extension is not built (KEEPLORA_BUILD_EXT=0 or no compiler)")
    monkeypatch.setenv("KEEPLORA_BACKEND", request.param)
    return request.param


def _orthonormal(*shape, dtype=torch.float64):
    return torch.linalg.qr(torch.randn(*shape, dtype=dtype)).Q


def _with_spectrum(m, n, spectrum, batch=None, dtype=torch.float64):
    k = len(spectrum)
    lead = () if batch is None else (batch,)
    u = _orthonormal(*lead, m, k)
    v = _orthonormal(*lead, n, k)
    s = torch.as_tensor(spectrum, dtype=torch.float64)
    return ((u * s) @ v.mT).to(dtype)


SPECTRA = {
    "fast_decay": [0.7**i for i in range(60)],
    "flat": [1.0] * 60,
    "rank_deficient": [5.0, 4.0, 3.0, 2.0, 1.0, 0.5],
    "ill_conditioned": list(torch.logspace(0, -10, 60, dtype=torch.float64).tolist()),
}


def _best_residual(a, k):
    s = torch.linalg.svdvals(a.double())
    return s[..., k:].square().sum(-1).sqrt()


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
def test_rsvd_against_full_svd_on_controlled_spectra(backend, spectrum):
    m, n, rank = 120, 90, 6
    a = _with_spectrum(m, n, SPECTRA[spectrum], batch=3)
    u, s, v = kk.rsvd(a, rank, oversample=10, power_iters=4, seed=1)
    exact = torch.linalg.svdvals(a)[:, :rank]
    eye = torch.eye(rank, dtype=torch.float64).expand(3, rank, rank)
    assert_close(u.mT @ u, eye, torch.float32)
    assert_close(v.mT @ v, eye, torch.float32)
    assert torch.all(s[:, :-1] >= s[:, 1:])  # descending
    residual = torch.linalg.matrix_norm(a - (u * s.unsqueeze(-2)) @ v.mT)
    best = _best_residual(a, rank)
    if spectrum == "flat":
        # any rank-6 subspace of a flat spectrum is nearly optimal in Frobenius norm; Ritz values never exceed σ
        assert torch.all(residual <= best * 1.02)
        assert torch.all(s <= exact + 1e-12)
    else:
        assert_close(s, exact, torch.float32)
        # rank-k residual relative to the optimal one (absolute floor for the rank-deficient case, where it is 0)
        assert torch.all(residual <= best * (1 + 1e-6) + 1e-9 * torch.linalg.matrix_norm(a))


def test_rsvd_matches_textbook_reference_at_equal_sketch(backend):
    a = _with_spectrum(80, 64, [0.8**i for i in range(64)], batch=2)
    u, s, v = kk.rsvd(a, 5, oversample=8, power_iters=3, seed=0)
    u_ref, s_ref, v_ref = rsvd_ref(a, 5, oversample=8, power_iters=3, seed=0)
    assert_close(s, s_ref, torch.float32)
    assert_close((u * s.unsqueeze(-2)) @ v.mT, (u_ref * s_ref.unsqueeze(-2)) @ v_ref.mT, torch.float32)


@pytest.mark.parametrize("shape", [(70, 50), (50, 70)])
def test_rsvd_batched_equals_per_matrix(backend, shape):
    a = _with_spectrum(*shape, [0.85**i for i in range(50)], batch=4, dtype=torch.float32)
    u, s, v = kk.rsvd(a, 7, oversample=6, power_iters=2, seed=11)
    for i in range(4):
        ui, si, vi = kk.rsvd(a[i], 7, oversample=6, power_iters=2, seed=11)
        assert_close(si, s[i])
        assert_close(ui * si @ vi.T, (u[i] * s[i]) @ v[i].T)


def test_rsvd_implicit_projection_equals_explicit(backend):
    a = _with_spectrum(60, 45, [0.7**i for i in range(45)], batch=3)
    basis = _orthonormal(3, 60, 9)
    explicit = a - basis @ (basis.mT @ a)
    u, s, v = kk.rsvd(a, 5, oversample=8, power_iters=3, project_out=basis, seed=2)
    u_e, s_e, v_e = kk.rsvd(explicit, 5, oversample=8, power_iters=3, seed=2)
    assert_close(s, s_e, torch.float64)
    assert_close((u * s.unsqueeze(-2)) @ v.mT, (u_e * s_e.unsqueeze(-2)) @ v_e.mT, torch.float64)
    assert (basis.mT @ u).abs().max() < 1e-12
    # and the factorisation is the SVD of the projected matrix
    assert_close(s, torch.linalg.svdvals(explicit)[:, :5], torch.float32)


def test_rsvd_zero_padded_projection_equals_unpadded(backend):
    """The engine pads the bases of one shape group with zero columns to a common k."""
    a = torch.randn(3, 64, 48)
    ks = [0, 5, 12]
    padded = torch.zeros(3, 64, max(ks))
    for i, k in enumerate(ks):
        padded[i, :, :k] = _orthonormal(64, k, dtype=torch.float32) if k else 0
    u, s, v = kk.rsvd(a, 6, oversample=8, power_iters=2, project_out=padded, seed=5)
    for i, k in enumerate(ks):
        basis = padded[i : i + 1, :, :k]
        ui, si, vi = kk.rsvd(a[i : i + 1], 6, oversample=8, power_iters=2, project_out=basis, seed=5)
        assert_close(si[0], s[i])
        assert_close((ui[0] * si[0]) @ vi[0].T, (u[i] * s[i]) @ v[i].T)


def test_rsvd_is_deterministic_per_seed(backend):
    a = torch.randn(2, 50, 40)
    first = kk.rsvd(a, 4, oversample=6, power_iters=1, seed=7)
    second = kk.rsvd(a, 4, oversample=6, power_iters=1, seed=7)
    other = kk.rsvd(a, 4, oversample=6, power_iters=1, seed=8)
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    assert not torch.equal(first[0], other[0])  # another sketch, other rounding (and signs)


def test_rsvd_backends_agree(monkeypatch):
    """The extension and the PyTorch fallback run the same algorithm on the same sketch."""
    if "rsvd" not in _dispatch.extension_ops("cpu"):
        pytest.skip("the C++ extension is not built (KEEPLORA_BUILD_EXT=0 or no compiler)")
    monkeypatch.setenv("KEEPLORA_BACKEND", "extension")  # compared with rsvd_torch (the torch backend)
    a = torch.randn(3, 70, 55)
    basis = _orthonormal(3, 70, 4, dtype=torch.float32)
    u, s, v = kk.rsvd(a, 6, oversample=6, power_iters=2, project_out=basis, seed=3)
    u_t, s_t, v_t, _ = rsvd_torch(a, 6, oversample=6, power_iters=2, project_out=basis, seed=3)
    assert_close(s, s_t)
    assert_close(u, u_t)
    assert_close(v, v_t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rsvd_low_precision_inputs(backend, dtype):
    a = _with_spectrum(96, 64, [0.75**i for i in range(64)], batch=2)
    u, s, v = kk.rsvd(a.to(dtype), 6, oversample=8, power_iters=3, seed=0)
    assert s.dtype == torch.float32 and u.dtype == torch.float32 and v.dtype == torch.float32
    exact = torch.linalg.svdvals(a)[:, :6]
    torch_low = torch.linalg.svdvals(a.to(dtype).float())[:, :6]  # PyTorch's own SVD of the rounded input
    assert_within_torch_error(s, torch_low, exact, dtype)
    assert_close(u.mT @ u, torch.eye(6).expand(2, 6, 6), torch.float32)


@pytest.mark.parametrize(
    "shape,rank,oversample", [((40, 30), 25, 10), ((30, 40), 30, 0), ((25, 60), 3, 30), ((64, 48), 1, 4)]
)
def test_rsvd_exact_path_and_edges(backend, shape, rank, oversample):
    """Sketch width capped at min(m, n) takes the exact path; rank may reach min(m, n)."""
    a = torch.randn(2, *shape, dtype=torch.float64)
    u, s, v = kk.rsvd(a, rank, oversample=oversample, power_iters=1, seed=0)
    assert u.shape == (2, shape[0], rank) and s.shape == (2, rank) and v.shape == (2, shape[1], rank)
    exact = torch.linalg.svdvals(a)[:, :rank]
    if min(rank + oversample, min(shape)) == min(shape):
        assert_close(s, exact, torch.float64)
        assert_close((u * s.unsqueeze(-2)) @ v.mT, _truncate(a, rank), torch.float64)
    else:
        # the sketched path: Ritz values never exceed σ, the factors are orthonormal and the rank-k residual is
        # close to the optimal one (a Gaussian matrix has a flat spectrum, so only loosely)
        assert torch.all(s <= exact + 1e-12)
        assert torch.all(s >= 0.5 * exact)
        eye = torch.eye(rank, dtype=torch.float64).expand(2, rank, rank)
        assert_close(u.mT @ u, eye, torch.float32)
        assert_close(v.mT @ v, eye, torch.float32)
        residual = torch.linalg.matrix_norm(a - (u * s.unsqueeze(-2)) @ v.mT)
        assert torch.all(residual <= 1.1 * _best_residual(a, rank))


def _truncate(a, k):
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return (u[..., :k] * s[..., None, :k]) @ vh[..., :k, :]


def test_rsvd_zero_matrix_and_full_projection(backend):
    """Nothing to factor: S = 0 and no NaN (directions are zero or orthonormal, never garbage)."""
    a = torch.zeros(2, 30, 20)
    u, s, v = kk.rsvd(a, 3, oversample=4, power_iters=1, seed=0)
    assert torch.all(s == 0) and torch.isfinite(u).all() and torch.isfinite(v).all()
    b = torch.randn(1, 30, 20)
    full = torch.eye(30).unsqueeze(0)
    _, s2, _ = kk.rsvd(b, 3, oversample=4, power_iters=1, project_out=full, seed=0)
    assert s2.abs().max() < 1e-5 * torch.linalg.matrix_norm(b).max()


def test_rsvd_householder_mode_agrees_with_cholqr():
    a = _with_spectrum(90, 70, SPECTRA["ill_conditioned"][:40], batch=2)
    u, s, v, info = rsvd_torch(a, 8, oversample=8, power_iters=2, seed=0)
    u_h, s_h, v_h, _ = rsvd_torch(a, 8, oversample=8, power_iters=2, seed=0, orthonormalize="householder")
    assert_close(s, s_h, torch.float32)
    assert_close((u * s.unsqueeze(-2)) @ v.mT, (u_h * s_h.unsqueeze(-2)) @ v_h.mT, torch.float32)
    if "rsvd" in _dispatch.extension_ops("cpu"):
        u_x, s_x, v_x, _ = torch.ops.keeplora.rsvd(a, 8, 8, 2, None, 0, "householder")
        assert_close(s_x, s_h, torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# principal_subspace


def _brute_force_rank(w, energy, strict=False):
    return energy_rank_loop(torch.linalg.svdvals(w.double()).square().tolist(), energy, strict=strict)


def _same_subspace(a, b, tol):
    assert a.shape == b.shape
    diff = a.double() @ a.double().T - b.double() @ b.double().T
    assert torch.linalg.matrix_norm(diff, ord=2) < tol


@pytest.mark.parametrize("energy", [0.0, 0.5, 0.9, 0.99, 0.999, 1.0])
def test_principal_subspace_energy_rank_equals_brute_force(backend, energy):
    # 0.9^i decay on 192 directions: p = 4, 11, 22, 33 and all; the sketch path, its growth and the exact path
    w = _with_spectrum(256, 192, [0.9**i for i in range(192)], dtype=torch.float32)
    basis = kk.principal_subspace(w, energy)
    p = _brute_force_rank(w, energy)
    assert basis.shape == (192, p) and basis.dtype == torch.float32
    if p:
        assert_close(basis.T @ basis, torch.eye(p), torch.float32)
        if p < 192:
            _same_subspace(basis, principal_subspace_ref(w, energy), 1e-4)


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("strict", [False, True])
def test_principal_subspace_side_and_strict(backend, side, strict):
    w = _with_spectrum(150, 110, [0.85**i for i in range(110)], dtype=torch.float32)  # (d_out, d_in)
    for energy in (0.3, 0.7):
        basis = kk.principal_subspace(w, energy, side=side, strict=strict)
        ref = principal_subspace_ref(w, energy, side=side, strict=strict)
        assert basis.shape == ref.shape == ((110 if side == "input" else 150), _brute_force_rank(w, energy, strict))
        if ref.shape[1]:
            _same_subspace(basis, ref, 1e-4)


def test_principal_subspace_list_of_shapes(backend):
    """A list with repeated and distinct shapes (grouped inside) equals the per-weight results, order kept."""
    spectrum = [0.8**i for i in range(60)]
    weights = [
        _with_spectrum(96, 64, spectrum, dtype=torch.float32),
        _with_spectrum(64, 96, spectrum, dtype=torch.float32),
        _with_spectrum(96, 64, spectrum, dtype=torch.float32),
        torch.zeros(96, 64),
        _with_spectrum(40, 100, spectrum[:40], dtype=torch.float32),
    ]
    bases = kk.principal_subspace(weights, 0.95)
    assert len(bases) == len(weights)
    for w, basis in zip(weights, bases):
        alone = kk.principal_subspace(w, 0.95)
        assert basis.shape == alone.shape == (w.shape[1], _brute_force_rank(w, 0.95))
        if basis.shape[1]:
            _same_subspace(basis, alone, 1e-5)
            _same_subspace(basis, principal_subspace_ref(w, 0.95), 1e-4)


def test_principal_subspace_captures_the_energy_on_a_flat_spectrum(backend):
    """Without a spectral gap p may differ from brute force by a direction, but the energy is always there."""
    w = torch.randn(200, 160) / math.sqrt(200)
    for energy in (0.05, 0.1):
        basis = kk.principal_subspace(w, energy)
        captured = (
            torch.linalg.matrix_norm(w.double() @ basis.double()).square()
            / torch.linalg.matrix_norm(w.double()).square()
        )
        assert captured >= energy - 1e-6
        assert abs(basis.shape[1] - _brute_force_rank(w, energy)) <= 2
