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
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import keeplora_kernels as kk

from . import distributed
from .adapters import target_shape, unwrap_model
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
        raise TypeError(
            "loss_fn=None uses the model's own loss and needs dict batches (model(**batch).loss); "
            f"got a {type(batch).__name__}: pass loss_fn(model, batch) -> loss"
        )
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


def _progress(iterable: Iterable, desc: str, enabled: bool, total: int | None = None):
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
        self._stack: list[torch.Tensor | None] = []
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

    def mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
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


def checkpoint_blocks(model: nn.Module, layers: Mapping[str, nn.Module]) -> list[nn.Module]:
    """The model's repeated blocks that hold targets: the children of every outermost ``nn.ModuleList`` of modules of
    one class of which some hold a target (a transformers model's decoder or encoder layers; both towers of a
    two-tower model). Empty when the model has none."""
    targets = {id(layer) for layer in layers.values()}

    def holds_target(module: nn.Module) -> bool:
        return any(id(m) in targets for m in module.modules())

    blocks: list[nn.Module] = []
    chosen: list[str] = []
    for name, module in model.named_modules():  # parents before their children
        if not isinstance(module, nn.ModuleList) or len({type(c) for c in module}) != 1:
            continue
        if any(name.startswith(prefix + ".") for prefix in chosen):
            continue
        holding = [child for child in module if holds_target(child)]
        if holding:
            chosen.append(name)
            blocks.extend(holding)
    return blocks


@contextlib.contextmanager
def _checkpointed(model: nn.Module, blocks: list[nn.Module]):
    """Inside, each block's forward runs under non-reentrant activation checkpointing: autograd keeps a block's
    inputs, and its backward recomputes the block's forward (the same kernels on the same inputs: the same
    values) to get what it saved. A transformers model's key/value cache is off inside (a recomputed forward would
    append to it a second time); the forwards and the cache settings are restored on exit."""
    if not blocks:  # the plain pass: nothing to change
        yield
        return
    from torch.utils.checkpoint import checkpoint

    # every config that turns a cache on: a multimodal model's language model has its own (text_config)
    caching = {id(c): c for m in model.modules() if getattr(c := getattr(m, "config", None), "use_cache", False)}
    settings = [(config, config.use_cache) for config in caching.values()]
    patched: list[tuple[nn.Module, bool, Callable[..., Any]]] = []
    try:
        for config, _ in settings:
            config.use_cache = False
        for block in blocks:
            forward = block.forward

            def run(*args, _forward=forward, **kwargs):
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            patched.append((block, "forward" in vars(block), forward))
            block.forward = run
        yield
    finally:
        for block, had_own, forward in reversed(patched):
            if had_own:
                block.forward = forward
            else:
                del block.forward
        for config, value in settings:
            config.use_cache = value


class _GradientTap(torch.autograd.Function):
    """Identity on a target's output ``y`` whose backward adds ``dyᵀ·x`` to the target's accumulator.

    ``anchor`` is a scalar leaf that every tap depends on: differentiating the loss with respect to it alone runs
    the backward through every tap while no ``dy`` is kept (``autograd.grad`` would hold the gradients of all its
    inputs until the end of the backward). ``x`` goes through ``save_for_backward`` so that saved-tensor hooks
    (offloading) see it. The output is a copy, not an alias, so that the model may modify it in place.
    """

    @staticmethod
    def forward(ctx, y, anchor, x, sink):
        ctx.save_for_backward(x)
        ctx.sink = sink
        ctx.anchor_dtype = anchor.dtype
        return y.clone()

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        ctx.sink(dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]))
        return (
            dy if ctx.needs_input_grad[0] else None,
            torch.zeros((), device=dy.device, dtype=ctx.anchor_dtype),
            None,
            None,
        )


# the model's own loss (loss_fn=None) per transformers loss type: does the token mean skip the first label of each
# row (causal LMs predict token t+1 from t)? Only these are split into micro-batches (see _micro_batches).
_TOKEN_MEAN_LOSSES = {"ForCausalLM": True, "ForMaskedLM": False, "ForTokenClassification": False}
# transformers causal LMs whose class name holds no loss type: their loss_type is None and their forward uses the
# default loss function, the causal LM loss (PreTrainedModel.loss_function)
_UNNAMED_CAUSAL_LMS = {"GPT2LMHeadModel"}
_IGNORE_INDEX = -100


