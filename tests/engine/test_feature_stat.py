"""feature_stat: the exact second moment (default) and the authors' batch-summed sketch ("official-sketch")."""

import pytest
import torch

from keeplora import KeepLoRA, KeepLoRAConfig
from keeplora import distributed as kd
from keeplora import statistics as ks
from keeplora.statistics import collect_feature_sketches, collect_second_moments
from support.properties import orthonormality_error
from support.tiny_models import CASES, sgd_pass

CPU = torch.device("cpu")


def make(case, **overrides):
    model = case.model()
    cfg = dict(
        target_modules=case.targets,
        r=4,
        alpha=4.0,
        weight_energy=case.weight_energy,
        feature_energy=0.9,
        feature_stat="official-sketch",
        stats_dtype="float64",
        progress=False,
    )
    cfg.update(overrides)
    return model, KeepLoRA(model, KeepLoRAConfig(**cfg))


def uneven_batches(case, seed=0):
    """Three batches of unequal widths: a full one, one padded to a longer sequence (more columns, padding masked)
    and a smaller last one (fewer rows)."""
    first, wide, last = case.batches(n=3, seed=seed)
    extra = 3
    for key in ("input_ids", "attention_mask"):
        wide[key] = torch.cat([wide[key], torch.zeros(wide[key].shape[0], extra, dtype=wide[key].dtype)], 1)
    if "labels" in wide and wide["labels"].dim() == 2:
        wide["labels"] = torch.cat([wide["labels"], torch.full((wide["labels"].shape[0], extra), -100)], 1)
    last = {k: v[:2] for k, v in last.items()}
    return [first, wide, last]


def reference_sketches(case, model, kl, data):
    """``Σ_b X_bᵀ / N`` per target from independently hooked inputs: padding rows zeroed, column j = token j of the
    call, narrower calls zero-padded; N counts the real tokens."""
    calls = {n: [] for n in kl.layers}
    current = {}

    def hook(name):
        def fn(_m, args, _out):
            x = args[0].detach().double()
            mask = current["mask"]
            if tuple(x.shape[:-1]) == tuple(mask.shape):
                x = x * mask[..., None].double()
            calls[name].append(x.reshape(-1, x.shape[-1]).t())

        return fn

    handles = [layer.register_forward_hook(hook(n)) for n, layer in kl.layers.items()]
    with torch.no_grad():
        for batch in data:
            current["mask"] = batch["attention_mask"]
            case.loss(model, batch)
    for h in handles:
        h.remove()
    sketches, tokens = {}, {}
    for name, xs in calls.items():
        width = max(x.shape[1] for x in xs)
        sketch = sum(torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in xs)
        # a real token has a non-zero input row in these models; padding rows were zeroed above
        tokens[name] = sum(int((x != 0).any(0).sum()) for x in xs)
        sketches[name] = sketch / tokens[name]
    return sketches, tokens


@pytest.mark.parametrize("case_name", ["bert", "clip", "llama"])
def test_sketch_equals_a_reference_from_hooked_inputs(case_name):
    case = CASES[case_name]
    model, kl = make(case)
    data = uneven_batches(case)
    expected, expected_tokens = reference_sketches(case, model, kl, data)
    sketches, tokens = collect_feature_sketches(
        model, kl.layers, data, case.loss, device=CPU, dtype=torch.float64, progress=False
    )
    moments, _ = kl._task_statistics(data, case.loss)
    for name in kl.layers:
        assert tokens[name] == expected_tokens[name], name
        torch.testing.assert_close(sketches[name], expected[name])
        s = expected[name]
        assert moments[name].shape == (s.shape[0], s.shape[0]) and moments[name].dtype == torch.float64
        torch.testing.assert_close(moments[name], s @ s.t())
    masked = [n for n in kl.layers if "vision_model" not in n]
    n_real = sum(int(b["attention_mask"].sum()) for b in data)
    assert all(tokens[n] == n_real for n in masked)
    widest = max(b["attention_mask"].numel() for b in data)
    assert all(sketches[n].shape[1] == widest for n in masked)


