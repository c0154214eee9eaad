"""transformers ``Conv1D`` targets (GPT-2 family, weight stored ``d_in × d_out``): every guarantee that ``nn.Linear``
targets have, with the model's "Linear twin" (every Conv1D replaced by the equivalent ``nn.Linear``, weight
transposed) as the oracle; the fused forward, save/load, PEFT export, refusals of other layer types."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import layer as lora_layer
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import keeplora_kernels as kk
from keeplora import KeepLoRA, KeepLoRAConfig, KeepLoRAWarning
from keeplora.adapters import KeepLoRALinear, target_shape, target_weight
from keeplora.statistics import estimate_gradients
from keeplora_kernels import _dispatch
from keeplora_kernels.lora_linear import lora_linear_extension, lora_linear_torch
from support.properties import orthonormality_error
from support.tiny_models import CASES, CONV1D_CASES, sgd_pass
from support.tolerances import assert_close

CASE = CONV1D_CASES["gpt2"]
SHAPES = {"attn.c_attn": (96, 32), "attn.c_proj": (32, 32), "mlp.c_fc": (128, 32), "mlp.c_proj": (32, 128)}


def linear_twin(model: nn.Module, only: str = "") -> nn.Module:
    """A copy of ``model`` with every ``Conv1D`` (whose name contains ``only``) replaced by the ``nn.Linear``
    computing the same function."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if type(module) is not Conv1D or only not in name:
            continue
        d_in, d_out = module.weight.shape
        linear = nn.Linear(d_in, d_out, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.t())
            linear.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent), child, linear)
    return twin


def config(**overrides) -> KeepLoRAConfig:
    cfg = dict(target_modules=CASE.targets, r=4, alpha=8.0, feature_energy=0.9, progress=False)
    cfg.update(overrides)
    return KeepLoRAConfig(**cfg)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def adapter(kl, name):
    layer = kl.layers[name]
    return layer.lora_A[kl.adapter_name].weight.detach(), layer.lora_B[kl.adapter_name].weight.detach()


def effective_weight(kl, name):
    """``W + s·B·A`` (d_out × d_in) in float64."""
    a, b = adapter(kl, name)
    return target_weight(kl.layers[name]).double() + kl.config.scale * (b.double() @ a.double())


def projector(p):
    p = p.double()
    return p @ p.t()


# ----------------------------------------------------------------------------------------------- the layers
def test_targets_are_the_conv1d_layers_with_their_d_out_by_d_in_view():
    model = CASE.model()
    kl = KeepLoRA(model, config())
    assert len(kl.layers) == 8
    for name, layer in kl.layers.items():
        base = layer.base_layer
        assert type(base) is Conv1D and layer.fan_in_fan_out
        d_out, d_in = SHAPES[name.split(".", 3)[-1]]
        assert target_shape(layer) == (d_out, d_in) == (layer.out_features, layer.in_features)
        assert tuple(base.weight.shape) == (d_in, d_out)
        w = target_weight(layer)
        assert w.data_ptr() == base.weight.data_ptr()  # a view, no copy
        a, b = adapter(kl, name)
        assert tuple(a.shape) == (4, d_in) and tuple(b.shape) == (d_out, 4)  # PEFT's shapes, as for nn.Linear
    layer = next(iter(kl.layers.values()))
    with torch.no_grad():
        target_weight(layer)[0, 1] += 1.0  # in-place writes through the view reach the stored weight
    assert layer.base_layer.weight[1, 0] == target_weight(layer)[0, 1]


# ----------------------------------------------------------------------------------------------- the Linear twin
def _assert_runs_equal(conv_kl, twin_kl, stage, adapters=True):
    for name, layer in conv_kl.layers.items():
        twin = twin_kl.layers[name]
        assert type(twin.base_layer) is nn.Linear
        # a stored Conv1D weight is the twin's transposed (merges wrote the stored weight)
        stored = layer.base_layer.weight
        assert_close(stored.t() if type(layer.base_layer) is Conv1D else stored, twin.base_layer.weight)
        assert conv_kl.bases[name].shape == twin_kl.bases[name].shape, (stage, name)
        assert_close(projector(conv_kl.bases[name]), projector(twin_kl.bases[name]), dtype=torch.float32)
        if adapters:
            (ca, cb), (ta, tb) = adapter(conv_kl, name), adapter(twin_kl, name)
            assert_close(ca, ta, dtype=torch.float32)
            assert_close(cb, tb, dtype=torch.float32)


