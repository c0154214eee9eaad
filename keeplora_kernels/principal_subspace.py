"""Pre-trained principal subspace of a weight by the energy rule of the KeepLoRA spec.

The batched algorithm, in PyTorch around the backend's randomized SVD (``keeplora_kernels.rsvd``: the C++/CUDA
extension when built): group the weights by shape; per group, ``‖W‖_F²`` per matrix, then a randomized SVD of
rank r (sketch width ``l = r + max(10, r/2)``, 4 power iterations) whose Ritz values give the captured energy. A
matrix whose top-r Ritz values reach ε gets p from the energy rule on them, and its top-p Ritz vectors are accepted
only when they have converged: the estimate of :func:`ritz_subspace_error` of the sine of the largest principal
angle to the exact principal subspace must be at most ``SUBSPACE_TOLERANCE`` of the result dtype.
The other matrices grow r to ``max(2r, 1.2·p̂)`` (:func:`grown_rank`) with p̂ the rank at which the energy is
predicted to reach ε (:func:`tail_count`: the tail extrapolated from the Ritz values; never below the rigorous bound
``r + (ε·total − captured)/σ_r²``); a sketch that reached ε but did not converge doubles r. When the sketch would
exceed 0.3·min(m, n) the exact path takes over (the loop is :func:`keeplora_kernels.sketch_growth.grow`, shared with
the memory update): the eigendecomposition of the smaller float64 Gram matrix. The Ritz
subspace of the returned basis captures exactly the Ritz energy, so the basis always holds at least ε of ‖W‖_F²;
p equals the brute-force value when the Ritz values around p are resolved (a gap), and may exceed it by a direction
or two on a flat spectrum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _dispatch
from .rsvd import _rsvd_callable, cholesky_qr
from .sketch_growth import energy_counts, grow, grown_rank, tail_count

__all__ = [
    "principal_subspace",
    "energy_rank",
    "energy_counts",
    "tail_count",
    "grown_rank",
    "ritz_subspace_error",
    "SUBSPACE_TOLERANCE",
]

# Largest accepted sine of the largest principal angle between a sketch's basis and the exact principal subspace,
# by result dtype: a few hundred units of fp32 rounding (the fp32 basis itself is rounded to about 1e-7), far above
# fp64's. Where a sketch cannot meet it (flat spectra, small gaps at p) the sketch grows or the exact path runs.
SUBSPACE_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def energy_rank(squared_singular_values: torch.Tensor, energy: float, *, strict: bool = False) -> int:
    """Number of leading directions the energy rule (:func:`energy_counts`) keeps for ``σ_i²`` (descending), with
    ``c_p = Σ_{i≤p} σ_i² / Σσ²``. ``energy = 0`` or a zero spectrum keeps nothing."""
    sq = squared_singular_values.detach().to(torch.float64).flatten()
    total = sq.sum()
    if energy <= 0 or total <= 0:
        return 0
    return int(energy_counts(torch.cumsum(sq / total, 0), energy, strict))


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
        raise ValueError(f"ritz_subspace_error: vectors need more than max(counts) = {int(cnt.max())} columns, got {c}")
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


_POWER_ITERS = 4


def _oversample(rank: int) -> int:
    return max(10, rank // 2)


def _cholesky_qr_q(y: torch.Tensor, backend: str) -> torch.Tensor:
    """Q of the shifted CholeskyQR4 of ``y (b, m, l)`` on the backend that runs the rSVD."""
    if backend == "extension":
        return torch.ops.keeplora.cholesky_qr(y, 2, 2)[0]
    return cholesky_qr(y, 2, 2, want_r=False)[0]


def _exact_subspace(
    mat: torch.Tensor, total: torch.Tensor, energy: float, strict: bool, out_dtype, backend: str
) -> list:
    """Left singular vectors of each ``mat (b, s, o)`` kept by the energy rule, from the smaller float64 Gram.

    From the right Gram (``s > o``) the left vectors are ``x·v/σ``, which rounding leaves meaningless where ``σ²`` is
    within the Gram's rounding (``o·eps·λ_max``). Only ε near 1 on a (numerically) rank-deficient weight asks for
    such directions; they hold no resolvable energy, so any orthonormal completion of the resolved ones serves as
    them (as the left Gram's eigenvectors of its zero eigenvalues would)."""
    x = mat.to(torch.float64)
    s, o = x.shape[-2:]
    left = s <= o
    evals, evecs = torch.linalg.eigh(x @ x.mT if left else x.mT @ x)
    evals, evecs = evals.flip(-1).clamp_min(0), evecs.flip(-1)
    counts = energy_counts(evals.cumsum(-1) / total.unsqueeze(-1), energy, strict).tolist()
    resolved = (evals > evals[:, :1] * (min(s, o) * torch.finfo(torch.float64).eps)).sum(-1).tolist()
    bases = []
    for j, p in enumerate(counts):
        if left or p == 0:
            basis = evecs[j, :, :p]
        else:  # u_i = x·v_i / σ_i, orthonormal up to rounding: the QR keeps their directions (R ≈ I)
            k = max(min(p, resolved[j]), 1)
            sigma = evals[j, :k].sqrt()
            basis = _cholesky_qr_q((x[j] @ evecs[j, :, :k] / sigma).unsqueeze(0), backend)[0]
            if p > k:
                basis = torch.cat([basis, _orthonormal_completion(basis, p - k)], 1)
        bases.append(basis.to(out_dtype).contiguous())
    return bases


def _orthonormal_completion(q: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` orthonormal columns orthogonal to the orthonormal columns of ``q (s, k)`` (fixed seed)."""
    gen = torch.Generator(device=q.device).manual_seed(0)
    z = torch.randn(q.shape[0], count, generator=gen, dtype=q.dtype, device=q.device)
    for _ in range(2):  # projecting twice: orthogonal to q to rounding
        z = z - q @ (q.mT @ z)
    return torch.linalg.qr(z).Q


def _group_subspaces(
    mat: torch.Tensor, total: torch.Tensor, energy: float, strict: bool, out_dtype, backend: str
) -> list:
    """Bases of the matrices of one same-shaped group ``mat (b, s, o)`` (their left singular vectors; ``total``
    (b,) float64, all positive): :func:`~keeplora_kernels.sketch_growth.grow` with the rSVD of ``backend``."""
    b, s, o = mat.shape
    mn = min(s, o)
    tolerance = SUBSPACE_TOLERANCE[out_dtype]

    def select(items):
        idx = torch.tensor(items, device=mat.device)
        return mat.index_select(0, idx), total.index_select(0, idx)

    def sketch(items, r):
        sub, sub_total = (mat, total) if len(items) == b else select(items)
        # all l Ritz pairs of the same sketch (rank l, no oversampling): the convergence test needs pair p + 1
        u, sv, _ = _rsvd_callable(backend, r + _oversample(r), 0, _POWER_ITERS, 0)(sub, None)
        sq = sv[:, :r].to(torch.float64).square()
        cum = sq.cumsum(-1) / sub_total.unsqueeze(-1)
        reached = (cum[:, r - 1] >= energy).tolist()
        counts = energy_counts(cum, energy, strict).tolist()
        done = [k for k, hit in enumerate(reached) if hit]
        error = [math.inf] * len(items)
        if done:
            pick = torch.tensor(done, device=mat.device)
            for k, e in zip(
                done,
                ritz_subspace_error(
                    sub.index_select(0, pick), u.index_select(0, pick), [counts[k] for k in done]
                ).tolist(),
            ):
                error[k] = e
        sq_rows, totals = sq.cpu().tolist(), sub_total.tolist()
        outcome = []
        for k, (hit, p) in enumerate(zip(reached, counts)):
            if hit and error[k] <= tolerance:
                outcome.append((True, u[k, :, :p].to(out_dtype).contiguous()))
            elif hit:  # energy reached by Ritz vectors not converged yet: only a larger sketch tells
                outcome.append((False, 0.0))
            else:
                outcome.append((False, r + tail_count(sq_rows[k], energy * totals[k] - sum(sq_rows[k]), mn)))
        return outcome

    def exact(items):
        return _exact_subspace(*select(items), energy, strict, out_dtype, backend)

    start = min(max(8, mn // 32), mn)
    found = grow(range(b), start, mn, width=lambda r: r + _oversample(r), sketch=sketch, exact=exact)
    return [found[j] for j in range(b)]


def _principal_subspaces(weights: Sequence[torch.Tensor], energy: float, side: str, strict: bool, backend: str) -> list:
    """The bases of weights on one device; same-shaped weights (and dtype) are one batch."""
    out: list = [None] * len(weights)
    groups: dict = {}
    for i, w in enumerate(weights):
        groups.setdefault((tuple(w.shape), w.dtype), []).append(i)
    for (shape, dtype), members in groups.items():
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        side_dim, other = (shape[1], shape[0]) if side == "input" else shape
        device = weights[members[0]].device
        empty = torch.zeros(side_dim, 0, dtype=out_dtype, device=device)
        if energy <= 0 or min(side_dim, other) == 0:
            for i in members:
                out[i] = empty
            continue
        w = torch.stack([weights[i].detach() for i in members])
        mat = w.mT if side == "input" else w  # (b, side, other): its left singular vectors
        total = torch.stack([weights[i].detach().float().square().sum(dtype=torch.float64) for i in members])
        nonzero = [j for j, t in enumerate(total.tolist()) if t > 0]  # a zero weight has nothing to protect
        for j in set(range(len(members))) - set(nonzero):
            out[members[j]] = empty
        if not nonzero:
            continue
        if len(nonzero) < len(members):
            idx = torch.tensor(nonzero, device=device)
            mat, total = mat.index_select(0, idx), total.index_select(0, idx)
        for j, basis in zip(nonzero, _group_subspaces(mat, total, energy, strict, out_dtype, backend)):
            out[members[j]] = basis
    return out


def principal_subspace(
    weight: torch.Tensor | Sequence[torch.Tensor], energy: float, *, side: str = "input", strict: bool = False
):
    """Orthonormal basis of the principal subspace of a PyTorch weight ``W`` (``d_out × d_in``).

    Args:
        weight: one weight or a list of weights (of any shapes).
        energy: ε in [0, 1]; keep the leading singular directions holding that fraction of ``‖W‖_F²``.
        side: ``"input"`` (default, paper): right singular vectors of W, a ``d_in × p`` basis of the input space.
            ``"output"``: left singular vectors, ``d_out × p`` (the authors' CLIP code applies these on the input
            side, which only type-checks for square weights).
        strict: the authors' strict energy rule ``max(#{p : c_p < ε}, 1)`` instead of the paper's (see
            :func:`~keeplora_kernels.sketch_growth.energy_counts`).

    Returns a ``(d, p)`` fp32 tensor (fp64 for fp64 weights) with orthonormal columns (a list of them for a list
    input). Same-shaped weights of a list are computed as one batch (the engine passes all targets at once). The
    returned basis captures at least ``energy`` of ``‖W‖_F²`` and is within ``SUBSPACE_TOLERANCE`` (sine of the
    largest principal angle) of the exact principal subspace; see the module docstring for the algorithm.
    The randomized SVDs (and the exact path's CholeskyQR) run on the backend that ``rsvd`` selects: the C++/CUDA
    extension when built, else PyTorch.
    """
    if not 0.0 <= energy <= 1.0:
        raise ValueError(f"principal_subspace: energy must be in [0, 1], got {energy}")
    if side not in ("input", "output"):
        raise ValueError(f"principal_subspace: side must be 'input' or 'output', got {side!r}")
    weights = [weight] if isinstance(weight, torch.Tensor) else list(weight)
    for w in weights:
        if w.dim() != 2:
            raise ValueError(f"principal_subspace: each weight must be 2-D (d_out, d_in), got {tuple(w.shape)}")
        if not w.is_floating_point():
            raise ValueError(f"principal_subspace: weights must be floating point, got {w.dtype}")
    out: list = [None] * len(weights)
    by_device: dict = {}
    for i, w in enumerate(weights):
        by_device.setdefault(w.device, []).append(i)
    for device, members in by_device.items():  # one call per device; same-shaped weights are batched inside
        backend = _dispatch.select("rsvd", device)
        for i, basis in zip(
            members, _principal_subspaces([weights[i] for i in members], energy, side, strict, backend)
        ):
            out[i] = basis
    return out[0] if isinstance(weight, torch.Tensor) else out
