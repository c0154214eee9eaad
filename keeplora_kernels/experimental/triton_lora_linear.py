"""Experimental: Triton kernels for the frozen-A LoRA linear (forward and backward), single and shared-input
(q/k/v) forms, carrying the base GEMM ``x·Wᵀ`` in their own main loop.

Dispatched when: the bf16 training step of :func:`lora_linear_triton` beats the ``expand_first`` torch step and the
compiled op at the Llama and CLIP layer shapes of ``keeplora_bench.micro.bench_lora_variants``, and
:func:`lora_linear_shared_triton` beats three such steps on the CLIP q/k/v shape. The pointer-load main loop here
does not reach cuBLAS; a persistent, TMA-fed one did in ``keeplora_bench.micro.bench_triton_gemm``
(numbers: ``benchmarks/results/h200/``).

Layout: kernels, launchers (each returns :class:`Launch` plans, then runs them), the ``torch.autograd.Function``,
the entry points. The production op is ``keeplora_kernels.lora_linear``; this module is not in its dispatch table.

Notation: X is T×K (tokens × d_in), W is N×K (d_out × d_in), A is R×K (``lora_A.weight``), B is N×R
(``lora_B.weight``), s = X·Aᵀ (T×R). For the shared form, projection i has (W_i, b_i, A_i, B_i, scale_i) and
A_cat = [A_1; …; A_p] (ΣR_i × K), s_cat = X·A_catᵀ.

Kernels:
* ``_shrink_kernel``     s = X·Aᵀ, split over K (fp32 partials, summed on the host) when there are few tokens.
* ``_fwd_kernel``        Y = [X | s]·[Wᵀ ; scale·Bᵀ] + b in one output tile: the r-wide step s·Bᵀ (times scale,
                         in fp32) initialises the accumulator, the K loop adds X·Wᵀ, the epilogue adds the bias.
* ``_bwd_dy_kernel``     one pass over dY giving scale·ds = scale·dY·B (partials per d_out block), dB = scale·dYᵀ·s
                         and db = Σ_T dY (partials per token chunk), summed on the device (no kernel if one).
* ``_bwd_dx_kernel``     dX = [dY_1 | … | dY_p | scale·ds_cat]·[W_1; …; W_p; A_cat] (up to four dY/W segments).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .._triton_utils import (
    Launch,
    acc_dtype,
    cdiv,
    dot_mode,
    load,
    load_all,
    mma,
    next_pow2,
    round_to,
    target_programs,
)

__all__ = ["lora_linear_triton", "lora_linear_shared_triton", "LoRALinearTritonFunction", "lora_dy_pass"]

MAX_RANK = 128
MAX_SEGMENTS = 4  # dY/W pairs the dX kernel takes in one launch


# ----------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Row-major tile order in groups of GROUP_M tile rows, so consecutive programs share operand tiles in L2."""
    width = GROUP_M * num_pid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _shrink_kernel(
    X,
    A,
    S,
    T,
    K,
    R,
    k_per_split,
    stride_xt,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_ss,
    stride_st,
    stride_sr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """S[split] = X[:, k-range]·A[:, k-range]ᵀ for the token block and rank block of this program."""
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64: T·stride may pass 2³¹
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    k_start = pid_s * k_per_split
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=ACC)
    for k0 in range(0, k_per_split, BLOCK_K):
        offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < K
        x = load(
            X + offs_t[:, None] * stride_xt + offs_k[None, :] * stride_xk,
            (offs_t[:, None] < T) & in_k[None, :],
            UPCAST,
            ACC,
        )
        a = load(
            A + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
            in_k[:, None] & (offs_r[None, :] < R),
            UPCAST,
            ACC,
        )
        acc = mma(x, a, acc, UPCAST, PREC)
    ptrs = S + pid_s * stride_ss + offs_t[:, None] * stride_st + offs_r[None, :] * stride_sr
    tl.store(ptrs, round_to(acc, S.dtype.element_ty, UPCAST), mask=(offs_t[:, None] < T) & (offs_r[None, :] < R))


