"""Experimental orders of the frozen-A LoRA linear's GEMMs, beside the production ones of
:mod:`keeplora_kernels.lora_linear`:

* the ``fused_dy`` backward: one Triton pass over dY gives ``scale·ds``, dB and db together (dY is read once for
  the rank-r part instead of three times), then ``dX`` as in ``expand_first``. Dispatched when the
  ``expand_first/fused_dy`` bf16 training step beats ``expand_first/expand_first`` at the Llama and CLIP layer
  shapes of ``keeplora_bench.micro.bench_lora_variants``; it lost to the two cuBLAS GEMMs it replaces at both.
* the stacked forward: one GEMM against ``[W; A]`` (formed once per task) gives ``X·Wᵀ`` and ``s = X·Aᵀ`` while
  reading X once. Dispatched when its forward beats the ``expand_first`` forward at those shapes; it gained
  nothing there.

The Triton pass is the registered op ``keeplora::lora_dy_pass`` (``torch.library.custom_op`` with a fake
implementation): ``torch.compile`` and CUDA graphs take it whole. It is registered when this module is imported
(so a traced call finds it); triton itself is imported only on its first call.
"""

from __future__ import annotations

import torch

from .. import _dispatch
from ..lora_linear import LoRALinearFunction, _backward, _flatten_tokens

__all__ = [
    "BACKWARD_ORDERS",
    "LoRALinearVariantFunction",
    "StackedLoRALinearFunction",
    "stack_frozen",
    "variant_backward",
]

BACKWARD_ORDERS = _dispatch.BACKWARD_ORDERS + ("fused_dy",)


