"""The spec's "Guarantees to test", as properties on real transformers classes with random weights and data."""

import warnings

import pytest
import torch

from keeplora import KeepLoRA, KeepLoRAConfig, KeepLoRAWarning
from keeplora.adapters import target_weight
from support.tiny_models import CASES

ALL = sorted(CASES)


def make(case, **overrides):
    model = case.model()
    cfg = dict(
        target_modules=case.targets,
        r=4,
        alpha=4.0,
        weight_energy=case.weight_energy,
        feature_energy=0.9,
        progress=False,
    )
    cfg.update(overrides)
    return model, KeepLoRA(model, KeepLoRAConfig(**cfg))


def train(kl, case, data, steps=3, lr=5e-2):
    kl.model.train()
    opt = torch.optim.AdamW(kl.trainable_parameters(), lr=lr)
    for step in range(steps):
        loss = case.loss(kl.model, data[step % len(data)])
        loss.backward()
        opt.step()
        opt.zero_grad()
    kl.model.eval()


def adapter(kl, name):
    layer = kl.layers[name]
    return layer.lora_A[kl.adapter_name].weight.t().double(), layer.lora_B[kl.adapter_name].weight.t().double()


def effective_weight(kl, name):
    layer = kl.layers[name]
    a, b = adapter(kl, name)
    return target_weight(layer).double() + kl.config.scale * (a @ b).t()


def outputs(model, case, batch):
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    return (
        out.logits
        if hasattr(out, "logits") and out.logits is not None
        else (out.last_hidden_state if hasattr(out, "last_hidden_state") else out.text_embeds)
    )


@pytest.mark.parametrize("case_name", ALL)
@pytest.mark.parametrize("b_init", ["gradient", "zero"])
def test_begin_task_preserves_the_function(case_name, b_init):
    case = CASES[case_name]
    model, kl = make(case, b_init=b_init)
    data = case.batches()
    before = outputs(model, case, data[0])
    kl.begin_task(data, case.loss)
    after = outputs(model, case, data[0])
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    if b_init == "gradient":  # the adapter is not trivially zero: the weights really moved
        assert any(adapter(kl, n)[1].abs().max() > 0 for n in kl.layers)


@pytest.mark.parametrize("case_name", ALL)
def test_adapter_is_orthonormal_and_orthogonal_to_the_protected_basis(case_name):
    case = CASES[case_name]
    model, kl = make(case)
    kl.begin_task(case.batches(), case.loss)
    for name in kl.layers:
        a, _ = adapter(kl, name)
        p = kl.bases[name].double()
        assert p.shape[1] > 0 or kl.config.weight_energy_for(name) == 0
        torch.testing.assert_close(a.t() @ a, torch.eye(a.shape[1], dtype=torch.float64), atol=1e-5, rtol=0)
        assert (p.t() @ a).abs().max() < 1e-5
        assert (a.gather(0, a.abs().argmax(0, keepdim=True)) > 0).all()  # signs fixed: largest entry positive


def test_the_adapter_sign_convention_changes_no_result(monkeypatch):
    """Flipping every adapter direction's sign (A's column with B's row) mirrors training exactly: after AdamW steps
    and end_task, the merged weights and the memory are bit-identical. So fixing the signs costs nothing."""
    from keeplora import engine

    case = CASES["llama"]
    results = []
    for flip in (False, True):
        if flip:
            canonical = engine._canonical_signs
            monkeypatch.setattr(engine, "_canonical_signs", lambda a: -canonical(a))
        model, kl = make(case)
        data = case.batches()
        kl.begin_task(data, case.loss)
        train(kl, case, data, steps=3)
        kl.end_task(data, case.loss)
        results.append({n: (target_weight(kl.layers[n]).clone(), kl.bases[n].clone()) for n in kl.layers})
    for name, (w, basis) in results[0].items():
        assert not torch.equal(w, CASES["llama"].model().get_submodule(name).weight)  # training moved it
        assert torch.equal(results[1][name][0], w), name
        assert torch.equal(results[1][name][1], basis), name


@pytest.mark.parametrize("case_name", ALL)
def test_no_interference_inside_the_protected_subspace(case_name):
    """For x ∈ span(P), the module's response is unchanged by training the task and by later tasks."""
    case = CASES[case_name]
    model, kl = make(case)
    g = torch.Generator().manual_seed(5)
    for task in range(2):
        data = case.batches(seed=task)
        bases = {n: p.clone().double() for n, p in kl.bases.items()}
        weights = {n: effective_weight(kl, n) for n in kl.layers}
        kl.begin_task(data, case.loss)
        train(kl, case, data, steps=4)
        kl.end_task(data, case.loss)
        changed = 0
        for name in kl.layers:
            p = bases[name]
            x = p @ torch.randn(p.shape[1], 5, generator=g, dtype=torch.float64)  # inputs in span(P)
            new = effective_weight(kl, name)
            torch.testing.assert_close(new @ x, weights[name] @ x, atol=1e-5, rtol=0)
            changed += int((new - weights[name]).abs().max() > 1e-4)
        assert changed > 0  # training did change the weights elsewhere


