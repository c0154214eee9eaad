"""Pre-trained principal subspace of a weight by the energy rule of the KeepLoRA spec.

The batched algorithm (extension ``torch.ops.keeplora.principal_subspace``, and :func:`principal_subspace_torch`
in PyTorch when the extension is not built): group the weights by shape; per group, ``‖W‖_F²`` per matrix, then a
randomized SVD of rank r (sketch width ``l = r + max(10, r/2)``, 4 power iterations) whose Ritz values give the
captured energy. A matrix whose top-r Ritz values reach ε gets p from the energy rule on them, and its top-p Ritz
vectors are accepted only when they have converged: the estimate of :func:`ritz_subspace_error` of the sine of the
largest principal angle to the exact principal subspace must be at most ``SUBSPACE_TOLERANCE`` of the result dtype.
The other matrices grow r to ``max(2r, 1.2·p̂)`` (:func:`grown_rank`) with p̂ the rank at which the energy is
predicted to reach ε (:func:`tail_count`: the tail extrapolated from the Ritz values; never below the rigorous bound
``r + (ε·total − captured)/σ_r²``); a sketch that reached ε but did not converge doubles r. When the sketch would
exceed 0.3·min(m, n) the exact path takes over: the eigendecomposition of the smaller float64 Gram matrix. The Ritz
subspace of the returned basis captures exactly the Ritz energy, so the basis always holds at least ε of ‖W‖_F²;
p equals the brute-force value when the Ritz values around p are resolved (a gap), and may exceed it by a direction
or two on a flat spectrum.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from . import _dispatch
from .rsvd import cholesky_qr, rsvd_torch

__all__ = ["principal_subspace", "principal_subspace_ref", "principal_subspace_torch", "principal_subspace_extension",
           "energy_rank", "energy_counts", "tail_count", "grown_rank", "ritz_subspace_error", "SUBSPACE_TOLERANCE"]

# Largest accepted sine of the largest principal angle between a sketch's basis and the exact principal subspace,
# by result dtype: a few hundred units of fp32 rounding (the fp32 basis itself is rounded to about 1e-7), far above
# fp64's. Where a sketch cannot meet it (flat spectra, small gaps at p) the sketch grows or the exact path runs.
SUBSPACE_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def energy_counts(cumulative: torch.Tensor, energy: float, strict: bool = False) -> torch.Tensor:
    """Per row of cumulative energy fractions ``c_1 ≤ c_2 ≤ …`` (last dim): how many leading directions the energy
    rule keeps, for ``energy > 0`` and a nonzero spectrum (callers handle those cases):

    * inclusive (paper): the smallest ``p ≥ 1`` with ``c_p ≥ energy``, i.e. ``#{i : c_{i−1} < energy}``;
    * strict (the authors' CLIP and LLaVA code): ``max(#{i : c_i < energy}, 1)``: one direction less than the
      inclusive rule where ``c_p`` does not land exactly on ``energy``, but never none (when the top direction
      alone holds ``energy`` the authors keep it).
    """
    if strict:
        return (cumulative < energy).sum(-1).clamp_min(1)
    before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], -1)
    return (before < energy).sum(-1)


def energy_rank(squared_singular_values: torch.Tensor, energy: float, *, strict: bool = False) -> int:
    """Number of leading directions the energy rule (:func:`energy_counts`) keeps for ``σ_i²`` (descending), with
    ``c_p = Σ_{i≤p} σ_i² / Σσ²``. ``energy = 0`` or a zero spectrum keeps nothing."""
    sq = squared_singular_values.detach().to(torch.float64).flatten()
    total = sq.sum()
    if energy <= 0 or total <= 0:
        return 0
    return int(energy_counts(torch.cumsum(sq / total, 0), energy, strict))


def tail_count(values: Sequence[float], deficit: float, limit: int) -> int:
    """How many directions beyond the k known ones are predicted to hold ``deficit``, from ``values``: the k known
    energies (descending; any scale, ``deficit`` in the same one), at most ``limit − k``.

    The tail is extrapolated by a power law and by a geometric decay, both fitted at i = k/4 and k; the first model
    to reach the deficit wins: exact on power-law spectra, an underestimate on faster-decaying ones. Both models
    hold at most ``values[k−1]`` per direction, so the count is never below the rigorous bound
    ``deficit / values[k−1]`` (with k = 1 the fit is flat and gives exactly that). ``limit − k`` when neither
    reaches it. Only speed depends on it: callers check the energy rule on computed values.
    """
    values = [float(v) for v in values]
    k = len(values)
    if deficit <= 0 or k >= limit:
        return 0 if deficit <= 0 else max(limit - k, 0)
    i1 = max(1, k // 4)
    s1, s2 = values[i1 - 1], values[k - 1]
    if not (s2 > 0 and s1 >= s2):
        return limit - k
    beta = math.log(s1 / s2) / math.log(k / i1) if k > i1 else 0.0
    ratio = (s2 / s1) ** (1.0 / (k - i1)) if k > i1 else 1.0
    index = torch.arange(k + 1, limit + 1, dtype=torch.float64)
    power = (s2 * (index / k) ** -beta).cumsum(0)
    geometric = (s2 * ratio ** (index - k)).cumsum(0)
    reached = ((power >= deficit) | (geometric >= deficit)).nonzero()
    return int(reached[0]) + 1 if reached.numel() else limit - k


def grown_rank(rank: int, predicted: float, limit: int) -> int:
    """The next sketch rank: at least double, and at least 1.2× the predicted need (capped at ``limit``)."""
    return max(2 * rank, math.ceil(min(1.2 * predicted, limit)))


def ritz_subspace_error(mat: torch.Tensor, vectors: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Per matrix ``j`` of ``mat (b, s, o)``: an estimate of the sine of the largest principal angle between the
    span of ``vectors[j, :, :p]`` (Ritz vectors of ``G = mat[j]·mat[j]ᵀ``, orthonormal, ordered by decreasing
    Ritz value; ``p = counts[j]``, at least one more column given) and the span of G's top-p eigenvectors.

    With ``θ_i = uᵢᵀ·G·uᵢ`` and ``ρ_i = ‖G·uᵢ − θ_i·uᵢ‖`` (computed in float64 from the vectors as returned, so
    their rounding counts): expanding ``uᵢ`` in G's eigenvectors gives ``ρ_i² ≥ Σ_{j>p} c_j²·(θ_i − λ_j)²``, hence
    ``sin∠(uᵢ, top-p) ≤ ρ_i / (θ_i − λ_{p+1})`` when ``θ_i > λ_{p+1}``, and the largest angle of the span is at most
    ``sqrt(Σ_{i≤p} (ρ_i / (θ_i − λ_{p+1}))²)``. ``λ_{p+1}`` is not known; ``θ_{p+1} + ρ_{p+1}`` stands for it (a
    Ritz value lies within its residual of an eigenvalue; an unconverged (p+1)-th vector makes it large and the
    estimate infinite). ``inf`` where a gap is not positive.
    """
    b, _, c = vectors.shape
    cnt = torch.as_tensor(list(counts), dtype=torch.long, device=vectors.device)
    if b == 0:
        return torch.zeros(0, dtype=torch.float64, device=vectors.device)
    if int(cnt.max()) >= c:
        raise ValueError(f"ritz_subspace_error: vectors need more than max(counts) = {int(cnt.max())} columns, "
                         f"got {c}")
    width = int(cnt.max()) + 1
    x = mat.to(torch.float64)
    u = vectors[..., :width].to(torch.float64)
    y = x.mT @ u
    theta = y.square().sum(-2)
    rho = torch.linalg.vector_norm(x @ y - u * theta.unsqueeze(-2), dim=-2)
    bound = (theta + rho).gather(-1, cnt.unsqueeze(-1))  # stands for λ_{p+1}
    gap = theta - bound
    keep = torch.arange(width, device=vectors.device) < cnt.unsqueeze(-1)
    ratio = torch.where(keep, rho / gap.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(rho))
    error = ratio.square().sum(-1).sqrt()
    return torch.where((keep & (gap <= 0)).any(-1), torch.full_like(error, math.inf), error)


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


def _exact_subspace(mat: torch.Tensor, total: torch.Tensor, energy: float, strict: bool, out_dtype) -> list:
    """Left singular vectors of each ``mat (b, s, o)`` kept by the energy rule, from the smaller float64 Gram."""
    x = mat.to(torch.float64)
    s, o = x.shape[-2:]
    left = s <= o
    evals, evecs = torch.linalg.eigh(x @ x.mT if left else x.mT @ x)
    evals, evecs = evals.flip(-1).clamp_min(0), evecs.flip(-1)
    counts = energy_counts(evals.cumsum(-1) / total.unsqueeze(-1), energy, strict).tolist()
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


def principal_subspace_torch(weights: Sequence[torch.Tensor], energy: float, *, side: str = "input",
                             strict: bool = False) -> list:
    """The extension's grouped, sketch-growing algorithm in PyTorch (see the module docstring)."""
    out: list = [None] * len(weights)
    groups: dict = {}
    for i, w in enumerate(weights):
        groups.setdefault((tuple(w.shape), w.dtype, w.device), []).append(i)
    for (shape, dtype, device), members in groups.items():
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        tolerance = SUBSPACE_TOLERANCE[out_dtype]
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
            sub = mat[idx]
            # all l Ritz pairs of the same sketch (rank l, no oversampling): the convergence test needs pair p + 1
            u, s, _, _ = rsvd_torch(sub, r + over, oversample=0, power_iters=_POWER_ITERS, seed=0)
            sq = s[:, :r].to(torch.float64).square()
            cum = sq.cumsum(-1) / total[idx].unsqueeze(-1)
            reached = (cum[:, r - 1] >= energy).tolist()
            counts = energy_counts(cum, energy, strict).tolist()
            done = [k for k, hit in enumerate(reached) if hit]
            error = [math.inf] * len(remaining)
            if done:
                for k, e in zip(done, ritz_subspace_error(sub[done], u[done], [counts[k] for k in done]).tolist()):
                    error[k] = e
            sq_rows, totals = sq.cpu().tolist(), total[idx].tolist()
            nxt, most = [], 0.0
            for k, (j, hit, p) in enumerate(zip(remaining, reached, counts)):
                if hit and error[k] <= tolerance:
                    out[members[j]] = u[k, :, :p].to(out_dtype).contiguous()
                    continue
                nxt.append(j)
                if not hit:
                    most = max(most, r + tail_count(sq_rows[k], energy * totals[k] - sum(sq_rows[k]), mn))
            remaining = nxt
            r = grown_rank(r, most, mn)
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
        strict: the authors' strict energy rule ``max(#{p : c_p < ε}, 1)`` instead of the paper's (see
            :func:`energy_counts`).

    Returns a ``(d, p)`` fp32 tensor (fp64 for fp64 weights) with orthonormal columns (a list of them for a list
    input). Same-shaped weights of a list are computed as one batch (the engine passes all targets at once). The
    returned basis captures at least ``energy`` of ``‖W‖_F²`` and is within ``SUBSPACE_TOLERANCE`` (sine of the
    largest principal angle) of the exact principal subspace; see the module docstring for the algorithm.
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
