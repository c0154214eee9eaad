"""Soak: a 20-task sequence on the tiny BERT, every invariant checked after every task.

After each task: the bases orthonormal (to 1e-5), within ``d_in`` columns and only growing (old columns kept); the
task's weight change leaves the pre-task bases' inputs alone (``ΔW·P ≈ 0``); a saved state loads into a fresh copy
of the pre-trained model with equal bases, weights and outputs. The memory energy is high enough that every basis
fills its input space part-way through, so later tasks exercise the full-basis path (a warning, a zero adapter, the
weights unchanged). The tensors the process holds may grow only by the bases' own growth: a census of live tensors
(by storage, after a garbage collection) catches anything kept per task (gradient sums, statistics, old adapters).
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

from keeplora import KeepLoRA, KeepLoRAConfig, KeepLoRAWarning
from support.properties import orthonormality_error
from support.tiny_models import CASES

CASE = CASES["bert"]
TASKS = 20


def _outputs(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def _live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every live tensor (parameters included), after a full collection."""
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance() on some module objects warns of their deprecation
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        tensors = [obj for obj in objects if isinstance(obj, torch.Tensor)]
    del objects
    for obj in tensors:
        try:
            if obj.device.type != "cpu":
                continue
            storage = obj.untyped_storage()
            key = storage.data_ptr()
        except (ReferenceError, RuntimeError):  # weakref proxies; tensors without storage (meta, sparse, fake ones
            continue  # that earlier torch.compile tests of the same process leave behind)
        if key and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


@pytest.mark.slow
def test_twenty_tasks_keep_every_invariant_and_hold_no_per_task_memory(tmp_path):
    config = KeepLoRAConfig(
        target_modules=CASE.targets, r=4, alpha=4.0, weight_energy=0.3, feature_energy=0.999, progress=False
    )
    model = CASE.model()
    kl = KeepLoRA(model, config)
    d_in = {n: layer.in_features for n, layer in kl.layers.items()}
    probe = CASE.batches(n=1, seed=10_000)[0]
    full_seen, census = 0, []
    for task in range(TASKS):
        data = CASE.batches(n=2, seed=task)
        old = {n: p.double().clone() for n, p in kl.bases.items()}
        weights = {n: layer.base_layer.weight.double().clone() for n, layer in kl.layers.items()}
        full = {n for n, p in old.items() if p.shape[1] == d_in[n]}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", KeepLoRAWarning)
            kl.begin_task(data, CASE.loss)
        for name in full:  # a full basis: warned, and the adapter stays zero
            assert any(name in str(w.message) and "spans all" in str(w.message) for w in caught), (task, name)
            layer = kl.layers[name]
            assert not layer.lora_A[kl.adapter_name].weight.any() and not layer.lora_B[kl.adapter_name].weight.any()
        full_seen += len(full)

        kl.model.train()
        opt = torch.optim.AdamW(kl.trainable_parameters(), lr=5e-2)
        for step in range(2):
            CASE.loss(kl.model, data[step]).backward()
            opt.step()
            opt.zero_grad()
        kl.model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KeepLoRAWarning)
            kl.end_task(data, CASE.loss)

        for name, layer in kl.layers.items():
            p, new = old[name], kl.bases[name].double()
            delta = layer.base_layer.weight.double() - weights[name]
            if p.shape[1]:
                assert (delta @ p).abs().max().item() <= 1e-5 * max(weights[name].abs().max().item(), 1.0)
            if name in full:
                assert not delta.any(), (task, name)
            assert p.shape[1] <= new.shape[1] <= d_in[name], (task, name)
            torch.testing.assert_close(new[:, : p.shape[1]], p)
            assert orthonormality_error(new) <= 1e-5, (task, name)

        folder = tmp_path / "state"
        kl.save(str(folder))
        restored = KeepLoRA.load(str(folder), CASE.model())
        assert restored.tasks_done == task + 1
        for name in kl.layers:
            assert torch.equal(restored.bases[name], kl.bases[name]), (task, name)
            assert torch.equal(restored.layers[name].base_layer.weight, kl.layers[name].base_layer.weight)
        torch.testing.assert_close(_outputs(restored.model, probe), _outputs(kl.model, probe), rtol=0, atol=0)
        del restored
        bases_bytes = sum(p.untyped_storage().nbytes() for p in kl.bases.values())
        census.append(_live_tensor_bytes() - bases_bytes)

    assert full_seen > 0, "no basis filled its input space: the full-basis path went untested"
    # after the first tasks (lazily created buffers, the optimizer's first state) the non-basis tensors stay put:
    # a tensor kept per task, even one 32 × 32 fp32 matrix (4 KiB), would exceed the bound over 16 tasks
    settled = census[3]
    print("live non-basis tensor bytes per task:", census)
    assert max(census[3:]) <= settled + 4096, census