@pytest.mark.parametrize("case_name", ["bert", "llama"])
def test_one_sgd_step_on_b_is_the_projected_weight_step(case_name):
    """Prop. 3.1: ΔW = −η·s²·(A·Aᵀ·Gᵀ)ᵀ, G = ∂L/∂W at the current weights."""
    case = CASES[case_name]
    model, kl = make(case)
    data = case.batches()
    kl.begin_task(data, case.loss)
    train(kl, case, data, steps=2)  # move B away from its initial value first
    batch = data[1]
    base_weights = {n: target_weight(kl.layers[n]) for n in kl.layers}
    for w in base_weights.values():  # autograd gradient of the effective weight (PEFT's general forward path)
        w.requires_grad_(True)
    loss = case.loss(model, batch)
    loss.backward()
    grads = {n: w.grad.double().clone() for n, w in base_weights.items()}
    for w in base_weights.values():
        w.grad = None
        w.requires_grad_(False)
    before = {n: effective_weight(kl, n) for n in kl.layers}
    lr = 0.1
    with torch.no_grad():
        for p in kl.trainable_parameters():
            p -= lr * p.grad
            p.grad = None
    s = kl.config.scale
    for name in kl.layers:
        a, _ = adapter(kl, name)
        expected = -lr * s**2 * (a @ a.t() @ grads[name].t()).t()
        torch.testing.assert_close(effective_weight(kl, name) - before[name], expected, atol=1e-6, rtol=1e-4)


def _reference_gradients(case, model, kl, data):
    """Mean over batches of ∂L/∂W by plain autograd, in eval mode."""
    weights = {n: target_weight(kl.layers[n]) for n in kl.layers}
    total = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
    for batch in data:
        case.loss(model, batch).backward()
        for n, w in weights.items():
            total[n] += w.grad.double()
            w.grad = None
    for w in weights.values():
        w.requires_grad_(False)
    return {n: t / len(data) for n, t in total.items()}


def _residual_gradients(case, model, kl, data):
    """``Ĝ = (I − PPᵀ)·Gᵀ`` per target with the bases before begin_task, from the autograd gradients."""
    grads = _reference_gradients(case, model, kl, data)
    out = {}
    for name, p in kl.bases.items():
        p = p.double()
        out[name] = grads[name].t() - p @ (p.t() @ grads[name].t())
    return out


@pytest.mark.parametrize("case_name", ["bert", "clip"])
def test_adapter_maximises_the_projected_gradient(case_name):
    """Prop. 3.2: A spans the top-r left singular subspace of Ĝ = (I − PPᵀ)·Gᵀ, and B = Aᵀ·Ĝ."""
    case = CASES[case_name]
    model, kl = make(case, svd_method="exact")
    data = case.batches()
    residuals = _residual_gradients(case, model, kl, data)
    kl.begin_task(data, case.loss)
    for name, residual in residuals.items():
        u, s, _ = torch.linalg.svd(residual)
        a, b = adapter(kl, name)
        r = a.shape[1]
        captured = torch.linalg.matrix_norm(a.t() @ residual) ** 2
        optimal = (s[:r] ** 2).sum()
        assert captured >= optimal * (1 - 1e-6) - 1e-14
        if s[r - 1] > 1.01 * s[r]:  # a spectral gap makes the subspace unique
            torch.testing.assert_close(a @ a.t(), u[:, :r] @ u[:, :r].t(), atol=1e-4, rtol=0)
        torch.testing.assert_close(b, a.t() @ residual, atol=1e-6, rtol=1e-4)


def test_randomized_svd_init_captures_the_projected_gradient():
    case = CASES["bert"]
    model, kl = make(case, svd_method="randomized", svd_oversample=4, svd_power_iters=4)
    data = case.batches()
    residuals = _residual_gradients(case, model, kl, data)
    kl.begin_task(data, case.loss)
    for name, residual in residuals.items():
        s = torch.linalg.svdvals(residual)
        a, _ = adapter(kl, name)
        captured = torch.linalg.matrix_norm(a.t() @ residual) ** 2
        assert captured >= 0.999 * (s[: a.shape[1]] ** 2).sum()


