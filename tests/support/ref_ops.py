"""Test oracles of the keeplora_kernels ops: plain formulas, independent of the library's implementations, that the
tests compare every backend against (differentiable in every argument where an op has a backward)."""

import torch
import torch.nn.functional as F


def lora_linear_ref(x, weight, bias, lora_a, lora_b, scale):
    """``x·Wᵀ + b + scale·(x·Aᵀ)·Bᵀ`` under plain autograd (every operand may require grad)."""
    y = F.linear(x, weight, bias)
    return y + scale * F.linear(F.linear(x, lora_a), lora_b)


def lora_linear_shared_ref(x, weights, biases, lora_as, lora_bs, scales):
    """One :func:`lora_linear_ref` per projection of the same input."""
    return tuple(
        lora_linear_ref(x, w, b, a, lb, s) for w, b, a, lb, s in zip(weights, biases, lora_as, lora_bs, scales)
    )


def outer_sum_ref(acc: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``acc + dyᵀ·x`` in float64 (a new tensor; ``acc`` is not touched)."""
    return acc.double() + dy.double().t() @ x.double()


def residual_project_ref(g: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``(I − P·Pᵀ)·g`` with the dense d×d projector, in float64; ``g`` (d, n) or (b, d, n), ``basis`` (d, k) or
    (b, d, k), k may be 0."""
    p = basis.double()
    projector = torch.eye(p.shape[-2], dtype=torch.float64, device=p.device) - p @ p.transpose(-1, -2)
    return projector @ g.double()


def second_moment_ref(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ xᵀ·x`` over the rows of ``x`` (leading dims flattened) where ``mask`` is non-zero, in float64."""
    rows = x.reshape(-1, x.shape[-1]).double()
    if mask is not None:
        rows = rows[mask.reshape(-1) != 0]
    return rows.t() @ rows