@triton.jit
def _accumulate_product(
    acc,
    A,
    B,
    K,
    stride_ar,
    stride_ak,
    stride_bk,
    stride_bc,
    rows,
    cols,
    EVEN_K: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc += A[rows, :K]·B[:K, cols], BLOCK_K at a time; unmasked loads when K is a multiple of BLOCK_K (the
    main loop of the forward GEMM and of each dX segment)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows[:, None] * stride_ar + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + cols[None, :] * stride_bc
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = load_all(a_ptrs, UPCAST, ACC)
            b = load_all(b_ptrs, UPCAST, ACC)
        else:
            in_k = (k0 + offs_k) < K
            a = load(a_ptrs, in_k[None, :], UPCAST, ACC)
            b = load(b_ptrs, in_k[:, None], UPCAST, ACC)
        acc = mma(a, b, acc, UPCAST, PREC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _fwd_kernel(
    X,
    W,
    BIAS,
    S,
    B,
    Y,
    T,
    N,
    K,
    R,
    scale,
    stride_xt,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_st,
    stride_sr,
    stride_bn,
    stride_br,
    stride_yt,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_T: tl.constexpr,
):
    """Y = X·Wᵀ + scale·(s·Bᵀ) + bias for one BLOCK_T×BLOCK_N tile (fp32 accumulation, one rounding at the end)."""
    pid_t, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(T, BLOCK_T), tl.cdiv(N, BLOCK_N), GROUP_T)
    offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64: T·stride may pass 2³¹
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_t % T  # wrapped indices keep loads in bounds; the store is masked
    cols = offs_n % N
    # the r-wide step of the K-concatenated GEMM [x | s]·[Wᵀ ; scale·Bᵀ] goes first, so that one accumulator
    # (initialised to scale·s·Bᵀ in fp32) serves both parts and no second BLOCK_T×BLOCK_N tile is live
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        in_r = offs_r < R
        s = load(S + rows[:, None] * stride_st + offs_r[None, :] * stride_sr, in_r[None, :], UPCAST, ACC)
        b = load(B + offs_r[:, None] * stride_br + cols[None, :] * stride_bn, in_r[:, None], UPCAST, ACC)
        acc = mma(s, b, acc, UPCAST, PREC)
    acc = acc * scale
    acc = _accumulate_product(
        acc, X, W, K, stride_xt, stride_xk, stride_wk, stride_wn, rows, cols, EVEN_K, ACC, UPCAST, PREC, BLOCK_K
    )
    if HAS_BIAS:
        acc += tl.load(BIAS + cols).to(ACC)[None, :]
    mask = (offs_t[:, None] < T) & (offs_n[None, :] < N)
    tl.store(
        Y + offs_t[:, None] * stride_yt + offs_n[None, :] * stride_yn,
        round_to(acc, Y.dtype.element_ty, UPCAST),
        mask=mask,
    )


@triton.jit
def _bwd_dy_kernel(
    DY,
    S,
    B,
    DS_PART,
    DB_PART,
    DBIAS_PART,
    T,
    N,
    R,
    blocks_per_prog,
    scale,
    stride_dyt,
    stride_dyn,
    stride_st,
    stride_sr,
    stride_bn,
    stride_br,
    stride_dsp,
    stride_dst,
    stride_dsr,
    stride_dbp,
    stride_dbn,
    stride_dbr,
    stride_dbiasp,
    HAS_DBIAS: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One read of the dY tiles of d_out block ``pid_n`` over token chunk ``pid_t``:
    DS_PART[pid_n] = scale·dY[:, n-block]·B[n-block], DB_PART[pid_t] = scale·Σ_chunk dYᵀ·s,
    DBIAS_PART[pid_t] = Σ_chunk dY (the scale is applied in fp32 to the fp32 sums)."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    in_n = offs_n < N
    in_r = offs_r < R
    b = load(B + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br, in_n[:, None] & in_r[None, :], UPCAST, ACC)
    db_acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC)
    dbias_acc = tl.zeros((BLOCK_N,), dtype=ACC)
    for i in range(0, blocks_per_prog):
        offs_t = (pid_t * blocks_per_prog + i).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        in_t = offs_t < T
        dy = load(
            DY + offs_t[:, None] * stride_dyt + offs_n[None, :] * stride_dyn, in_t[:, None] & in_n[None, :], UPCAST, ACC
        )
        s = load(
            S + offs_t[:, None] * stride_st + offs_r[None, :] * stride_sr, in_t[:, None] & in_r[None, :], UPCAST, ACC
        )
        ds = mma(dy, b, tl.zeros((BLOCK_T, BLOCK_R), dtype=ACC), UPCAST, PREC)
        tl.store(
            DS_PART + pid_n * stride_dsp + offs_t[:, None] * stride_dst + offs_r[None, :] * stride_dsr,
            round_to(ds * scale, DS_PART.dtype.element_ty, UPCAST),
            mask=in_t[:, None] & in_r[None, :],
        )
        db_acc = mma(tl.trans(dy), s, db_acc, UPCAST, PREC)
        if HAS_DBIAS:
            dbias_acc += tl.sum(dy.to(ACC), axis=0)
    tl.store(
        DB_PART + pid_t * stride_dbp + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr,
        round_to(db_acc * scale, DB_PART.dtype.element_ty, UPCAST),
        mask=in_n[:, None] & in_r[None, :],
    )
    if HAS_DBIAS:
        tl.store(
            DBIAS_PART + pid_t * stride_dbiasp + offs_n,
            round_to(dbias_acc, DBIAS_PART.dtype.element_ty, UPCAST),
            mask=in_n,
        )


@triton.jit
def _bwd_dx_kernel(
    DY0,
    W0,
    N0,
    s_dy0t,
    s_dy0n,
    s_w0n,
    s_w0k,
    DY1,
    W1,
    N1,
    s_dy1t,
    s_dy1n,
    s_w1n,
    s_w1k,
    DY2,
    W2,
    N2,
    s_dy2t,
    s_dy2n,
    s_w2n,
    s_w2k,
    DY3,
    W3,
    N3,
    s_dy3t,
    s_dy3n,
    s_w3n,
    s_w3k,
    DS,
    A,
    DX,
    T,
    K,
    R,
    stride_dst,
    stride_dsr,
    stride_ar,
    stride_ak,
    stride_dxt,
    stride_dxk,
    NUM_SEG: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_T: tl.constexpr,
):
    """dX tile = Σ_seg dY_seg·W_seg + ds·A (ds already holds the scales), one rounding at the end."""
    pid_t, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(T, BLOCK_T), tl.cdiv(K, BLOCK_K), GROUP_T)
    offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64: T·stride may pass 2³¹
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = offs_t % T
    cols = offs_k % K
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=ACC)
    acc = _accumulate_product(
        acc, DY0, W0, N0, s_dy0t, s_dy0n, s_w0n, s_w0k, rows, cols, False, ACC, UPCAST, PREC, BLOCK_N
    )
    if NUM_SEG > 1:
        acc = _accumulate_product(
            acc, DY1, W1, N1, s_dy1t, s_dy1n, s_w1n, s_w1k, rows, cols, False, ACC, UPCAST, PREC, BLOCK_N
        )
    if NUM_SEG > 2:
        acc = _accumulate_product(
            acc, DY2, W2, N2, s_dy2t, s_dy2n, s_w2n, s_w2k, rows, cols, False, ACC, UPCAST, PREC, BLOCK_N
        )
    if NUM_SEG > 3:
        acc = _accumulate_product(
            acc, DY3, W3, N3, s_dy3t, s_dy3n, s_w3n, s_w3k, rows, cols, False, ACC, UPCAST, PREC, BLOCK_N
        )
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        in_r = offs_r < R
        ds = tl.load(DS + rows[:, None] * stride_dst + offs_r[None, :] * stride_dsr, mask=in_r[None, :], other=0.0)
        a = load(A + offs_r[:, None] * stride_ar + cols[None, :] * stride_ak, in_r[:, None], UPCAST, ACC)
        if UPCAST:
            ds = ds.to(ACC)
        else:  # ds is fp32 (summed partials); the tensor cores take it in dY's dtype, as the torch path does
            ds = ds.to(DY0.dtype.element_ty)
        acc = mma(ds, a, acc, UPCAST, PREC)
    mask = (offs_t[:, None] < T) & (offs_k[None, :] < K)
    tl.store(
        DX + offs_t[:, None] * stride_dxt + offs_k[None, :] * stride_dxk,
        round_to(acc, DX.dtype.element_ty, UPCAST),
        mask=mask,
    )


