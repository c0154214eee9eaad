"""Frozen-A LoRA linear: ``y = x·Wᵀ + b + scale·(x·Aᵀ)·Bᵀ`` with W and A frozen, B trained.

Layouts follow PEFT: ``weight`` is ``d_out × d_in``, ``lora_a`` is ``r × d_in`` (``lora_A.weight``), ``lora_b`` is
``d_out × r`` (``lora_B.weight``). Because W and A never receive gradients, backward needs only ``s = x·Aᵀ``
(T×r) from the forward pass, never x (T×d_in): the adapter branch keeps d_in/r times less activation memory than a
general LoRA layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _dispatch
from ._dispatch import BACKWARD_ORDERS, FORWARD_ORDERS

__all__ = [
    "lora_linear",
    "lora_linear_unfused",
    "lora_linear_shared",
    "lora_linear_torch",
    "lora_linear_shared_torch",
    "lora_linear_extension",
    "LoRALinearFunction",
    "FORWARD_ORDERS",
    "BACKWARD_ORDERS",
]


def lora_linear_unfused(x, weight, bias, lora_a, lora_b, scale):
    """The KeepLoRA authors' LoRA path, kept as a benchmark baseline: ``y = x·Wᵀ + b`` then
    ``y + (x @ Aᵀ) @ Bᵀ · scale`` as separate kernels (base GEMM, shrink, expand, scale, add) under plain autograd,
    which saves x for the adapter branch. The adapters are used in x's dtype, as the authors' code holds them."""
    y = torch.nn.functional.linear(x, weight, bias)
    return y + (x @ lora_a.to(x.dtype).t()) @ lora_b.to(x.dtype).t() * scale


def _flatten_tokens(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _scaled_mm(m1: torch.Tensor, m2: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale·m1·m2`` as one GEMM: ``addmm_`` with beta = 0 into an uninitialised tensor (beta = 0 never reads it).
    Traced, the product and the scaling instead: inductor's addmm decomposition multiplies the uninitialised
    input by zero, which turns garbage NaNs into NaN outputs."""
    if torch.compiler.is_compiling():
        return torch.mm(m1, m2) * scale
    out = torch.empty((m1.shape[0], m2.shape[1]), device=m1.device, dtype=m1.dtype)
    return out.addmm_(m1, m2, beta=0, alpha=scale)


def _forward(x, weight, bias, lora_a, lora_b, scale, order: str = "base_first"):
    """``(Y (T×d_out), s, A, B)`` with the adapters cast to x's dtype: the forward of :class:`LoRALinearFunction`.

    ``order`` says which GEMM writes Y first (both are exact; which is faster depends on the device):
    * ``"base_first"``: ``Y = X·Wᵀ + b``, then ``Y += scale·s·Bᵀ`` (a rank-r GEMM that reads and writes Y again);
    * ``"expand_first"``: ``Y = b + scale·s·Bᵀ``, then ``Y += X·Wᵀ`` in place, so the base GEMM reads the rank-r term
      as its C operand inside the GEMM instead of a separate read-modify-write of Y.
    """
    x2 = _flatten_tokens(x)
    a = lora_a.to(x.dtype)
    b = lora_b.to(x.dtype)
    s = x2 @ a.t()
    if order == "expand_first":
        if bias is not None:
            y2 = torch.addmm(bias.to(x.dtype), s, b.t(), alpha=scale)
        else:
            y2 = _scaled_mm(s, b.t(), scale)
        y2.addmm_(x2, weight.t())
    else:
        y2 = torch.addmm(bias.to(x.dtype), x2, weight.t()) if bias is not None else x2 @ weight.t()
        y2.addmm_(s, b.t(), alpha=scale)
    return y2, s, a, b


