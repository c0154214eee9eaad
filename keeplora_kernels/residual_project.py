"""Residual projection ``(I − P·Pᵀ)·g = g − P·(Pᵀ·g)`` for an orthonormal basis P, never forming ``P·Pᵀ``.

Cost: 4·d·n·k FLOP and (for small k) one read of g plus one write; the dense projector would be 2·d²·n FLOP.
"""

from __future__ import annotations

import torch

from . import _dispatch

__all__ = ["residual_project", "residual_project_torch", "residual_project_dense"]


def residual_project_torch(g: torch.Tensor, basis: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """The torch backend: ``g − basis·(basisᵀ·g)`` computed in fp32 (or fp64 when either input is fp64).

    ``g`` is ``(d, n)`` or ``(b, d, n)``; ``basis`` is ``(d, k)`` or ``(b, d, k)``; ``k = 0`` returns g unchanged.
    """
    if basis.shape[-1] == 0:
        return g if inplace else g.clone()
    acc = torch.float64 if torch.float64 in (g.dtype, basis.dtype) else torch.float32
    p = basis.to(acc)
    coeff = p.transpose(-1, -2) @ g.to(acc)
    out = g.to(acc) - p @ coeff
    if inplace:
        return g.copy_(out)
    return out.to(g.dtype)


def residual_project_dense(g: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The KeepLoRA authors' form, kept as a benchmark baseline only: the dense projector ``(I − P·Pᵀ)`` (d×d) is
    formed and applied, 2·d²·n FLOP plus d² memory, computed in fp32 (fp64 if an input is). 2-D inputs only."""
    acc = torch.float64 if torch.float64 in (g.dtype, basis.dtype) else torch.float32
    p = basis.to(acc)
    projector = torch.eye(p.shape[0], device=p.device, dtype=acc) - p @ p.T
    return (projector @ g.to(acc)).to(g.dtype)


def _check(g: torch.Tensor, basis: torch.Tensor) -> None:
    if g.dim() not in (2, 3) or basis.dim() not in (2, 3):
        raise ValueError(
            f"residual_project expects g of shape (d, n) or (b, d, n) and basis (d, k) or (b, d, k), "
            f"got g {tuple(g.shape)} and basis {tuple(basis.shape)}"
        )
    if g.shape[-2] != basis.shape[-2]:
        raise ValueError(
            f"residual_project: g has {g.shape[-2]} rows but basis has {basis.shape[-2]} "
            "(both are indexed by the input dimension d)"
        )


def residual_project(g: torch.Tensor, basis: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Project the columns of ``g`` onto the orthogonal complement of ``span(basis)``.

    Args:
        g: ``(d, n)`` or ``(b, d, n)``, any float dtype.
        basis: ``(d, k)`` or ``(b, d, k)`` with orthonormal columns (fp32 recommended); ``k`` may be 0.
        inplace: write the result into ``g`` and return it.

    Returns ``g − basis·(basisᵀ·g)`` in g's dtype, accumulated in fp32.
    """
    _check(g, basis)
    backend = _dispatch.select("residual_project", g.device, g.dtype, basis.dtype)
    if backend == "torch":
        return residual_project_torch(g, basis, inplace=inplace)
    return _dispatch.implementation("residual_project", backend)(g, basis, inplace=inplace)