# --------------------------------------------------------------------------------------------------- launchers
# Tile sizes on a GPU, per kernel and input width, in one place: keeplora_bench.micro.tune_triton sweeps these entries
# (Hopper heuristics, not tuned). Under the interpreter the kernels use INTERPRETER_TILES (fewer numpy operations
# per program). Every entry here is compiled for sm_90 and checked spill-free by tests/kernels/test_triton_compile.py.
GPU_TILES: dict[str, dict[str, int]] = {
    "gemm_16bit": dict(BLOCK_T=128, BLOCK_N=256, BLOCK_K=64, GROUP_T=8, num_warps=8, num_stages=3),
    "gemm_32bit": dict(BLOCK_T=64, BLOCK_N=64, BLOCK_K=32, GROUP_T=8, num_warps=8, num_stages=3),
    "shrink_16bit": dict(BLOCK_T=64, BLOCK_K=128, num_warps=4, num_stages=3),
    "shrink_32bit": dict(BLOCK_T=64, BLOCK_K=64, num_warps=4, num_stages=3),
    "dy_pass_16bit": dict(BLOCK_T=64, BLOCK_N=128, num_warps=4, num_stages=2),
    "dy_pass_32bit": dict(BLOCK_T=32, BLOCK_N=64, num_warps=4, num_stages=2),
}
INTERPRETER_TILES: dict[str, dict[str, int]] = {
    "gemm": dict(BLOCK_T=32, BLOCK_N=32, BLOCK_K=32, GROUP_T=4, num_warps=4, num_stages=1),
    "shrink": dict(BLOCK_T=32, BLOCK_K=32, num_warps=4, num_stages=1),
    "dy_pass": dict(BLOCK_T=32, BLOCK_N=32, num_warps=4, num_stages=1),
}


