"""KeepLoRA on PEFT's own LoRA layers: plain models, PeftModels, the fused forward, the Trainer callback."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import LoraLayer

import keeplora_kernels
from keeplora import KeepLoRA, KeepLoRAConfig
from keeplora.adapters import KeepLoRALinear
from support.tiny_models import CASES, sgd_pass


def trainable_names(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_only_b_is_trainable_and_a_stays_frozen():
    case = CASES["llama"]
    model = case.model()
    kl = KeepLoRA(model, KeepLoRAConfig(target_modules=case.targets, r=4, progress=False))
    names = trainable_names(model)
    assert names and all(".lora_B." in n for n in names)
    assert len(names) == len(kl.layers) == 2 * 4
    assert {id(p) for p in kl.trainable_parameters()} == {id(p) for p in model.parameters() if p.requires_grad}
    kl.begin_task(case.batches(), case.loss)
    assert trainable_names(model) == names


def test_fused_forward_runs_and_equals_peft_forward(monkeypatch):
    case = CASES["bert"]
    model = case.model()
    kl = KeepLoRA(model, KeepLoRAConfig(target_modules=case.targets, r=4, alpha=8, progress=False))
    data = case.batches()
    kl.begin_task(data, case.loss)
    calls = []
    real = keeplora_kernels.lora_linear
    monkeypatch.setattr(keeplora_kernels, "lora_linear", lambda *a: calls.append(1) or real(*a))
    batch = {k: v for k, v in data[0].items() if k != "labels"}
    fused = model(**batch).last_hidden_state
    assert len(calls) == len(kl.layers)
    for layer in kl.layers.values():  # PEFT's general path for the same layers
        layer.__class__ = KeepLoRALinear.__mro__[1]
    general = model(**batch).last_hidden_state
    torch.testing.assert_close(fused, general)


def test_peft_model_with_a_matching_adapter_is_reused():
    case = CASES["bert"]
    base = case.model()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["query", "value"]))
    kl = KeepLoRA(peft_model, KeepLoRAConfig(target_modules=None, r=4, alpha=4, progress=False))
    assert sorted(kl.layers) == sorted(n for n, m in base.named_modules() if isinstance(m, LoraLayer))
    data = case.batches()
    kl.begin_task(data, case.loss)
    opt = torch.optim.AdamW(kl.trainable_parameters(), lr=1e-2)
    case.loss(peft_model, data[0]).backward()
    opt.step()
    before = {n: layer.base_layer.weight.detach().clone() for n, layer in kl.layers.items()}
    sizes = {n: p.shape[1] for n, p in kl.bases.items()}
    kl.end_task(data, case.loss)
    assert kl.tasks_done == 1
    # the trained PEFT adapter was merged into the weights (they moved) and reset; the memory grew
    assert any(not torch.equal(layer.base_layer.weight, before[n]) for n, layer in kl.layers.items())
    assert all(layer.lora_B[kl.adapter_name].weight.abs().sum() == 0 for layer in kl.layers.values())
    assert all(kl.bases[n].shape[1] >= sizes[n] for n in kl.layers)
    assert any(kl.bases[n].shape[1] > sizes[n] for n in kl.layers)


def test_peft_model_with_another_rank_is_refused():
    case = CASES["bert"]
    peft_model = get_peft_model(case.model(), LoraConfig(r=8, lora_alpha=8, target_modules=["query"]))
    with pytest.raises(ValueError, match="r=8"):
        KeepLoRA(peft_model, KeepLoRAConfig(target_modules=["query"], r=4, progress=False))


def test_peft_model_gets_a_new_adapter_next_to_the_users():
    case = CASES["bert"]
    peft_model = get_peft_model(case.model(), LoraConfig(r=8, lora_alpha=8, target_modules=["query"]))
    kl = KeepLoRA(
        peft_model, KeepLoRAConfig(target_modules=["query", "value"], r=4, adapter_name="keeplora", progress=False)
    )
    assert peft_model.active_adapter == "keeplora"
    kl.begin_task(case.batches(), case.loss)
    kl.end_task(case.batches(), case.loss)
    assert all(".lora_B.keeplora." in n for n in trainable_names(peft_model))


def test_default_targets_come_from_peft_for_known_model_types():
    case = CASES["llama"]
    model = case.model()
    kl = KeepLoRA(model, KeepLoRAConfig(r=4, progress=False))
    assert {n.rsplit(".", 1)[-1] for n in kl.layers} == {"q_proj", "v_proj"}


def test_trainer_callback_runs_one_task_per_train_call(tmp_path):
    pytest.importorskip("accelerate")
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    from keeplora import KeepLoRACallback

    case = CASES["llama"]

    class Batches(Dataset):
        def __init__(self, seed):
            rows = []
            for b in case.batches(n=2, seed=seed):
                rows += [{k: v[i] for k, v in b.items()} for i in range(b["input_ids"].shape[0])]
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    model = case.model()
    kl = KeepLoRA(model, KeepLoRAConfig(target_modules=case.targets, r=4, alpha=4, progress=False))
    for task in range(2):
        before = {n: layer.base_layer.weight.clone() for n, layer in kl.layers.items()}
        bases = {n: p.clone() for n, p in kl.bases.items()}
        args = TrainingArguments(
            output_dir=str(tmp_path / f"t{task}"),
            per_device_train_batch_size=4,
            num_train_epochs=2,
            learning_rate=5e-2,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Batches(task), callbacks=[KeepLoRACallback(kl)])
        trainer.train()
        assert kl.tasks_done == task + 1 and not kl.in_task
        moved = [n for n, layer in kl.layers.items() if not torch.equal(layer.base_layer.weight, before[n])]
        assert moved
        for n in moved:  # the change is confined to directions orthogonal to the basis at task start
            delta = (kl.layers[n].base_layer.weight - before[n]).double()
            assert (delta @ bases[n].double()).abs().max() < 1e-5
        assert all(p.grad is None or ".lora_B." in n for n, p in model.named_parameters())


def _train_once(case, backend, monkeypatch):
    monkeypatch.setenv("KEEPLORA_BACKEND", backend)
    model = case.model()
    kl = KeepLoRA(model, KeepLoRAConfig(target_modules=case.targets, r=4, alpha=4, feature_energy=0.9, progress=False))
    data = case.batches(n=2)
    kl.begin_task(data, case.loss)
    sgd_pass(model, kl.trainable_parameters(), data, case.loss)
    kl.end_task(data, case.loss)
    return kl


def test_engine_through_the_triton_kernels_matches_the_torch_backend(monkeypatch):
    """The whole lifecycle with every dispatched Triton op (interpreter on CPU) gives the torch backend's result."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 before triton is imported")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: a 2-thread pool only spins
    try:
        case = CASES["bert"]
        ref = _train_once(case, "torch", monkeypatch)
        tri = _train_once(case, "triton", monkeypatch)
    finally:
        torch.set_num_threads(threads)
    for name in ref.layers:
        torch.testing.assert_close(
            tri.layers[name].base_layer.weight, ref.layers[name].base_layer.weight, rtol=1e-4, atol=1e-5
        )
        assert tri.bases[name].shape == ref.bases[name].shape
        torch.testing.assert_close(
            tri.bases[name] @ tri.bases[name].t(), ref.bases[name] @ ref.bases[name].t(), rtol=0, atol=1e-4
        )


