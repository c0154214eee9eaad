"""Engine invariants as hypothesis properties over the tiny transformers models of ``support.tiny_models`` and short
random task sequences (2–3 tasks, random ranks, energies and B initialisations):

* ``begin_task`` keeps the function (outputs unchanged right after it);
* the task's weight change leaves the inputs of the pre-task bases alone: ``ΔW·P ≈ 0`` after each ``end_task``;
* the bases stay orthonormal, within ``d_in`` columns, and only grow (the old columns kept).
"""

from __future__ import annotations

import warnings

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keeplora import KeepLoRA, KeepLoRAConfig, KeepLoRAWarning
from keeplora.adapters import target_weight
from support.properties import count_example, orthonormality_error
from support.tiny_models import CASES

# Every example builds a model and runs a few tasks: a sixth of the profile's examples (8 under "ci").
EXAMPLES = max(3, settings().max_examples // 6)


def _outputs(model, batch):
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    for field in ("logits", "last_hidden_state", "text_embeds"):
        value = getattr(out, field, None)
        if value is not None:
            return value
    raise AssertionError(f"no output tensor in {type(out).__name__}")


def _weights(kl) -> dict[str, torch.Tensor]:
    """Every target's effective weight ``W + s·B·A`` in float64."""
    out = {}
    for name, layer in kl.layers.items():
        a = layer.lora_A[kl.adapter_name].weight.double()
        b = layer.lora_B[kl.adapter_name].weight.double()
        out[name] = target_weight(layer).double() + kl.config.scale * (b @ a)
    return out


@settings(max_examples=EXAMPLES)
@given(
    case_name=st.sampled_from(sorted(CASES)),
    tasks=st.integers(2, 3),
    r=st.integers(1, 4),
    weight_energy=st.sampled_from([0.0, 0.3, 0.6, 0.9]),
    feature_energy=st.floats(0.5, 1.0),
    b_init=st.sampled_from(["gradient", "zero"]),
    lr=st.sampled_from([1e-2, 5e-2]),
    seed=st.integers(0, 1000),
)
def test_task_sequences_keep_the_engine_invariants(
    case_name, tasks, r, weight_energy, feature_energy, b_init, lr, seed
):
    count_example()
    case = CASES[case_name]
    model = case.model(seed=seed)
    config = KeepLoRAConfig(
        target_modules=case.targets,
        r=r,
        alpha=float(r),
        weight_energy=weight_energy,
        feature_energy=feature_energy,
        b_init=b_init,
        progress=False,
    )
    kl = KeepLoRA(model, config)
    d_in = {n: layer.in_features for n, layer in kl.layers.items()}
    for task in range(tasks):
        data = case.batches(n=2, seed=seed + task)
        old = {n: p.double().clone() for n, p in kl.bases.items()}
        before = _outputs(model, data[0])
        weights = _weights(kl)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KeepLoRAWarning)  # a basis may fill d_in (ε_f near 1)
            kl.begin_task(data, case.loss)
        torch.testing.assert_close(_outputs(model, data[0]), before, rtol=1e-4, atol=1e-5)

        kl.model.train()
        opt = torch.optim.AdamW(kl.trainable_parameters(), lr=lr)
        for step in range(2):
            case.loss(kl.model, data[step % len(data)]).backward()
            opt.step()
            opt.zero_grad()
        kl.model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KeepLoRAWarning)
            kl.end_task(data, case.loss)

        after = _weights(kl)
        for name in kl.layers:
            p = old[name]
            delta = after[name] - weights[name]
            scale = max(weights[name].abs().max().item(), 1.0)
            if p.shape[1]:
                assert (delta @ p).abs().max().item() <= 1e-5 * scale, (name, task)
            new = kl.bases[name].double()
            assert new.shape[0] == d_in[name] and p.shape[1] <= new.shape[1] <= d_in[name], (name, task)
            torch.testing.assert_close(new[:, : p.shape[1]], p)
            assert orthonormality_error(new) <= 1e-5, (name, task)