def _tiles(kernel: str, dtype: torch.dtype, on_gpu: bool) -> dict[str, int]:
    """Tile sizes of ``kernel`` ("gemm": forward and dX, "shrink", "dy_pass") for inputs of ``dtype``."""
    if not on_gpu:
        return INTERPRETER_TILES[kernel]
    return GPU_TILES[f"{kernel}_{'16bit' if dtype in (torch.float16, torch.bfloat16) else '32bit'}"]


def _rank_block(r: int) -> int:
    return max(16, min(next_pow2(r), MAX_RANK))


def plan_shrink(
    x2: torch.Tensor, a: torch.Tensor, out: torch.Tensor, *, split_k: int | None = None, on_gpu: bool | None = None
):
    """Launches computing ``out = x2·aᵀ`` (T×R). Returns ``(launches, finish)``; ``finish()`` sums split-K
    partials into ``out`` (no-op without split)."""
    T, K = x2.shape
    R = a.shape[0]
    device = x2.device
    upcast, prec = dot_mode(x2.dtype)
    on_gpu = device.type == "cuda" if on_gpu is None else on_gpu
    tiles = _tiles("shrink", x2.dtype, on_gpu)
    block_t, block_k = tiles["BLOCK_T"], tiles["BLOCK_K"]
    block_r = _rank_block(R)
    t_blocks, r_blocks, k_blocks = cdiv(T, block_t), cdiv(R, block_r), cdiv(K, block_k)
    if split_k is None:
        split_k = 1
        target = target_programs(device)
        if t_blocks * r_blocks < target:
            split_k = min(cdiv(target, max(1, t_blocks * r_blocks)), k_blocks)
    split_k = max(1, min(split_k, k_blocks))
    k_per_split = cdiv(k_blocks, split_k) * block_k
    split_k = cdiv(K, k_per_split)
    if split_k > 1:
        part = torch.empty(
            (split_k, T, R), device=device, dtype=torch.float32 if x2.dtype != torch.float64 else torch.float64
        )
        dst, stride_ss = part, part.stride(0)
        strides = part.stride()[1:]
    else:
        part, dst, stride_ss, strides = None, out, 0, out.stride()
    launch = Launch(
        _shrink_kernel,
        (t_blocks, r_blocks, split_k),
        dict(
            X=x2,
            A=a,
            S=dst,
            T=T,
            K=K,
            R=R,
            k_per_split=k_per_split,
            stride_xt=x2.stride(0),
            stride_xk=x2.stride(1),
            stride_ar=a.stride(0),
            stride_ak=a.stride(1),
            stride_ss=stride_ss,
            stride_st=strides[0],
            stride_sr=strides[1],
        ),
        dict(
            ACC=acc_dtype(x2.dtype, a.dtype),
            UPCAST=upcast,
            PREC=prec,
            BLOCK_T=block_t,
            BLOCK_K=block_k,
            BLOCK_R=block_r,
        ),
        num_warps=tiles["num_warps"],
        num_stages=tiles["num_stages"],
    )

    def finish():
        if part is not None:
            torch.sum(part, dim=0, out=out) if out.dtype == part.dtype else out.copy_(part.sum(0))

    return [launch], finish


