"""Pre-trained principal subspace of a weight by the energy rule of the KeepLoRA spec."""

from __future__ import annotations

from typing import Sequence, Union

import torch

from . import _dispatch

__all__ = ["principal_subspace", "principal_subspace_ref", "energy_rank"]


def energy_rank(squared_singular_values: torch.Tensor, energy: float, *, strict: bool = False) -> int:
    """Number of leading directions the energy rule keeps.

    With ``e_i = σ_i² / Σσ²`` (descending σ) and ``c_p = Σ_{i≤p} e_i``:
      * default (paper): the smallest ``p ≥ 1`` with ``c_p ≥ energy``; ``energy = 0`` keeps nothing;
      * ``strict=True`` (authors' CLIP code): ``p = #{i : c_i < energy}``, which keeps slightly less.
    A zero spectrum keeps nothing.
    """
    sq = squared_singular_values.detach().to(torch.float64).flatten()
    total = sq.sum()
    if energy <= 0 or total <= 0:
        return 0
    cumulative = torch.cumsum(sq / total, 0)
    if strict:
        return int((cumulative < energy).sum())
    before = torch.cat([cumulative.new_zeros(1), cumulative[:-1]])
    return int((before < energy).sum())


def principal_subspace_ref(weight: torch.Tensor, energy: float, *, side: str = "input",
                           strict: bool = False) -> torch.Tensor:
    """Reference by a full SVD in fp32 (fp64 for fp64 weights)."""
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    u, s, vh = torch.linalg.svd(weight.detach().to(compute), full_matrices=False)
    p = energy_rank(s.square(), energy, strict=strict)
    vectors = vh.mT if side == "input" else u
    return vectors[:, :p].contiguous()


def principal_subspace(weight: Union[torch.Tensor, Sequence[torch.Tensor]], energy: float, *, side: str = "input",
                       strict: bool = False):
    """Orthonormal basis of the principal subspace of a PyTorch weight ``W`` (``d_out × d_in``).

    Args:
        weight: one weight or a list of weights (of any shapes).
        energy: ε in [0, 1]; keep the leading singular directions holding that fraction of ``‖W‖_F²``.
        side: ``"input"`` (default, paper): right singular vectors of W, a ``d_in × p`` basis of the input space.
            ``"output"``: left singular vectors, ``d_out × p`` (the authors' CLIP code applies these on the input
            side, which only type-checks for square weights).
        strict: use the authors' strict rule (see :func:`energy_rank`).

    Returns a ``(d, p)`` fp32 tensor with orthonormal columns (a list of them for a list input).
    """
    if not 0.0 <= energy <= 1.0:
        raise ValueError(f"principal_subspace: energy must be in [0, 1], got {energy}")
    if side not in ("input", "output"):
        raise ValueError(f"principal_subspace: side must be 'input' or 'output', got {side!r}")
    weights = [weight] if isinstance(weight, torch.Tensor) else list(weight)
    for w in weights:
        if w.dim() != 2:
            raise ValueError(f"principal_subspace: each weight must be 2-D (d_out, d_in), got {tuple(w.shape)}")
    out = []
    for w in weights:
        backend = _dispatch.select("principal_subspace", w.device)
        if backend == "reference":
            out.append(principal_subspace_ref(w, energy, side=side, strict=strict))
        else:
            out.append(_dispatch.implementation("principal_subspace", backend)(w, energy, side=side, strict=strict))
    return out[0] if isinstance(weight, torch.Tensor) else out
