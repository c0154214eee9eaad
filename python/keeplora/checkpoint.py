"""Saving and restoring the continual state, and exporting a task's adapter in PEFT's format.

:func:`save_state` writes a :class:`~keeplora.state.ContinualState` with the config and the model tensors it goes
with; :func:`read_state` reads one back, checked against a model, as a :class:`SavedState` that
:meth:`keeplora.KeepLoRA.load` applies. A state folder holds ``keeplora_state.json`` (format version, config, task
counter, history, the record of the task in progress, target shapes and weight fingerprints), ``bases.safetensors``
(the protected bases), ``weights.safetensors`` (the current target weights, which carry every merged task), mid-task
``adapter.safetensors`` (A, B and B at task start), and ``manifest.json`` (every file's size and sha256).
Every target weight is saved ``d_out × d_in`` (the engine's convention, the shape in ``targets``): an ``nn.Linear``
weight as the model stores it, a transformers ``Conv1D`` weight (stored ``d_in × d_out``) transposed; A and B are
PEFT's ``r × d_in`` and ``d_out × r`` for both. It is
written with :func:`keeplora.durable.atomic_folder` (fsynced, then renamed into place), so a crash or power loss
leaves the previous or the new state, never a mix; loading verifies the manifest and checks every tensor before the
model is touched.

Under ``torch.distributed`` every rank calls save/export (sharded tensors are gathered with collectives) and rank 0
alone writes; every rank returns once the folder is in place (or raises if writing failed). Every rank loads.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import distributed, durable, finite
from .config import KeepLoRAConfig
from .state import ContinualState, fingerprint, same_fingerprint

FORMAT_VERSION = 1
STATE_FILE = "keeplora_state.json"


@dataclass
class SavedState:
    """A state folder read back and checked: the config, the continual state (on the CPU, as saved), the target
    weights, and, for a state saved during a task, every target's adapter ``(A r×d_in, B d_out×r)``."""

    config: KeepLoRAConfig
    state: ContinualState
    weights: dict[str, torch.Tensor]
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] | None


