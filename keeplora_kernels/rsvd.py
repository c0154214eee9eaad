"""Randomized truncated SVD, batched, with an optional implicit residual projection ``(I − P·Pᵀ)·a``.

Halko–Martinsson–Tropp range finder with power iterations. The projection is folded into every product
(``Â·X = a·X − P·(Pᵀ·a·X)``, ``Âᵀ·Y = aᵀ·(Y − P·(Pᵀ·Y))``) so ``Â`` is never materialised.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch

__all__ = ["rsvd", "rsvd_ref"]


def _as_batch(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or t.dim() == 3 else t.unsqueeze(0)


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def rsvd_ref(a: torch.Tensor, rank: int, *, oversample: int = 8, power_iters: int = 4,
             project_out: Optional[torch.Tensor] = None, seed: int = 0):
    """Pure-PyTorch reference of :func:`rsvd` (same algorithm, Householder QR, batched LAPACK/cuSOLVER calls)."""
    squeeze = a.dim() == 2
    compute = torch.float64 if a.dtype == torch.float64 else torch.float32
    mat = _as_batch(a).to(compute)
    basis = _as_batch(project_out)
    if basis is not None:
        basis = basis.to(compute)
        if basis.shape[-1] == 0:
            basis = None
    b, m, n = mat.shape
    width = min(rank + oversample, m, n)

    def apply(x):  # Â·x
        y = mat @ x
        return y if basis is None else y - basis @ (basis.mT @ y)

    def apply_t(y):  # Âᵀ·y
        return mat.mT @ (y if basis is None else y - basis @ (basis.mT @ y))

    if width == min(m, n):  # the sketch would span everything: the exact SVD is cheaper and exact
        full = mat if basis is None else mat - basis @ (basis.mT @ mat)
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
    else:
        gen = torch.Generator(device=mat.device).manual_seed(int(seed))
        omega = torch.randn((b, n, width), generator=gen, device=mat.device, dtype=compute)
        q = _orthonormal(apply(omega))
        for _ in range(power_iters):
            q = _orthonormal(apply(_orthonormal(apply_t(q))))
        small = apply_t(q).mT  # (b, width, n) = Qᵀ·Â
        u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
        u = q @ u_small
    u, s, v = u[..., :rank], s[..., :rank], vh[..., :rank, :].mT
    if squeeze:
        u, s, v = u[0], s[0], v[0]
    return u, s, v


def rsvd(a: torch.Tensor, rank: int, *, oversample: int = 8, power_iters: int = 4,
         project_out: Optional[torch.Tensor] = None, seed: int = 0):
    """Top-``rank`` SVD ``a ≈ U·diag(S)·Vᵀ`` of ``a`` or, with ``project_out=P``, of ``(I − P·Pᵀ)·a``.

    Args:
        a: ``(m, n)`` or ``(b, m, n)``; bf16/fp16/fp32 are computed in fp32, fp64 in fp64.
        rank: number of singular triplets, ``1 ≤ rank ≤ min(m, n)``.
        oversample: extra sketch columns (sketch width ``rank + oversample``, capped at ``min(m, n)``; at the cap the
            exact SVD is used).
        power_iters: subspace iterations; each sharpens the spectrum by one power of ``S²``.
        project_out: optional ``(m, k)`` or ``(b, m, k)`` orthonormal basis P to project out of the column space.
        seed: the Gaussian sketch's seed; equal seeds give equal results.

    Returns ``U (…, m, rank)``, ``S (…, rank)`` descending, ``V (…, n, rank)`` in the compute dtype.
    """
    if a.dim() not in (2, 3):
        raise ValueError(f"rsvd: a must be (m, n) or (b, m, n), got shape {tuple(a.shape)}")
    m, n = a.shape[-2:]
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rsvd: rank must be in [1, min(m, n)] = [1, {min(m, n)}], got {rank}")
    if oversample < 0 or power_iters < 0:
        raise ValueError(f"rsvd: oversample and power_iters must be ≥ 0, got {oversample} and {power_iters}")
    if project_out is not None and (project_out.dim() != a.dim() or project_out.shape[-2] != m):
        raise ValueError(f"rsvd: project_out must have {m} rows and the same batch layout as a, "
                         f"got {tuple(project_out.shape)} for a of shape {tuple(a.shape)}")
    backend = _dispatch.select("rsvd", a.device)
    if backend == "reference":
        return rsvd_ref(a, rank, oversample=oversample, power_iters=power_iters, project_out=project_out, seed=seed)
    return _dispatch.implementation("rsvd", backend)(a, rank, oversample=oversample, power_iters=power_iters,
                                                     project_out=project_out, seed=seed)