def plan_forward(x2, weight, bias, s, lora_b, scale, y, *, on_gpu: bool | None = None) -> list[Launch]:
    T, K = x2.shape
    N = weight.shape[0]
    R = s.shape[1]
    cfg = _tiles("gemm", x2.dtype, x2.device.type == "cuda" if on_gpu is None else on_gpu)
    upcast, prec = dot_mode(x2.dtype)
    grid = (cdiv(T, cfg["BLOCK_T"]) * cdiv(N, cfg["BLOCK_N"]),)
    return [
        Launch(
            _fwd_kernel,
            grid,
            dict(
                X=x2,
                W=weight,
                BIAS=bias if bias is not None else y,
                S=s,
                B=lora_b,
                Y=y,
                T=T,
                N=N,
                K=K,
                R=R,
                scale=float(scale),
                stride_xt=x2.stride(0),
                stride_xk=x2.stride(1),
                stride_wn=weight.stride(0),
                stride_wk=weight.stride(1),
                stride_st=s.stride(0),
                stride_sr=s.stride(1),
                stride_bn=lora_b.stride(0),
                stride_br=lora_b.stride(1),
                stride_yt=y.stride(0),
                stride_yn=y.stride(1),
            ),
            dict(
                HAS_BIAS=bias is not None,
                EVEN_K=K % cfg["BLOCK_K"] == 0,
                ACC=acc_dtype(x2.dtype, weight.dtype),
                UPCAST=upcast,
                PREC=prec,
                BLOCK_T=cfg["BLOCK_T"],
                BLOCK_N=cfg["BLOCK_N"],
                BLOCK_K=cfg["BLOCK_K"],
                BLOCK_R=min(_rank_block(R), 64),
                GROUP_T=cfg["GROUP_T"],
            ),
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    ]


def plan_backward_dy(
    dy2, s, lora_b, scale, *, need_dbias: bool, blocks_per_prog: int | None = None, on_gpu: bool | None = None
):
    """Launch of the one pass over dY. Returns ``(launches, (ds_part, db_part, dbias_part))`` with
    ``scale·ds = ds_part.sum(0)`` (T×R), ``dB = db_part.sum(0)`` (N×R), ``dbias = dbias_part.sum(0)``."""
    T, N = dy2.shape
    R = s.shape[1]
    device = dy2.device
    on_gpu = device.type == "cuda" if on_gpu is None else on_gpu
    upcast, prec = dot_mode(dy2.dtype)
    tiles = _tiles("dy_pass", dy2.dtype, on_gpu)
    block_t, block_n = tiles["BLOCK_T"], tiles["BLOCK_N"]
    block_r = _rank_block(R)
    t_blocks, n_blocks = cdiv(T, block_t), cdiv(N, block_n)
    if blocks_per_prog is None:
        programs_t = max(1, min(t_blocks, cdiv(target_programs(device), max(1, n_blocks))))
        blocks_per_prog = cdiv(t_blocks, programs_t)
    blocks_per_prog = max(1, min(blocks_per_prog, t_blocks))
    programs_t = cdiv(t_blocks, blocks_per_prog)
    part_dtype = torch.float64 if dy2.dtype == torch.float64 else torch.float32
    ds_part = torch.empty((n_blocks, T, R), device=device, dtype=part_dtype)
    db_part = torch.empty((programs_t, N, R), device=device, dtype=part_dtype)
    dbias_part = torch.empty((programs_t, N) if need_dbias else (1, 1), device=device, dtype=part_dtype)
    launch = Launch(
        _bwd_dy_kernel,
        (programs_t, n_blocks),
        dict(
            DY=dy2,
            S=s,
            B=lora_b,
            DS_PART=ds_part,
            DB_PART=db_part,
            DBIAS_PART=dbias_part,
            T=T,
            N=N,
            R=R,
            blocks_per_prog=blocks_per_prog,
            scale=float(scale),
            stride_dyt=dy2.stride(0),
            stride_dyn=dy2.stride(1),
            stride_st=s.stride(0),
            stride_sr=s.stride(1),
            stride_bn=lora_b.stride(0),
            stride_br=lora_b.stride(1),
            stride_dsp=ds_part.stride(0),
            stride_dst=ds_part.stride(1),
            stride_dsr=ds_part.stride(2),
            stride_dbp=db_part.stride(0),
            stride_dbn=db_part.stride(1),
            stride_dbr=db_part.stride(2),
            stride_dbiasp=dbias_part.stride(0),
        ),
        dict(
            HAS_DBIAS=need_dbias,
            ACC=acc_dtype(dy2.dtype, s.dtype),
            UPCAST=upcast,
            PREC=prec,
            BLOCK_T=block_t,
            BLOCK_N=block_n,
            BLOCK_R=block_r,
        ),
        num_warps=tiles["num_warps"],
        num_stages=tiles["num_stages"],
    )
    return [launch], (ds_part, db_part, dbias_part)


def plan_backward_dx(
    segments: Sequence[tuple[torch.Tensor, torch.Tensor]], ds, a_cat, dx, *, on_gpu: bool | None = None
) -> list[Launch]:
    """Launch of ``dx = Σ dy_i·W_i + ds·a_cat`` for up to :data:`MAX_SEGMENTS` (dy_i, W_i) pairs."""
    if not 1 <= len(segments) <= MAX_SEGMENTS:
        raise ValueError(f"plan_backward_dx takes 1..{MAX_SEGMENTS} (dy, W) segments, got {len(segments)}")
    T, K = dx.shape
    R = ds.shape[1]
    dy0 = segments[0][0]
    cfg = _tiles("gemm", dy0.dtype, dx.device.type == "cuda" if on_gpu is None else on_gpu)
    upcast, prec = dot_mode(dy0.dtype)
    args = {}
    for i in range(MAX_SEGMENTS):
        dy, w = segments[i] if i < len(segments) else segments[0]
        n = dy.shape[1] if i < len(segments) else 0
        args.update(
            {
                f"DY{i}": dy,
                f"W{i}": w,
                f"N{i}": n,
                f"s_dy{i}t": dy.stride(0),
                f"s_dy{i}n": dy.stride(1),
                f"s_w{i}n": w.stride(0),
                f"s_w{i}k": w.stride(1),
            }
        )
    args.update(
        DS=ds,
        A=a_cat,
        DX=dx,
        T=T,
        K=K,
        R=R,
        stride_dst=ds.stride(0),
        stride_dsr=ds.stride(1),
        stride_ar=a_cat.stride(0),
        stride_ak=a_cat.stride(1),
        stride_dxt=dx.stride(0),
        stride_dxk=dx.stride(1),
    )
    grid = (cdiv(T, cfg["BLOCK_T"]) * cdiv(K, cfg["BLOCK_N"]),)
    return [
        Launch(
            _bwd_dx_kernel,
            grid,
            args,
            dict(
                NUM_SEG=len(segments),
                ACC=acc_dtype(dy0.dtype),
                UPCAST=upcast,
                PREC=prec,
                BLOCK_T=cfg["BLOCK_T"],
                BLOCK_K=cfg["BLOCK_N"],
                BLOCK_N=cfg["BLOCK_K"],
                BLOCK_R=min(_rank_block(R), 64),
                GROUP_T=cfg["GROUP_T"],
            ),
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    ]


def _sum_parts(part: torch.Tensor) -> torch.Tensor:
    """Sum of the partials over dim 0 (no kernel when there is one partial)."""
    return part[0] if part.shape[0] == 1 else part.sum(0)


def _run(launches: Sequence[Launch]) -> None:
    for launch in launches:
        launch()


# ------------------------------------------------------------------------------------------ forward / backward
def _check(x, weights, biases, lora_as, lora_bs):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"lora_linear (triton): unsupported x dtype {x.dtype}")
    k = x.shape[-1]
    for i, (w, b, a, lb) in enumerate(zip(weights, biases, lora_as, lora_bs)):
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"projection {i}: weight must be (d_out, {k}), got {tuple(w.shape)}")
        if a.dim() != 2 or a.shape[1] != k:
            raise ValueError(f"projection {i}: lora_a must be (r, {k}), got {tuple(a.shape)}")
        if lb.dim() != 2 or lb.shape != (w.shape[0], a.shape[0]):
            raise ValueError(f"projection {i}: lora_b must be ({w.shape[0]}, {a.shape[0]}), got {tuple(lb.shape)}")
        if not 1 <= a.shape[0] <= MAX_RANK:
            raise ValueError(f"projection {i}: rank {a.shape[0]} outside 1..{MAX_RANK}")
        if b is not None and b.shape != (w.shape[0],):
            raise ValueError(f"projection {i}: bias must be ({w.shape[0]},), got {tuple(b.shape)}")
        if w.requires_grad or a.requires_grad:
            raise RuntimeError(
                "lora_linear treats `weight` and `lora_a` as frozen, but one of them requires grad; "
                "call .requires_grad_(False) on it, or use lora_linear_unfused (plain autograd)"
            )
        for t in (w, a, lb) + ((b,) if b is not None else ()):
            if t.device != x.device:
                raise ValueError(f"projection {i}: all tensors must be on {x.device}, got one on {t.device}")