def test_ranks_pad_their_sketches_to_the_widest_and_sum_them(monkeypatch):
    """Two ranks simulated in one process: this rank holds the narrow last batch, the other the wider ones. The
    reduced sketch equals one process's sketch over all the batches (the same column alignment)."""
    case = CASES["bert"]
    model, kl = make(case)
    data = uneven_batches(case)
    kwargs = dict(device=CPU, dtype=torch.float64, progress=False)
    expected, expected_tokens = collect_feature_sketches(model, kl.layers, data, case.loss, **kwargs)
    other, other_tokens = collect_feature_sketches(model, kl.layers, data[:2], case.loss, **kwargs)
    other_sums = [other[n] * other_tokens[n] for n in kl.layers]  # the other rank's sums before the division
    names = list(kl.layers)

    def gather(obj):
        assert obj == {n: data[2]["attention_mask"].numel() for n in names}  # this rank's widths
        return [obj, {n: s.shape[1] for n, s in zip(names, other_sums)}]

    def reduce(tensors):
        sketches, tokens, batches = tensors[: len(names)], tensors[len(names) : 2 * len(names)], tensors[-1]
        for mine, theirs in zip(sketches, other_sums):
            assert mine.shape == theirs.shape  # padded to the widest rank before the sum
            mine += theirs
        for mine, name in zip(tokens, names):
            mine += other_tokens[name]
        batches += 2

    monkeypatch.setattr(kd, "all_gather_objects", gather)
    monkeypatch.setattr(ks, "all_reduce_sum", reduce)
    sketches, tokens = collect_feature_sketches(model, kl.layers, data[2:], case.loss, **kwargs)
    assert tokens == expected_tokens
    for name in names:
        torch.testing.assert_close(sketches[name], expected[name])


def test_default_statistic_is_the_exact_second_moment():
    case = CASES["bert"]
    model, kl = make(case, feature_stat="second-moment", stats_dtype="float32")
    assert KeepLoRAConfig().feature_stat == "second-moment"
    saved = KeepLoRAConfig(target_modules=["query"]).to_dict()
    del saved["feature_stat"]  # a configuration saved before the option existed
    assert KeepLoRAConfig.from_dict(saved).feature_stat == "second-moment"
    data = uneven_batches(case)
    moments, tokens = kl._task_statistics(data, case.loss)
    exact, exact_tokens = collect_second_moments(
        model, kl.layers, data, case.loss, device=CPU, dtype=torch.float32, progress=False
    )
    assert tokens == exact_tokens
    for name in kl.layers:
        assert torch.equal(moments[name], exact[name]), name


@pytest.mark.parametrize("case_name", ["bert", "clip", "llama"])
def test_a_task_with_the_sketch_keeps_the_engine_guarantees(case_name):
    """Two tasks: the basis grows by the energy rule on the sketch's singular values, stays orthonormal within d_in,
    keeps its old columns, and the next task's A is orthonormal and orthogonal to it."""
    case = CASES[case_name]
    model, kl = make(case, feature_energy=0.95)
    d_in = {n: layer.in_features for n, layer in kl.layers.items()}
    for task in range(2):
        data = uneven_batches(case, seed=task)
        kl.begin_task(data, case.loss)
        for name in kl.layers:
            a = kl.layers[name].lora_A[kl.adapter_name].weight.t().double()
            p = kl.bases[name].double()
            assert orthonormality_error(a) < 1e-5, name
            assert (p.t() @ a).abs().max() < 1e-5, name
        sgd_pass(model, kl.trainable_parameters(), data, case.loss, lr=5e-2)
        sketches, _ = reference_sketches(case, model, kl, data)  # adapter active: the function end_task sees
        old = {n: p.double().clone() for n, p in kl.bases.items()}
        kl.end_task(data, case.loss)
        grew = 0
        for name in kl.layers:
            s, p, new = sketches[name], old[name], kl.bases[name].double()
            total = (s**2).sum()
            residual = s - p @ (p.t() @ s)
            sigma = torch.linalg.svdvals(residual)
            captured = (total - (residual**2).sum()) / total
            added = 0
            while captured < 0.95 and added < d_in[name] - p.shape[1]:
                captured += sigma[added] ** 2 / total
                added += 1
            assert new.shape[1] == p.shape[1] + added <= d_in[name], name
            torch.testing.assert_close(new[:, : p.shape[1]], p)
            assert orthonormality_error(new) < 1e-6, name
            grew += added
        assert grew > 0


def test_config_errors():
    with pytest.raises(ValueError, match=r"feature_stat must be one of \['second-moment', 'official-sketch'\]"):
        KeepLoRAConfig(feature_stat="sketch")
    with pytest.raises(ValueError, match="feature_stat='official-sketch'.*memory_source='features'"):
        KeepLoRAConfig(feature_stat="official-sketch", memory_source="gradients")
    assert KeepLoRAConfig(feature_stat="second-moment", memory_source="gradients").memory_source == "gradients"
