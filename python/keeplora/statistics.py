"""Data passes over a task: the target-only gradient estimate and the streaming input second moments.

Both passes observe the targets through forward hooks on the KeepLoRA layers, so they work for any model and any
user forward/loss function. Accumulators live on the model's device in fp32 (or fp64) and are only read back once
per task; under ``torch.distributed`` each pass ends with one status exchange (a rank that failed makes every rank
raise) and then sums its accumulators over the ranks (sums and counts, never averages of averages; see
:mod:`keeplora.distributed`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

import keeplora_kernels as kk

from .distributed import all_reduce_sum, failures_shared

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class EmptyDataError(ValueError):
    """A task's dataloader yielded no batch."""


# ----------------------------------------------------------------------------------------------- batches
def move_to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [move_to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def model_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The default loss: the model's own, ``model(**batch).loss``."""
    if not isinstance(batch, Mapping):
        raise TypeError("loss_fn=None uses the model's own loss and needs dict batches (model(**batch).loss); "
                        f"got a {type(batch).__name__}: pass loss_fn(model, batch) -> loss")
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None:
        raise ValueError("the model returned no loss (are labels in the batch?); pass loss_fn(model, batch) -> loss")
    return loss


def evenly_spaced(batches: Iterable[Any], fraction: float) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, batch)`` for an evenly spaced ``fraction`` of the batches, always including the first."""
    for i, batch in enumerate(batches):
        if fraction >= 1.0 or math.ceil((i + 1) * fraction) > math.ceil(i * fraction):
            yield i, batch


def _progress(iterable: Iterable, desc: str, enabled: bool, total: Optional[int] = None):
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------- attention masks
class AttentionMaskTracker:
    """Knows, inside a forward pass, the 2-D padding masks of the enclosing module calls.

    Every module whose ``forward`` takes an ``attention_mask`` argument pushes the 2-D mask it was called with
    (batch × sequence) while it runs. A target's input ``x`` of shape ``(batch, sequence, d)`` uses the innermost
    mask of exactly that shape; inputs with no such mask (e.g. a vision tower next to a text tower) count every
    token. 4-D additive masks built inside the model are ignored.
    """

    def __init__(self, model: nn.Module):
        self._stack: list[Optional[torch.Tensor]] = []
        self._handles = []
        for module in model.modules():
            try:
                params = inspect.signature(module.forward).parameters
            except (TypeError, ValueError):
                continue
            if "attention_mask" not in params:
                continue
            position = list(params).index("attention_mask")
            self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(position), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post_hook, always_call=True))

    def _make_pre_hook(self, position: int):
        def hook(_module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if mask is None and len(args) > position:
                mask = args[position]
            self._stack.append(mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None)

        return hook

    def _post_hook(self, *_):
        if self._stack:
            self._stack.pop()

    def mask_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        for mask in reversed(self._stack):
            if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
                return mask.bool()
        return None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# ----------------------------------------------------------------------------------------------- passes
@contextlib.contextmanager
def _frozen_parameters(model: nn.Module):
    """No parameter requires grad inside (so none receives .grad); the flags are restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def estimate_gradients(model: nn.Module, layers: Mapping[str, nn.Module], dataloader: Iterable[Any],
                       loss_fn: Optional[LossFn], *, device: torch.device, dtype: torch.dtype,
                       fraction: float = 1.0, progress: bool = True, desc: str = "gradient"
                       ) -> dict[str, torch.Tensor]:
    """Mean over batches of ``∂L/∂W_l`` (``d_out × d_in``) for every target, and nothing else.

    The gradient of a linear layer's weight is ``dYᵀ·X``. A forward hook records each target call's input X and
    output Y (making Y a graph leaf that requires grad when nothing upstream does); ``torch.autograd.grad`` then
    returns the ``dY`` of exactly those outputs, and ``dYᵀ·X`` is accumulated in ``dtype`` on ``device``. No
    ``.grad`` is ever written (not even of parameters outside the model that the loss uses) and no parameter
    gradient is formed: model parameters are frozen during the pass. The model runs in eval mode (no dropout).
    Raises ``EmptyDataError`` for an empty dataloader and ``FloatingPointError`` for a non-finite loss or gradient
    (checked once at the end: no per-batch host sync). Under ``torch.distributed`` the mean is over the batches of
    all ranks (the sums and the batch count are summed over the ranks) and every rank raises when one failed.
    """
    loss_fn = loss_fn or model_loss
    sums = {name: torch.zeros(layer.base_layer.weight.shape, device=device, dtype=dtype)
            for name, layer in layers.items()}
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def make_hook(name: str):
        def forward_hook(_module, args, output):
            if not torch.is_grad_enabled():
                return None
            if not output.requires_grad:
                output = output.detach().requires_grad_()
            calls.append((name, args[0].detach(), output))
            return output

        return forward_hook

    handles = [layer.register_forward_hook(make_hook(name)) for name, layer in layers.items()]
    count = torch.zeros((), device=device, dtype=dtype)
    first_bad = torch.full((), -1, device=device, dtype=torch.int64)
    with failures_shared(f"{desc} pass"):
        try:
            with _frozen_parameters(model), _eval_mode(model), torch.enable_grad():
                for index, batch in _progress(evenly_spaced(dataloader, fraction), f"keeplora: {desc}", progress):
                    calls.clear()
                    loss = loss_fn(model, move_to_device(batch, device))
                    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                        raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                                        f"{tuple(getattr(loss, 'shape', ()))}")
                    if not calls or not loss.requires_grad:
                        raise ValueError("the loss does not depend on any adapted module's output; check "
                                         "target_modules and loss_fn")
                    bad = ~torch.isfinite(loss.detach())
                    first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, index), first_bad)
                    dys = torch.autograd.grad(loss, [out for _, _, out in calls], allow_unused=True)
                    if all(dy is None for dy in dys):
                        raise ValueError("the loss does not depend on any adapted module's output; check "
                                         "target_modules and loss_fn")
                    for (name, x, _), dy in zip(calls, dys):
                        if dy is not None:  # bf16/fp16 on CUDA: tensor cores, fp32 sums, no upcast copies
                            sums[name] = kk.outer_sum(sums[name], dy.reshape(-1, dy.shape[-1]),
                                                      x.reshape(-1, x.shape[-1]))
                    calls.clear()
                    count += 1
        finally:
            calls.clear()
            for h in handles:
                h.remove()
        if int(first_bad.item()) >= 0:
            raise FloatingPointError(f"non-finite loss in batch {int(first_bad.item())} of the {desc} pass; "
                                     "nothing was changed")
    all_reduce_sum([*sums.values(), count])
    if int(count.item()) == 0:
        raise EmptyDataError(f"the dataloader yielded no batch for the {desc} pass")
    nonfinite = [name for name, s in sums.items() if not bool(torch.isfinite(s).all())]
    if nonfinite:
        raise FloatingPointError(f"non-finite gradient of {nonfinite[:4]} in the {desc} pass; nothing was changed")
    return {name: s / count for name, s in sums.items()}


