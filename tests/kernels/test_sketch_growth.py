"""The energy rule and the sketch-growth loop shared by the principal subspace and the memory update."""

import pytest
import torch

from keeplora_kernels.sketch_growth import EXACT_FRACTION, energy_counts, grow, grown_rank


def _smallest_reaching(cumulative, energy, captured=0.0):
    for p, before in enumerate([captured] + cumulative[:-1]):
        if before >= energy:
            return p
    return len(cumulative)


@pytest.mark.parametrize("energy", [0.1, 0.5, 0.9, 0.999])
def test_inclusive_rule_is_the_first_crossing(energy):
    g = torch.Generator().manual_seed(0)
    sq = torch.rand(6, 40, generator=g, dtype=torch.float64).sort(-1, descending=True).values
    cum = sq.cumsum(-1) / sq.sum(-1, keepdim=True)
    counts = energy_counts(cum, energy).tolist()
    assert counts == [_smallest_reaching(row, energy) for row in cum.tolist()]
    assert all(
        1 <= c <= 40 and cum[i, c - 1] >= energy and (c == 1 or cum[i, c - 2] < energy) for i, c in enumerate(counts)
    )
    strict = energy_counts(cum, energy, strict=True).tolist()
    assert strict == [max(int((row < energy).sum()), 1) for row in cum]


def test_captured_energy_before_the_first_direction_counts():
    cum = torch.tensor([[0.55, 0.62, 0.7], [0.3, 0.5, 0.6], [0.75, 0.76, 0.77]], dtype=torch.float64)
    captured = torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)
    # row 0 reaches 0.6 with its second direction; row 1 never (all three, the caller sees c_3 < 0.6); row 2 holds
    # 0.6 before the first direction: nothing to add
    assert energy_counts(cum, 0.6, captured=captured).tolist() == [2, 3, 0]


def test_a_dip_after_the_crossing_does_not_move_the_count():
    cum = torch.tensor([[0.4, 0.9, 0.89, 0.95]], dtype=torch.float64)  # rounding of a tiny negative eigenvalue
    assert energy_counts(cum, 0.895).tolist() == [2]


def test_grow_doubles_or_follows_the_prediction_and_hands_over_to_the_exact_path():
    need = {"a": 5, "b": 40, "c": 300, "d": 20}
    ranks, exact_items = [], []

    def sketch(items, r):
        ranks.append(r)
        return [(True, f"{i}@{r}") if r >= need[i] else (False, need[i] if i != "d" else 0.0) for i in items]

    def exact(items):
        exact_items.extend(items)
        return [f"{i}:exact" for i in items]

    found = grow(["a", "b", "c", "d"], 8, 1000, width=lambda r: r + 10, sketch=sketch, exact=exact)
    # 8 -> max(16, 1.2 * 300) = 360 passes 0.3 * 1000 with its width: the exact path takes b, c and d
    assert ranks == [8]
    assert found == {"a": "a@8", "b": "b:exact", "c": "c:exact", "d": "d:exact"} and exact_items == ["b", "c", "d"]

    ranks.clear()
    need["c"] = 30
    found = grow(["a", "b", "c", "d"], 8, 1000, width=lambda r: r + 10, sketch=sketch, exact=exact)
    assert ranks == [8, grown_rank(8, 40, 1000)] == [8, 48]  # 1.2 × the largest need (b's 40) beats doubling
    assert found == {"a": "a@8", "b": "b@48", "c": "c@48", "d": "d@48"}


def test_grow_applies_the_clamp_before_the_exact_test():
    seen = []

    def sketch(items, r):
        seen.append(r)
        return [(r >= 6, "done" if r >= 6 else 0.0) for _ in items]

    found = grow(
        [0],
        4,
        100,
        width=lambda r: r,
        sketch=sketch,
        exact=lambda items: ["exact"] * len(items),
        clamp=lambda r, items: min(r, 6),
    )
    assert seen == [4, 6] and found == {0: "done"}  # the second round is clamped from 8 to 6
    # a width past the fraction hands over to the exact path before any sketch
    assert grow([0], 31, 100, width=lambda r: r, sketch=sketch, exact=lambda items: ["exact"]) == {0: "exact"}
    assert seen == [4, 6] and EXACT_FRACTION * 100 < 31
