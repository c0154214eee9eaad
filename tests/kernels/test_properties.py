"""Property-based tests (hypothesis) of every keeplora_kernels op against the oracles in ``support.ref_ops`` and
``support.ref_subspace``: random tiny shapes (ragged, zero tokens, r = d_in, full bases), dtypes (fp32, fp64, bf16
under the suite's low-precision rule) and non-contiguous views. Each example runs on every CPU backend of the op
(the PyTorch one and the C++ extension where it is built). Shapes stay tiny: CI runs the bounded "ci" profile
(tests/conftest.py)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import keeplora_kernels as kk
from keeplora_kernels import _dispatch
from support.properties import count_example, energy_rank_loop, orthonormality_error
from support.ref_ops import (
    lora_linear_ref,
    lora_linear_shared_ref,
    outer_sum_ref,
    residual_project_ref,
    second_moment_ref,
)
from support.tolerances import RTOL_ATOL, assert_close, assert_within_torch_error

DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
SEEDS = st.integers(0, 2**31 - 1)


def _backends(op: str) -> list[str]:
    return ["torch"] + (["extension"] if op in _dispatch.extension_ops("cpu") else [])


@contextlib.contextmanager
def _backend(name: str):
    """KEEPLORA_BACKEND for one call (hypothesis runs many examples in one test, so no monkeypatch fixture)."""
    old = os.environ.get("KEEPLORA_BACKEND")
    os.environ["KEEPLORA_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["KEEPLORA_BACKEND"]
        else:
            os.environ["KEEPLORA_BACKEND"] = old


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``t`` in another memory layout: ``"contiguous"``, ``"transposed"`` (a view of the
    transposed storage) or ``"sliced"`` (every other element of a twice wider last dimension)."""
    if how == "transposed" and t.dim() >= 2:
        return t.mT.contiguous().mT
    if how == "sliced" and t.shape[-1] > 0:
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


LAYOUTS = st.sampled_from(["contiguous", "transposed", "sliced"])


def _orthonormal_rows(r: int, d: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64)).Q.T.contiguous()


def _check(got: torch.Tensor, ref_low: torch.Tensor | None, exact: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32/fp64 against the fp64 oracle at the dtype's tolerance; bf16 by the low-precision rule (at most twice the
    error of PyTorch's own bf16 computation ``ref_low``, plus the floor)."""
    assert got.shape == exact.shape
    if exact.numel() == 0:
        return
    if dtype == torch.bfloat16:
        assert_within_torch_error(got, ref_low, exact, dtype)
    else:
        assert_close(got.double(), exact.double(), dtype)


# ---------------------------------------------------------------------------------------------------------------
# lora_linear / lora_linear_shared


@st.composite
def lora_problems(draw):
    lead = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=2)))
    d_in = draw(st.integers(1, 12))
    d_out = draw(st.integers(1, 12))
    r = draw(st.one_of(st.just(d_in), st.integers(1, d_in)))  # r = d_in drawn often
    return lead, d_in, d_out, r


@given(problem=lora_problems(), dtype=DTYPES, bias=st.booleans(), layout=LAYOUTS, seed=SEEDS)
def test_lora_linear_and_gradients_match_the_oracle(problem, dtype, bias, layout, seed):
    count_example()
    lead, d_in, d_out, r = problem
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d_in, generator=gen, dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) / d_in**0.5
    b = torch.randn(d_out, generator=gen, dtype=torch.float64) if bias else None
    a = _orthonormal_rows(r, d_in, gen)
    lb = torch.randn(d_out, r, generator=gen, dtype=torch.float64)
    dy = torch.randn(*lead, d_out, generator=gen, dtype=torch.float64)
    scale = 0.5
    # the oracle on the dtype-rounded operands, exactly (fp64) and as PyTorch computes it in the dtype itself
    rounded = [t if t is None else t.to(dtype) for t in (x, w, b, a, lb)]
    results = {}
    for compute in {torch.float64, dtype}:
        xr, wr, br, ar, lr = [t if t is None else t.to(compute) for t in rounded]
        xr, lr = xr.requires_grad_(), lr.requires_grad_()
        br = br if br is None else br.requires_grad_()
        y = lora_linear_ref(xr, wr, br, ar, lr, scale)
        inputs = (xr, lr) + ((br,) if bias else ())
        results[compute] = (y,) + torch.autograd.grad(y, inputs, dy.to(compute))
    for backend in _backends("lora_linear"):
        xk = _layout(rounded[0], layout).requires_grad_()
        lk = _layout(rounded[4], layout).requires_grad_()
        bk = rounded[2] if rounded[2] is None else rounded[2].clone().requires_grad_()
        with _backend(backend):
            y = kk.lora_linear(xk, _layout(rounded[1], layout), bk, _layout(rounded[3], layout), lk, scale)
        assert y.shape == (*lead, d_out)
        inputs = (xk, lk) + ((bk,) if bias else ())
        got = (y,) + torch.autograd.grad(y, inputs, dy.to(y.dtype), allow_unused=True)
        for g, low, exact in zip(got, results[dtype], results[torch.float64]):
            g = torch.zeros_like(exact) if g is None else g  # no tokens: no gradient flows
            _check(g, low, exact, dtype)