def collect_second_moments(model: nn.Module, layers: Mapping[str, nn.Module], dataloader: Iterable[Any],
                           forward_fn: Optional[LossFn], *, device: torch.device, dtype: torch.dtype,
                           progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Exact ``C_l = Σ x·xᵀ`` (``d_in × d_in``) of every target's inputs over real tokens, and the token counts.

    ``forward_fn(model, batch)`` runs the forward pass (its return value is ignored; the loss function of the task
    works); None calls ``model(**batch)``. Padding is excluded with the attention masks the model's modules are
    called with (see :class:`AttentionMaskTracker`). Eval mode, no grad. Under ``torch.distributed`` moments and
    token counts are summed over the ranks; a rank with no batch contributes zero.
    """
    forward_fn = forward_fn or (lambda m, b: m(**b) if isinstance(b, Mapping) else m(b))
    moments = {name: torch.zeros(layer.in_features, layer.in_features, device=device, dtype=dtype)
               for name, layer in layers.items()}
    tokens = {name: torch.zeros((), device=device, dtype=torch.int64) for name in layers}
    tracker = AttentionMaskTracker(model)

    def make_hook(name: str):
        def hook(_module, args, _output):
            x = args[0].detach()
            mask = tracker.mask_for(x)
            kk.second_moment_update(moments[name], x, mask)
            tokens[name] += x[..., 0].numel() if mask is None else mask.sum()

        return hook

    handles = [layer.register_forward_hook(make_hook(name)) for name, layer in layers.items()]
    batches = torch.zeros((), device=device, dtype=torch.int64)
    with failures_shared("feature pass"):
        try:
            with _eval_mode(model), torch.no_grad():
                for batch in _progress(dataloader, "keeplora: features", progress):
                    forward_fn(model, move_to_device(batch, device))
                    batches += 1
        finally:
            for h in handles:
                h.remove()
            tracker.close()
    all_reduce_sum([*moments.values(), *tokens.values(), batches])
    if int(batches.item()) == 0:
        raise EmptyDataError("the dataloader yielded no batch for the feature pass")
    return moments, {name: int(t.item()) for name, t in tokens.items()}


__all__ = [
    "AttentionMaskTracker",
    "EmptyDataError",
    "all_reduce_sum",
    "collect_second_moments",
    "estimate_gradients",
    "evenly_spaced",
    "model_loss",
    "move_to_device",
]
