"""Triton residual projection ``out = g − P·(Pᵀ·g)`` (out of place or into g), fp32 accumulation.

Layout: kernel, launcher, entry point. The torch backend and the public function are in
``keeplora_kernels/residual_project.py``.

* k ≤ :data:`FUSED_MAX_K` (memory-bound regime, arithmetic intensity ≈ k FLOP/byte for bf16 g, below the H200
  ridge of ≈184): one kernel per column block of g. Pass 1 reads the d×BLOCK_N column block and forms
  ``c = Pᵀ·g`` (k×BLOCK_N, in registers); pass 2 re-reads the same block (an L2 hit: the working set of all
  resident programs is a few MB) and writes ``g − P·c``. HBM traffic ≈ one read and one write of g.
  Columns belong to one program, so writing into g itself (``inplace=True``) is safe.
* k > :data:`FUSED_MAX_K` (compute-bound): two GEMMs at library rate, ``c = Pᵀ·g`` and ``addmm(g, P, c, alpha=-1)``.

Precision: fp32 (or fp64) accumulation. The basis is applied in its own dtype; ``tl.dot`` on fp32 operands uses
``"ieee"`` for fp32/fp64 g (unless torch allows tf32, then ``"tf32"``) and ``"tf32"`` for bf16/fp16 g, whose
output rounding (2⁻⁹ / 2⁻¹²) is at least as coarse as tf32's (2⁻¹¹ relative per operand).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import Launch, acc_dtype, cdiv, dot_mode, interpreted, load, next_pow2, round_to

__all__ = ["residual_project_triton", "FUSED_MAX_K"]

FUSED_MAX_K = 184  # the H200's bf16 ridge point (790 TFLOP/s over 4.3 TB/s): above it, compute-bound


@triton.jit
def _project_kernel(
    G,
    P,
    O,
    D,
    NCOL,
    KB,
    stride_gb,
    stride_gd,
    stride_gn,
    stride_pb,
    stride_pd,
    stride_pk,
    stride_ob,
    stride_od,
    stride_on,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """O[:, cols] = G[:, cols] − P·(Pᵀ·G[:, cols]) for the column block ``pid_n`` of batch ``pid_b``."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)  # b·d·n may pass 2³¹
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    in_n = offs_n < NCOL
    in_k = offs_k < KB
    g_base = G + pid_b * stride_gb + offs_n[None, :] * stride_gn
    p_base = P + pid_b * stride_pb + offs_k[None, :] * stride_pk
    coeff = tl.zeros((BLOCK_K, BLOCK_N), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        rows = d0 + offs_d
        in_d = rows < D
        p = load(p_base + rows[:, None] * stride_pd, in_d[:, None] & in_k[None, :], True, ACC)
        g = load(g_base + rows[:, None] * stride_gd, in_d[:, None] & in_n[None, :], True, ACC)
        coeff = tl.dot(tl.trans(p), g, coeff, input_precision=PREC)
    o_base = O + pid_b * stride_ob + offs_n[None, :] * stride_on
    for d0 in range(0, D, BLOCK_D):
        rows = d0 + offs_d
        in_d = rows < D
        p = load(p_base + rows[:, None] * stride_pd, in_d[:, None] & in_k[None, :], True, ACC)
        g = load(g_base + rows[:, None] * stride_gd, in_d[:, None] & in_n[None, :], True, ACC)
        out = g - tl.dot(p, coeff, input_precision=PREC)
        out = round_to(out, O.dtype.element_ty, INTERPRETED)  # a GPU's rounding under the interpreter too
        tl.store(o_base + rows[:, None] * stride_od, out, mask=in_d[:, None] & in_n[None, :])


def plan_project(g3: torch.Tensor, p3: torch.Tensor, out3: torch.Tensor, *, on_gpu: bool | None = None) -> list[Launch]:
    """Launch for batched ``g3`` (b, d, n), basis ``p3`` (b or 1, d, k ≤ FUSED_MAX_K), output ``out3`` (may be g3)."""
    nb, d, n = g3.shape
    k = p3.shape[-1]
    on_gpu = g3.device.type == "cuda" if on_gpu is None else on_gpu
    acc = acc_dtype(g3.dtype, p3.dtype)
    _, prec = dot_mode(torch.float64 if acc == tl.float64 else torch.float32)  # "ieee" unless torch allows tf32
    if on_gpu and acc == tl.float32 and g3.dtype in (torch.float16, torch.bfloat16):
        prec = "tf32"  # output rounding of bf16/fp16 g is at least as coarse (module docstring)
    block_k = max(16, next_pow2(k))
    if on_gpu:
        # checked spill-free with the sm_90 compile test (tests/kernels/test_triton_compile.py); untuned otherwise
        if prec == "tf32":
            block_n, block_d, warps = (64 if block_k <= 64 else 32), (64 if block_k <= 128 else 32), 8
        else:  # "ieee" dots run on the FMA units from registers
            block_n, block_d, warps = 32, 32, (8 if block_k <= 64 else 4)
        stages = 2
    else:
        block_n, block_d, warps, stages = 32, 32, 4, 1
    return [
        Launch(
            _project_kernel,
            (cdiv(n, block_n), nb),
            dict(
                G=g3,
                P=p3,
                O=out3,
                D=d,
                NCOL=n,
                KB=k,
                stride_gb=g3.stride(0),
                stride_gd=g3.stride(1),
                stride_gn=g3.stride(2),
                stride_pb=p3.stride(0) if p3.shape[0] > 1 else 0,
                stride_pd=p3.stride(1),
                stride_pk=p3.stride(2),
                stride_ob=out3.stride(0),
                stride_od=out3.stride(1),
                stride_on=out3.stride(2),
            ),
            dict(ACC=acc, PREC=prec, INTERPRETED=interpreted(), BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_K=block_k),
            num_warps=warps,
            num_stages=stages,
        )
    ]


def _project_gemm(g: torch.Tensor, basis: torch.Tensor, inplace: bool) -> torch.Tensor:
    """k > FUSED_MAX_K: ``c = Pᵀ·g`` and ``g − P·c`` as library GEMMs in the accumulation dtype."""
    acc = torch.float64 if torch.float64 in (g.dtype, basis.dtype) else torch.float32
    p = basis.to(acc)
    if g.dim() == 3:
        p = p.expand(g.shape[0], *p.shape[-2:])
    coeff = p.transpose(-1, -2) @ g.to(acc)
    update = torch.baddbmm if g.dim() == 3 else torch.addmm
    if inplace and g.dtype == acc:
        return (g.baddbmm_ if g.dim() == 3 else g.addmm_)(p, coeff, alpha=-1)
    out = update(g.to(acc), p, coeff, alpha=-1)
    return g.copy_(out) if inplace else out.to(g.dtype)


def residual_project_triton(g: torch.Tensor, basis: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """The triton backend of :func:`keeplora_kernels.residual_project` (``_dispatch`` selects it)."""
    k = basis.shape[-1]
    if k == 0:
        return g if inplace else g.clone()
    if basis.dim() == 3 and g.dim() == 2:
        raise ValueError("residual_project: a batched basis needs a batched g")
    if g.dim() == 3 and basis.dim() == 3 and basis.shape[0] not in (1, g.shape[0]):
        raise ValueError(f"residual_project: batch sizes differ (g {g.shape[0]}, basis {basis.shape[0]})")
    if basis.device != g.device:
        raise ValueError(f"residual_project: g is on {g.device} but basis on {basis.device}")
    if k > FUSED_MAX_K:
        return _project_gemm(g, basis, inplace)
    g3 = g if g.dim() == 3 else g.unsqueeze(0)
    p3 = basis if basis.dim() == 3 else basis.unsqueeze(0)
    out3 = g3 if inplace else torch.empty(g3.shape, device=g.device, dtype=g.dtype)
    for launch in plan_project(g3, p3, out3):
        launch()
    return g if inplace else (out3 if g.dim() == 3 else out3[0])