@pytest.mark.parametrize("case_name", ALL)
def test_pretrained_bases_follow_the_energy_rule(case_name):
    case = CASES[case_name]
    model, kl = make(case)
    for name, layer in kl.layers.items():
        w = target_weight(layer).double()
        _, s, vh = torch.linalg.svd(w)
        frac = torch.cumsum(s**2, 0) / (s**2).sum()
        energy = kl.config.weight_energy_for(name)
        p = 0 if energy == 0 else int(torch.nonzero(frac >= energy - 1e-12)[0]) + 1
        basis = kl.bases[name].double()
        assert basis.shape == (layer.in_features, p)
        torch.testing.assert_close(basis @ basis.t(), vh[:p].t() @ vh[:p], atol=1e-5, rtol=0)


def _stacked_inputs(case, model, kl, data):
    """Every target's real-token inputs, collected by independent hooks (masks applied by hand)."""
    rows = {n: [] for n in kl.layers}
    current = {}

    def hook(name):
        def fn(_m, args, _out):
            x = args[0].detach().double()
            mask = current.get("mask")
            if mask is not None and x.shape[:-1] == mask.shape:
                x = x[mask.bool()]
            rows[name].append(x.reshape(-1, x.shape[-1]))

        return fn

    handles = [layer.register_forward_hook(hook(n)) for n, layer in kl.layers.items()]
    with torch.no_grad():
        for batch in data:
            current["mask"] = batch.get("attention_mask")
            case.loss(model, batch)
    for h in handles:
        h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


@pytest.mark.parametrize("case_name", ALL)
def test_memory_grows_by_the_energy_rule_on_the_stacked_features(case_name):
    """The eigen rule on Σxxᵀ equals the SVD rule on the stacked real-token features X (λ = σ²)."""
    case = CASES[case_name]
    model, kl = make(case, feature_energy=0.95)
    data = case.batches()
    kl.begin_task(data, case.loss)
    train(kl, case, data, steps=2)
    old = {n: p.double().clone() for n, p in kl.bases.items()}
    features = _stacked_inputs(case, model, kl, data)  # the adapter is still active: the merged function
    kl.end_task(data, case.loss)
    for name in kl.layers:
        x, p = features[name], old[name]
        total = (x**2).sum()
        residual = x - (x @ p) @ p.t()  # rows projected onto the complement of span(P)
        _, s, vh = torch.linalg.svd(residual, full_matrices=False)
        captured = (total - (residual**2).sum()) / total
        added = 0
        while captured < 0.95 and added < x.shape[1] - p.shape[1]:
            captured += s[added] ** 2 / total
            added += 1
        new = kl.bases[name].double()
        assert new.shape[1] == p.shape[1] + added, name
        torch.testing.assert_close(new[:, : p.shape[1]], p)
        torch.testing.assert_close(new.t() @ new, torch.eye(new.shape[1], dtype=torch.float64), atol=1e-5, rtol=0)
        if added and s[added - 1] > 1.01 * s[added]:
            block = new[:, p.shape[1] :]
            torch.testing.assert_close(block @ block.t(), vh[:added].t() @ vh[:added], atol=1e-4, rtol=0)


def test_bases_stay_orthonormal_are_capped_and_a_full_basis_gives_a_zero_adapter():
    case = CASES["bert"]
    model, kl = make(case, feature_energy=1.0, weight_energy=0.99)
    d_in = {n: layer.in_features for n, layer in kl.layers.items()}
    for task in range(3):
        data = case.batches(n=4, seed=task)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KeepLoRAWarning)
            kl.begin_task(data, case.loss)
        train(kl, case, data, steps=2)
        kl.end_task(data, case.loss)
        for name, p in kl.bases.items():
            assert p.shape[1] <= d_in[name]
            torch.testing.assert_close(p.t() @ p, torch.eye(p.shape[1]), atol=1e-5, rtol=0)
    full = [n for n, p in kl.bases.items() if p.shape[1] == d_in[n]]
    assert full, "ε_f = 1 should fill some bases within three tasks"
    weights = {n: target_weight(kl.layers[n]).clone() for n in full}
    data = case.batches(seed=9)
    with pytest.warns(KeepLoRAWarning, match="spans all of"):
        kl.begin_task(data, case.loss)
    for name in full:
        a, b = adapter(kl, name)
        assert a.abs().max() == 0 and b.abs().max() == 0
    train(kl, case, data, steps=2)
    kl.end_task(data, case.loss)
    for name in full:
        assert torch.equal(target_weight(kl.layers[name]), weights[name])


def test_random_a_ablation_stays_in_the_residual_subspace():
    case = CASES["bert"]
    model, kl = make(case, a_init="random")
    kl.begin_task(case.batches(), case.loss)
    for name in kl.layers:
        a, _ = adapter(kl, name)
        assert (kl.bases[name].double().t() @ a).abs().max() < 1e-5
        torch.testing.assert_close(a.t() @ a, torch.eye(a.shape[1], dtype=torch.float64), atol=1e-5, rtol=0)
