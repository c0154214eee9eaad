"""Saving and restoring the continual state, and exporting a task's adapter in PEFT's format.

A state folder holds ``keeplora_state.json`` (format version, config, task counter, history, target shapes and
weight fingerprints), ``bases.safetensors`` (the protected bases), ``weights.safetensors`` (the current target
weights, which carry every merged task) and, mid-task, ``adapter.safetensors`` (A, B and B at task start). It is
written to a temporary folder and renamed into place, so a crash never leaves a half-written state.

Under ``torch.distributed`` every rank calls save/export (sharded tensors are gathered with collectives) and rank 0
alone writes; every rank returns once the folder is in place (or raises if writing failed). Every rank loads.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from . import distributed

if TYPE_CHECKING:  # pragma: no cover
    from .engine import KeepLoRA

FORMAT_VERSION = 1
STATE_FILE = "keeplora_state.json"


def fingerprint(weights: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per target ``[Σw, Σw²]`` of the weight in fp64: identifies a model's weights without storing them.

    A sharded (FSDP2) weight is summed over its shards without being gathered."""
    out = {}
    for name, weight in weights.items():
        w = weight.detach().double()
        out[name] = [float(distributed.full_tensor(w.sum())), float(distributed.full_tensor(w.square().sum()))]
    return out


def target_weights(kl: "KeepLoRA") -> dict[str, torch.Tensor]:
    return {name: layer.base_layer.weight for name, layer in kl.layers.items()}


def _same_fingerprint(a: dict[str, list[float]], b: dict[str, list[float]]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6) for n in a for x, y in zip(a[n], b[n]))


def _atomic_folder(directory: str | os.PathLike):
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target, Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def _replace_folder(tmp: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old)


def _host(t: torch.Tensor) -> torch.Tensor:
    """A whole (gathered when sharded), contiguous CPU copy of ``t``."""
    return distributed.full_tensor(t.detach()).contiguous().cpu()


def save_state(kl: "KeepLoRA", directory: str | os.PathLike) -> None:
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "config": kl.config.to_dict(),
        "tasks_done": kl.tasks_done,
        "in_task": kl.in_task,
        "history": kl.history,
        "task_record": kl._task_record,
        "targets": {n: [layer.out_features, layer.in_features] for n, layer in kl.layers.items()},
        "initial_fingerprint": kl.initial_fingerprint,
        "current_fingerprint": fingerprint(target_weights(kl)),
    }
    files = {"bases.safetensors": {n: p.contiguous().cpu() for n, p in kl.bases.items()},
             "weights.safetensors": {n: _host(layer.base_layer.weight) for n, layer in kl.layers.items()}}
    if kl.in_task:
        tensors = {}
        for n, layer in kl.layers.items():
            tensors[f"{n}.lora_A"] = _host(layer.lora_A[kl.adapter_name].weight)
            tensors[f"{n}.lora_B"] = _host(layer.lora_B[kl.adapter_name].weight)
            tensors[f"{n}.lora_B_start"] = kl._b_start[n].contiguous().cpu()
        files["adapter.safetensors"] = tensors
    with distributed.failures_shared(f"save to {directory}"):
        if distributed.rank() != 0:
            return
        target, tmp = _atomic_folder(directory)
        try:
            (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1))
            for file, tensors in files.items():
                save_file(tensors, str(tmp / file))
            _replace_folder(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def load_state(cls, directory: str | os.PathLike, model: torch.nn.Module) -> "KeepLoRA":
    from .config import KeepLoRAConfig

    folder = Path(directory)
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{folder} holds no KeepLoRA state ({STATE_FILE} is missing)")
    meta = json.loads((folder / STATE_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: state format {meta.get('format_version')} is not supported "
                         f"(this keeplora reads format {FORMAT_VERSION})")
    config = KeepLoRAConfig.from_dict(meta["config"])
    _check_model_matches(model, config, meta, folder)
    bases = load_file(str(folder / "bases.safetensors"))
    kl = cls(model, config, _bases={})
    weights = load_file(str(folder / "weights.safetensors"))
    with torch.no_grad():
        for name, layer in kl.layers.items():
            distributed.copy_full_(layer.base_layer.weight, weights[name])
        kl.bases = {n: bases[n].to(device=kl.device, dtype=config.torch_stats_dtype) for n in kl.layers}
        if meta["in_task"]:
            adapter = load_file(str(folder / "adapter.safetensors"))
            for name, layer in kl.layers.items():
                lora_b = layer.lora_B[kl.adapter_name].weight
                distributed.copy_full_(layer.lora_A[kl.adapter_name].weight, adapter[f"{name}.lora_A"])
                distributed.copy_full_(lora_b, adapter[f"{name}.lora_B"])
                kl._b_start[name] = adapter[f"{name}.lora_B_start"].to(device=kl.device, dtype=lora_b.dtype)
    kl.initial_fingerprint = meta["initial_fingerprint"]
    kl.tasks_done = int(meta["tasks_done"])
    kl.in_task = bool(meta["in_task"])
    kl.history = list(meta["history"])
    kl._task_record = dict(meta.get("task_record") or {})
    return kl


def _check_model_matches(model, config, meta, folder) -> None:
    """Before touching the model: the targets and their shapes must be the saved ones."""
    from .adapters import resolve_targets, unwrap_model

    model = distributed.unwrap_data_parallel(model)
    names = resolve_targets(model, config)
    saved = meta["targets"]
    if sorted(names) != sorted(saved):
        raise ValueError(f"{folder} was saved for targets {sorted(saved)[:4]}… ({len(saved)}), but this model has "
                         f"{sorted(names)[:4]}… ({len(names)}): not the same model")
    modules = dict(unwrap_model(model).named_modules())
    weights = {}
    for name in names:
        module = modules[name]
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if [base.out_features, base.in_features] != list(saved[name]):
            raise ValueError(f"{folder}: target {name!r} was {tuple(saved[name])} (d_out, d_in) when saved, but is "
                             f"{(base.out_features, base.in_features)} in this model: not the same model")
        weights[name] = base.weight
    found = fingerprint(weights)
    if not (_same_fingerprint(found, meta["initial_fingerprint"])
            or _same_fingerprint(found, meta["current_fingerprint"])):
        raise ValueError(f"{folder} was saved from a model with other weights in the target modules; load it into "
                         "the same pre-trained model (or the model it was saved from)")


def export_peft_adapter(kl: "KeepLoRA", directory: str | os.PathLike) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` of the task's change (B − B_start)."""
    from peft import LoraConfig

    from .adapters import unwrap_model

    tensors = {}
    for name, layer in kl.layers.items():
        b = distributed.full_tensor(layer.lora_B[kl.adapter_name].weight.detach())
        tensors[f"base_model.model.{name}.lora_A.weight"] = _host(layer.lora_A[kl.adapter_name].weight)
        tensors[f"base_model.model.{name}.lora_B.weight"] = (b - kl._b_start[name]).contiguous().cpu()
    with distributed.failures_shared(f"adapter export to {directory}"):
        if distributed.rank() != 0:
            return
        target, tmp = _atomic_folder(directory)
        try:
            root = unwrap_model(kl.model)
            base_name = getattr(getattr(root, "config", None), "_name_or_path", None) or None
            LoraConfig(r=kl.config.r, lora_alpha=kl.config.alpha, target_modules=list(kl.layers), bias="none",
                       base_model_name_or_path=base_name).save_pretrained(str(tmp))
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            _replace_folder(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
