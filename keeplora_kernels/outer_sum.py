"""``acc + dyᵀ·x``: the sum over tokens of a linear layer's weight gradient, accumulated in fp32 (or fp64).

The gradient pass adds one ``d_out × d_in`` product per target and batch. Upcasting bf16/fp16 ``dy`` and ``x`` to
fp32 first costs two fp32 copies of the activations and runs the product on fp32 SIMT units, a large part of a
``begin_task`` on a GPU (profiles in benchmarks/results/h200). On CUDA, PyTorch's mixed-dtype
``addmm(..., out_dtype=float32)`` multiplies the 16-bit values on the tensor cores (products exact, sums in fp32)
and writes fp32 with no copies, into the accumulator itself (``out=acc``: no second ``d_out × d_in`` buffer);
elsewhere (CPU, fp32/fp64 inputs, mixed input dtypes) the inputs are converted, in row chunks no larger than the
accumulator, so the converted copies never outgrow it. ``_dispatch.outer_sum_path`` picks between these.
"""

from __future__ import annotations

import torch

from . import _dispatch

__all__ = ["outer_sum", "outer_sum_torch"]


def _addmm_converted(acc: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``acc += dyᵀ·x`` with both inputs converted to ``acc``'s dtype first: one in-place ``addmm_``."""
    return acc.addmm_(dy.t().to(acc.dtype), x.to(acc.dtype))


def outer_sum_torch(acc: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The torch backend of :func:`outer_sum` (inputs already checked), on the path ``_dispatch.outer_sum_path``
    picks."""
    path = _dispatch.outer_sum_path(acc.device.type, acc.dtype, dy.dtype, x.dtype)
    if path == "mixed_dtype_addmm":
        if _has_dtype_out(acc.device.type):
            return torch.addmm(acc, dy.t(), x, out_dtype=torch.float32, out=acc)
        return torch.addmm(acc, dy.t(), x, out_dtype=torch.float32)
    if path == "addmm":
        return _addmm_converted(acc, dy, x)
    rows = max(1, acc.numel() // (acc.shape[0] + acc.shape[1]))  # a chunk's converted dy and x: ≤ acc's size
    for start in range(0, dy.shape[0], rows):
        _addmm_converted(acc, dy[start : start + rows], x[start : start + rows])
    return acc


def outer_sum(acc: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return ``acc + dyᵀ·x`` in ``acc``'s dtype: ``acc`` itself, updated in place (callers may still rebind,
    ``acc = outer_sum(acc, dy, x)``: a CUDA build without the in-place mixed-dtype kernel returns a new tensor).

    Args:
        acc: ``(d_out, d_in)`` float32 or float64 accumulator.
        dy: ``(T, d_out)`` output gradients; x: ``(T, d_in)`` inputs; rows are tokens, any float dtype.
    """
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0] or acc.shape != (dy.shape[1], x.shape[1]):
        raise ValueError(
            f"outer_sum: need acc (d_out, d_in), dy (T, d_out), x (T, d_in); got acc "
            f"{tuple(acc.shape)}, dy {tuple(dy.shape)}, x {tuple(x.shape)}"
        )
    if acc.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"outer_sum: acc must be float32 or float64, got {acc.dtype}")
    backend = _dispatch.select("outer_sum", acc.device, dy.dtype, x.dtype, acc.dtype)
    if backend == "torch":
        return outer_sum_torch(acc, dy, x)
    return _dispatch.implementation("outer_sum", backend)(acc, dy, x)


def _has_dtype_out(device_type: str) -> bool:
    """Whether ``torch.addmm(..., out_dtype=torch.float32, out=acc)`` has a kernel for this device type."""
    if not hasattr(torch.ops.aten.addmm, "dtype_out"):
        return False
    return device_type == "meta" or torch._C._dispatch_has_kernel_for_dispatch_key(
        "aten::addmm.dtype_out", device_type.upper()
    )
