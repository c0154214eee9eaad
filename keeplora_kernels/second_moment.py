"""Streaming second moment ``acc += Xᵀ·X`` over the real (unmasked) rows of X, accumulated in fp32 or fp64."""

from __future__ import annotations

import torch

from . import _dispatch

__all__ = ["second_moment_update", "second_moment_update_torch"]


def second_moment_update_torch(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The torch backend: rows where ``mask`` is false are zeroed (no boolean indexing, so no device sync), then
    one GEMM."""
    x2 = x.reshape(-1, x.shape[-1]).to(acc.dtype)
    if mask is not None:
        x2 = x2 * mask.reshape(-1, 1).to(acc.dtype)
    return acc.addmm_(x2.t(), x2)


def second_moment_update(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """In place ``acc += Σ_rows x_rowᵀ·x_row`` over rows where ``mask`` is true.

    Args:
        acc: ``(d, d)`` fp32 or fp64 accumulator, updated in place and returned.
        x: ``(..., d)`` features in any float dtype; the leading dims are rows (tokens).
        mask: ``x.shape[:-1]`` bool/int tensor, true (non-zero) for real tokens; None means all rows.
    """
    d = x.shape[-1]
    if acc.shape != (d, d):
        raise ValueError(
            f"second_moment_update: acc must be ({d}, {d}) for features of size {d}, got {tuple(acc.shape)}"
        )
    if acc.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"second_moment_update: acc must be float32 or float64, got {acc.dtype}")
    if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"second_moment_update: mask shape {tuple(mask.shape)} must equal x.shape[:-1] = {tuple(x.shape[:-1])}"
        )
    backend = _dispatch.select("second_moment_update", x.device, x.dtype, acc.dtype)
    if backend == "torch":
        return second_moment_update_torch(acc, x, mask)
    return _dispatch.implementation("second_moment_update", backend)(acc, x, mask)
