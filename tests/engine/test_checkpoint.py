"""Saving/loading the continual state, and PEFT-format export of each task's adapter."""

import pytest
import torch
from peft import PeftModel

from keeplora import KeepLoRA, KeepLoRAConfig
from support.tiny_models import CASES

CASE = CASES["bert"]


def make(model=None, **overrides):
    model = model if model is not None else CASE.model()
    cfg = dict(target_modules=CASE.targets, r=4, alpha=4.0, feature_energy=0.9, progress=False)
    cfg.update(overrides)
    return model, KeepLoRA(model, KeepLoRAConfig(**cfg))


def train(kl, data, steps=3):
    opt = torch.optim.AdamW(kl.trainable_parameters(), lr=5e-2)
    for step in range(steps):
        CASE.loss(kl.model, data[step % len(data)]).backward()
        opt.step()
        opt.zero_grad()


def hidden(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def test_save_load_between_tasks_then_continue_equals_uninterrupted(tmp_path):
    data1, data2 = CASE.batches(seed=1), CASE.batches(seed=2)
    # uninterrupted
    model, kl = make()
    kl.begin_task(data1, CASE.loss)
    train(kl, data1)
    kl.end_task(data1, CASE.loss)
    kl.save(tmp_path / "after1")
    kl.begin_task(data2, CASE.loss)
    train(kl, data2)
    kl.end_task(data2, CASE.loss)
    # interrupted: a fresh pre-trained model, load the state after task 1, do task 2
    fresh = CASE.model()
    kl2 = KeepLoRA.load(tmp_path / "after1", fresh)
    assert kl2.tasks_done == 1 and not kl2.in_task and len(kl2.history) == 1
    kl2.begin_task(data2, CASE.loss)
    train(kl2, data2)
    kl2.end_task(data2, CASE.loss)
    for n in kl.layers:
        torch.testing.assert_close(kl2.bases[n], kl.bases[n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kl2.layers[n].base_layer.weight, kl.layers[n].base_layer.weight)
    torch.testing.assert_close(hidden(fresh, data1[0]), hidden(model, data1[0]))


def test_save_mid_task_restores_the_adapter(tmp_path):
    data = CASE.batches()
    model, kl = make()
    kl.begin_task(data, CASE.loss)
    train(kl, data)
    kl.save(tmp_path / "mid")
    fresh = CASE.model()
    kl2 = KeepLoRA.load(tmp_path / "mid", fresh)
    assert kl2.in_task
    torch.testing.assert_close(hidden(fresh, data[0]), hidden(model, data[0]))
    kl.end_task(data, CASE.loss)
    kl2.end_task(data, CASE.loss)
    for n in kl.layers:
        torch.testing.assert_close(kl2.bases[n], kl.bases[n])


def test_saving_replaces_an_existing_state_atomically(tmp_path):
    model, kl = make()
    kl.save(tmp_path / "s")
    kl.begin_task(CASE.batches(), CASE.loss)
    kl.end_task(CASE.batches(), CASE.loss)
    kl.save(tmp_path / "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert KeepLoRA.load(tmp_path / "s", CASE.model()).tasks_done == 1


def test_exported_adapters_reproduce_the_continual_model_with_peft(tmp_path):
    """Task t's adapter, loaded by PeftModel.from_pretrained onto the model after tasks < t, gives the model
    after task t; merging the adapters in order reproduces the continual model."""
    model, kl = make()
    for t in range(2):
        data = CASE.batches(seed=t)
        kl.begin_task(data, CASE.loss)
        train(kl, data)
        kl.end_task(data, CASE.loss, export_adapter_to=tmp_path / f"task{t + 1}")
    probe = CASE.batches(seed=7)[0]
    rebuilt = CASE.model()
    for t in range(2):
        peft_model = PeftModel.from_pretrained(rebuilt, tmp_path / f"task{t + 1}")
        rebuilt = peft_model.merge_and_unload()
    torch.testing.assert_close(hidden(rebuilt, probe), hidden(model, probe), rtol=1e-4, atol=1e-5)


def test_export_needs_an_active_task(tmp_path):
    _, kl = make()
    with pytest.raises(RuntimeError, match="between begin_task and end_task"):
        kl.export_adapter(tmp_path / "x")