def shared_forward(x2: torch.Tensor, weights, biases, lora_as, lora_bs, scales, *, split_k: int | None = None):
    """Forward of p projections of one input: one shrink with A_cat, then one fused GEMM per projection.
    Returns ``(ys, s_cat)``; ``s_cat`` (T×ΣR, x's dtype) is the only activation backward needs."""
    T = x2.shape[0]
    a_cat = lora_as[0] if len(lora_as) == 1 else torch.cat([a.to(lora_as[0].dtype) for a in lora_as], dim=0)
    s_cat = torch.empty((T, a_cat.shape[0]), device=x2.device, dtype=x2.dtype)
    launches, finish = plan_shrink(x2, a_cat, s_cat, split_k=split_k)
    _run(launches)
    finish()
    ys, r0 = [], 0
    for w, b, a, lb, scale in zip(weights, biases, lora_as, lora_bs, scales):
        r = a.shape[0]
        y = torch.empty((T, w.shape[0]), device=x2.device, dtype=x2.dtype)
        _run(plan_forward(x2, w, b, s_cat[:, r0 : r0 + r], lb, scale, y))
        ys.append(y)
        r0 += r
    return ys, s_cat


def shared_backward(dys, s_cat, weights, lora_as, lora_bs, scales, *, need_dx: bool, need_dlora_b, need_dbias):
    """Backward of :func:`shared_forward`. ``dys[i]`` may be None (output unused). Returns
    ``(dx2 or None, [dB_i or None], [dbias_i or None])``; dB_i in B_i's dtype, dbias_i in fp32 (cast by caller)."""
    T = s_cat.shape[0]
    device = s_cat.device
    dlora_bs, dbiases, ds_blocks, segments = [], [], [], []
    r0 = 0
    for i, (dy2, lb, a, scale) in enumerate(zip(dys, lora_bs, lora_as, scales)):
        r = a.shape[0]
        s = s_cat[:, r0 : r0 + r]
        r0 += r
        if dy2 is None:
            dlora_bs.append(torch.zeros_like(lb) if need_dlora_b[i] else None)
            dbiases.append(None if not need_dbias[i] else torch.zeros(lb.shape[0], device=device))
            ds_blocks.append(torch.zeros((T, r), device=device, dtype=torch.float32))
            continue
        if not (need_dx or need_dlora_b[i] or need_dbias[i]):
            dlora_bs.append(None)
            dbiases.append(None)
            ds_blocks.append(torch.zeros((T, r), device=device, dtype=torch.float32))
            continue
        launches, (ds_part, db_part, dbias_part) = plan_backward_dy(dy2, s, lb, scale, need_dbias=need_dbias[i])
        _run(launches)
        dlora_bs.append(_sum_parts(db_part).to(lb.dtype) if need_dlora_b[i] else None)
        dbiases.append(_sum_parts(dbias_part) if need_dbias[i] else None)
        ds_blocks.append(_sum_parts(ds_part))
        segments.append((dy2, weights[i]))
    dx2 = None
    if need_dx:
        dx2 = torch.empty((T, lora_as[0].shape[1]), device=device, dtype=s_cat.dtype)
        if not segments:
            dx2.zero_()
            return dx2, dlora_bs, dbiases
        a_cat = lora_as[0] if len(lora_as) == 1 else torch.cat([a.to(lora_as[0].dtype) for a in lora_as], dim=0)
        ds_cat = ds_blocks[0] if len(ds_blocks) == 1 else torch.cat(ds_blocks, dim=1)
        if len(segments) > MAX_SEGMENTS:  # rare: fold the extra segments into one by concatenation
            head, tail = segments[: MAX_SEGMENTS - 1], segments[MAX_SEGMENTS - 1 :]
            segments = head + [(torch.cat([d for d, _ in tail], dim=1), torch.cat([w for _, w in tail], dim=0))]
        _run(plan_backward_dx(segments, ds_cat, a_cat, dx2))
    return dx2, dlora_bs, dbiases