@given(
    d_in=st.integers(1, 10),
    projections=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 10), st.booleans()), min_size=1, max_size=3),
    tokens=st.integers(0, 6),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    layout=LAYOUTS,
    seed=SEEDS,
)
def test_lora_linear_shared_matches_one_oracle_per_projection(d_in, projections, tokens, dtype, layout, seed):
    count_example()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=gen, dtype=dtype)
    ws, bs, as_, lbs, scales = [], [], [], [], []
    for d_out, r, bias in projections:
        r = min(r, d_in)
        ws.append(_layout(torch.randn(d_out, d_in, generator=gen, dtype=dtype), layout))
        bs.append(torch.randn(d_out, generator=gen, dtype=dtype) if bias else None)
        as_.append(_orthonormal_rows(r, d_in, gen).to(dtype))
        lbs.append(torch.randn(d_out, r, generator=gen, dtype=dtype).requires_grad_())
        scales.append(float(r) / 4)
    dys = [torch.randn(tokens, d_out, generator=gen, dtype=dtype) for d_out, _, _ in projections]
    # the oracle exactly (fp64) and as PyTorch computes it in the dtype: the suite's rule bounds the error by the latter
    results = {}
    for compute in {torch.float64, dtype}:
        xr = x.to(compute).requires_grad_()
        lrs = [lb.detach().to(compute).requires_grad_() for lb in lbs]
        cast = [[t if t is None else t.to(compute) for t in group] for group in (ws, bs, as_)]
        ys = lora_linear_shared_ref(xr, *cast, lrs, scales)
        grads = torch.autograd.grad(ys, [xr, *lrs], [dy.to(compute) for dy in dys])
        results[compute] = (*ys, *grads)
    for backend in _backends("lora_linear_shared"):
        xk = _layout(x, layout).requires_grad_()
        with _backend(backend):
            ys = kk.lora_linear_shared(xk, ws, bs, as_, lbs, scales)
        assert len(ys) == len(projections)
        grads = torch.autograd.grad(ys, [xk, *lbs], dys)  # dX sums over the projections, dB per projection
        for got, low, exact in zip((*ys, *grads), results[dtype], results[torch.float64]):
            assert got.shape == exact.shape
            if exact.numel():
                assert_within_torch_error(got, low, exact, dtype)


# ---------------------------------------------------------------------------------------------------------------
# residual_project, second_moment_update, outer_sum


