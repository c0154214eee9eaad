"""The engine on a CUDA device: whole continual runs through the Triton kernels and the CUDA extension.

The kernel tests check each op alone; these check that the engine's dispatch on CUDA (fused LoRA forward/backward
inside PEFT's layers, residual projection, second moments, the batched rSVD) gives the CPU reference path's result.
"""

import pytest
import torch

from keeplora import KeepLoRA, KeepLoRAConfig
from keeplora.statistics import move_to_device
from support.tiny_models import CASES, sgd_pass

pytestmark = pytest.mark.gpu


def _continual_run(device: str, dtype: torch.dtype, tasks: int = 2, stats_dtype: str = "float32"):
    """Two tasks on the tiny Llama (its own LM loss, so nothing outside the model sits on the CPU)."""
    case = CASES["llama"]
    model = case.model().to(device=device, dtype=dtype)
    kl = KeepLoRA(
        model,
        KeepLoRAConfig(
            target_modules=case.targets, r=4, alpha=4, feature_energy=0.9, stats_dtype=stats_dtype, progress=False
        ),
    )
    snapshots = []
    for task in range(tasks):
        data = move_to_device(case.batches(n=2, seed=task), torch.device(device))
        kl.begin_task(data, case.loss)
        start = {n: l.base_layer.weight.detach().clone() for n, l in kl.layers.items()}
        bases = {n: p.clone() for n, p in kl.bases.items()}
        adapters = {n: l.lora_A[kl.adapter_name].weight.detach().clone() for n, l in kl.layers.items()}
        sgd_pass(model, kl.trainable_parameters(), data, case.loss)
        kl.end_task(data, case.loss)
        snapshots.append(dict(start=start, bases=bases, adapters=adapters))
    return model, kl, snapshots


def test_cuda_run_equals_the_cpu_reference_in_fp64():
    _, cpu, _ = _continual_run("cpu", torch.float64, stats_dtype="float64")
    _, gpu, _ = _continual_run("cuda", torch.float64, stats_dtype="float64")
    for name in cpu.layers:
        torch.testing.assert_close(
            gpu.layers[name].base_layer.weight.cpu(), cpu.layers[name].base_layer.weight, rtol=1e-7, atol=1e-9
        )
        assert gpu.bases[name].shape == cpu.bases[name].shape
        p_gpu, p_cpu = gpu.bases[name].cpu(), cpu.bases[name]
        torch.testing.assert_close(p_gpu @ p_gpu.T, p_cpu @ p_cpu.T, rtol=0, atol=1e-7)


# |A·P| bound: the adapter rows are computed against an fp32 basis (CPU reference: ~1e-7) and, in a bf16 model,
# stored in bf16 (rounding 2^-9 per entry; CPU reference: ~1e-3 at d = 32)
A_PERP = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_run_keeps_the_guarantees(dtype, backend, monkeypatch):
    """A ⟂ the memory basis at every task start; in fp32 the merged update of task 2 leaves task 1's features
    alone to the weights' own rounding (a bf16 weight's rounding, ~4e-3 relative, would hide the property).
    ``triton``: every op that has a Triton kernel runs it (auto takes Triton only where it measured faster)."""
    monkeypatch.setenv("KEEPLORA_BACKEND", backend)
    model, kl, snaps = _continual_run("cuda", dtype)
    for name in kl.layers:
        for snap in snaps:
            a, basis = snap["adapters"][name].float(), snap["bases"][name].float()
            assert torch.isfinite(a).all()
            if basis.numel():
                assert (a @ basis).abs().max() <= A_PERP[dtype], name
        weight = kl.layers[name].base_layer.weight
        assert torch.isfinite(weight).all()
        if dtype == torch.float32:
            delta = weight - snaps[1]["start"][name]
            basis = snaps[1]["bases"][name]  # what task 2 had to keep
            assert delta.abs().max() > 0, name  # task 2 did change the weight
            if basis.numel():
                assert (delta @ basis).abs().max() <= 1e-6 * weight.abs().max(), name
