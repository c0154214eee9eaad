"""Linear algebra of the protected basis P (``d_in × k``, orthonormal, fp32/fp64): never a dense ``P·Pᵀ``."""

from __future__ import annotations

import torch

import keeplora_kernels as kk
from keeplora_kernels.sketch_growth import energy_counts, grow, tail_count

from .batching import bounded_batches


def orthonormalize_against(
    block: torch.Tensor,
    basis: torch.Tensor,
    *,
    fill_to: int | None = None,
    generator: torch.Generator | None = None,
    tol: float = 1e-6,
) -> torch.Tensor:
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


def _orthonormalize_columns(
    v: torch.Tensor, basis: torch.Tensor, want: int, generator: torch.Generator | None, tol: float
) -> torch.Tensor:
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


# The memory update's randomized path: only for inputs this wide (below, a batched eigh of the d×d moment is cheap;
# above, it dominates the end of a task: benchmarks/results/), starting from this many directions and growing while
# the energy is not reached, until the sketch would pass a fraction of d (then eigh: sketch_growth.EXACT_FRACTION).
RANDOMIZED_MIN_DIM = 2048
RANDOMIZED_START = 32


def expand_bases(
    bases: dict[str, torch.Tensor],
    moments: dict[str, torch.Tensor],
    energy: float,
    *,
    method: str = "exact",
    oversample: int = 8,
    power_iters: int = 4,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Grow each P by the GPM energy rule (docs/algorithm.md); returns the new bases (``d × (k + added)``, ≤ d columns).

    ``total = trace(C)``; ``C_r = (I − P·Pᵀ)·C·(I − P·Pᵀ)``; eigenpairs ``(λ_i, u_i)`` of ``C_r``, descending;
    ``captured = (total − trace(C_r)) / total``; append ``u_1, u_2, …`` while ``captured < energy``
    (``captured += λ_i / total`` after each). Equals the SVD rule on the stacked feature matrix. One batched
    projection per input size, in memory-bounded batches (bases of one size are zero-padded to a common width; zero
    columns do not change ``P·Pᵀ``), then the eigenvectors:

    * ``method="exact"``: a batched ``eigh`` of ``C_r``;
    * ``method="randomized"``: the leading Ritz vectors of ``C_r`` from the batched randomized SVD (``oversample``,
      ``power_iters``, ``seed``), ranked by their Rayleigh quotients ``uᵀ·C_r·u`` (the energy each one really adds),
      the sketch growing (``grown_rank``: at least doubling, and at least to 1.2× the count predicted from the
      Ritz values by ``tail_count``: the extrapolated tail, never below the bound from the smallest one) until
      the rule is met, ``eigh`` once it would pass a fraction of d. The directions added always reach the energy
      (it is counted with the Rayleigh quotients); their number is the exact one or, on spectra without a gap at
      the cut, a few more;
    * ``method="auto"``: randomized for inputs of ``RANDOMIZED_MIN_DIM`` or more, exact below.
    """
    if method not in ("exact", "randomized", "auto"):
        raise ValueError(f"expand_bases: method must be 'exact', 'randomized' or 'auto', got {method!r}")
    out = dict(bases)
    if energy <= 0:
        return out
    by_size: dict[int, list[str]] = {}
    for name, basis in bases.items():
        d, k = basis.shape
        if k < d and bool(torch.trace(moments[name]) > 0):
            by_size.setdefault(d, []).append(name)
    batches = [
        (d, names)
        for d, group in by_size.items()
        for names in bounded_batches(group, 4 * d * d * bases[group[0]].element_size())
    ]  # ~4 d×d copies
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
        totals = torch.stack([torch.trace(moments[n].to(dtype)) for n in names])
        captured = (totals - torch.diagonal(c_res, dim1=-2, dim2=-1).sum(-1)) / totals
        free = [d - bases[n].shape[1] for n in names]
        randomized = method == "randomized" or (method == "auto" and d >= RANDOMIZED_MIN_DIM)
        if randomized:
            chosen = _ritz_directions(c_res, captured, totals, energy, free, oversample, power_iters, seed)
        else:
            chosen = _eigen_directions(c_res, captured, totals, energy, free)
        for n, directions in zip(names, chosen):
            if directions.shape[1]:
                out[n] = torch.cat([bases[n], orthonormalize_against(directions, bases[n])], 1)
    return out


def _first_reaching(values: torch.Tensor, captured: torch.Tensor, totals: torch.Tensor, energy: float) -> list:
    """Per row: how many of the leading directions (energies ``values``, descending) the rule appends, or None
    when even all of them leave the captured energy below ``energy``."""
    fractions = values / totals[:, None]
    after = captured[:, None] + torch.cumsum(fractions, -1)  # captured after appending directions 1 … k
    counts = energy_counts(after, energy, captured=captured).cpu()
    reached = (after[:, -1] >= energy).cpu() | (counts < values.shape[-1])
    return [int(c) if bool(hit) else None for c, hit in zip(counts, reached)]


def _eigen_directions(c_res, captured, totals, energy, free) -> list[torch.Tensor]:
    eigenvalues, eigenvectors = torch.linalg.eigh(c_res)
    eigenvalues, eigenvectors = eigenvalues.flip(-1), eigenvectors.flip(-1)
    counts = _first_reaching(eigenvalues, captured, totals, energy)
    return [eigenvectors[i, :, : min(free[i] if count is None else count, free[i])] for i, count in enumerate(counts)]


def _ritz_directions(c_res, captured, totals, energy, free, oversample, power_iters, seed) -> list[torch.Tensor]:
    """The directions to append, from sketches of ``C_r`` grown by ``sketch_growth.grow`` (eigh past its limit)."""
    d = c_res.shape[-1]

    def sketch(items, k):
        c = c_res[items]
        u, _, _ = kk.rsvd(c, k, oversample=oversample, power_iters=power_iters, seed=seed)
        u = u.to(c.dtype)
        rayleigh = ((c @ u) * u).sum(-2)  # the energy each Ritz vector adds: uᵀ·C_r·u
        rayleigh, order = rayleigh.sort(-1, descending=True)
        u = torch.gather(u, -1, order[:, None, :].expand_as(u))
        counts = _first_reaching(rayleigh, captured[items], totals[items], energy)
        # directions still missing: the extrapolated tail predicts how many, never fewer than the lower bound
        # (energy − captured after all k) / the smallest Ritz value (no later direction holds more: eigenvalue
        # interlacing), so that a large need goes to eigh after one round
        fractions = (rayleigh / totals[items, None]).double().cpu()
        after = captured[items].double().cpu() + fractions.sum(-1)
        outcome = []
        for j, (i, count) in enumerate(zip(items, counts)):
            if count is not None:
                outcome.append((True, u[j, :, : min(count, free[i])]))
            elif k >= free[i]:  # every direction left is needed
                outcome.append((True, u[j, :, : free[i]]))
            else:
                outcome.append((False, k + tail_count(fractions[j].tolist(), energy - float(after[j]), d)))
        return outcome

    def exact(items):
        return _eigen_directions(c_res[items], captured[items], totals[items], energy, [free[i] for i in items])

    found = grow(
        range(len(free)),
        RANDOMIZED_START,
        d,
        width=lambda k: k + oversample,
        sketch=sketch,
        exact=exact,
        clamp=lambda k, items: min(k, max(free[i] for i in items)),
    )
    return [found[i] for i in range(len(free))]


def random_residual_directions(basis: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random orthonormal directions orthogonal to ``span(basis)`` (the random-A ablation)."""
    gauss = torch.randn(basis.shape[0], count, generator=generator, dtype=basis.dtype, device="cpu")
    return orthonormalize_against(gauss.to(basis.device), basis, fill_to=count, generator=generator)