@given(
    d=st.integers(1, 10),
    n=st.integers(0, 6),
    batch=st.one_of(st.none(), st.integers(1, 3)),
    k_choice=st.sampled_from(["zero", "some", "full"]),
    dtype=DTYPES,
    layout=LAYOUTS,
    seed=SEEDS,
)
def test_residual_project_matches_the_dense_projector(d, n, batch, k_choice, dtype, layout, seed):
    count_example()
    gen = torch.Generator().manual_seed(seed)
    k = {"zero": 0, "some": max(d // 2, 1), "full": d}[k_choice]
    lead = () if batch is None else (batch,)
    g = torch.randn(*lead, d, n, generator=gen, dtype=torch.float64).to(dtype)
    basis = torch.linalg.qr(torch.randn(*lead, d, max(k, 1), generator=gen, dtype=torch.float64)).Q[..., :k]
    basis = basis.to(torch.float64 if dtype == torch.float64 else torch.float32)
    exact = residual_project_ref(g, basis)
    low = None
    if dtype == torch.bfloat16:
        p = basis.to(dtype)
        low = g - p @ (p.mT @ g)
    for backend in _backends("residual_project"):
        with _backend(backend):
            out = kk.residual_project(_layout(g, layout), _layout(basis, layout))
        assert out.shape == g.shape and out.dtype == g.dtype
        _check(out, low, exact, dtype)
        if k == d and out.numel():
            assert out.double().abs().max().item() <= 1e-2 * max(g.double().abs().max().item(), 1.0)


@given(
    lead=st.lists(st.integers(0, 5), min_size=1, max_size=2),
    d=st.integers(1, 10),
    acc_dtype=st.sampled_from([torch.float32, torch.float64]),
    x_dtype=DTYPES,
    masked=st.booleans(),
    layout=LAYOUTS,
    seed=SEEDS,
)
def test_second_moment_update_accumulates_the_masked_rows(lead, d, acc_dtype, x_dtype, masked, layout, seed):
    count_example()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=gen, dtype=torch.float64).to(x_dtype)
    mask = torch.rand(*lead, generator=gen) > 0.4 if masked else None
    start = torch.randn(d, d, generator=gen, dtype=torch.float64)
    start = (start + start.T).to(acc_dtype)
    # the x values are exact in every dtype, so the products are too: only the accumulation rounds (acc's dtype)
    exact = start.double() + second_moment_ref(x, mask)
    for backend in _backends("second_moment_update"):
        acc = start.clone()
        with _backend(backend):
            out = kk.second_moment_update(acc, _layout(x, layout), mask)
        assert out.data_ptr() == acc.data_ptr() and out.dtype == acc_dtype
        assert_close(acc.double(), exact, acc_dtype)


@given(
    tokens=st.integers(0, 8),
    d_out=st.integers(1, 9),
    d_in=st.integers(1, 9),
    acc_dtype=st.sampled_from([torch.float32, torch.float64]),
    in_dtype=DTYPES,
    layout=LAYOUTS,
    seed=SEEDS,
)
def test_outer_sum_adds_dy_transposed_x(tokens, d_out, d_in, acc_dtype, in_dtype, layout, seed):
    count_example()
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(tokens, d_out, generator=gen, dtype=torch.float64).to(in_dtype)
    x = torch.randn(tokens, d_in, generator=gen, dtype=torch.float64).to(in_dtype)
    start = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64).to(acc_dtype)
    exact = outer_sum_ref(start, dy, x)
    for backend in _backends("outer_sum"):
        with _backend(backend):
            out = kk.outer_sum(start.clone(), _layout(dy, layout), _layout(x, layout))
        assert out.shape == (d_out, d_in) and out.dtype == acc_dtype
        assert_close(out.double(), exact, acc_dtype)


# ---------------------------------------------------------------------------------------------------------------
# rsvd, principal_subspace


@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    batch=st.one_of(st.none(), st.integers(1, 3)),
    rank_frac=st.floats(0.0, 1.0),
    oversample=st.integers(0, 4),
    power_iters=st.integers(0, 2),
    project=st.sampled_from(["none", "some", "full"]),
    dtype=DTYPES,
    layout=LAYOUTS,
    seed=SEEDS,
)
def test_rsvd_factors_are_orthonormal_and_bounded_by_the_exact_svd(
    m, n, batch, rank_frac, oversample, power_iters, project, dtype, layout, seed
):
    count_example()
    gen = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    a = torch.randn(*lead, m, n, generator=gen, dtype=torch.float64).to(dtype)
    rank = 1 + int(rank_frac * (min(m, n) - 1))
    k = {"none": 0, "some": m - rank, "full": m}[project]  # "some" keeps the projected matrix at rank ≥ `rank`
    basis = None
    if project != "none":
        basis = torch.linalg.qr(torch.randn(*lead, m, max(k, 1), generator=gen, dtype=torch.float64)).Q[..., :k]
        basis = basis.to(torch.float64 if dtype == torch.float64 else torch.float32)
    a64 = a.double()
    target = a64 if basis is None else a64 - basis.double() @ (basis.double().mT @ a64)
    exact = torch.linalg.svdvals(target)[..., :rank]
    scale = max(torch.linalg.matrix_norm(a64).max().item(), 1e-30)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    exact_path = min(rank + oversample, m, n) == min(m, n)
    for backend in _backends("rsvd"):
        with _backend(backend):
            u, s, v = kk.rsvd(
                _layout(a, layout), rank, oversample=oversample, power_iters=power_iters, project_out=basis, seed=3
            )
        assert u.shape == (*lead, m, rank) and s.shape == (*lead, rank) and v.shape == (*lead, n, rank)
        assert torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(v).all()
        s64 = s.double()
        assert torch.all(s64[..., :-1] >= s64[..., 1:] - tol * scale) and torch.all(s64 >= 0)
        assert torch.all(s64 <= exact + tol * scale)  # Ritz values never exceed the singular values
        if project == "full":
            assert s64.max().item() <= tol * scale
            continue
        assert orthonormality_error(u) <= tol and orthonormality_error(v) <= tol
        if basis is not None and k:
            assert (basis.double().mT @ u.double()).abs().max().item() <= tol
        if exact_path:
            assert_close(s64, exact, torch.float64 if dtype == torch.float64 else torch.float32)
            recon = (u.double() * s64.unsqueeze(-2)) @ v.double().mT
            best = torch.linalg.svdvals(target)[..., rank:].square().sum(-1).sqrt()
            residual = torch.linalg.matrix_norm(target - recon)
            assert torch.all(residual <= best + tol * scale)