class LoRALinearTritonFunction(torch.autograd.Function):
    """Frozen-A LoRA linear for p ≥ 1 projections of one input x, in Triton.

    Forward (X = x with leading dims flattened, T×K; projection i):
        s_cat = X·[A_1; …; A_p]ᵀ                      one shrink for all projections (kept for backward)
        Y_i   = [X | s_i]·[W_iᵀ ; scale_i·B_iᵀ] + b_i    one K-concatenated GEMM, bias in the epilogue
    Backward, given dY_i:
        ds_i  = scale_i·dY_i·B_i,  dB_i = scale_i·dY_iᵀ·s_i,  db_i = Σ_T dY_i     one pass over dY_i
        dX    = [dY_1 | … | dY_p | ds_1 | … | ds_p]·[W_1; …; W_p; A_1; …; A_p]  one K-concatenated GEMM
    W_i and A_i are frozen (no dW, no dA), so X is never saved: the saved activation is s_cat (T×ΣR_i).
    dB_i is returned in B_i's dtype, db_i in b_i's dtype, dX in x's dtype and shape.
    """

    @staticmethod
    def forward(ctx, x, scales, n, *tensors):
        weights, biases, lora_as, lora_bs = (list(tensors[i * n : (i + 1) * n]) for i in range(4))
        _check(x, weights, biases, lora_as, lora_bs)
        x2 = x.reshape(-1, x.shape[-1])
        ys, s_cat = shared_forward(x2, weights, biases, lora_as, lora_bs, scales)
        ctx.save_for_backward(s_cat, *weights, *lora_as, *lora_bs)
        ctx.set_materialize_grads(False)
        ctx.n, ctx.scales, ctx.x_shape, ctx.x_dtype = n, scales, x.shape, x.dtype
        ctx.bias_dtypes = [None if b is None else b.dtype for b in biases]
        lead = x.shape[:-1]
        return tuple(y.reshape(*lead, y.shape[1]) for y in ys)

    @staticmethod
    def backward(ctx, *dys):
        n = ctx.n
        s_cat, *rest = ctx.saved_tensors
        weights, lora_as, lora_bs = rest[:n], rest[n : 2 * n], rest[2 * n :]
        need = ctx.needs_input_grad
        need_dx = need[0]
        need_dbias = [need[3 + n + i] for i in range(n)]
        need_dlora_b = [need[3 + 3 * n + i] for i in range(n)]
        dy2s = [None if dy is None else dy.reshape(-1, dy.shape[-1]).to(ctx.x_dtype) for dy in dys]
        dx2, dlora_bs, dbiases = shared_backward(
            dy2s,
            s_cat,
            weights,
            lora_as,
            lora_bs,
            ctx.scales,
            need_dx=need_dx,
            need_dlora_b=need_dlora_b,
            need_dbias=need_dbias,
        )
        dx = dx2.reshape(ctx.x_shape) if dx2 is not None else None
        dbiases = [None if g is None else g.to(dt) for g, dt in zip(dbiases, ctx.bias_dtypes)]
        return (dx, None, None, *([None] * n), *dbiases, *([None] * n), *dlora_bs)


