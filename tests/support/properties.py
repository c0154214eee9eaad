"""Helpers of the hypothesis property tests: an example counter (printed in the terminal summary) and an
energy-rule oracle that shares no code with the library."""

from __future__ import annotations

import os
from fractions import Fraction

import torch

# Examples run per property test (test node id → count), printed by tests/conftest.py at the end of the session.
EXAMPLES: dict[str, int] = {}


def count_example() -> None:
    """Count one example of the running test (call it first thing inside a ``@given`` body)."""
    nodeid = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
    EXAMPLES[nodeid] = EXAMPLES.get(nodeid, 0) + 1


def energy_rank_loop(squared_singular_values, energy: float, *, strict: bool = False) -> int:
    """The energy rule by a plain loop over the cumulative energies ``c_p = Σ_{i≤p} σ_i² / Σσ²`` (descending σ):

    * inclusive: the smallest ``p`` with ``c_p ≥ ε`` (all of them when rounding keeps every ``c_p`` below ε);
    * strict: how many ``c_p`` are still below ε, but at least one.

    A zero spectrum or ``ε = 0`` keeps nothing. Exact rational arithmetic on the given floats, so the rule itself
    and not a rounding of it decides (ε = 1 keeps every nonzero direction)."""
    values = [Fraction(float(v)) for v in squared_singular_values]
    total = sum(values, Fraction(0))
    target = Fraction(float(energy))
    if target <= 0 or total <= 0:
        return 0
    running, below = Fraction(0), 0
    for p, v in enumerate(values, start=1):
        running += v
        if running / total < target:
            below += 1
        elif not strict:
            return p
    return max(below, 1) if strict else len(values)


def orthonormality_error(basis: torch.Tensor) -> float:
    """``max |PᵀP − I|`` in float64 (0 for an empty basis)."""
    p = basis.double()
    k = p.shape[-1]
    if k == 0:
        return 0.0
    return (p.mT @ p - torch.eye(k, dtype=torch.float64)).abs().max().item()