def _scaled_outer(dy2: torch.Tensor, s: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """``scale·dy2ᵀ·s`` in ``out_dtype``: on CUDA with 16-bit inputs and an fp32 result, one tensor-core GEMM that
    writes fp32 (no rounding of dB to bf16, no cast kernel); elsewhere the product in the inputs' dtype, cast."""
    if (
        out_dtype == torch.float32
        and dy2.dtype == s.dtype
        and dy2.dtype in (torch.float16, torch.bfloat16)
        and _dispatch.mixed_dtype_gemm("mm", dy2.device.type)
    ):
        return torch.mm(dy2.t(), s, out_dtype=torch.float32).mul_(scale)
    return (dy2.t() @ s).mul_(scale).to(out_dtype)


def _backward(
    dy2, s, weight, a, b, scale: float, order: str, need_dx: bool, db_dtype: torch.dtype | None, need_dbias: bool
):
    """``(dX, dB, db)`` of the frozen-A LoRA linear (None where not needed; no dB when ``db_dtype`` is None); dB in
    ``db_dtype``, db in fp32 or dY's dtype (the caller casts).

    ``order``:
    * ``"base_first"``: ``dB = scale·dYᵀ·s``, ``ds = dY·B``, ``dX = dY·W`` then ``dX += scale·ds·A``;
    * ``"expand_first"``: the same dB and ds, then ``dX = scale·ds·A`` and ``dX += dY·W`` in place (the dX GEMM reads
      the rank-r term as its C operand).
    """
    dx2 = db_ = dbias = None
    if db_dtype is not None:
        db_ = _scaled_outer(dy2, s, scale, db_dtype)
    if need_dx:
        ds = dy2 @ b
        if order == "expand_first":
            dx2 = _scaled_mm(ds, a, scale)
            dx2.addmm_(dy2, weight.to(dy2.dtype))
        else:
            dx2 = dy2 @ weight.to(dy2.dtype)
            dx2.addmm_(ds, a, alpha=scale)
    if need_dbias:
        dbias = dy2.sum(0)
    return dx2, db_, dbias


class LoRALinearFunction(torch.autograd.Function):
    """Forward and backward of the frozen-A LoRA linear in PyTorch ops (cuBLAS on a GPU).

    Forward, with X the T×d_in matrix of tokens (leading dims flattened):
        s = X·Aᵀ                          (T×r, kept for backward)
        Y = X·Wᵀ + b + scale·s·Bᵀ
    Backward, given dY (T×d_out):
        dB = scale·dYᵀ·s                  (d_out×r)
        ds = dY·B                         (T×r)
        dX = dY·W + scale·ds·A            (T×d_in)
        db = Σ_T dY                       (only if the bias requires grad)
    W and A are frozen: no dW, no dA, so X itself is never saved.
    The adapter branch runs in x's dtype; dB is returned in B's dtype (fp32 adapters under bf16 inputs work).
    A and B are cast to x's dtype once per step: backward reuses the forward's casts (r×d each).
    ``forward_order`` / ``backward_order`` choose the order of the GEMMs (:func:`_forward`, :func:`_backward`);
    ``_dispatch.lora_orders`` picks them per device. Dynamo traces this Function (no graph break under
    ``torch.compile``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, forward_order="base_first", backward_order="base_first"):
        if weight.requires_grad or lora_a.requires_grad:
            raise RuntimeError(
                "lora_linear treats `weight` and `lora_a` as frozen, but one of them requires grad; "
                "call .requires_grad_(False) on it, or use lora_linear_unfused (plain autograd)"
            )
        y2, s, a, b = _forward(x, weight, bias, lora_a, lora_b, scale, forward_order)
        ctx.save_for_backward(s, weight, a, b)
        ctx.scale = scale
        ctx.order = backward_order
        ctx.x_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.lora_b_dtype = lora_b.dtype
        return y2.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        s, weight, a, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy2 = _flatten_tokens(dy).to(s.dtype)
        dx2, dlora_b, dbias = _backward(
            dy2, s, weight, a, b, ctx.scale, ctx.order, need[0], ctx.lora_b_dtype if need[4] else None, need[2]
        )
        dx = None if dx2 is None else dx2.reshape(ctx.x_shape)
        db = None if dbias is None else dbias.to(ctx.bias_dtype)
        return dx, None, db, None, dlora_b, None, None, None


def lora_linear_torch(
    x, weight, bias, lora_a, lora_b, scale: float, orders: tuple[str, str] | None = None
) -> torch.Tensor:
    """The torch backend of :func:`lora_linear`: :class:`LoRALinearFunction` in the orders ``lora_orders`` picks
    (or ``orders``), or its forward alone when there is no graph to build (no_grad, or nothing requires grad: the
    feature pass, evaluation), without the Function's overhead."""
    forward_order, backward_order = orders or _dispatch.lora_orders(x.device, x.dtype)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, lora_a, lora_b)):
        return LoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, scale, forward_order, backward_order)
    return _forward(x, weight, bias, lora_a, lora_b, scale, forward_order)[0].reshape(*x.shape[:-1], weight.shape[0])


