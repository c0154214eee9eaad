"""Linear algebra of the protected basis P (``d_in × k``, orthonormal, fp32/fp64): never a dense ``P·Pᵀ``."""

from __future__ import annotations

from typing import Optional

import torch

import keeplora_kernels as kk

from .batching import bounded_batches


def orthonormalize_against(block: torch.Tensor, basis: torch.Tensor, *, fill_to: Optional[int] = None,
                           generator: Optional[torch.Generator] = None, tol: float = 1e-6) -> torch.Tensor:
    """Orthonormal columns spanning ``(I − P·Pᵀ)·block``, in order, each oriented like its source column.

    Fast path: block Gram–Schmidt against P applied twice, then a QR of the block. When a column collapses (it lay
    in ``span(P)`` or in the span of earlier columns: relative norm < ``tol``) the slow path goes column by column
    and drops it, or, with ``fill_to=n``, replaces it with a random direction orthogonal to everything so far until
    n columns exist (n ≤ d − k). The result is orthogonal to ``basis`` to rounding.
    """
    d, k = basis.shape
    want = block.shape[1] if fill_to is None else fill_to
    if want > d - k:
        raise ValueError(f"cannot have {want} orthonormal directions outside a {k}-dimensional basis in R^{d}")
    v = block / torch.linalg.vector_norm(block, dim=0).clamp_min(torch.finfo(block.dtype).tiny)
    for _ in range(2):
        v = v - basis @ (basis.t() @ v) if k else v
    if v.shape[1] == want and want > 0:
        q, r = torch.linalg.qr(v)
        diag = r.diagonal()
        if bool((diag.abs() > tol).all()):
            return q * torch.sign(diag)
    return _orthonormalize_columns(v, basis, want, generator, tol)


def _orthonormalize_columns(v: torch.Tensor, basis: torch.Tensor, want: int,
                            generator: Optional[torch.Generator], tol: float) -> torch.Tensor:
    d, k = basis.shape
    out = v.new_zeros(d, want)
    n = 0
    candidates = iter(v.unbind(1))
    while n < want:
        col = next(candidates, None)
        if col is None:
            if generator is None:
                break
            col = torch.randn(d, generator=generator, dtype=v.dtype, device="cpu").to(v.device)
        norm0 = torch.linalg.vector_norm(col)
        if norm0 == 0:
            continue
        col = col / norm0
        for _ in range(2):
            if k:
                col = col - basis @ (basis.t() @ col)
            if n:
                col = col - out[:, :n] @ (out[:, :n].t() @ col)
        norm = torch.linalg.vector_norm(col)
        if norm > tol:
            out[:, n] = col / norm
            n += 1
    return out[:, :n]


def expand_bases(bases: dict[str, torch.Tensor], moments: dict[str, torch.Tensor],
                 energy: float) -> dict[str, torch.Tensor]:
    """Grow each P by the GPM energy rule of the spec; returns the new bases (``d × (k + added)``, ≤ d columns).

    ``total = trace(C)``; ``C_r = (I − P·Pᵀ)·C·(I − P·Pᵀ)``; eigenpairs ``(λ_i, u_i)`` of ``C_r``, descending;
    ``captured = (total − trace(C_r)) / total``; append ``u_1, u_2, …`` while ``captured < energy``
    (``captured += λ_i / total`` after each). Equals the SVD rule on the stacked feature matrix. One batched
    projection and eigendecomposition per input size, in memory-bounded batches (bases of one size are zero-padded
    to a common width; zero columns do not change ``P·Pᵀ``).
    """
    out = dict(bases)
    if energy <= 0:
        return out
    by_size: dict[int, list[str]] = {}
    for name, basis in bases.items():
        d, k = basis.shape
        if k < d and bool(torch.trace(moments[name]) > 0):
            by_size.setdefault(d, []).append(name)
    batches = [(d, names) for d, group in by_size.items()
               for names in bounded_batches(group, 4 * d * d * bases[group[0]].element_size())]  # ~4 d×d copies
    for d, names in batches:
        dtype, device = bases[names[0]].dtype, bases[names[0]].device
        width = max(bases[n].shape[1] for n in names)
        padded = torch.zeros(len(names), d, width, dtype=dtype, device=device)
        for i, n in enumerate(names):
            padded[i, :, : bases[n].shape[1]] = bases[n]
        c = torch.stack([moments[n].to(dtype) for n in names])
        left = kk.residual_project(c, padded)  # (I − PPᵀ)·C
        c_res = kk.residual_project(left.mT.contiguous(), padded)  # (I − PPᵀ)·C·(I − PPᵀ), C symmetric
        c_res = 0.5 * (c_res + c_res.mT)
        eigenvalues, eigenvectors = torch.linalg.eigh(c_res)
        eigenvalues, eigenvectors = eigenvalues.flip(-1), eigenvectors.flip(-1)
        totals = torch.stack([torch.trace(moments[n].to(dtype)) for n in names])
        captured = (totals - torch.diagonal(c_res, dim1=-2, dim2=-1).sum(-1)) / totals
        fractions = eigenvalues / totals[:, None]
        # captured before appending u_i; the rule stops at the first i where it already reached the energy
        before = captured[:, None] + torch.cumsum(fractions, -1) - fractions
        for i, n in enumerate(names):
            k = bases[n].shape[1]
            reached = torch.nonzero(before[i] >= energy)
            added = min(int(reached[0]) if len(reached) else d, d - k)
            if added:
                out[n] = torch.cat([bases[n], orthonormalize_against(eigenvectors[i, :, :added], bases[n])], 1)
    return out


def random_residual_directions(basis: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random orthonormal directions orthogonal to ``span(basis)`` (the random-A ablation)."""
    gauss = torch.randn(basis.shape[0], count, generator=generator, dtype=basis.dtype, device="cpu")
    return orthonormalize_against(gauss.to(basis.device), basis, fill_to=count, generator=generator)
