"""Triton streaming second moment ``acc += Xᵀ·X`` over the unmasked rows of X, fp32 (or fp64) accumulation.

Layout: kernel, launcher, entry point. The torch backend and the public function are in
``keeplora_kernels/second_moment.py``.

Only the tiles on and above the diagonal are computed (d_t·(d_t+1)/2 of d_t² tiles, so ≈ half the FLOPs of
``addmm``); each program adds its tile C_ij and, off the diagonal, its transpose into C_ji in the same epilogue:
the result is symmetric after this one pass, no separate symmetrisation (a diagonal tile is averaged with its
transpose in registers, so the whole update is exactly symmetric).

Accuracy: the products are summed in windows of ``WINDOW`` row blocks, and each window's sum is added to the running
total with an ordinary (round-to-nearest) fp32 add. Without windows one accumulator absorbs every row: on Hopper the
tensor cores' fp32 accumulation truncates, and its bias grows with the number of rows to several times the error of
PyTorch's fp32 GEMM over a few thousand rows; with fp32 FMA chains the error grows with the chain's length. Windows
cut both by the window length at one extra tile add per window. Masked rows are loaded as zeros
(``mask`` is read per row block; nothing is gathered, nothing syncs with the host). When there are fewer tile
pairs than the GPU has room for (small d), the rows are split into chunks whose fp32 partial d×d results are
summed on the device (deterministic, no atomics).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._triton_utils import Launch, acc_dtype, cdiv, dot_mode, load, mma, target_programs

__all__ = ["second_moment_update_triton"]

MAX_PARTIAL_BYTES = 256 * 2**20  # cap on the split-rows partial buffer


@triton.jit
def _second_moment_kernel(
    X,
    MASK,
    C,
    PAIRS,
    N,
    D,
    rows_per_split,
    stride_xn,
    stride_xd,
    stride_cs,
    stride_ci,
    stride_cj,
    HAS_MASK: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """Tile pair ``PAIRS[pid]`` = (ti ≤ tj) over the row chunk ``pid_s``: C[ti, tj] (+)= X_iᵀ·X_j, mirrored."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    ti = tl.load(PAIRS + 2 * pid)
    tj = tl.load(PAIRS + 2 * pid + 1)
    offs_i = ti * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = tj * BLOCK_D + tl.arange(0, BLOCK_D)
    in_i = offs_i < D
    in_j = offs_j < D
    offs_r = tl.arange(0, BLOCK_N)
    row0 = pid_s.to(tl.int64) * rows_per_split  # int64: N·stride may pass 2³¹
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=ACC)  # the running total: round-to-nearest adds only
    part = tl.zeros((BLOCK_D, BLOCK_D), dtype=ACC)  # the current window's sum, accumulated by the dot units
    for it in range(0, rows_per_split // BLOCK_N):
        rows = row0 + it * BLOCK_N + offs_r
        keep = rows < N
        if HAS_MASK:
            keep = keep & (tl.load(MASK + rows, mask=keep, other=0) != 0)
        xi = load(
            X + rows[:, None] * stride_xn + offs_i[None, :] * stride_xd, keep[:, None] & in_i[None, :], UPCAST, ACC
        )
        xj = load(
            X + rows[:, None] * stride_xn + offs_j[None, :] * stride_xd, keep[:, None] & in_j[None, :], UPCAST, ACC
        )
        part = mma(tl.trans(xi), xj, part, UPCAST, PREC)
        if it % WINDOW == WINDOW - 1:
            acc += part
            part = tl.zeros((BLOCK_D, BLOCK_D), dtype=ACC)
    acc += part
    base = C + pid_s * stride_cs
    upper = base + offs_i[:, None] * stride_ci + offs_j[None, :] * stride_cj
    lower = base + offs_j[:, None] * stride_ci + offs_i[None, :] * stride_cj
    off_diagonal = (offs_j[:, None] // BLOCK_D) != (offs_i[None, :] // BLOCK_D)  # all true iff ti != tj
    m_upper = in_i[:, None] & in_j[None, :]
    m_lower = in_j[:, None] & in_i[None, :] & off_diagonal  # the mirror tile, off the diagonal only
    acc = tl.where(off_diagonal, acc, 0.5 * (acc + tl.trans(acc)))  # a diagonal tile becomes exactly symmetric
    # upper tile, then its mirror: one C tile live at a time (keeps the epilogue within the register budget)
    if ACCUMULATE:
        tl.store(upper, (acc + tl.load(upper, mask=m_upper, other=0.0).to(ACC)).to(C.dtype.element_ty), mask=m_upper)
        tl.store(
            lower,
            (tl.trans(acc) + tl.load(lower, mask=m_lower, other=0.0).to(ACC)).to(C.dtype.element_ty),
            mask=m_lower,
        )
    else:
        tl.store(upper, acc.to(C.dtype.element_ty), mask=m_upper)
        tl.store(lower, tl.trans(acc).to(C.dtype.element_ty), mask=m_lower)


@functools.lru_cache(maxsize=64)
def _pairs(tiles: int, device: torch.device) -> torch.Tensor:
    """(ti, tj) for ti ≤ tj, flattened int32, on ``device`` (cached: made once per tile count)."""
    ij = torch.triu_indices(tiles, tiles)
    return ij.t().contiguous().to(device=device, dtype=torch.int32).reshape(-1)


def plan_second_moment(
    acc: torch.Tensor,
    x2: torch.Tensor,
    mask1: torch.Tensor | None,
    *,
    split: int | None = None,
    on_gpu: bool | None = None,
):
    """Launch adding ``x2ᵀ·x2`` (rows where ``mask1`` ≠ 0) into ``acc``. Returns ``(launches, finish)``; with a
    row split the kernel writes partials and ``finish()`` adds their sum into ``acc``."""
    n, d = x2.shape
    device = x2.device
    on_gpu = device.type == "cuda" if on_gpu is None else on_gpu
    upcast, prec = dot_mode(x2.dtype if acc.dtype != torch.float64 else torch.float64)
    block_d = (128 if x2.dtype in (torch.float16, torch.bfloat16) else 64) if on_gpu else 32
    block_n = (64 if x2.dtype in (torch.float16, torch.bfloat16) else 32) if on_gpu else 32
    # row blocks per accuracy window (module docstring): 8 on a GPU (512 bf16 / 256 fp32 rows; a flush per 8 dots
    # costs nothing measurable); 2 under the interpreter so the tests cross window boundaries on small shapes
    window = 8 if on_gpu else 2
    tiles = cdiv(d, block_d)
    pairs = _pairs(tiles, device)
    num_pairs = pairs.numel() // 2
    row_blocks = max(1, cdiv(n, block_n))
    if split is None:
        split = 1
        target = target_programs(device)
        if num_pairs < target:
            split = min(cdiv(target, num_pairs), row_blocks, max(1, MAX_PARTIAL_BYTES // (d * d * acc.element_size())))
    split = max(1, min(split, row_blocks))
    rows_per_split = cdiv(row_blocks, split) * block_n
    split = max(1, cdiv(n, rows_per_split))
    if split > 1:
        part = torch.empty((split, d, d), device=device, dtype=acc.dtype)
        dst, stride_cs, accumulate = part, part.stride(0), False
    else:
        part, dst, stride_cs, accumulate = None, acc, 0, True
    launch = Launch(
        _second_moment_kernel,
        (num_pairs, split),
        dict(
            X=x2,
            MASK=mask1 if mask1 is not None else pairs,
            C=dst,
            PAIRS=pairs,
            N=n,
            D=d,
            rows_per_split=rows_per_split,
            stride_xn=x2.stride(0),
            stride_xd=x2.stride(1),
            stride_cs=stride_cs,
            stride_ci=dst.stride(-2),
            stride_cj=dst.stride(-1),
        ),
        dict(
            HAS_MASK=mask1 is not None,
            ACCUMULATE=accumulate,
            ACC=acc_dtype(acc.dtype, x2.dtype),
            UPCAST=upcast,
            PREC=prec,
            BLOCK_D=block_d,
            BLOCK_N=block_n,
            WINDOW=window,
        ),
        num_warps=8 if on_gpu and block_d == 128 else 4,
        num_stages=3 if on_gpu else 1,
    )

    def finish():
        if part is not None:
            acc.add_(part.sum(0))

    return [launch], finish


def second_moment_update_triton(
    acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None, *, split: int | None = None
) -> torch.Tensor:
    """The triton backend of :func:`keeplora_kernels.second_moment_update` (``_dispatch`` selects it; shapes and
    dtypes were checked there). ``split`` forces the number of row chunks (tests)."""
    if acc.device != x.device:
        raise ValueError(f"second_moment_update: acc is on {acc.device} but x on {x.device}")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return acc
    mask1 = None
    if mask is not None:
        mask1 = mask.reshape(-1)
        mask1 = (mask1 != 0).to(torch.int8) if mask1.dtype != torch.int8 else mask1.contiguous()
    launches, finish = plan_second_moment(acc, x2, mask1, split=split)
    for launch in launches:
        launch()
    finish()
    return acc
