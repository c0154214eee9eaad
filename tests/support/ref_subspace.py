"""Full-SVD oracles for the randomized SVD and the principal subspace (used by the tests only).

They share no code with the algorithms they check beyond ``energy_rank`` (the rule itself, tested on its own):
Householder QR and LAPACK SVDs, one matrix at a time where that is simpler.
"""

from __future__ import annotations

import torch

import keeplora_kernels as kk


def _batch(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.dim() == 3 else t.unsqueeze(0)


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def rsvd_ref(
    a: torch.Tensor,
    rank: int,
    *,
    oversample: int = 8,
    power_iters: int = 4,
    project_out: torch.Tensor | None = None,
    seed: int = 0,
):
    """The textbook randomized SVD of ``a`` (or of ``(I − P·Pᵀ)·a``): Gaussian sketch of width ``rank + oversample``
    (torch's generator, not the extension's), Householder QR after every product, LAPACK SVD of the small matrix;
    the exact SVD when the sketch would span everything. Returns ``(U, S, V)`` like ``keeplora_kernels.rsvd``."""
    squeeze = a.dim() == 2
    compute = torch.float64 if a.dtype == torch.float64 else torch.float32
    mat = _batch(a).to(compute)
    basis = _batch(project_out)
    if basis is not None:
        basis = None if basis.shape[-1] == 0 else basis.to(compute)
    b, m, n = mat.shape
    width = min(rank + oversample, m, n)

    def project(y):
        return y if basis is None else y - basis @ (basis.mT @ y)

    if width == min(m, n):
        u, s, vh = torch.linalg.svd(project(mat), full_matrices=False)
    else:
        gen = torch.Generator(device=mat.device).manual_seed(int(seed))
        omega = torch.randn((b, n, width), generator=gen, device=mat.device, dtype=compute)
        q = _orthonormal(project(mat @ omega))
        for _ in range(power_iters):
            q = _orthonormal(project(mat @ _orthonormal(mat.mT @ project(q))))
        u_small, s, vh = torch.linalg.svd((mat.mT @ project(q)).mT, full_matrices=False)
        u = q @ u_small
    u, s, v = u[..., :rank], s[..., :rank], vh[..., :rank, :].mT
    return (u[0], s[0], v[0]) if squeeze else (u, s, v)


def principal_subspace_ref(
    weight: torch.Tensor, energy: float, *, side: str = "input", strict: bool = False
) -> torch.Tensor:
    """The energy-rule basis of one weight from its full SVD in fp32 (fp64 for fp64 weights)."""
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    u, s, vh = torch.linalg.svd(weight.detach().to(compute), full_matrices=False)
    p = kk.energy_rank(s.square(), energy, strict=strict)
    return (vh.mT if side == "input" else u)[:, :p].contiguous()