def target_weights(layers: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``{target: base weight}`` (``d_out × d_in``, see :func:`keeplora.adapters.target_weight`) of PEFT LoRA
    layers."""
    from .adapters import target_weight

    return {name: target_weight(layer) for name, layer in layers.items()}


def _host(t: torch.Tensor) -> torch.Tensor:
    """A whole (gathered when sharded), contiguous CPU copy of ``t``."""
    return distributed.full_tensor(t.detach()).contiguous().cpu()


def save_state(
    directory: str | os.PathLike, config: KeepLoRAConfig, state: ContinualState, layers: Mapping[str, Any]
) -> None:
    """Write ``state`` and ``config`` to ``directory`` with the model tensors that go with them, read from
    ``layers`` (``{target: PEFT LoRA layer}``): the target weights and, during a task, the adapter
    ``config.adapter_name``."""
    weights = target_weights(layers)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "tasks_done": state.tasks_done,
        "in_task": state.in_task,
        "history": state.history,
        "task_record": state.task_record,
        "targets": {n: list(w.shape) for n, w in weights.items()},
        "initial_fingerprint": state.initial_fingerprint,
        "current_fingerprint": fingerprint(weights),
    }
    files = {
        "bases.safetensors": {n: p.contiguous().cpu() for n, p in state.bases.items()},
        "weights.safetensors": {n: _host(w) for n, w in weights.items()},
    }
    if state.in_task:
        adapter = config.adapter_name
        tensors = {}
        for n, layer in layers.items():
            tensors[f"{n}.lora_A"] = _host(layer.lora_A[adapter].weight)
            tensors[f"{n}.lora_B"] = _host(layer.lora_B[adapter].weight)
            tensors[f"{n}.lora_B_start"] = state.b_start[n].contiguous().cpu()
        files["adapter.safetensors"] = tensors
    with distributed.failures_shared(f"save to {directory}"):
        if distributed.rank() != 0:
            return
        with durable.atomic_folder(directory) as tmp:
            (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1))
            for file, tensors in files.items():
                save_file(tensors, str(tmp / file))


def read_state(directory: str | os.PathLike, model: torch.nn.Module) -> SavedState:
    """Read a state folder for ``model`` and check everything (files, checksums, config, targets, shapes, dtypes,
    values, and that the model's target weights are the pre-trained ones the state started from or the saved ones)
    without touching the model. :meth:`keeplora.KeepLoRA.load` applies the result."""
    folder = durable.readable_folder(directory)
    with distributed.failures_shared(f"load from {directory}"):  # local checks: a rank that fails stops all
        config, meta, bases, weights, adapter, targets = _read_folder(folder, model)
    _check_fingerprint(targets, meta, folder)  # sums over shards (collectives): every rank decides alike
    state = ContinualState(
        bases=bases,
        initial_fingerprint=meta["initial_fingerprint"],
        tasks_done=int(meta["tasks_done"]),
        in_task=bool(meta["in_task"]),
        history=list(meta["history"]),
        task_record=dict(meta.get("task_record") or {}),
        b_start={n: adapter[f"{n}.lora_B_start"] for n in targets} if adapter is not None else {},
    )
    adapters = None
    if adapter is not None:
        adapters = {n: (adapter[f"{n}.lora_A"], adapter[f"{n}.lora_B"]) for n in targets}
    return SavedState(config=config, state=state, weights=weights, adapters=adapters)


_META_KEYS = ("config", "tasks_done", "in_task", "history", "targets", "initial_fingerprint", "current_fingerprint")


def _read_folder(folder: Path, model: torch.nn.Module):
    """``(config, meta, bases, weights, adapter or None, {target: weight})`` of a state folder, every part checked
    against itself and against ``model`` (all but the weights' fingerprint), without collectives. Raises
    ``FileNotFoundError`` (no state), ``IntegrityError`` (a damaged file, named) or ``ValueError`` (a state that
    does not fit this model or this keeplora). Reads the model, never writes it."""
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{folder} holds no KeepLoRA state ({STATE_FILE} is missing)")
    if not durable.verify(folder):
        warnings.warn(
            f"{folder} has no {durable.MANIFEST} (saved by an older keeplora): its files' integrity cannot "
            "be verified; save it again to add one",
            durable.UnverifiedWarning,
            stacklevel=3,
        )
    try:
        meta = json.loads((folder / STATE_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise durable.IntegrityError(f"{folder / STATE_FILE} is damaged: {error}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(
            f"{folder}: state format {version} is not supported (this keeplora reads format {FORMAT_VERSION})"
        )
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise durable.IntegrityError(f"{folder / STATE_FILE} lacks the entries {missing}")
    try:
        config = KeepLoRAConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{folder / STATE_FILE} holds a config this keeplora rejects: {error}") from None
    targets = _check_model_matches(model, config, meta, folder)
    bases = _read_tensors(folder, "bases.safetensors")
    weights = _read_tensors(folder, "weights.safetensors")
    expected: dict[str, dict[str, tuple[Any, torch.dtype | None]]] = {
        "bases.safetensors": {n: ((w.shape[1], None), None) for n, w in targets.items()},
        "weights.safetensors": {n: (tuple(w.shape), w.dtype) for n, w in targets.items()},
    }
    files = {"bases.safetensors": bases, "weights.safetensors": weights}
    adapter = None
    if meta["in_task"]:
        adapter = _read_tensors(folder, "adapter.safetensors")
        files["adapter.safetensors"] = adapter
        r = config.r
        expected["adapter.safetensors"] = {
            key: (shape, None)
            for n, w in targets.items()
            for key, shape in (
                (f"{n}.lora_A", (r, w.shape[1])),
                (f"{n}.lora_B", (w.shape[0], r)),
                (f"{n}.lora_B_start", (w.shape[0], r)),
            )
        }
    for file, tensors in files.items():
        _check_tensors(folder / file, tensors, expected[file])
    bad = finite.nonfinite({f"{file}: {key}": t for file, tensors in files.items() for key, t in tensors.items()})
    if bad:
        raise durable.IntegrityError(f"{folder}: non-finite values in {bad[:4]}; the state is damaged")
    for name, basis in bases.items():
        if basis.shape[1] > basis.shape[0]:
            raise durable.IntegrityError(
                f"{folder / 'bases.safetensors'}: the basis of {name!r} has "
                f"{basis.shape[1]} columns, more than its {basis.shape[0]} rows"
            )
    return config, meta, bases, weights, adapter, targets


def _read_tensors(folder: Path, file: str) -> dict[str, torch.Tensor]:
    path = folder / file
    if not path.is_file():
        raise durable.IntegrityError(f"{path} is missing")
    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise durable.IntegrityError(f"{path} is damaged: {type(error).__name__}: {error}") from None


def _check_tensors(
    path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[tuple, torch.dtype | None]]
) -> None:
    """Every expected key present with its shape (None = any size) and dtype (None = any floating dtype)."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise durable.IntegrityError(f"{path} lacks {missing[:4]} ({len(missing)} tensors)")
    for key, (shape, dtype) in expected.items():
        t = tensors[key]
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = tuple("any" if s is None else s for s in shape)
            raise ValueError(f"{path}: {key!r} has shape {tuple(t.shape)}, but this model needs {want}")
        if not t.is_floating_point() or (dtype is not None and t.dtype != dtype):
            raise ValueError(
                f"{path}: {key!r} is {t.dtype}, but this model needs "
                f"{dtype if dtype is not None else 'a floating-point dtype'}"
            )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    from .adapters import unwrap_model

    return unwrap_model(model)


def _check_model_matches(model, config, meta, folder) -> dict[str, torch.nn.Module]:
    """Before touching the model: the config must fit it (as KeepLoRA's constructor checks it), and the targets and
    their shapes must be the saved ones. Returns ``{target name: its base weight, d_out × d_in}``."""
    from .adapters import check_shapes, resolve_targets, target_weight

    bare = distributed.unwrap_data_parallel(model)
    names = resolve_targets(bare, config)
    check_shapes(bare, names, config)
    modules = dict(_unwrap(bare).named_modules())
    distributed.check_wrapping(model, bare, {n: modules[n] for n in names}, config.adapter_name)
    saved = meta["targets"]
    if sorted(names) != sorted(saved):
        raise ValueError(
            f"{folder} was saved for targets {sorted(saved)[:4]}… ({len(saved)}), but this model has "
            f"{sorted(names)[:4]}… ({len(names)}): not the same model"
        )
    targets = {}
    for name in names:
        weight = target_weight(modules[name])
        if list(weight.shape) != list(saved[name]):
            raise ValueError(
                f"{folder}: target {name!r} was {tuple(saved[name])} (d_out, d_in) when saved, but is "
                f"{tuple(weight.shape)} in this model: not the same model"
            )
        targets[name] = weight
    return targets


def _check_fingerprint(weights: dict[str, torch.Tensor], meta: dict, folder: Path) -> None:
    """The model's target weights must be the pre-trained ones the state started from, or the saved ones."""
    found = fingerprint(weights)
    if not (
        same_fingerprint(found, meta["initial_fingerprint"]) or same_fingerprint(found, meta["current_fingerprint"])
    ):
        raise ValueError(
            f"{folder} was saved from a model with other weights in the target modules; load it into "
            "the same pre-trained model (or the model it was saved from)"
        )


def export_peft_adapter(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    config: KeepLoRAConfig,
    layers: Mapping[str, Any],
    b_start: Mapping[str, torch.Tensor],
) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` of the task's change (B − B_start) of the
    adapter ``config.adapter_name`` on ``layers`` (the targets' PEFT LoRA layers in ``model``)."""
    from peft import LoraConfig

    from .adapters import fan_in_fan_out, unwrap_model

    adapter = config.adapter_name
    tensors = {}
    for name, layer in layers.items():
        b = distributed.full_tensor(layer.lora_B[adapter].weight.detach())
        tensors[f"base_model.model.{name}.lora_A.weight"] = _host(layer.lora_A[adapter].weight)
        tensors[f"base_model.model.{name}.lora_B.weight"] = (b - b_start[name]).contiguous().cpu()
    with distributed.failures_shared(f"adapter export to {directory}"):
        if distributed.rank() != 0:
            return
        with durable.atomic_folder(directory) as tmp:
            root = unwrap_model(model)
            base_name = getattr(getattr(root, "config", None), "_name_or_path", None) or None
            LoraConfig(
                r=config.r,
                lora_alpha=config.alpha,
                target_modules=list(layers),
                bias="none",
                fan_in_fan_out=fan_in_fan_out(root, list(layers)),
                base_model_name_or_path=base_name,
            ).save_pretrained(str(tmp))
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