@pytest.mark.parametrize(
    ("b_init", "memory_source", "mixed"),
    [("gradient", "features", False), ("zero", "gradients", False), ("gradient", "features", True)],
)
def test_conv1d_run_equals_its_linear_twin_at_every_stage(b_init, memory_source, mixed):
    """Pre-trained bases, begin_task's A and B (and W for b_init='gradient'), training steps, end_task's merged
    weights and memory, two tasks: the Conv1D model and its Linear twin agree (fp64, so that the two weight
    layouts' different GEMM rounding stays far below the tolerance). ``mixed``: the MLP targets are nn.Linear and
    the attention ones Conv1D (one PEFT config serves both: PEFT sets fan_in_fan_out per layer)."""
    conv = CASE.model().double()
    if mixed:
        conv = linear_twin(conv, only="mlp")
        types = {type(m).__name__ for n, m in conv.named_modules() if n.endswith(("c_attn", "c_fc"))}
        assert types == {"Conv1D", "Linear"}
    twin = linear_twin(conv)
    probe = CASE.batches(seed=9)[0]
    assert_close(logits(conv, probe), logits(twin, probe))  # the oracle is the same function
    options = dict(b_init=b_init, memory_source=memory_source, stats_dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's per-layer fan_in_fan_out correction is not the user's concern
        conv_kl = KeepLoRA(conv, config(**options))
    twin_kl = KeepLoRA(twin, config(**options))
    assert all(p.shape[1] > 0 for p in conv_kl.bases.values())
    _assert_runs_equal(conv_kl, twin_kl, "pre-trained")
    for task in range(2):
        data = CASE.batches(seed=task)
        assert conv_kl.begin_task(data, CASE.loss) == twin_kl.begin_task(data, CASE.loss)
        _assert_runs_equal(conv_kl, twin_kl, f"task {task} begin")
        for kl in (conv_kl, twin_kl):
            sgd_pass(kl.model, kl.trainable_parameters(), data, CASE.loss, lr=0.5)
        _assert_runs_equal(conv_kl, twin_kl, f"task {task} trained")
        assert any(adapter(conv_kl, n)[1].abs().max() > 0 for n in conv_kl.layers)
        added = conv_kl.end_task(data, CASE.loss)
        assert added == twin_kl.end_task(data, CASE.loss)
        assert sum(added.values()) > 0
        _assert_runs_equal(conv_kl, twin_kl, f"task {task} end", adapters=False)
    assert_close(logits(conv, probe), logits(twin, probe))
    assert not torch.equal(logits(conv, probe), logits(CASE.model().double(), probe))  # the tasks did change it


def test_gradient_estimate_is_the_autograd_gradient_of_the_transposed_stored_weight():
    model = CASE.model()
    kl = KeepLoRA(model, config())
    data = CASE.batches()
    grads = estimate_gradients(model, kl.layers, data, CASE.loss, device=torch.device("cpu"), dtype=torch.float64)
    weights = {n: layer.base_layer.weight for n, layer in kl.layers.items()}
    for w in weights.values():
        w.requires_grad_(True)
    for batch in data:
        CASE.loss(model, batch).backward()
    for name, w in weights.items():
        assert grads[name].shape == target_shape(kl.layers[name])
        torch.testing.assert_close(grads[name], w.grad.double().t() / len(data), rtol=1e-5, atol=1e-7)
        w.requires_grad_(False)


def test_default_targets_of_gpt2_are_its_attention_conv1d():
    kl = KeepLoRA(CASE.model(), config(target_modules=None))  # PEFT's default targets for model type gpt2
    assert sorted(kl.layers) == [f"transformer.h.{i}.attn.c_attn" for i in range(2)]


# ----------------------------------------------------------------------------------------------- guarantees
@pytest.mark.parametrize("b_init", ["gradient", "zero"])
def test_begin_task_preserves_the_function(b_init):
    model = CASE.model()
    kl = KeepLoRA(model, config(b_init=b_init))
    data = CASE.batches()
    before = logits(model, data[0])
    weights = {n: target_weight(layer).clone() for n, layer in kl.layers.items()}
    kl.begin_task(data, CASE.loss)
    torch.testing.assert_close(logits(model, data[0]), before, rtol=1e-4, atol=1e-5)
    moved = any(not torch.equal(target_weight(layer), weights[n]) for n, layer in kl.layers.items())
    assert moved == (b_init == "gradient")


def test_pretrained_bases_are_the_principal_input_directions_of_the_stored_weight():
    model = CASE.model()
    kl = KeepLoRA(model, config(weight_energy=0.5))
    for name, layer in kl.layers.items():
        w = layer.base_layer.weight.double().t()  # stored d_in × d_out: its transpose is W
        _, s, vh = torch.linalg.svd(w)
        frac = torch.cumsum(s**2, 0) / (s**2).sum()
        p = int(torch.nonzero(frac >= 0.5 - 1e-12)[0]) + 1
        assert kl.bases[name].shape == (layer.in_features, p)
        torch.testing.assert_close(projector(kl.bases[name]), vh[:p].t() @ vh[:p], atol=1e-5, rtol=0)


def test_tasks_leave_the_protected_inputs_alone_and_bases_stay_orthonormal():
    """After each end_task: ΔW·P ≈ 0 for the bases the task started with; A orthonormal and ⟂ P; the bases
    orthonormal, within d_in, the old columns kept."""
    model = CASE.model()
    kl = KeepLoRA(model, config(weight_energy=0.6))
    for task in range(2):
        data = CASE.batches(seed=task)
        old = {n: p.double().clone() for n, p in kl.bases.items()}
        weights = {n: effective_weight(kl, n) for n in kl.layers}
        kl.begin_task(data, CASE.loss)
        for name in kl.layers:
            a = adapter(kl, name)[0].double()
            assert orthonormality_error(a.t()) <= 1e-5
            assert (a @ old[name]).abs().max() < 1e-5
        sgd_pass(model, kl.trainable_parameters(), data, CASE.loss, lr=0.5)
        kl.end_task(data, CASE.loss)
        changed = 0
        for name, layer in kl.layers.items():
            delta = effective_weight(kl, name) - weights[name]
            assert (delta @ old[name]).abs().max() <= 1e-5 * max(1.0, weights[name].abs().max().item()), name
            changed += int(delta.abs().max() > 1e-4)
            new = kl.bases[name].double()
            assert old[name].shape[1] <= new.shape[1] <= layer.in_features
            torch.testing.assert_close(new[:, : old[name].shape[1]], old[name])
            assert orthonormality_error(new) <= 1e-5
        assert changed > 0


# ----------------------------------------------------------------------------------------------- the fused forward
def test_fused_forward_runs_for_conv1d_and_equals_peft_forward(monkeypatch):
    model = CASE.model()
    kl = KeepLoRA(model, config())
    data = CASE.batches()
    kl.begin_task(data, CASE.loss)
    sgd_pass(model, kl.trainable_parameters(), data[:1], CASE.loss, lr=0.5)  # B ≠ its start
    assert all(layer._fused_adapter() == kl.adapter_name for layer in kl.layers.values())
    calls = []
    real = kk.lora_linear

    def spy(x, weight, *rest):
        calls.append(weight)
        return real(x, weight, *rest)

    monkeypatch.setattr(kk, "lora_linear", spy)
    params = kl.trainable_parameters()
    loss = CASE.loss(model, data[1])
    fused = (loss.detach(), *torch.autograd.grad(loss, params))
    assert len(calls) == len(kl.layers)
    for weight, layer in zip(calls, kl.layers.values()):  # the (d_out × d_in) view of the stored weight, not a copy
        assert weight.shape == target_shape(layer) and weight.data_ptr() == layer.base_layer.weight.data_ptr()
    for layer in kl.layers.values():  # PEFT's general path (fan_in_fan_out) for the same layers
        layer.__class__ = lora_layer.Linear
    loss = CASE.loss(model, data[1])
    general = (loss.detach(), *torch.autograd.grad(loss, params))
    assert len(calls) == len(kl.layers)
    for got, ref in zip(fused, general):
        assert_close(got, ref)
    for layer in kl.layers.values():
        layer.__class__ = KeepLoRALinear


def _lora_linear_backends():
    backends = [("torch", lora_linear_torch)]
    if "lora_linear" in _dispatch.extension_ops("cpu"):
        backends.append(("extension", lora_linear_extension))
    return backends


@pytest.mark.parametrize("backend", [b for b, _ in _lora_linear_backends()])
def test_lora_linear_takes_a_transposed_weight_view(backend):
    """The fused op on W given as the transpose of a (d_in × d_out) tensor (a Conv1D's) equals the op on a
    contiguous W and the plain-autograd reference: outputs, dX, dB, db."""
    fn = dict(_lora_linear_backends())[backend]
    g = torch.Generator().manual_seed(0)
    stored = torch.randn(32, 96, generator=g)  # d_in × d_out
    bias = torch.randn(96, generator=g, requires_grad=True)
    a = torch.randn(4, 32, generator=g)
    b = torch.randn(96, 4, generator=g, requires_grad=True)
    x = torch.randn(3, 5, 32, generator=g, requires_grad=True)
    results = []
    for weight in (stored.t(), stored.t().contiguous()):
        y = fn(x, weight, bias, a, b, 0.5)
        results.append((y, *torch.autograd.grad(y.square().sum(), (x, b, bias))))
    y = torch.nn.functional.linear(x, stored.t(), bias) + (x @ a.t()) @ b.t() * 0.5
    reference = (y, *torch.autograd.grad(y.square().sum(), (x, b, bias)))
    assert not results[0][0].isnan().any()
    for view, contiguous, ref in zip(*results, reference):
        assert_close(view, contiguous)
        assert_close(view, ref)


# ----------------------------------------------------------------------------------------------- save, load, export
def test_save_load_round_trips_mid_task_and_between_tasks(tmp_path):
    data1, data2 = CASE.batches(seed=1), CASE.batches(seed=2)
    model = CASE.model()
    kl = KeepLoRA(model, config())
    kl.begin_task(data1, CASE.loss)
    sgd_pass(model, kl.trainable_parameters(), data1, CASE.loss, lr=0.5)
    kl.save(tmp_path / "mid")
    # the saved layout: every weight d_out × d_in (a Conv1D's stored weight transposed), A and B as PEFT's
    saved = load_file(str(tmp_path / "mid" / "weights.safetensors"))
    adapters = load_file(str(tmp_path / "mid" / "adapter.safetensors"))
    meta = json.loads((tmp_path / "mid" / "keeplora_state.json").read_text())
    for name, layer in kl.layers.items():
        assert torch.equal(saved[name], layer.base_layer.weight.t())
        assert meta["targets"][name] == [layer.out_features, layer.in_features]
        assert torch.equal(adapters[f"{name}.lora_B"], adapter(kl, name)[1])
    fresh = CASE.model()
    kl2 = KeepLoRA.load(tmp_path / "mid", fresh)
    assert kl2.in_task
    torch.testing.assert_close(logits(fresh, data1[0]), logits(model, data1[0]))
    for run in (kl, kl2):
        run.end_task(data1, CASE.loss)
    kl.save(tmp_path / "after1")
    fresh = CASE.model()
    kl3 = KeepLoRA.load(tmp_path / "after1", fresh)
    for run in (kl, kl2, kl3):
        run.begin_task(data2, CASE.loss)
        sgd_pass(run.model, run.trainable_parameters(), data2, CASE.loss, lr=0.5)
        run.end_task(data2, CASE.loss)
    for run in (kl2, kl3):
        for name, layer in kl.layers.items():
            torch.testing.assert_close(run.bases[name], kl.bases[name], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(run.layers[name].base_layer.weight, layer.base_layer.weight)
        torch.testing.assert_close(logits(run.model, data1[0]), logits(model, data1[0]))


def test_trainer_restore_writes_the_stored_weights(tmp_path):
    """keeplora.trainer.restore (Trainer resume) puts a mid-task state into a running KeepLoRA in place."""
    from keeplora.trainer import STATE_SUBFOLDER, restore

    data = CASE.batches()
    model = CASE.model()
    kl = KeepLoRA(model, config())
    kl.begin_task(data, CASE.loss)
    sgd_pass(model, kl.trainable_parameters(), data, CASE.loss, lr=0.5)
    kl.save(tmp_path / STATE_SUBFOLDER)
    other_model = CASE.model()
    other = KeepLoRA(other_model, config())
    restore(other, tmp_path)
    assert other.in_task
    for name, layer in kl.layers.items():
        assert torch.equal(other.layers[name].base_layer.weight, layer.base_layer.weight)
        assert torch.equal(adapter(other, name)[1], adapter(kl, name)[1])
    torch.testing.assert_close(logits(other_model, data[0]), logits(model, data[0]))


def test_exported_adapters_rebuild_the_continual_model_with_peft(tmp_path):
    """Each task's adapter, loaded by PeftModel.from_pretrained (fan_in_fan_out) onto the model after the previous
    tasks and merged, rebuilds the continual model."""
    model = CASE.model()
    kl = KeepLoRA(model, config())
    for t in range(2):
        data = CASE.batches(seed=t)
        kl.begin_task(data, CASE.loss)
        sgd_pass(model, kl.trainable_parameters(), data, CASE.loss, lr=0.5)
        kl.end_task(data, CASE.loss, export_adapter_to=tmp_path / f"task{t + 1}")
    assert json.loads((tmp_path / "task1" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    probe = CASE.batches(seed=7)[0]
    rebuilt = CASE.model()
    before = logits(rebuilt, probe)
    for t in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # e.g. PEFT correcting fan_in_fan_out: it must not need to
            peft_model = PeftModel.from_pretrained(rebuilt, tmp_path / f"task{t + 1}")
        rebuilt = peft_model.merge_and_unload()
    assert all(type(m) is Conv1D for n, m in rebuilt.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc")))
    torch.testing.assert_close(logits(rebuilt, probe), logits(model, probe), rtol=1e-4, atol=1e-5)
    assert (logits(model, probe) - before).abs().max() > 1e-4


def test_a_peft_model_with_a_conv1d_adapter_is_reused():
    """get_peft_model on GPT-2 (PEFT sets fan_in_fan_out for Conv1D): KeepLoRA takes the adapter over, keeps the
    function at begin_task, and PEFT's own merge of the trained adapter gives the model KeepLoRA's merge gives."""
    from peft import LoraConfig, get_peft_model

    base = CASE.model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PEFT: "fan_in_fan_out is set to False ... Conv1D"
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]))
    kl = KeepLoRA(peft_model, config(target_modules=None))
    assert len(kl.layers) == 4 and all(type(layer.base_layer) is Conv1D for layer in kl.layers.values())
    data = CASE.batches()
    before = logits(peft_model, data[0])
    kl.begin_task(data, CASE.loss)
    torch.testing.assert_close(logits(peft_model, data[0]), before, rtol=1e-4, atol=1e-5)
    sgd_pass(peft_model, kl.trainable_parameters(), data, CASE.loss, lr=0.5)
    adapted = logits(peft_model, data[0])
    peft_merged = copy.deepcopy(peft_model).merge_and_unload()  # PEFT's merge (fan_in_fan_out) of W + s·B·A
    kl.end_task(data, CASE.loss)
    torch.testing.assert_close(logits(peft_model, data[0]), adapted, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(peft_merged, data[0]), adapted, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- refusals
class _QuantizedLinear(nn.Linear):
    """Stands for a quantized linear (bitsandbytes' are nn.Linear subclasses)."""


@pytest.mark.parametrize(
    ("case_name", "target", "layer_type"),
    [("vit", "projection", "Conv2d"), ("bert", "word_embeddings", "Embedding"), ("bert", "query", "_QuantizedLinear")],
)
def test_other_layer_types_are_refused_naming_the_layer(case_name, target, layer_type):
    model = CASES[case_name].model()
    if layer_type == "_QuantizedLinear":
        for name, module in list(model.named_modules()):
            if name.endswith(".query"):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, _QuantizedLinear(module.in_features, module.out_features))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError) as raised:
        KeepLoRA(model, KeepLoRAConfig(target_modules=[target], r=4, progress=False))
    message = str(raised.value)
    assert target in message and layer_type in message
    assert "supported: torch.nn.Linear, transformers Conv1D (GPT-2 family)" in message
    assert model.state_dict().keys() == before.keys()  # nothing was attached
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())


def test_output_side_subspace_needs_square_conv1d_weights():
    with pytest.raises(ValueError, match=r"c_attn'? is \(96, 32\) \(d_out, d_in\)"):
        KeepLoRA(CASE.model(), config(weight_subspace="official-clip"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KeepLoRAWarning)
        kl = KeepLoRA(CASE.model(), config(target_modules=["attn.c_proj"], weight_subspace="official-clip"))
    assert len(kl.layers) == 2
