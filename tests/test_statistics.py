"""The data passes: target-only gradients, exact masked second moments, evenly spaced subsets."""

import pytest
import torch

from keeplora import KeepLoRA, KeepLoRAConfig
from keeplora.statistics import collect_second_moments, estimate_gradients, evenly_spaced
from tiny_models import CASES


def make(case_name, **overrides):
    case = CASES[case_name]
    model = case.model()
    cfg = dict(target_modules=case.targets, r=4, alpha=4.0, weight_energy=case.weight_energy, progress=False)
    cfg.update(overrides)
    return case, model, KeepLoRA(model, KeepLoRAConfig(**cfg))


@pytest.mark.parametrize("case_name", ["bert", "clip", "llama"])
def test_gradient_estimate_equals_autograd_and_touches_no_grad(case_name):
    case, model, kl = make(case_name)
    data = case.batches(n=3)
    head = torch.nn.Parameter(torch.ones(()))  # a user parameter in the loss must not get .grad either

    def loss_fn(m, b):
        return case.loss(m, b) * head

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = estimate_gradients(model, kl.layers, data, loss_fn, device=torch.device("cpu"), dtype=torch.float64)
    assert all(p.grad is None for p in model.parameters()) and head.grad is None
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {n: kl.layers[n].base_layer.weight for n in kl.layers}
    for w in weights.values():
        w.requires_grad_(True)
    expected = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in weights.items()}
    for b in data:
        case.loss(model, b).backward()
        for n, w in weights.items():
            expected[n] += w.grad.double() / len(data)
            w.grad = None
    for n in weights:
        torch.testing.assert_close(grads[n], expected[n], rtol=1e-5, atol=1e-7)


def test_second_moments_count_only_real_tokens_per_tower():
    """CLIP: text inputs are masked by the text attention mask, vision inputs count every patch."""
    case, model, kl = make("clip")
    data = case.batches(n=2)
    moments, tokens = collect_second_moments(model, kl.layers, data, case.loss, device=torch.device("cpu"),
                                             dtype=torch.float64)
    seen = {n: torch.zeros_like(m) for n, m in moments.items()}
    count = {n: 0 for n in moments}
    current = {}

    def hook(name):
        def fn(_m, args, _o):
            x = args[0].double()
            if "text_model" in name:
                x = x[current["mask"].bool()]
            x = x.reshape(-1, x.shape[-1])
            seen[name] += x.t() @ x
            count[name] += x.shape[0]
        return fn

    handles = [layer.register_forward_hook(hook(n)) for n, layer in kl.layers.items()]
    with torch.no_grad():
        for b in data:
            current["mask"] = b["attention_mask"]
            case.loss(model, b)
    for h in handles:
        h.remove()
    n_text = int(sum(b["attention_mask"].sum() for b in data))
    for n in moments:
        torch.testing.assert_close(moments[n], seen[n])
        assert tokens[n] == count[n]
        if "text_model" in n:
            assert tokens[n] == n_text
        else:
            assert tokens[n] == 2 * 4 * 5  # batches × images × (4 patches + CLS)


@pytest.mark.parametrize("fraction,count,expected", [
    (1.0, 5, [0, 1, 2, 3, 4]), (0.2, 10, [0, 5]), (0.5, 5, [0, 2, 4]), (0.01, 3, [0])])
def test_evenly_spaced_subset(fraction, count, expected):
    assert [i for i, _ in evenly_spaced(range(count), fraction)] == expected


def test_grad_data_fraction_uses_the_evenly_spaced_batches():
    case, model, kl = make("bert")
    data = case.batches(n=4)
    sub = estimate_gradients(model, kl.layers, data, case.loss, device=torch.device("cpu"), dtype=torch.float64,
                             fraction=0.5)
    direct = estimate_gradients(model, kl.layers, [data[0], data[2]], case.loss, device=torch.device("cpu"),
                                dtype=torch.float64)
    for n in sub:
        torch.testing.assert_close(sub[n], direct[n])


def test_gradient_memory_source_grows_the_basis():
    case, model, kl = make("bert", memory_source="gradients", feature_energy=0.9)
    data = case.batches()
    sizes = kl.basis_sizes()
    kl.begin_task(data, case.loss)
    kl.end_task(data, case.loss)
    grew = [n for n, k in kl.basis_sizes().items() if k > sizes[n]]
    assert grew
    for n in grew:
        p = kl.bases[n]
        torch.testing.assert_close(p.t() @ p, torch.eye(p.shape[1]), atol=1e-5, rtol=0)


def test_memory_bounded_batches_give_the_same_lifecycle(monkeypatch):
    """Cutting the batched SVD / eigen calls into one-matrix batches changes nothing but the peak memory."""
    results = []
    for budget in (None, "1"):
        if budget is None:
            monkeypatch.delenv("KEEPLORA_BATCH_BYTES", raising=False)
        else:
            monkeypatch.setenv("KEEPLORA_BATCH_BYTES", budget)
        case, model, kl = make("llama", feature_energy=0.9, svd_method="randomized", svd_oversample=4)
        data = case.batches()
        kl.begin_task(data, case.loss)
        a = {n: layer.lora_A[kl.adapter_name].weight.clone() for n, layer in kl.layers.items()}
        kl.end_task(data, case.loss)
        results.append((a, {n: p.clone() for n, p in kl.bases.items()}))
    (a1, p1), (a2, p2) = results
    for n in a1:
        torch.testing.assert_close(a2[n], a1[n], rtol=1e-5, atol=1e-6)
        assert p1[n].shape == p2[n].shape
        torch.testing.assert_close(p2[n], p1[n], rtol=1e-5, atol=1e-5)


def test_batch_budget_is_validated(monkeypatch):
    from keeplora.batching import bounded_batches

    monkeypatch.setenv("KEEPLORA_BATCH_BYTES", "lots")
    with pytest.raises(ValueError, match="KEEPLORA_BATCH_BYTES must be a positive integer"):
        list(bounded_batches([1, 2], 8))
    monkeypatch.setenv("KEEPLORA_BATCH_BYTES", "16")
    assert list(bounded_batches([1, 2, 3], 8)) == [[1, 2], [3]]
