"""The pre-trained subspace against the authors' pipelines: the strict energy rule keeps at least one direction,
sketched bases are the exact principal subspace to the tolerance table on flat and slowly decaying spectra (both
backends), and the side and the energy rule are two options of KeepLoRAConfig."""

import math

import pytest
import torch

import keeplora_kernels as kk
from keeplora import KeepLoRA, KeepLoRAConfig
from keeplora_kernels import _dispatch
from keeplora_kernels.principal_subspace import SUBSPACE_TOLERANCE, ritz_subspace_error
from keeplora_kernels.rsvd import rsvd_torch
from keeplora_kernels.sketch_growth import tail_count
from support.ref_subspace import principal_subspace_ref
from support.tiny_models import CASES
from support.tolerances import SUBSPACE_SIN


@pytest.fixture(params=["extension", "torch"])
def backend(request, monkeypatch):
    if request.param == "extension" and "rsvd" not in _dispatch.extension_ops("cpu"):
        pytest.skip("the C++ extension is not built (KEEPLORA_BUILD_EXT=0 or no compiler)")
    monkeypatch.setenv("KEEPLORA_BACKEND", request.param)
    return request.param


def _with_spectrum(m, n, singular_values, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return (u * torch.as_tensor(singular_values, dtype=torch.float64)) @ v.T


def _exact(w, energy, side="input", strict=False):
    """The top-p eigenvectors of the float64 Gram matrix of the chosen side (p by the energy rule)."""
    x = w.double().T if side == "input" else w.double()
    evals, evecs = torch.linalg.eigh(x @ x.T)
    evals, evecs = evals.flip(-1).clamp_min(0), evecs.flip(-1)
    return evecs[:, : kk.energy_rank(evals, energy, strict=strict)]


def _sin_largest_angle(a, b):
    return torch.linalg.matrix_norm(a.double() @ a.double().T - b @ b.T, ord=2).item()


# ---------------------------------------------------------------------------------------------------------------
# the strict rule keeps at least one direction (the authors' max(p, 1))


def test_strict_rule_keeps_the_top_direction_when_it_alone_holds_the_energy():
    sq = torch.tensor([6.0, 2.0, 1.0, 1.0])  # cumulative 0.6, 0.8, 0.9, 1.0
    assert kk.energy_rank(sq, 0.2, strict=True) == 1  # #{c < 0.2} = 0; the authors keep max(0, 1)
    assert kk.energy_rank(sq, 0.6, strict=True) == 1  # c_1 = 0.6 is not < 0.6
    assert kk.energy_rank(sq, 0.85, strict=True) == 2
    assert kk.energy_rank(sq, 0.2) == 1
    assert kk.energy_rank(sq, 0.0, strict=True) == 0  # ε = 0 (ablation) and a zero spectrum keep nothing
    assert kk.energy_rank(torch.zeros(4), 0.5, strict=True) == 0


@pytest.mark.parametrize("side", ["input", "output"])
def test_strict_principal_subspace_keeps_one_direction_on_both_backends(backend, side):
    # the top direction holds 30/(30+…) ≈ 0.68 of the energy, above ε = 0.2 (the CLIP text tower's ε_w)
    w = _with_spectrum(48, 40, [30.0**0.5] + [1.0] * 14).float()
    for weights in (w, [w, w.clone()]):
        bases = kk.principal_subspace(weights, 0.2, side=side, strict=True)
        for basis in bases if isinstance(bases, list) else [bases]:
            exact = _exact(w, 0.2, side=side, strict=True)
            assert exact.shape[1] == 1 and basis.shape == exact.shape
            assert _sin_largest_angle(basis, exact) <= SUBSPACE_SIN[torch.float32]
    assert principal_subspace_ref(w, 0.2, side=side, strict=True).shape[1] == 1


# ---------------------------------------------------------------------------------------------------------------
# sketched bases are the exact principal subspace to the tolerance table


def test_library_tolerance_is_no_looser_than_the_table():
    for dtype, sin in SUBSPACE_SIN.items():
        assert SUBSPACE_TOLERANCE[dtype] <= sin


SPECTRA = {
    "flat": lambda k: [1.0 + 0.02 * (k - i) / k for i in range(k)],
    "decay_0.93": lambda k: [0.93**i for i in range(k)],
    "decay_0.99": lambda k: [0.99**i for i in range(k)],
}


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
@pytest.mark.parametrize("shape", [(64, 64), (160, 128), (300, 300)])
@pytest.mark.parametrize("strict", [False, True])
def test_sketched_subspace_is_the_exact_one_on_flat_and_slow_spectra(backend, spectrum, shape, strict):
    m, n = shape
    weights = [_with_spectrum(m, n, SPECTRA[spectrum](min(m, n)), seed=seed).float() for seed in range(2)]
    weights.append(torch.randn(m, n, generator=torch.Generator().manual_seed(5)) / math.sqrt(m))  # Marchenko–Pastur
    for energy in (0.05, 0.2, 0.5):
        bases = kk.principal_subspace(weights, energy, strict=strict)
        for w, basis in zip(weights, bases):
            exact = _exact(w, energy, strict=strict)
            assert basis.shape == exact.shape
            sin = _sin_largest_angle(basis, exact)
            assert sin <= SUBSPACE_SIN[torch.float32], (energy, sin)


def test_sketched_subspace_in_float64(backend):
    w = _with_spectrum(200, 160, [0.95**i for i in range(160)])
    for energy in (0.2, 0.6):
        basis = kk.principal_subspace(w, energy)
        assert basis.dtype == torch.float64
        assert _sin_largest_angle(basis, _exact(w, energy)) <= SUBSPACE_SIN[torch.float64]


@pytest.mark.parametrize("power_iters", [0, 1, 2, 6])
def test_ritz_subspace_error_bounds_the_true_angle(power_iters):
    """The acceptance estimate is not below the true largest angle, for converged and unconverged sketches."""
    for spectrum in ([0.93**i for i in range(96)], [0.8**i for i in range(96)], [1.0 / (1 + i) for i in range(96)]):
        w = _with_spectrum(128, 96, spectrum).float()
        mat = w.T.unsqueeze(0)  # input side: left singular vectors of Wᵀ
        u, _, _, _ = rsvd_torch(mat, 24, oversample=0, power_iters=power_iters, seed=0)
        x = mat[0].double()
        evecs = torch.linalg.eigh(x @ x.T)[1].flip(-1)
        for p in (1, 4, 10):
            estimate = ritz_subspace_error(mat, u, [p]).item()
            true = _sin_largest_angle(u[0, :, :p], evecs[:, :p])
            assert estimate >= true, (p, estimate, true)


def test_ritz_subspace_error_needs_pair_p_plus_one():
    with pytest.raises(ValueError, match="more than max"):
        ritz_subspace_error(torch.randn(1, 8, 6), torch.linalg.qr(torch.randn(1, 8, 3)).Q, [3])


def test_tail_count_never_below_the_flat_bound():
    assert tail_count([0.1], 0.35, 50) == 4  # one known value: the flat bound ceil(0.35 / 0.1)
    values = [0.5**i for i in range(8)]
    for deficit in (1e-3, 0.01, 0.05):
        assert tail_count(values, deficit, 100) >= deficit / values[-1]
    assert tail_count(values, 0.0, 100) == 0 and tail_count(values, 0.1, 8) == 0


# ---------------------------------------------------------------------------------------------------------------
# KeepLoRAConfig: side and energy rule as two options; 'official-clip' stays the alias it was


@pytest.mark.parametrize(
    "kwargs,side,rule,alias",
    [
        ({}, "input", "inclusive", "input"),
        ({"weight_subspace": "official-clip"}, "output", "strict", "official-clip"),
        ({"weight_energy_rule": "strict"}, "input", "strict", "input"),  # the authors' LLaVA pipeline
        ({"weight_subspace_side": "output"}, "output", "inclusive", "input"),
        ({"weight_subspace_side": "output", "weight_energy_rule": "strict"}, "output", "strict", "official-clip"),
        ({"weight_subspace": "official-clip", "weight_subspace_side": "output"}, "output", "strict", "official-clip"),
    ],
)
def test_config_resolves_side_and_rule(kwargs, side, rule, alias):
    cfg = KeepLoRAConfig(**kwargs)
    assert (cfg.weight_subspace_side, cfg.weight_energy_rule, cfg.weight_subspace) == (side, rule, alias)
    assert cfg.principal_subspace_options() == {"side": side, "strict": rule == "strict"}
    assert KeepLoRAConfig.from_dict(cfg.to_dict()) == cfg


def test_a_config_saved_before_the_options_loads_as_before():
    saved = KeepLoRAConfig(weight_subspace="official-clip").to_dict()
    del saved["weight_subspace_side"], saved["weight_energy_rule"]
    cfg = KeepLoRAConfig.from_dict(saved)
    assert cfg.principal_subspace_options() == {"side": "output", "strict": True}


@pytest.mark.parametrize(
    "options",
    [
        {"weight_subspace": "input"},
        {"weight_subspace": "official-clip"},
        {"weight_subspace_side": "output", "weight_energy_rule": "strict"},
        {"weight_energy_rule": "strict"},  # the authors' LLaVA pipeline: input side, strict rule
    ],
)
def test_engine_bases_follow_the_options(options):
    case = CASES["bert"]
    model = case.model()
    kl = KeepLoRA(model, KeepLoRAConfig(target_modules=case.targets, r=4, weight_energy=0.2, progress=False, **options))
    kwargs = kl.config.principal_subspace_options()
    for name, layer in kl.layers.items():
        expected = _exact(layer.base_layer.weight, 0.2, side=kwargs["side"], strict=kwargs["strict"])
        assert kl.bases[name].shape == expected.shape
        assert _sin_largest_angle(kl.bases[name], expected) <= SUBSPACE_SIN[torch.float32]
