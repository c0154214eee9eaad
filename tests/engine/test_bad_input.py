"""Bad input: each a clear exception naming the problem, with the model and the continual state unchanged."""

import contextlib
import math

import pytest
import torch

from keeplora import EmptyDataError, KeepLoRA, KeepLoRAConfig
from support.tiny_models import CASES

CASE = CASES["bert"]


def snapshot(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for n, t in before.items():
        assert torch.equal(after[n], t), n


def make(**overrides):
    model = CASE.model()
    cfg = dict(target_modules=CASE.targets, r=4, alpha=4.0, progress=False)
    cfg.update(overrides)
    return model, KeepLoRA(model, KeepLoRAConfig(**cfg))


def state(kl):
    return (kl.tasks_done, kl.in_task, {n: p.clone() for n, p in kl.bases.items()})


def assert_state(kl, before):
    tasks, in_task, bases = before
    assert (kl.tasks_done, kl.in_task) == (tasks, in_task)
    assert all(torch.equal(kl.bases[n], p) for n, p in bases.items())


@contextlib.contextmanager
def refused(model, kl=None, *, raises, match=None):
    """The block raises ``raises`` (message matching ``match``) and leaves the model's weights and, with ``kl``,
    KeepLoRA's continual state exactly as they were."""
    before, st = snapshot(model), (state(kl) if kl is not None else None)
    with pytest.raises(raises, match=match):
        yield
    assert_unchanged(model, before)
    if kl is not None:
        assert_state(kl, st)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("r", 0, "KeepLoRAConfig.r must be a positive integer"),
        ("alpha", -1.0, "KeepLoRAConfig.alpha"),
        ("weight_energy", 1.5, r"KeepLoRAConfig.weight_energy must be a number in \[0, 1\]"),
        ("weight_energy", {"text": -0.1}, r"weight_energy\['text'\]"),
        ("weight_energy", {"(": 0.5}, "not a valid regular expression"),
        ("feature_energy", -0.01, r"KeepLoRAConfig.feature_energy must be a number in \[0, 1\]"),
        ("feature_energy", math.nan, "feature_energy"),
        ("grad_data_fraction", 0.0, r"grad_data_fraction must be a number in \(0, 1\]"),
        ("b_init", "kaiming", r"b_init must be one of \['gradient', 'zero'\]"),
        ("a_init", "pissa", r"a_init must be one of \['gradient', 'random'\]"),
        ("memory_source", "activations", "memory_source must be one of"),
        ("weight_subspace", "output", r"weight_subspace must be one of \['input', 'official-clip'\]"),
        ("weight_subspace_side", "left", r"weight_subspace_side must be one of \['input', 'output'\]"),
        ("weight_energy_rule", "paper", r"weight_energy_rule must be one of \['inclusive', 'strict'\]"),
        ("stats_dtype", "float16", r"stats_dtype must be one of \['float32', 'float64'\]"),
        ("svd_method", "lanczos", "svd_method must be one of"),
        ("target_modules", [], "target_modules must be"),
        ("grad_micro_batch", -1, r"grad_micro_batch must be a non-negative integer \(tokens per micro-batch"),
        ("grad_micro_batch", 512.0, "grad_micro_batch must be a non-negative integer"),
        ("grad_micro_batch", True, "grad_micro_batch must be a non-negative integer"),
        ("grad_offload", "yes", "grad_offload must be True or False"),
        ("grad_checkpoint", 1, "grad_checkpoint must be True or False"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        KeepLoRAConfig(**{field: value})


def test_config_round_trips_through_a_dict():
    cfg = KeepLoRAConfig(target_modules=["q"], weight_energy={"vision": 0.85, ".*": 0.2}, stats_dtype=torch.float64)
    assert KeepLoRAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        KeepLoRAConfig.from_dict({"rank": 3})


def test_unknown_target_module():
    model = CASE.model()
    with refused(model, raises=ValueError, match=r"no module matches \['qkv'\].*query"):
        KeepLoRA(model, KeepLoRAConfig(target_modules=["query", "qkv"], progress=False))


def test_non_linear_target():
    model = CASE.model()
    with refused(model, raises=ValueError, match="not torch.nn.Linear"):
        KeepLoRA(model, KeepLoRAConfig(target_modules=["query", "LayerNorm"], progress=False))


def test_rank_larger_than_input_size():
    model = CASE.model()
    with refused(model, raises=ValueError, match=r"r = 33 exceeds d_in = 32"):
        KeepLoRA(model, KeepLoRAConfig(target_modules=CASE.targets, r=33, progress=False))


def test_group_energy_without_a_pattern_for_a_target():
    model = CASE.model()
    with refused(model, raises=ValueError, match="no pattern matching target"):
        KeepLoRA(model, KeepLoRAConfig(target_modules=CASE.targets, weight_energy={"layer.0": 0.5}, progress=False))


def test_official_clip_subspace_refuses_non_square_weights():
    llama = CASES["llama"]
    model = llama.model()
    with pytest.raises(ValueError, match="square weights"):
        KeepLoRA(model, KeepLoRAConfig(target_modules=llama.targets, weight_subspace="official-clip", progress=False))


@pytest.mark.parametrize("field,value", [("weight_subspace_side", "input"), ("weight_energy_rule", "inclusive")])
def test_official_clip_alias_refuses_a_contradicting_option(field, value):
    with pytest.raises(ValueError, match=f"weight_subspace='official-clip' means {field}="):
        KeepLoRAConfig(weight_subspace="official-clip", **{field: value})


def test_output_side_refuses_non_square_weights_naming_the_option():
    llama = CASES["llama"]
    model = llama.model()
    with pytest.raises(ValueError, match="weight_subspace_side='output'.*square weights"):
        KeepLoRA(model, KeepLoRAConfig(target_modules=llama.targets, weight_subspace_side="output", progress=False))


def test_empty_dataloader():
    model, kl = make()
    with refused(model, kl, raises=EmptyDataError, match="no batch"):
        kl.begin_task([], CASE.loss)


def test_nan_loss_during_the_gradient_estimate():
    model, kl = make()
    data = CASE.batches(n=3)

    def loss_with_nan(m, b):
        loss = CASE.loss(m, b)
        return loss * float("nan") if torch.equal(b["input_ids"], data[1]["input_ids"]) else loss

    with refused(model, kl, raises=FloatingPointError, match="non-finite loss in batch 1"):
        kl.begin_task(data, loss_with_nan)


def test_end_task_without_begin_task():
    model, kl = make()
    with refused(model, kl, raises=RuntimeError, match="without begin_task"):
        kl.end_task(CASE.batches(), CASE.loss)


def test_begin_task_twice():
    model, kl = make()
    kl.begin_task(CASE.batches(), CASE.loss)
    with refused(model, kl, raises=RuntimeError, match="call end_task first"):
        kl.begin_task(CASE.batches(), CASE.loss)


def test_end_task_with_an_empty_dataloader_keeps_the_task_open():
    model, kl = make()
    kl.begin_task(CASE.batches(), CASE.loss)
    with refused(model, kl, raises=EmptyDataError):
        kl.end_task([], CASE.loss)


def test_loss_that_ignores_the_adapted_modules():
    model, kl = make()
    with refused(model, kl, raises=ValueError, match="does not depend on any adapted module"):
        kl.begin_task(CASE.batches(), lambda m, b: m.embeddings(input_ids=b["input_ids"]).sum())


def test_loading_a_state_into_a_different_model(tmp_path):
    model, kl = make()
    kl.begin_task(CASE.batches(), CASE.loss)
    kl.end_task(CASE.batches(), CASE.loss)
    kl.save(tmp_path / "state")
    other = CASE.model(seed=1)  # same architecture, other weights
    with refused(other, raises=ValueError, match="other weights"):
        KeepLoRA.load(tmp_path / "state", other)
    llama = CASES["llama"].model()  # other architecture
    with refused(llama, raises=ValueError):
        KeepLoRA.load(tmp_path / "state", llama)