@st.composite
def gapped_weights(draw):
    """A weight whose σ come in clusters separated by a gap (ratio ≥ 4), and an energy away from every c_p."""
    d_out = draw(st.integers(1, 12))
    d_in = draw(st.integers(1, 12))
    r = min(d_out, d_in)
    clusters = draw(st.lists(st.integers(1, 3), min_size=1, max_size=4))
    spectrum, level = [], 1.0
    for size in clusters:
        for j in range(size):
            spectrum.append(level * (1 - 0.05 * j))
        level /= draw(st.floats(4.0, 20.0))
    spectrum = spectrum[:r]
    spectrum += [0.0] * (r - len(spectrum))
    energy = draw(st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0])))
    return d_out, d_in, spectrum, energy


@given(
    problem=gapped_weights(),
    dtype=DTYPES,
    side=st.sampled_from(["input", "output"]),
    strict=st.booleans(),
    layout=LAYOUTS,
    seed=SEEDS,
)
def test_principal_subspace_keeps_the_energy_with_the_oracle_count(problem, dtype, side, strict, layout, seed):
    count_example()
    d_out, d_in, spectrum, energy = problem
    gen = torch.Generator().manual_seed(seed)
    r = len(spectrum)
    u = torch.linalg.qr(torch.randn(d_out, r, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(d_in, r, generator=gen, dtype=torch.float64)).Q
    w = ((u * torch.tensor(spectrum, dtype=torch.float64)) @ v.T).to(dtype)
    sq = torch.linalg.svdvals(w.double()).square()
    total = sq.sum().item()
    cumulative = (sq.cumsum(0) / total).tolist() if total > 0 else []
    # the count is only well defined away from the cumulative energies (a rounding may move c_p across ε)
    assume(energy in (0.0, 1.0) or all(abs(c - energy) > 1e-3 for c in cumulative))
    p = energy_rank_loop(sq.tolist(), energy, strict=strict)
    p_low, p_high = p, p
    if energy == 1.0 and total > 0:
        # ε = 1 keeps every direction of a non-negligible singular value; whether the directions of (rounded) zero
        # ones are kept as well is decided by rounding, so any count up to the rank bound is the rule
        nonnegligible = int((sq > 1e-6 * total).sum())
        p_low, p_high = (max(nonnegligible - 1, 1) if strict else nonnegligible), r
    for backend in _backends("rsvd"):
        with _backend(backend):
            basis = kk.principal_subspace(_layout(w, layout), energy, side=side, strict=strict)
        d = d_in if side == "input" else d_out
        assert basis.shape[0] == d and p_low <= basis.shape[1] <= p_high and basis.shape[1] <= d
        assert basis.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert orthonormality_error(basis) <= (1e-10 if dtype == torch.float64 else 1e-5)
        if total > 0 and not strict:
            w64 = w.double() if side == "input" else w.double().T
            captured = torch.linalg.matrix_norm(w64 @ basis.double()).square().item() / total
            assert captured >= energy - RTOL_ATOL[torch.float32][0] * 10


@pytest.mark.parametrize("backend", _backends("rsvd"))
def test_principal_subspace_full_energy_of_a_rank_deficient_weight_is_orthonormal(backend):
    """Regression found by the property above: a 2 × 6 weight of rank 1 under ε = 1 kept its rounding-level second
    direction as a zero column. The rule's count stands; directions of rounding-level σ are an orthonormal
    completion."""
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(2, 2, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(6, 2, generator=gen, dtype=torch.float64)).Q
    w = (u * torch.tensor([1.0, 0.0], dtype=torch.float64)) @ v.T
    with _backend(backend):
        basis = kk.principal_subspace(w, 1.0)
    assert basis.shape[0] == 6 and 1 <= basis.shape[1] <= 2
    assert orthonormality_error(basis) <= 1e-10
    assert torch.linalg.matrix_norm(w @ basis).square().item() == pytest.approx(1.0, rel=1e-12)