def test_gradient_pass_skips_zero_adapters_and_finds_the_same_adapter(monkeypatch):
    """Between tasks every B is zero, so begin_task's gradient pass runs the base layers only (no adapter kernels)
    and initialises exactly the adapter that the pass through the zero adapters gives; a non-zero B is not
    skipped."""
    case = CASES["llama"]
    data = case.batches()
    runs = {}
    for mode in ("skip", "through"):
        torch.manual_seed(0)
        model = case.model()
        kl = KeepLoRA(model, KeepLoRAConfig(target_modules=case.targets, r=4, progress=False))
        if mode == "through":
            monkeypatch.setattr(KeepLoRA, "_adapters_are_zero", lambda self: False)
        calls = []
        real = keeplora_kernels.lora_linear
        monkeypatch.setattr(keeplora_kernels, "lora_linear", lambda *a: calls.append(1) or real(*a))
        kl.begin_task(data, case.loss)
        monkeypatch.undo()
        runs[mode] = (kl, len(calls))
        if mode == "skip":
            assert kl._adapters_are_zero() is False  # the new task's adapter is set: B ≠ 0 (b_init="gradient")
    (skip, skip_calls), (through, through_calls) = runs["skip"], runs["through"]
    assert skip_calls == 0 and through_calls > 0
    for name, layer in skip.layers.items():
        other = through.layers[name]
        for part in ("lora_A", "lora_B"):
            torch.testing.assert_close(
                getattr(layer, part)[skip.adapter_name].weight, getattr(other, part)[skip.adapter_name].weight
            )
        torch.testing.assert_close(layer.base_layer.weight, other.base_layer.weight)