def _token_mean_loss(model: nn.Module) -> bool | None:
    """Whether the model's own loss is a token mean over shifted labels (True), unshifted ones (False), or neither
    known (None). A PeftModel's loss is its transformers model's."""
    model = unwrap_model(model)
    if "_loss_function" in vars(model):  # a user replaced transformers' loss function
        return None
    loss_type = getattr(model, "loss_type", None)
    if loss_type is None and type(model).__name__ in _UNNAMED_CAUSAL_LMS:
        loss_type = "ForCausalLM"
    return _TOKEN_MEAN_LOSSES.get(loss_type or "")


def _micro_batches(model: nn.Module, batch: Any, max_tokens: int) -> list[tuple[Any, torch.Tensor | None]]:
    """``[(part, weight)]`` whose weighted losses sum to the batch's loss; ``[(batch, None)]`` when not split.

    A batch is split by rows only where the split is exact: the model's own loss (``model(**batch).loss``) of a
    transformers model whose loss is the mean over the labels that are not -100 (causal LM, masked LM, token
    classification), with every tensor of the dict batch holding one row per example. A part's loss is the mean over
    its own ``n_i`` labels, so it is weighted by ``n_i / N``; parts with no label are skipped (they add nothing to
    the sum). The weights stay on the device (no host sync).
    """
    shifted = _token_mean_loss(model)
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if max_tokens <= 0 or shifted is None or not isinstance(labels, torch.Tensor) or labels.dim() < 2:
        return [(batch, None)]
    if any(k in batch for k in ("shift_labels", "num_items_in_batch")):
        return [(batch, None)]
    rows = labels.shape[0]
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    if any(v.dim() == 0 or v.shape[0] != rows for v in tensors):
        return [(batch, None)]
    tokens_per_row = max(1, labels[0].numel())
    per_part = max(1, max_tokens // tokens_per_row)
    if per_part >= rows:
        return [(batch, None)]
    counted = labels[:, 1:] if shifted else labels
    per_row = (counted != _IGNORE_INDEX).reshape(rows, -1).sum(1)
    total = per_row.sum()
    parts = []
    for start in range(0, rows, per_part):
        part = {k: v[start : start + per_part] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        parts.append((part, per_row[start : start + per_part].sum()))
    if int(total.item()) == 0:  # the full batch's loss is 0/0: run it whole so that the non-finite check sees it
        return [(batch, None)]
    counts = torch.stack([n for _, n in parts]).tolist()  # one host sync per batch, to skip empty parts
    return [(part, n.to(torch.float64) / total) for (part, n), c in zip(parts, counts) if c > 0]


def estimate_gradients(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    dataloader: Iterable[Any],
    loss_fn: LossFn | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    fraction: float = 1.0,
    progress: bool = True,
    desc: str = "gradient",
    micro_batch_tokens: int = 0,
    offload: bool = False,
    checkpoint: bool = False,
) -> dict[str, torch.Tensor]:
    """Mean over batches of ``∂L/∂W_l`` (``d_out × d_in``) for every target, and nothing else.

    The gradient of a linear layer's weight is ``dYᵀ·X``. A forward hook passes each target call's output through
    :class:`_GradientTap`, whose backward adds ``dYᵀ·X`` (in ``dtype``, on ``device``) to the target's sum as soon
    as that ``dY`` exists, so the backward holds one ``dY`` at a time. No ``.grad`` is ever written (not even of
    parameters outside the model that the loss uses) and no parameter gradient is formed: model parameters are
    frozen during the pass, so autograd keeps only what the targets' ``dY`` need. The model runs in eval mode (no
    dropout).

    ``micro_batch_tokens`` > 0 splits a batch by rows into parts of at most that many tokens where the split is exact
    (the model's own loss, ``loss_fn=None``; see :func:`_micro_batches`); a user ``loss_fn`` always sees whole
    batches. ``offload`` keeps the tensors saved for backward in host memory (pinned on CUDA) during the pass.
    ``checkpoint`` runs the model's repeated blocks (:func:`checkpoint_blocks`) under activation checkpointing: the
    pass keeps each block's inputs instead of its activations and recomputes one block at a time in the backward
    (one more forward); raises ``ValueError`` when the model has no such blocks.
    Raises ``EmptyDataError`` for an empty dataloader and ``FloatingPointError`` for a non-finite loss or gradient
    (checked once at the end: no per-batch host sync). Under ``torch.distributed`` the mean is over the batches of
    all ranks (the sums and the batch count are summed over the ranks) and every rank raises when one failed.
    """
    split = loss_fn is None
    loss_fn = loss_fn or model_loss
    blocks = checkpoint_blocks(model, layers) if checkpoint else []
    if checkpoint and not blocks:
        raise ValueError(
            f"grad_checkpoint=True: {type(model).__name__} has no repeated blocks to checkpoint (an nn.ModuleList of "
            "modules of one class holding adapted layers); set grad_checkpoint=False"
        )
    sums = {name: torch.zeros(target_shape(layer), device=device, dtype=dtype) for name, layer in layers.items()}
    anchor = torch.zeros((), device=device, dtype=torch.float32, requires_grad=True)
    tapped = [0]

    def make_sink(name: str):
        def sink(dy: torch.Tensor, x: torch.Tensor) -> None:
            # bf16/fp16 on CUDA: tensor cores, fp32 sums, no upcast copies
            sums[name] = kk.outer_sum(sums[name], dy, x)

        return sink

    def make_hook(name: str):
        sink = make_sink(name)

        def forward_hook(_module, args, output):
            if not torch.is_grad_enabled():
                return None
            tapped[0] += 1
            return _GradientTap.apply(output, anchor, args[0].detach(), sink)

        return forward_hook

    def one_loss(part: Any, weight: torch.Tensor | None) -> torch.Tensor:
        loss = loss_fn(model, part)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError(
                f"loss_fn must return a scalar tensor, got {type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}"
            )
        return loss if weight is None else loss * weight.to(loss.dtype)

    handles = [layer.register_forward_hook(make_hook(name)) for name, layer in layers.items()]
    count = torch.zeros((), device=device, dtype=dtype)
    first_bad = torch.full((), -1, device=device, dtype=torch.int64)
    saved = torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda") if offload else contextlib.nullcontext()
    with failures_shared(f"{desc} pass"):
        try:
            with _frozen_parameters(model), _eval_mode(model), _checkpointed(model, blocks), torch.enable_grad():
                for index, batch in _progress(evenly_spaced(dataloader, fraction), f"keeplora: {desc}", progress):
                    batch = move_to_device(batch, device)
                    parts = _micro_batches(model, batch, micro_batch_tokens) if split else [(batch, None)]
                    del batch
                    for part, weight in parts:
                        tapped[0] = 0
                        with saved:
                            loss = one_loss(part, weight)
                        if not tapped[0] or not loss.requires_grad:
                            raise ValueError(
                                "the loss does not depend on any adapted module's output; check "
                                "target_modules and loss_fn"
                            )
                        bad = ~torch.isfinite(loss.detach())
                        first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, index), first_bad)
                        reached = torch.autograd.grad(loss, [anchor], allow_unused=True)[0]
                        del loss
                        if reached is None:
                            raise ValueError(
                                "the loss does not depend on any adapted module's output; check "
                                "target_modules and loss_fn"
                            )
                    count += 1
        finally:
            for h in handles:
                h.remove()
        if int(first_bad.item()) >= 0:
            raise FloatingPointError(
                f"non-finite loss in batch {int(first_bad.item())} of the {desc} pass; nothing was changed"
            )
    all_reduce_sum([*sums.values(), count])
    if int(count.item()) == 0:
        raise EmptyDataError(f"the dataloader yielded no batch for the {desc} pass")
    nonfinite = [name for name, s in sums.items() if not bool(torch.isfinite(s).all())]
    if nonfinite:
        raise FloatingPointError(f"non-finite gradient of {nonfinite[:4]} in the {desc} pass; nothing was changed")
    for s in sums.values():  # in place: a second set of d_out × d_in copies would double the accumulators' memory
        s.div_(count)
    return sums