# ------------------------------------------------------------------------------------------------ entry points
def lora_dy_pass(
    dy2: torch.Tensor, s: torch.Tensor, lora_b: torch.Tensor, scale: float, need_dbias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Body of the registered op ``keeplora::lora_dy_pass`` (:mod:`keeplora_kernels.experimental.lora_variants`):
    one pass over ``dy2`` (T×N) for the rank-r part of the LoRA backward, ``(scale·dy2·lora_b (T×R),
    scale·dy2ᵀ·s (N×R), Σ_T dy2 (N,))``, all fp32 (fp64 for fp64 inputs); the bias sum is a 1-element
    placeholder when ``need_dbias`` is False."""
    launches, (ds_part, db_part, dbias_part) = plan_backward_dy(dy2, s, lora_b, scale, need_dbias=need_dbias)
    for launch in launches:
        launch()
    return ds_part.sum(0), db_part.sum(0), dbias_part.sum(0)


def lora_linear_triton(x, weight, bias, lora_a, lora_b, scale):
    """:func:`keeplora_kernels.lora_linear` in the Triton kernels (same arguments and results)."""
    (y,) = LoRALinearTritonFunction.apply(x, (float(scale),), 1, weight, bias, lora_a, lora_b)
    return y


def lora_linear_shared_triton(x, weights, biases, lora_as, lora_bs, scales):
    """:func:`keeplora_kernels.lora_linear_shared` in the Triton kernels: one shrink of x for all projections."""
    n = len(weights)
    return LoRALinearTritonFunction.apply(x, tuple(float(s) for s in scales), n, *weights, *biases, *lora_as, *lora_bs)


def planned_launches(x2, weight, bias, lora_a, lora_b, scale, dy2, *, on_gpu: bool = True) -> list[Launch]:
    """Every kernel variant one forward + backward can launch for these inputs (not run): shrink with and without
    split-K, the fused forward, the dY pass, the dX GEMM with 1 and 3 segments. For the ahead-of-time compile test."""
    T = x2.shape[0]
    s = torch.empty((T, lora_a.shape[0]), device=x2.device, dtype=x2.dtype)
    y = torch.empty((T, weight.shape[0]), device=x2.device, dtype=x2.dtype)
    launches = plan_shrink(x2, lora_a, s, split_k=1, on_gpu=on_gpu)[0]
    launches += plan_shrink(x2, lora_a, s, split_k=2, on_gpu=on_gpu)[0]
    launches += plan_forward(x2, weight, bias, s, lora_b, scale, y, on_gpu=on_gpu)
    dy_launches, (ds_part, _, _) = plan_backward_dy(dy2, s, lora_b, scale, need_dbias=bias is not None, on_gpu=on_gpu)
    launches += dy_launches
    dx = torch.empty_like(x2)
    launches += plan_backward_dx([(dy2, weight)], ds_part[0], lora_a, dx, on_gpu=on_gpu)
    launches += plan_backward_dx([(dy2, weight)] * 3, ds_part[0], lora_a, dx, on_gpu=on_gpu)
    return launches