def lora_linear_shared_torch(x, weights, biases, lora_as, lora_bs, scales) -> tuple[torch.Tensor, ...]:
    """The torch backend of :func:`lora_linear_shared`: one :func:`lora_linear_torch` per projection."""
    return tuple(
        lora_linear_torch(x, w, b, a, lb, float(s)) for w, b, a, lb, s in zip(weights, biases, lora_as, lora_bs, scales)
    )


def lora_linear_extension(x, weight, bias, lora_a, lora_b, scale: float) -> torch.Tensor:
    """The compiled extension's ``keeplora::lora_linear`` (csrc/lora_linear.cpp): the same GEMMs as
    :class:`LoRALinearFunction`, one dispatcher call forward and a C++ backward (no Python per step)."""
    forward_order, backward_order = _dispatch.lora_orders(x.device, x.dtype)
    return torch.ops.keeplora.lora_linear(x, weight, bias, lora_a, lora_b, scale, forward_order, backward_order)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``x·weightᵀ + bias + scale·(x·lora_aᵀ)·lora_bᵀ`` with ``weight`` and ``lora_a`` frozen.

    Args:
        x: ``(..., d_in)``, any leading dims, may be non-contiguous; fp32, fp16 or bf16.
        weight: ``(d_out, d_in)``, frozen (must not require grad).
        bias: ``(d_out,)`` or None; may require grad.
        lora_a: ``(r, d_in)`` (PEFT's ``lora_A.weight``), frozen.
        lora_b: ``(d_out, r)`` (PEFT's ``lora_B.weight``), trainable; may be fp32 while x is low precision.
        scale: ``alpha / r``.

    Returns ``(..., d_out)`` in x's dtype. Saved for backward: ``s = x·lora_aᵀ`` (T×r) and the (frozen) weights.
    Under ``torch.compile`` the torch path runs whatever the backend: dynamo traces it, not the compiled op.
    """
    if torch.compiler.is_compiling():
        return lora_linear_torch(x, weight, bias, lora_a, lora_b, float(scale))
    backend = _dispatch.select("lora_linear", x.device, x.dtype, weight.dtype, lora_a.dtype, lora_b.dtype)
    if backend == "torch":
        return lora_linear_torch(x, weight, bias, lora_a, lora_b, float(scale))
    if backend == "extension":
        return lora_linear_extension(x, weight, bias, lora_a, lora_b, float(scale))
    return _dispatch.implementation("lora_linear", backend)(x, weight, bias, lora_a, lora_b, float(scale))


def lora_linear_shared(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> tuple[torch.Tensor, ...]:
    """Several frozen-A LoRA linears of one input (e.g. q, k, v): ``tuple(lora_linear(x, W_i, b_i, A_i, B_i, s_i))``.

    The torch path runs one :func:`lora_linear_torch` per projection. (An experimental Triton form that shrinks x
    once for all projections is in ``keeplora_kernels.experimental.triton_lora_linear``.)

    Args:
        x: ``(..., d_in)`` as in :func:`lora_linear`.
        weights, biases, lora_as, lora_bs, scales: one entry per projection, each as in :func:`lora_linear`
            (biases may hold None; every ``lora_as[i]`` is ``(r_i, d_in)``).

    Returns a tuple of ``(..., d_out_i)`` tensors in x's dtype.
    """
    n = len(weights)
    if not (len(biases) == len(lora_as) == len(lora_bs) == len(scales) == n) or n == 0:
        raise ValueError(
            "lora_linear_shared: weights, biases, lora_as, lora_bs and scales need one entry per "
            f"projection (got {len(weights)}, {len(biases)}, {len(lora_as)}, {len(lora_bs)}, "
            f"{len(scales)})"
        )
    backend = _dispatch.select(
        "lora_linear_shared", x.device, x.dtype, *(t.dtype for group in (weights, lora_as, lora_bs) for t in group)
    )
    if backend == "torch":
        return lora_linear_shared_torch(x, weights, biases, lora_as, lora_bs, scales)
    return tuple(
        _dispatch.implementation("lora_linear_shared", backend)(
            x, list(weights), list(biases), list(lora_as), list(lora_bs), [float(s) for s in scales]
        )
    )