@torch.library.custom_op("keeplora::lora_dy_pass", mutates_args=())
def _lora_dy_pass(
    dy2: torch.Tensor, s: torch.Tensor, lora_b: torch.Tensor, scale: float, need_dbias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton pass over dY of the ``fused_dy`` backward (``triton_lora_linear.lora_dy_pass``) as an opaque
    registered op (``triton_op`` would import triton at registration)."""
    from .triton_lora_linear import lora_dy_pass  # imports triton (slow): on first use only

    return lora_dy_pass(dy2, s, lora_b, scale, need_dbias)


@_lora_dy_pass.register_fake
def _(dy2, s, lora_b, scale, need_dbias):
    acc = torch.float64 if dy2.dtype == torch.float64 else torch.float32
    return (
        dy2.new_empty((dy2.shape[0], s.shape[1]), dtype=acc),
        dy2.new_empty((dy2.shape[1], s.shape[1]), dtype=acc),
        dy2.new_empty((dy2.shape[1] if need_dbias else 1,), dtype=acc),
    )


def _check_order(backward_order: str, device: torch.device, dtype: torch.dtype) -> None:
    if backward_order not in BACKWARD_ORDERS:
        raise ValueError(f"backward_order must be one of {BACKWARD_ORDERS}, got {backward_order!r}")
    # checked in eager calls only: probing for triton is not traceable (a traced call trusts the eager one)
    if (
        backward_order == "fused_dy"
        and not torch.compiler.is_compiling()
        and not _dispatch.triton_runs(device, (dtype,))
    ):
        raise RuntimeError(
            f"the fused_dy backward needs Triton on {device.type} tensors of {dtype} (a GPU, or TRITON_INTERPRET=1)"
        )


def variant_backward(
    dy2, s, weight, a, b, scale: float, order: str, need_dx: bool, db_dtype: torch.dtype | None, need_dbias: bool
):
    """``lora_linear._backward`` extended by ``order="fused_dy"``: the Triton pass gives ``scale·ds``, dB and db
    (fp32 sums), then ``dX = scale·ds·A`` and ``dX += dY·W`` in place."""
    if order != "fused_dy":
        return _backward(dy2, s, weight, a, b, scale, order, need_dx, db_dtype, need_dbias)
    dx2 = None
    ds_scaled, db32, dbias32 = torch.ops.keeplora.lora_dy_pass(dy2, s, b, float(scale), need_dbias)
    db_ = None if db_dtype is None else db32.to(db_dtype)
    dbias = dbias32 if need_dbias else None
    if need_dx:
        dx2 = ds_scaled.to(dy2.dtype) @ a
        dx2.addmm_(dy2, weight.to(dy2.dtype))
    return dx2, db_, dbias


class LoRALinearVariantFunction(LoRALinearFunction):
    """:class:`~keeplora_kernels.lora_linear.LoRALinearFunction` (same arguments, same forward) whose backward
    order may also be ``"fused_dy"`` (:func:`variant_backward`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, forward_order="base_first", backward_order="base_first"):
        _check_order(backward_order, x.device, x.dtype)
        return LoRALinearFunction.forward(ctx, x, weight, bias, lora_a, lora_b, scale, forward_order, backward_order)

    @staticmethod
    def backward(ctx, dy):
        s, weight, a, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy2 = _flatten_tokens(dy).to(s.dtype)
        dx2, dlora_b, dbias = variant_backward(
            dy2, s, weight, a, b, ctx.scale, ctx.order, need[0], ctx.lora_b_dtype if need[4] else None, need[2]
        )
        dx = None if dx2 is None else dx2.reshape(ctx.x_shape)
        db = None if dbias is None else dbias.to(ctx.bias_dtype)
        return dx, None, db, None, dlora_b, None, None, None


def stack_frozen(weight: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """``[W; A]`` ((d_out + r) × d_in, W's dtype): both are frozen for a whole task, so this is formed once per task
    for :class:`StackedLoRALinearFunction`."""
    return torch.cat([weight, lora_a.to(weight.dtype)], dim=0)


class StackedLoRALinearFunction(torch.autograd.Function):
    """The frozen-A LoRA linear with ``[W; A]`` stacked: one GEMM ``X·[W; A]ᵀ`` gives ``X·Wᵀ`` and ``s = X·Aᵀ`` while
    reading X once, then ``Y += scale·s·Bᵀ`` in place. Y is a view with row stride d_out + r (the s columns are
    copied out, so only s is kept for backward). Backward as :func:`variant_backward` with W and A as views of the
    stack. Args: ``(x, stacked, bias, lora_b, scale, d_out, backward_order)``."""

    @staticmethod
    def forward(ctx, x, stacked, bias, lora_b, scale, d_out, backward_order="base_first"):
        if stacked.requires_grad:
            raise RuntimeError("the stacked [W; A] is frozen but requires grad; call .requires_grad_(False) on it")
        _check_order(backward_order, x.device, x.dtype)
        x2 = _flatten_tokens(x)
        b = lora_b.to(x.dtype)
        if bias is not None:
            padded = torch.cat([bias.to(x.dtype), bias.new_zeros(stacked.shape[0] - d_out, dtype=x.dtype)])
            z = torch.addmm(padded, x2, stacked.t())
        else:
            z = x2 @ stacked.t()
        y2, s = z[:, :d_out], z[:, d_out:].contiguous()
        y2.addmm_(s, b.t(), alpha=scale)
        ctx.save_for_backward(s, stacked, b)
        ctx.scale, ctx.order, ctx.d_out, ctx.x_shape = scale, backward_order, d_out, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.lora_b_dtype = lora_b.dtype
        return y2.reshape(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx, dy):
        s, stacked, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy2 = _flatten_tokens(dy).to(s.dtype)
        weight, a = stacked[: ctx.d_out], stacked[ctx.d_out :].to(s.dtype)
        dx2, dlora_b, dbias = variant_backward(
            dy2, s, weight, a, b, ctx.scale, ctx.order, need[0], ctx.lora_b_dtype if need[3] else None, need[2]
        )
        dx = None if dx2 is None else dx2.reshape(ctx.x_shape)
        db = None if dbias is None else dbias.to(ctx.bias_dtype)
        return dx, None, db, dlora_b, None, None, None
