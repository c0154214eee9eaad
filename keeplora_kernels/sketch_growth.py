"""The energy rule and the sketch-growth loop shared by the pre-trained principal subspace and the memory update.

Both find, per matrix of a batch, the leading singular (or eigen) directions that hold a fraction ε of an energy,
without knowing their number in advance. A randomized sketch of rank r gives Ritz values; a matrix whose sketch
reaches ε (and whose caller accepts the vectors) is done; for the others :func:`tail_count` predicts how many
directions are still missing, and the next sketch has rank :func:`grown_rank` (at least double). Once a sketch
would pass ``EXACT_FRACTION`` of the dimension, a sketch costs about as much as an exact eigendecomposition and is
less accurate, so the remaining matrices take the caller's exact path. :func:`grow` is that loop; each caller
supplies the sketch-and-accept step and the exact step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["EXACT_FRACTION", "energy_counts", "tail_count", "grown_rank", "grow"]

# A sketch wider than this fraction of the dimension hands the remaining matrices to the exact path.
EXACT_FRACTION = 0.3


def energy_counts(
    cumulative: torch.Tensor, energy: float, strict: bool = False, captured: torch.Tensor | None = None
) -> torch.Tensor:
    """Per row of cumulative energy fractions ``c_1 ≤ c_2 ≤ … ≤ c_k`` (last dim): how many leading directions the
    energy rule keeps, for ``energy > 0`` and a nonzero spectrum (callers handle those cases):

    * inclusive (paper): the smallest ``p ≥ 1`` with ``c_p ≥ energy`` (the first p whose energy before it,
      ``c_{p−1}`` with ``c_0 = captured``, is below ``energy`` and after it is not); ``k`` when even ``c_{k−1}``
      is below it (the caller checks ``c_k`` to tell "all k" from "not reached"). With ``captured`` (per row, the
      fraction already held before the first direction; 0 by default) it is 0 when that already reaches ``energy``.
    * strict (the authors' CLIP and LLaVA code): ``max(#{i : c_i < energy}, 1)``: one direction less than the
      inclusive rule where ``c_p`` does not land exactly on ``energy``, but never none (when the top direction
      alone holds ``energy`` the authors keep it).

    The inclusive count is the first crossing, so a row whose cumulative sum dips (rounding of eigenvalues near
    zero) still stops where the energy is first reached.
    """
    if strict:
        return (cumulative < energy).sum(-1).clamp_min(1)
    start = torch.zeros_like(cumulative[..., :1]) if captured is None else captured.unsqueeze(-1)
    before = torch.cat([start, cumulative[..., :-1]], -1)
    reached = before >= energy
    first = reached.to(torch.uint8).argmax(-1)  # the first maximum
    return torch.where(reached.any(-1), first, torch.full_like(first, before.shape[-1]))


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


def grow(
    items: Sequence[Any],
    rank: int,
    limit: int,
    *,
    width: Callable[[int], int],
    sketch: Callable[[list, int], list],
    exact: Callable[[list], list],
    clamp: Callable[[int, list], int] | None = None,
) -> dict:
    """The sketch-growth loop: returns ``{item: result}`` for every item.

    Per round, on the items not done yet: ``rank = clamp(rank, items)`` when given; if the sketch ``width(rank)``
    would pass ``EXACT_FRACTION · limit``, ``exact(items)`` gives their results (a list in item order) and the loop
    ends; else ``sketch(items, rank)`` gives per item ``(True, result)`` (accepted) or ``(False, need)``, ``need``
    the rank predicted to be enough for it (0 when only a larger sketch of the same kind can tell, e.g. unconverged
    vectors), and the next rank is :func:`grown_rank` of the largest need.
    """
    results: dict = {}
    todo = list(items)
    while todo:
        if clamp is not None:
            rank = clamp(rank, todo)
        if width(rank) > EXACT_FRACTION * limit:
            results.update(zip(todo, exact(todo)))
            break
        remaining, most = [], 0.0
        for item, (done, value) in zip(todo, sketch(todo, rank)):
            if done:
                results[item] = value
            else:
                remaining.append(item)
                most = max(most, value)
        todo, rank = remaining, grown_rank(rank, most, limit)
    return results
