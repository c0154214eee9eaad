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


def _continual_run(
    device: str, dtype: torch.dtype, tasks: int = 2, stats_dtype: str = "float32", case_name: str = "llama"
):
    """Two tasks on a tiny model (Llama: its own LM loss, so nothing outside the model sits on the CPU); dropout
    off, so that runs on two devices see the same function.

    Each task's snapshot holds the task's start (weights, bases, A) and ``stages``: sign-free quantities after
    begin_task, after training and after end_task, for comparing two runs step by step."""
    case = CASES[case_name]
    model = case.model().to(device=device, dtype=dtype)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
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
        stages = {"begin_task": _stage(kl)}
        sgd_pass(model, kl.trainable_parameters(), data, case.loss)
        stages["trained"] = _stage(kl)
        kl.end_task(data, case.loss)
        stages["end_task"] = _stage(kl)
        snapshots.append(dict(start=start, bases=bases, adapters=adapters, stages=stages))
    return model, kl, snapshots


def _stage(kl: KeepLoRA) -> dict[str, dict[str, torch.Tensor]]:
    """Per target: the weight, the adapter's update ``B·A`` and the projectors on A's rows and on the basis (an
    SVD's sign choice, which may differ between LAPACK and cuSOLVER, changes none of them)."""
    out = {}
    for name, layer in kl.layers.items():
        a = layer.lora_A[kl.adapter_name].weight.detach().cpu()
        b = layer.lora_B[kl.adapter_name].weight.detach().cpu()
        p = kl.bases[name].cpu()
        out[name] = {
            "weight": layer.base_layer.weight.detach().cpu().clone(),
            "adapter_update": b @ a,
            "adapter_projector": a.T @ a,
            "basis_projector": p @ p.T,
        }
    return out


# fp64 runs on the two devices differ only by the order of floating-point operations. BERT, not Llama: Llama's
# RMSNorm computes in fp32 whatever the model's dtype, so an "fp64" Llama carries fp32 roundings, which differ
# between the devices' libraries (measured on the H200: the runs part at 1e-8 in the first gradient estimate).
_FP64_CLOSE = {
    "weight": dict(rtol=1e-7, atol=1e-9),
    "adapter_update": dict(rtol=1e-7, atol=1e-9),
    "adapter_projector": dict(rtol=0, atol=1e-7),
    "basis_projector": dict(rtol=0, atol=1e-7),
}


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cuda_run_equals_the_cpu_reference_in_fp64(backend, monkeypatch):
    """Stage by stage (each task's begin_task, training, end_task), so that a failure names where the runs part;
    ``torch``: the CUDA run without the extension's and Triton's ops (the CPU run is the same under both)."""
    monkeypatch.setenv("KEEPLORA_BACKEND", backend)
    _, cpu, cpu_snaps = _continual_run("cpu", torch.float64, stats_dtype="float64", case_name="bert")
    _, _, gpu_snaps = _continual_run("cuda", torch.float64, stats_dtype="float64", case_name="bert")
    report, failed = [], []
    for task, (c, g) in enumerate(zip(cpu_snaps, gpu_snaps), 1):
        for stage in c["stages"]:
            for name in cpu.layers:
                for quantity, tol in _FP64_CLOSE.items():
                    x, y = g["stages"][stage][name][quantity], c["stages"][stage][name][quantity]
                    where = f"task {task} {stage} {name} {quantity}"
                    if x.shape != y.shape:
                        failed.append(f"{where}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
                    elif x.numel():
                        diff = (x - y).abs()
                        line = f"{where}: max |diff| {float(diff.max()):.3e}"
                        report.append(line)
                        if bool((diff > tol["atol"] + tol["rtol"] * y.abs()).any()):
                            failed.append(line)
    assert not failed, (
        "the CUDA and CPU fp64 runs part at:\n" + "\n".join(failed[:20]) + "\n\nall:\n" + "\n".join(report)
    )


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpointed_gradient_pass_on_cuda_gives_the_plain_pass_sums(dtype):
    from keeplora.statistics import estimate_gradients

    case = CASES["llama"]
    model = case.model().to(device="cuda", dtype=dtype).eval()
    kl = KeepLoRA(model, KeepLoRAConfig(target_modules=case.targets, r=4, progress=False))
    data = move_to_device(case.batches(n=2), torch.device("cuda"))
    kw = dict(device=torch.device("cuda"), dtype=torch.float32)
    plain = estimate_gradients(model, kl.layers, data, case.loss, **kw)
    again = estimate_gradients(model, kl.layers, data, case.loss, **kw)
    kept = estimate_gradients(model, kl.layers, data, case.loss, checkpoint=True, **kw)
    for n in plain:
        scale = plain[n].abs().max()
        assert scale > 0
        # the recomputed forward runs the same kernels on the same inputs: the checkpointed pass differs from the
        # plain one by no more than two plain passes differ (attention backward kernels may sum in any order)
        spread = (again[n] - plain[n]).abs().max()
        assert (kept[n] - plain[n]).abs().max() <= 2 * spread + 1e-6 * scale, n