def _feature_pass(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    dataloader: Iterable[Any],
    forward_fn: LossFn | None,
    *,
    device: torch.device,
    progress: bool,
    make_hook: Callable[[str, AttentionMaskTracker], Callable[..., None]],
) -> torch.Tensor:
    """Run ``forward_fn`` over the batches (eval mode, no grad) with ``make_hook(name, tracker)`` as a forward hook
    on every target; returns this rank's batch count (a tensor on ``device``). Errors are shared over the ranks."""
    forward_fn = forward_fn or (lambda m, b: m(**b) if isinstance(b, Mapping) else m(b))
    tracker = AttentionMaskTracker(model)
    handles = [layer.register_forward_hook(make_hook(name, tracker)) for name, layer in layers.items()]
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
    return batches


def collect_second_moments(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    dataloader: Iterable[Any],
    forward_fn: LossFn | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Exact ``C_l = Σ x·xᵀ`` (``d_in × d_in``) of every target's inputs over real tokens, and the token counts.

    ``forward_fn(model, batch)`` runs the forward pass (its return value is ignored; the loss function of the task
    works); None calls ``model(**batch)``. Padding is excluded with the attention masks the model's modules are
    called with (see :class:`AttentionMaskTracker`). Eval mode, no grad. Under ``torch.distributed`` moments and
    token counts are summed over the ranks; a rank with no batch contributes zero.
    """
    moments = {
        name: torch.zeros(layer.in_features, layer.in_features, device=device, dtype=dtype)
        for name, layer in layers.items()
    }
    tokens = {name: torch.zeros((), device=device, dtype=torch.int64) for name in layers}

    def make_hook(name: str, tracker: AttentionMaskTracker):
        def hook(_module, args, _output):
            x = args[0].detach()
            mask = tracker.mask_for(x)
            kk.second_moment_update(moments[name], x, mask)
            tokens[name] += x[..., 0].numel() if mask is None else mask.sum()

        return hook

    batches = _feature_pass(
        model, layers, dataloader, forward_fn, device=device, progress=progress, make_hook=make_hook
    )
    all_reduce_sum([*moments.values(), *tokens.values(), batches])
    if int(batches.item()) == 0:
        raise EmptyDataError("the dataloader yielded no batch for the feature pass")
    return moments, {name: int(t.item()) for name, t in tokens.items()}


def collect_feature_sketches(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    dataloader: Iterable[Any],
    forward_fn: LossFn | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The authors' CLIP feature statistic: per target the sketch ``S = Σ_b X_bᵀ / N_tokens`` and the token counts.

    ``X_b`` is the target's input of one call (one batch), flattened token-major to ``tokens × d_in`` as for the
    second moment; ``X_bᵀ`` is added column by column, so token ``j`` of every call lands in column ``j`` of the
    ``d_in × width`` sketch, ``width`` being the most tokens any call had. A call with fewer tokens (a smaller last
    batch, a shorter padded length) fills only the first columns: it is zero-padded to ``width``. Every call of a
    target in a forward pass counts as one batch of the sum. Padding tokens (see :class:`AttentionMaskTracker`) are
    zeroed in place, so they add nothing and are not counted in ``N_tokens``; the other tokens keep their columns.
    The left singular vectors of ``S`` with ``σ²`` are the eigenpairs of ``S·Sᵀ``. Adding inputs of different
    examples column by column is the authors' approximation, kept here for comparison with the exact
    :func:`collect_second_moments`; ``S·Sᵀ`` is not ``Σ x·xᵀ`` (cross terms between the tokens sharing a column).

    Under ``torch.distributed`` every rank's sketch is zero-padded to the widest rank's and the sketches and token
    counts are summed over the ranks, like the moments: the calls of all ranks land in the same columns, the same
    column alignment as the authors' code applies to the batches of one process. ``N_tokens`` is the total over all
    ranks; a target with no real token keeps a zero sketch.
    """
    sketches = {name: torch.zeros(layer.in_features, 0, device=device, dtype=dtype) for name, layer in layers.items()}
    tokens = {name: torch.zeros((), device=device, dtype=torch.int64) for name in layers}

    def make_hook(name: str, tracker: AttentionMaskTracker):
        def hook(_module, args, _output):
            x = args[0].detach()
            mask = tracker.mask_for(x)
            rows = x.reshape(-1, x.shape[-1]).to(dtype)
            if mask is not None:
                rows = rows * mask.reshape(-1, 1).to(dtype)  # no boolean indexing: columns stay put, no host sync
            sketch = sketches[name]
            if rows.shape[0] > sketch.shape[1]:
                sketch = torch.nn.functional.pad(sketch, (0, rows.shape[0] - sketch.shape[1]))
                sketches[name] = sketch
            sketch[:, : rows.shape[0]] += rows.t()
            tokens[name] += x[..., 0].numel() if mask is None else mask.sum()

        return hook

    batches = _feature_pass(
        model, layers, dataloader, forward_fn, device=device, progress=progress, make_hook=make_hook
    )
    widths = distributed.all_gather_objects({name: s.shape[1] for name, s in sketches.items()})
    for name, sketch in sketches.items():
        widest = max(w[name] for w in widths)
        if widest > sketch.shape[1]:
            sketches[name] = torch.nn.functional.pad(sketch, (0, widest - sketch.shape[1]))
    all_reduce_sum([*sketches.values(), *tokens.values(), batches])
    if int(batches.item()) == 0:
        raise EmptyDataError("the dataloader yielded no batch for the feature pass")
    counts = {name: int(t.item()) for name, t in tokens.items()}
    for name, sketch in sketches.items():
        sketch.div_(max(1, counts[name]))
    return sketches, counts


__all__ = [
    "AttentionMaskTracker",
    "EmptyDataError",
    "all_reduce_sum",
    "collect_feature_sketches",
    "collect_second_moments",
    "estimate_gradients",
    "evenly_spaced",
    "model_loss",
    "move_to_device",
]
