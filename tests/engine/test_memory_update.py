"""The memory update (``expand_bases``): exact eigh path and the randomized Ritz path give the GPM energy rule."""

import pytest
import torch

from keeplora import basis as basis_module
from keeplora.basis import expand_bases
from keeplora_kernels.sketch_growth import tail_count

D = 256


def _moment(d: int, spectrum: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    return ((q * spectrum) @ q.T).float()


def _old_basis(d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 100)
    return torch.linalg.qr(torch.randn(d, k, generator=g)).Q


def _captured(basis: torch.Tensor, c: torch.Tensor) -> float:
    return float(torch.trace(basis.T.double() @ c.double() @ basis.double()) / torch.trace(c.double()))


SPECTRA = {
    # a gap after 12 directions: the rule's cut is well defined
    "gapped": torch.cat([torch.linspace(10, 5, 12), torch.full((D - 12,), 0.01)]).double(),
    # power-law decay, no gap anywhere
    "power": (torch.arange(1, D + 1, dtype=torch.float64) ** -1.2),
}


@pytest.mark.parametrize("spectrum", list(SPECTRA))
@pytest.mark.parametrize("energy", [0.5, 0.9])
def test_randomized_update_meets_the_rule_like_the_exact_one(spectrum, energy, monkeypatch):
    monkeypatch.setattr(basis_module, "RANDOMIZED_START", 8)  # small d: start small so that the sketch path runs
    names = ["a", "b", "c"]
    moments = {n: _moment(D, SPECTRA[spectrum], seed=i) for i, n in enumerate(names)}
    bases = {n: _old_basis(D, 4 * i, seed=i) for i, n in enumerate(names)}  # widths 0, 4, 8
    exact = expand_bases(bases, moments, energy, method="exact")
    fast = expand_bases(bases, moments, energy, method="randomized", oversample=8, power_iters=4, seed=3)
    for n in names:
        k_old, k_exact, k_fast = bases[n].shape[1], exact[n].shape[1], fast[n].shape[1]
        torch.testing.assert_close(fast[n][:, :k_old], bases[n])  # the old basis is kept as is
        eye = torch.eye(k_fast)
        assert (fast[n].T @ fast[n] - eye).abs().max() < 1e-5  # orthonormal
        assert _captured(fast[n], moments[n]) >= energy - 1e-6  # the rule is met
        if k_exact > k_old:  # nothing is added when the old basis already holds the energy, on both paths
            assert k_exact <= k_fast <= k_exact + (0 if spectrum == "gapped" else 3), (k_exact, k_fast)
        else:
            assert k_fast == k_old
        if spectrum == "gapped" and k_fast > k_old:  # a gap pins the subspace down: the same directions
            pe, pf = exact[n][:, k_old:], fast[n][:, k_old:]
            assert torch.linalg.matrix_norm(pe @ pe.T - pf @ pf.T, ord=2) < 1e-3


def test_randomized_update_falls_back_to_eigh_when_many_directions_are_needed(monkeypatch):
    monkeypatch.setattr(basis_module, "RANDOMIZED_START", 8)
    moments = {"a": _moment(D, SPECTRA["power"], seed=0)}
    bases = {"a": torch.zeros(D, 0)}
    calls = []
    real = basis_module._eigen_directions
    monkeypatch.setattr(basis_module, "_eigen_directions", lambda *a: calls.append(1) or real(*a))
    sketches = []
    real_rsvd = basis_module.kk.rsvd
    monkeypatch.setattr(basis_module.kk, "rsvd", lambda *a, **k: sketches.append(a[1]) or real_rsvd(*a, **k))
    exact = expand_bases(bases, moments, 0.99, method="exact")
    calls.clear()
    fast = expand_bases(bases, moments, 0.99, method="randomized")
    assert calls and exact["a"].shape[1] > 0.3 * D  # the sketch would have passed 0.3·d: eigh took over
    # the extrapolated tail predicts the need after the first sketch and hands over to eigh at once, where
    # doubling alone would have taken four sketches (8, 16, 32, 64) and the smallest-Ritz-value bound two
    assert sketches == [8], sketches
    torch.testing.assert_close(fast["a"] @ fast["a"].T, exact["a"] @ exact["a"].T)


@pytest.mark.parametrize("family", ["power", "geometric"])
def test_tail_count_is_exact_on_power_laws_and_low_on_faster_decay(family):
    d, k = 600, 40
    i = torch.arange(1, d + 1, dtype=torch.float64)
    spectrum = i**-1.3 if family == "power" else 0.97**i
    spectrum = spectrum / spectrum.sum()
    for needed in (1, 25, 200):
        deficit = float(spectrum[k : k + needed].sum())
        predicted = tail_count(spectrum[:k], deficit * (1 - 1e-9), d)
        if family == "power":  # the power-law fit is exact on its own family
            assert predicted == needed
        else:  # faster decay: the power law reaches first and underestimates (a later round corrects it), so a
            assert 1 <= predicted <= needed  # small need is never sent to eigh on this family
    assert tail_count(spectrum[:k], 2.0, d) == d - k  # unreachable: every remaining direction
    assert tail_count(spectrum[:k], 0.0, d) == 0


def test_auto_is_exact_below_the_size_threshold():
    moments = {"a": _moment(D, SPECTRA["power"], seed=1)}
    bases = {"a": _old_basis(D, 5, seed=1)}
    assert basis_module.RANDOMIZED_MIN_DIM > D
    auto = expand_bases(bases, moments, 0.8, method="auto")
    exact = expand_bases(bases, moments, 0.8, method="exact")
    assert torch.equal(auto["a"], exact["a"])


def test_bad_method_names_the_accepted_ones():
    with pytest.raises(ValueError, match="'exact', 'randomized' or 'auto'"):
        expand_bases({"a": torch.zeros(4, 0)}, {"a": torch.eye(4)}, 0.5, method="svd")
