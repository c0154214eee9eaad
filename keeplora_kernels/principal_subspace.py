"""Pre-trained principal subspace of a weight by the energy rule of the KeepLoRA spec.

The batched algorithm (extension ``torch.ops.keeplora.principal_subspace``, and :func:`principal_subspace_torch`
in PyTorch when the extension is not built): group the weights by shape; per group, ``‖W‖_F²`` per matrix, then a
randomized SVD of rank r (sketch width ``r + max(10, r/2)``, 4 power iterations) whose Ritz values give the
captured energy; matrices whose top-r directions reach ε are done (p from the energy rule on the Ritz values),
the others grow r to ``max(2r, 1.2·p̂)`` with p̂ the rank at which the energy is predicted to reach ε (tail
extrapolated from the Ritz values by a power law and by a geometric decay; never below the rigorous bound
``r + (ε·total − captured)/σ_r²``). When the sketch would exceed 0.3·min(m, n) the exact path takes over: the
eigendecomposition of the smaller float64 Gram matrix. The Ritz subspace of the returned basis captures exactly the
Ritz energy, so the basis always holds at least ε of ‖W‖_F²; p equals the brute-force value when the Ritz values
around p are resolved (a gap), and may exceed it by a direction or two on a flat spectrum.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from . import _dispatch
from .rsvd import cholesky_qr, rsvd_torch

__all__ = ["principal_subspace", "principal_subspace_ref", "principal_subspace_torch", "principal_subspace_extension",
           "energy_rank"]


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



_EXACT_FRACTION = 0.3
_POWER_ITERS = 4


def _energy_counts(cum: torch.Tensor, energy: float, strict: bool) -> torch.Tensor:
    """Per row of cumulative energy fractions: the number of directions the energy rule keeps."""
    if strict:
        return (cum < energy).sum(-1)
    before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], -1)
    return (before < energy).sum(-1)


def _exact_subspace(mat: torch.Tensor, total: torch.Tensor, energy: float, strict: bool, out_dtype) -> list:
    """Left singular vectors of each ``mat (b, s, o)`` kept by the energy rule, from the smaller float64 Gram."""
    x = mat.to(torch.float64)
    s, o = x.shape[-2:]
    left = s <= o
    evals, evecs = torch.linalg.eigh(x @ x.mT if left else x.mT @ x)
    evals, evecs = evals.flip(-1).clamp_min(0), evecs.flip(-1)
    counts = _energy_counts(evals.cumsum(-1) / total.unsqueeze(-1), energy, strict).tolist()
    bases = []
    for j, p in enumerate(counts):
        if left or p == 0:
            basis = evecs[j, :, :p]
        else:
            sigma = evals[j, :p].sqrt()
            inv = torch.where(sigma > 0, sigma.reciprocal(), torch.zeros_like(sigma))
            basis = cholesky_qr((x[j] @ evecs[j, :, :p] * inv).unsqueeze(0), 2, 2, want_r=False)[0][0]
        bases.append(basis.to(out_dtype).contiguous())
    return bases


def _predicted_rank(sq: list, r: int, total: float, energy: float, mn: int) -> int:
    """Where to grow the sketch (speed only): the rank at which the energy is predicted to reach ``energy``, the
    tail beyond the r Ritz values extrapolated by a power law and by a geometric decay fitted at i = r/4 and r;
    the first model to reach wins. A flat fit gives the rigorous lower bound ``r + deficit / σ_r²``."""
    deficit = energy * total - sum(sq)
    if deficit <= 0:
        return r
    i1 = max(1, r // 4)
    s1, s2 = sq[i1 - 1], sq[r - 1]
    if not (s2 > 0 and s1 >= s2):
        return mn
    beta = math.log(s1 / s2) / math.log(r / i1) if r > i1 else 0.0
    g = (s2 / s1) ** (1.0 / (r - i1)) if r > i1 else 1.0
    i = torch.arange(r + 1, mn + 1, dtype=torch.float64)
    hit = ((s2 * (i / r) ** -beta).cumsum(0) >= deficit) | ((s2 * g ** (i - r)).cumsum(0) >= deficit)
    return int(i[hit][0]) if bool(hit.any()) else mn


def principal_subspace_torch(weights: Sequence[torch.Tensor], energy: float, *, side: str = "input",
                             strict: bool = False) -> list:
    """The extension's grouped, sketch-growing algorithm in PyTorch (see the module docstring)."""
    out: list = [None] * len(weights)
    groups: dict = {}
    for i, w in enumerate(weights):
        groups.setdefault((tuple(w.shape), w.dtype, w.device), []).append(i)
    for (shape, dtype, device), members in groups.items():
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        side_dim, other = (shape[1], shape[0]) if side == "input" else shape
        mn = min(side_dim, other)
        if energy <= 0 or mn == 0:
            for i in members:
                out[i] = torch.zeros(side_dim, 0, dtype=out_dtype, device=device)
            continue
        w = torch.stack([weights[i].detach() for i in members])
        mat = w.mT if side == "input" else w
        total = torch.stack([weights[i].detach().float().square().sum(dtype=torch.float64) for i in members])
        remaining = []
        for j, t in enumerate(total.tolist()):
            if t > 0:
                remaining.append(j)
            else:
                out[members[j]] = torch.zeros(side_dim, 0, dtype=out_dtype, device=device)
        r = min(max(8, mn // 32), mn)
        while remaining:
            over = max(10, r // 2)
            if r + over > _EXACT_FRACTION * mn:
                break
            idx = torch.tensor(remaining, device=device)
            u, s, _, _ = rsvd_torch(mat[idx], r, oversample=over, power_iters=_POWER_ITERS, seed=0)
            sq = s.to(torch.float64).square()
            cum = sq.cumsum(-1) / total[idx].unsqueeze(-1)
            last = cum[:, r - 1]
            reached = (last >= energy).tolist()
            counts = _energy_counts(cum, energy, strict).tolist()
            sq_rows, totals = sq.cpu().tolist(), total[idx].tolist()
            nxt, most = [], 0.0
            for k, (j, done, p) in enumerate(zip(remaining, reached, counts)):
                if done:
                    out[members[j]] = u[k, :, :p].to(out_dtype).contiguous()
                else:
                    nxt.append(j)
                    most = max(most, _predicted_rank(sq_rows[k], r, totals[k], energy, mn))
            remaining = nxt
            r = max(2 * r, math.ceil(min(1.2 * most, mn)))
        if remaining:
            idx = torch.tensor(remaining, device=device)
            for j, basis in zip(remaining, _exact_subspace(mat[idx], total[idx], energy, strict, out_dtype)):
                out[members[j]] = basis
    return out


def principal_subspace_extension(weights: Sequence[torch.Tensor], energy: float, *, side: str = "input",
                                 strict: bool = False) -> list:
    """``torch.ops.keeplora.principal_subspace`` (C++/CUDA) on weights of one device."""
    return list(torch.ops.keeplora.principal_subspace([w.detach() for w in weights], float(energy),
                                                      side == "input", bool(strict)))


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

    Returns a ``(d, p)`` fp32 tensor (fp64 for fp64 weights) with orthonormal columns (a list of them for a list
    input). Same-shaped weights of a list are computed as one batch (the engine passes all targets at once). The
    returned basis captures at least ``energy`` of ``‖W‖_F²``; see the module docstring for the algorithm.
    Backends: the C++/CUDA extension when built, else :func:`principal_subspace_torch`;
    :func:`principal_subspace_ref` (full SVD per weight) is the reference the tests compare with.
    """
    if not 0.0 <= energy <= 1.0:
        raise ValueError(f"principal_subspace: energy must be in [0, 1], got {energy}")
    if side not in ("input", "output"):
        raise ValueError(f"principal_subspace: side must be 'input' or 'output', got {side!r}")
    weights = [weight] if isinstance(weight, torch.Tensor) else list(weight)
    for w in weights:
        if w.dim() != 2:
            raise ValueError(f"principal_subspace: each weight must be 2-D (d_out, d_in), got {tuple(w.shape)}")
    out: list = [None] * len(weights)
    by_device: dict = {}
    for i, w in enumerate(weights):
        by_device.setdefault(w.device, []).append(i)
    for device, members in by_device.items():  # one call per device; same-shaped weights are batched inside
        backend = _dispatch.select("principal_subspace", device)
        fn = principal_subspace_torch if backend == "reference" else _dispatch.implementation("principal_subspace",
                                                                                               backend)
        for i, basis in zip(members, fn([weights[i] for i in members], energy, side=side, strict=strict)):
            out[i] = basis
    return out[0] if isinstance(weight, torch.Tensor) else out
