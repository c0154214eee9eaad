"""Experimental: the frozen-A LoRA linear on a persistent, TMA-fed Triton GEMM main loop, the rank-r work folded in.

The pointer-load main loop of :mod:`.triton_lora_linear` does not reach cuBLAS speed on the H200; a persistent main
loop fed by tensor descriptors (TMA on Hopper) did in ``keeplora_bench.micro.bench_triton_gemm`` (numbers:
``benchmarks/results/h200/``). Here that main loop carries the whole frozen-A LoRA linear, so the
rank-r work costs tensor-core time inside the GEMM instead of extra passes over the T×d activations:

* ``_forward_kernel``: for an output tile Y[m, n] (BM×BN), each step of the K loop loads the X tile once and feeds
  two products, X·Wᵀ (BM×BN) and s = X·Aᵀ (BM×R, a narrow wgmma); the epilogue rounds scale·s to X's dtype, adds
  (scale·s)·Bᵀ and the bias to the fp32 accumulator and stores Y once. The tiles of the first column block also
  store s (T×R), the only activation backward needs.
* ``_dx_kernel``: for a tile dX[m, k] the loop over d_out loads the dY tile once and feeds dY·W and v = dY·B
  (BM×R); the epilogue adds (scale·v, rounded to dY's dtype)·A. With ``fuse_db`` the launch also computes
  dB = scale·dYᵀ·s and db = Σ_T dY in dB tiles placed first in its tile sequence (one read of each dY column block;
  they fill the idle programs of the dX tiles' last wave); otherwise they are the torch path's GEMM and sum.

Cost model (bf16, T=8192, d_in=d_out=4096, r=16, tiles 128×256×64): the narrow products add r/BN = 6 % to the
main loop's tensor-core work and nothing to its memory traffic, so forward ≈ 1.06× the base GEMM and dX ≈ 1.06× the
dX GEMM if the main loop runs at cuBLAS speed; the 32 dB tiles fit the 1024 dX tiles' last wave (8 × 132 programs).

Dispatched when: the bf16 training step of :func:`lora_linear_persistent` beats the ``expand_first`` torch step and
the compiled op at the Llama and CLIP layer shapes of ``keeplora_bench.micro.bench_lora_variants``.

Notation as in :mod:`.triton_lora_linear`: X is T×K (tokens × d_in), W is N×K, A is R×K, B is N×R, s = X·Aᵀ.
Operands that a tensor descriptor cannot describe (a row stride or base not 16-byte aligned, a non-unit column
stride, a Triton without descriptors) take the same kernels' masked pointer path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._triton_utils import (
    Launch,
    TensorDescriptor,
    acc_dtype,
    cdiv,
    dot_mode,
    ensure_tma_allocator,
    mma,
    next_pow2,
    persistent_programs,
    round_to,
    tma_blocker,
)
from ..lora_linear import _backward, _flatten_tokens
from .triton_lora_linear import _grouped_pid

__all__ = ["lora_linear_persistent", "LoRALinearPersistentFunction", "plan_forward", "plan_dx", "Tiles"]

MAX_RANK = 64  # the narrow accumulator is BM×R fp32 registers beside the BM×BN one
_TL_DTYPES = {
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


# ----------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _forward_kernel(
    X,
    W,
    A,
    B,
    BIAS,
    Y,
    S,
    T,
    N,
    K,
    R,
    scale,
    stride_xt,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_yt,
    stride_yn,
    stride_st,
    stride_sr,
    num_programs,
    USE_TMA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_S: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    IO_DTYPE: tl.constexpr,
    FLATTEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Y = X·Wᵀ + (scale·s)·Bᵀ + bias and (first column block) S = s, s = X·Aᵀ, over the output tiles
    ``pid, pid + num_programs, …`` (a runtime stride: a new token count compiles nothing). With ``USE_TMA`` X, W,
    A and Y are tensor descriptors (blocks BM×BK, BN×BK, BR×BK, BM×BN; the hardware zero-fills what lies outside);
    B, the bias and S are small and use pointers."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(T, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    for tile in tl.range(pid, num_tiles, num_programs, flatten=FLATTEN):
        pid_m, pid_n = _grouped_pid(tile, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: T·stride may pass 2³¹
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        acc_s = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
        if USE_TMA:
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            for ki in range(0, k_tiles):
                x = X.load([off_m, ki * BLOCK_K])
                w = W.load([off_n, ki * BLOCK_K])
                a = A.load([0, ki * BLOCK_K])
                if UPCAST:
                    x = x.to(ACC)
                    w = w.to(ACC)
                    a = a.to(ACC)
                acc = mma(x, w.T, acc, UPCAST, PREC)
                acc_s = mma(x, a.T, acc_s, UPCAST, PREC)
        else:
            rows = offs_m % T  # wrapped indices keep the loads in bounds; the stores are masked
            cols = offs_n % N
            offs_k = tl.arange(0, BLOCK_K)
            x_ptrs = X + rows[:, None] * stride_xt + offs_k[None, :] * stride_xk
            w_ptrs = W + cols[:, None] * stride_wn + offs_k[None, :] * stride_wk
            a_ptrs = A + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak
            for ki in range(0, k_tiles):
                in_k = offs_k < K - ki * BLOCK_K
                x = tl.load(x_ptrs, mask=in_k[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=in_k[None, :], other=0.0)
                a = tl.load(a_ptrs, mask=(offs_r[:, None] < R) & in_k[None, :], other=0.0)
                if UPCAST:
                    x = x.to(ACC)
                    w = w.to(ACC)
                    a = a.to(ACC)
                acc = mma(x, w.T, acc, UPCAST, PREC)
                acc_s = mma(x, a.T, acc_s, UPCAST, PREC)
                x_ptrs += BLOCK_K * stride_xk
                w_ptrs += BLOCK_K * stride_wk
                a_ptrs += BLOCK_K * stride_ak
        # epilogue: the rank-r term in X's dtype on the tensor cores (s is rounded there as the torch path rounds
        # it), accumulated into the fp32 tile; Y is rounded once
        in_n = offs_n < N
        b = tl.load(
            B + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
            mask=in_n[:, None] & (offs_r[None, :] < R),
            other=0.0,
        )
        s_scaled = round_to(acc_s * scale, IO_DTYPE, UPCAST)
        if UPCAST:
            s_scaled = s_scaled.to(ACC)
            b = b.to(ACC)
        acc = mma(s_scaled, b.T, acc, UPCAST, PREC)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=in_n, other=0.0).to(ACC)[None, :]
        if USE_TMA:
            Y.store([pid_m * BLOCK_M, pid_n * BLOCK_N], round_to(acc, IO_DTYPE, UPCAST))
        else:
            mask = (offs_m[:, None] < T) & in_n[None, :]
            tl.store(
                Y + offs_m[:, None] * stride_yt + offs_n[None, :] * stride_yn,
                round_to(acc, IO_DTYPE, UPCAST),
                mask=mask,
            )
        if STORE_S:  # the first column block's tiles write s: a row limit of T there and 0 elsewhere, not a branch
            # (Triton 3.6 cannot flatten the tile loop around a data-dependent scf.if)
            s_rows = T - T * tl.minimum(pid_n, 1)
            s_mask = (offs_m[:, None] < s_rows) & (offs_r[None, :] < R)
            s_ptrs = S + offs_m[:, None] * stride_st + offs_r[None, :] * stride_sr
            tl.store(s_ptrs, round_to(acc_s, IO_DTYPE, UPCAST), mask=s_mask)


@triton.jit
def _dx_kernel(
    DY,
    W,
    B,
    A,
    DX,
    DY_DB,
    S,
    DB,
    DBIAS,
    T,
    N,
    K,
    R,
    scale,
    stride_dyt,
    stride_dyn,
    stride_wn,
    stride_wk,
    stride_bn,
    stride_br,
    stride_ar,
    stride_ak,
    stride_dxt,
    stride_dxk,
    stride_st,
    stride_sr,
    stride_dbn,
    stride_dbr,
    num_programs,
    FUSE_DB: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    BLOCK_DB: tl.constexpr,
    USE_TMA: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    IO_DTYPE: tl.constexpr,
    FLATTEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dX = dY·W + (scale·dY·B)·A over the tiles of dX (T×K; BM×BN tiles, columns in d_in), the reduction over
    d_out in steps of BLOCK_K. With ``USE_TMA`` dY, W and dX are tensor descriptors (blocks BM×BK, BK×BN, BM×BN);
    B (N×R) and A (R×K) are small and use pointers.

    With ``FUSE_DB`` the tile sequence ``pid, pid + num_programs, …`` starts with ⌈N/BLOCK_DB⌉ dB tiles:
    DB[n-block] = scale·dY[:, n-block]ᵀ·S (fp32, and DBIAS[n-block] = Σ_T dY[:, n-block] with ``HAS_DBIAS``),
    each reading its column block of dY once (``DY_DB``: blocks BM×BLOCK_DB). They are memory-bound and few; the dX
    tiles are compute-bound and fill the waves, so the dB tiles mostly take the last wave's idle programs instead of
    a launch of their own. Two loops in sequence, not a branch per tile (Triton 3.6 cannot flatten a loop around one).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(T, BLOCK_M)
    num_pid_n = tl.cdiv(K, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    red_tiles = tl.cdiv(N, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    offs_red = tl.arange(0, BLOCK_K)
    num_db_tiles = 0
    if FUSE_DB:
        num_db_tiles = tl.cdiv(N, BLOCK_DB)
        offs_db_local = tl.arange(0, BLOCK_DB)
        offs_t = tl.arange(0, BLOCK_M)
        for db_tile in tl.range(pid, num_db_tiles, num_programs):
            offs_db = db_tile * BLOCK_DB + offs_db_local
            in_db = offs_db < N
            acc_db = tl.zeros((BLOCK_DB, BLOCK_R), dtype=ACC)
            acc_bias = tl.zeros((BLOCK_DB,), dtype=ACC)
            for m0 in range(0, T, BLOCK_M):
                rows = (m0 + offs_t).to(tl.int64)
                in_t = rows < T
                if USE_TMA:
                    dy = DY_DB.load([m0, db_tile * BLOCK_DB])
                else:
                    dy = tl.load(
                        DY_DB + rows[:, None] * stride_dyt + offs_db[None, :] * stride_dyn,
                        mask=in_t[:, None] & in_db[None, :],
                        other=0.0,
                    )
                s_tile = tl.load(
                    S + rows[:, None] * stride_st + offs_r[None, :] * stride_sr,
                    mask=in_t[:, None] & (offs_r[None, :] < R),
                    other=0.0,
                )
                if UPCAST:
                    dy = dy.to(ACC)
                    s_tile = s_tile.to(ACC)
                acc_db = mma(dy.T, s_tile, acc_db, UPCAST, PREC)
                if HAS_DBIAS:
                    acc_bias += tl.sum(dy.to(ACC), axis=0)
            db_mask = in_db[:, None] & (offs_r[None, :] < R)
            tl.store(DB + offs_db[:, None] * stride_dbn + offs_r[None, :] * stride_dbr, acc_db * scale, mask=db_mask)
            if HAS_DBIAS:
                tl.store(DBIAS + offs_db, acc_bias, mask=in_db)
    # this program's first dX tile: its first position in the shared sequence past the dB tiles
    first = pid + num_programs * tl.cdiv(tl.maximum(num_db_tiles - pid, 0), num_programs) - num_db_tiles
    for tile in tl.range(first, num_tiles, num_programs, flatten=FLATTEN):
        pid_m, pid_n = _grouped_pid(tile, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: T·stride may pass 2³¹
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        acc_v = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
        b_ptrs = B + offs_red[:, None] * stride_bn + offs_r[None, :] * stride_br
        if USE_TMA:
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            for ki in range(0, red_tiles):
                dy = DY.load([off_m, ki * BLOCK_K])
                w = W.load([ki * BLOCK_K, off_n])
                in_red = offs_red < N - ki * BLOCK_K
                b = tl.load(b_ptrs, mask=in_red[:, None] & (offs_r[None, :] < R), other=0.0)
                if UPCAST:
                    dy = dy.to(ACC)
                    w = w.to(ACC)
                    b = b.to(ACC)
                acc = mma(dy, w, acc, UPCAST, PREC)
                acc_v = mma(dy, b, acc_v, UPCAST, PREC)
                b_ptrs += BLOCK_K * stride_bn
        else:
            rows = offs_m % T  # wrapped indices keep the loads in bounds; the stores are masked
            cols = offs_n % K
            dy_ptrs = DY + rows[:, None] * stride_dyt + offs_red[None, :] * stride_dyn
            w_ptrs = W + offs_red[:, None] * stride_wn + cols[None, :] * stride_wk
            for ki in range(0, red_tiles):
                in_red = offs_red < N - ki * BLOCK_K
                dy = tl.load(dy_ptrs, mask=in_red[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=in_red[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=in_red[:, None] & (offs_r[None, :] < R), other=0.0)
                if UPCAST:
                    dy = dy.to(ACC)
                    w = w.to(ACC)
                    b = b.to(ACC)
                acc = mma(dy, w, acc, UPCAST, PREC)
                acc_v = mma(dy, b, acc_v, UPCAST, PREC)
                dy_ptrs += BLOCK_K * stride_dyn
                w_ptrs += BLOCK_K * stride_wn
                b_ptrs += BLOCK_K * stride_bn
        in_n = offs_n < K
        a = tl.load(
            A + offs_r[:, None] * stride_ar + offs_n[None, :] * stride_ak,
            mask=(offs_r[:, None] < R) & in_n[None, :],
            other=0.0,
        )
        v_scaled = round_to(acc_v * scale, IO_DTYPE, UPCAST)
        if UPCAST:
            v_scaled = v_scaled.to(ACC)
            a = a.to(ACC)
        acc = mma(v_scaled, a, acc, UPCAST, PREC)
        if USE_TMA:
            DX.store([pid_m * BLOCK_M, pid_n * BLOCK_N], round_to(acc, IO_DTYPE, UPCAST))
        else:
            mask = (offs_m[:, None] < T) & in_n[None, :]
            tl.store(
                DX + offs_m[:, None] * stride_dxt + offs_n[None, :] * stride_dxk,
                round_to(acc, IO_DTYPE, UPCAST),
                mask=mask,
            )


# --------------------------------------------------------------------------------------------------- launchers
@dataclass(frozen=True)
class Tiles:
    """Tile sizes of one kernel. ``block_k`` is the reduction step (d_in for the forward, d_out for dX)."""

    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int
    group_m: int = 8
    flatten: bool = True  # one software pipeline across the tile and reduction loops

    def smem_bytes(self, elem: int, block_r: int) -> int:
        """The operand ring (per stage: the two GEMM tiles and the narrow A or B tile) plus the output tile the
        TMA store stages through; must stay under the 227 KiB a block may use on sm_90."""
        stage = (self.block_m * self.block_k + self.block_n * self.block_k + block_r * self.block_k) * elem
        return self.num_stages * stage + self.block_m * self.block_n * elem


# bf16/fp16 with descriptors: the tile of the persistent GEMM that reached cuBLAS in bench_triton_gemm (128×256×64),
#   three stages: 3·(16 + 32 + 2) KiB + 64 KiB = 214 KiB with the r ≤ 16 operand; wider ranks get two stages.
# Pointer loads (operands TMA cannot describe) need registers for the addresses: 128×128 tiles stay spill-free.
# fp32 (ieee products, no tensor cores) keeps its operands in registers: 64×64×16 is spill-free at r ≤ 64.
# Every entry is compiled for sm_90 and checked spill-free by tests/kernels/test_triton_compile.py.
GPU_TILES_TMA = Tiles(128, 256, 64, 3, 8)
GPU_TILES_TMA_WIDE_RANK = Tiles(128, 256, 64, 2, 8)  # BLOCK_R > 16
GPU_TILES_POINTER = Tiles(128, 128, 64, 3, 8)
GPU_TILES_32BIT = Tiles(64, 64, 16, 3, 8)
INTERPRETER_TILES = Tiles(32, 32, 32, 1, 4, group_m=2)  # several tiles and reduction steps on the test shapes
SM90_SMEM = 232448  # bytes of shared memory one block may use on sm_90 (H100 and H200)


def _tiles(dtype: torch.dtype, block_r: int, use_tma: bool, on_gpu: bool) -> Tiles:
    if not on_gpu:
        return INTERPRETER_TILES
    if dtype == torch.float32:
        return GPU_TILES_32BIT
    if not use_tma:
        return GPU_TILES_POINTER
    return GPU_TILES_TMA if block_r <= 16 else GPU_TILES_TMA_WIDE_RANK


def _rank_block(r: int) -> int:
    return max(16, next_pow2(r))


def _descriptors(use_tma: bool, pairs):
    """``[(tensor, block)]`` -> tensor descriptors (TMA) or the tensors themselves (pointer path)."""
    if not use_tma:
        return [t for t, _ in pairs]
    return [TensorDescriptor.from_tensor(t, list(block)) for t, block in pairs]


def _use_tma(device: torch.device, tensors, tma: bool | None) -> bool:
    why_not = tma_blocker(*tensors)
    if tma is True and why_not:
        raise ValueError(f"lora_linear_persistent: tma=True but {why_not}")
    use = why_not is None and tma is not False
    if use:
        ensure_tma_allocator(device)
    return use


def plan_forward(x2, weight, bias, a, b, scale, y, s, *, tma: bool | None = None, on_gpu: bool | None = None):
    """The launch of ``y = x2·weightᵀ + (scale·x2·aᵀ)·bᵀ + bias`` writing ``s = x2·aᵀ`` when ``s`` is given
    (a and b in x2's dtype). ``tma``: None = descriptors where the operands allow, True = require, False = pointers."""
    T, K = x2.shape
    N, R = weight.shape[0], a.shape[0]
    on_gpu = x2.device.type == "cuda" if on_gpu is None else on_gpu
    block_r = _rank_block(R)
    use_tma = _use_tma(x2.device, (x2, weight, a, y), tma)
    cfg = _tiles(x2.dtype, block_r, use_tma, on_gpu)
    upcast, prec = dot_mode(x2.dtype)
    xd, wd, ad, yd = _descriptors(
        use_tma,
        [
            (x2, (cfg.block_m, cfg.block_k)),
            (weight, (cfg.block_n, cfg.block_k)),
            (a, (block_r, cfg.block_k)),
            (y, (cfg.block_m, cfg.block_n)),
        ],
    )
    num_tiles = cdiv(T, cfg.block_m) * cdiv(N, cfg.block_n)
    programs = persistent_programs(x2.device, num_tiles)
    s_out = s if s is not None else y  # never written without STORE_S
    launch = Launch(
        _forward_kernel,
        (programs,),
        dict(
            X=xd,
            W=wd,
            A=ad,
            B=b,
            BIAS=bias if bias is not None else y,
            Y=yd,
            S=s_out,
            T=T,
            N=N,
            K=K,
            R=R,
            scale=float(scale),
            stride_xt=x2.stride(0),
            stride_xk=x2.stride(1),
            stride_wn=weight.stride(0),
            stride_wk=weight.stride(1),
            stride_ar=a.stride(0),
            stride_ak=a.stride(1),
            stride_bn=b.stride(0),
            stride_br=b.stride(1),
            stride_yt=y.stride(0),
            stride_yn=y.stride(1),
            stride_st=s_out.stride(0),
            stride_sr=s_out.stride(1),
            num_programs=programs,
        ),
        dict(
            USE_TMA=use_tma,
            HAS_BIAS=bias is not None,
            STORE_S=s is not None,
            ACC=acc_dtype(x2.dtype),
            UPCAST=upcast,
            PREC=prec,
            IO_DTYPE=_TL_DTYPES[x2.dtype],
            FLATTEN=cfg.flatten,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            BLOCK_R=block_r,
            GROUP_M=cfg.group_m,
        ),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return launch


def plan_dx(
    dy2,
    weight,
    b,
    a,
    scale,
    dx,
    *,
    s=None,
    db=None,
    dbias=None,
    tma: bool | None = None,
    on_gpu: bool | None = None,
):
    """The launch of ``dx = dy2·weight + (scale·dy2·b)·a`` (a and b in dy2's dtype) and, when ``db`` (N×R fp32)
    is given, of ``db = scale·dy2ᵀ·s`` (and ``dbias = Σ_T dy2`` when ``dbias`` is given) in the same launch;
    ``tma`` as in :func:`plan_forward`."""
    T, N = dy2.shape
    K, R = weight.shape[1], a.shape[0]
    on_gpu = dy2.device.type == "cuda" if on_gpu is None else on_gpu
    block_r = _rank_block(R)
    use_tma = _use_tma(dy2.device, (dy2, weight, dx), tma)
    cfg = _tiles(dy2.dtype, block_r, use_tma, on_gpu)
    upcast, prec = dot_mode(dy2.dtype)
    fuse_db = db is not None
    # dB tiles of 128 d_out columns (32 KB per bf16 stage) where descriptors feed the tiles, 64 where they pass
    # through registers (pointer loads): both spill-free (fp32 does not fuse on a GPU: see _fuses_db)
    block_db = cfg.block_k if not on_gpu else 128 if use_tma else 64
    pairs = [(dy2, (cfg.block_m, cfg.block_k)), (weight, (cfg.block_k, cfg.block_n)), (dx, (cfg.block_m, cfg.block_n))]
    dyd, wd, dxd, *rest = _descriptors(use_tma, pairs + ([(dy2, (cfg.block_m, block_db))] if fuse_db else []))
    dy_db = rest[0] if fuse_db else dyd  # never read without FUSE_DB
    num_tiles = cdiv(T, cfg.block_m) * cdiv(K, cfg.block_n) + (cdiv(N, block_db) if fuse_db else 0)
    programs = persistent_programs(dy2.device, num_tiles)
    s_in = s if fuse_db else a  # never read without FUSE_DB
    db_out = db if fuse_db else dx
    return Launch(
        _dx_kernel,
        (programs,),
        dict(
            DY=dyd,
            W=wd,
            B=b,
            A=a,
            DX=dxd,
            DY_DB=dy_db,
            S=s_in,
            DB=db_out,
            DBIAS=dbias if dbias is not None else db_out,
            T=T,
            N=N,
            K=K,
            R=R,
            scale=float(scale),
            stride_dyt=dy2.stride(0),
            stride_dyn=dy2.stride(1),
            stride_wn=weight.stride(0),
            stride_wk=weight.stride(1),
            stride_bn=b.stride(0),
            stride_br=b.stride(1),
            stride_ar=a.stride(0),
            stride_ak=a.stride(1),
            stride_dxt=dx.stride(0),
            stride_dxk=dx.stride(1),
            stride_st=s_in.stride(0),
            stride_sr=s_in.stride(1),
            stride_dbn=db_out.stride(0),
            stride_dbr=db_out.stride(1),
            num_programs=programs,
        ),
        dict(
            FUSE_DB=fuse_db,
            HAS_DBIAS=fuse_db and dbias is not None,
            BLOCK_DB=block_db,
            USE_TMA=use_tma,
            ACC=acc_dtype(dy2.dtype),
            UPCAST=upcast,
            PREC=prec,
            IO_DTYPE=_TL_DTYPES[dy2.dtype],
            FLATTEN=cfg.flatten,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            BLOCK_R=block_r,
            GROUP_M=cfg.group_m,
        ),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


# ------------------------------------------------------------------------------------------ forward / backward
def _check(x, weight, bias, lora_a, lora_b):
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"lora_linear_persistent: x must be bfloat16, float16, float32 or float64, got {x.dtype}")
    if x.dtype == torch.float64 and x.device.type == "cuda":
        raise TypeError(
            "lora_linear_persistent: float64 runs only under the Triton interpreter (Triton compiles no float64 "
            "tl.dot for a GPU); use keeplora_kernels.lora_linear"
        )
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"lora_linear_persistent: weight must be (d_out, {k}), got {tuple(weight.shape)}")
    if lora_a.dim() != 2 or lora_a.shape[1] != k:
        raise ValueError(f"lora_linear_persistent: lora_a must be (r, {k}), got {tuple(lora_a.shape)}")
    if not 1 <= lora_a.shape[0] <= MAX_RANK:
        raise ValueError(
            f"lora_linear_persistent: rank {lora_a.shape[0]} outside 1..{MAX_RANK}; use keeplora_kernels.lora_linear"
        )
    if lora_b.shape != (weight.shape[0], lora_a.shape[0]):
        raise ValueError(
            f"lora_linear_persistent: lora_b must be ({weight.shape[0]}, {lora_a.shape[0]}), got {tuple(lora_b.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"lora_linear_persistent: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if weight.requires_grad or lora_a.requires_grad:
        raise RuntimeError(
            "lora_linear treats `weight` and `lora_a` as frozen, but one of them requires grad; "
            "call .requires_grad_(False) on it, or use lora_linear_unfused (plain autograd)"
        )
    for t in (weight, lora_a, lora_b) + ((bias,) if bias is not None else ()):
        if t.device != x.device:
            raise ValueError(f"lora_linear_persistent: all tensors must be on {x.device}, got one on {t.device}")


@torch.library.custom_op("keeplora::lora_persistent_forward", mutates_args=())
def _forward_op(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    tma: bool | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y2, s)`` of :func:`_forward_kernel` (every operand in x2's dtype) as a registered op: opaque to
    ``torch.compile`` (no graph break), captured by CUDA graphs."""
    T, N = x2.shape[0], weight.shape[0]
    y2 = x2.new_empty((T, N))
    s = x2.new_empty((T, a.shape[0]))
    if T:
        plan_forward(x2, weight, bias, a, b, scale, y2, s, tma=tma)()
    return y2, s


@_forward_op.register_fake
def _(x2, weight, bias, a, b, scale, tma):
    return x2.new_empty((x2.shape[0], weight.shape[0])), x2.new_empty((x2.shape[0], a.shape[0]))


@torch.library.custom_op("keeplora::lora_persistent_backward", mutates_args=())
def _backward_op(
    dy2: torch.Tensor,
    weight: torch.Tensor,
    b: torch.Tensor,
    a: torch.Tensor,
    s: torch.Tensor,
    scale: float,
    fuse_db: bool,
    need_dbias: bool,
    tma: bool | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dX, dB, db)`` of :func:`_dx_kernel` (every operand in dy2's dtype) as a registered op; dB (N×R) and db
    (N,) in fp32 (fp64 for fp64 input) from the fused dB tiles when ``fuse_db``, else empty (0×R, 0)."""
    T, N = dy2.shape
    acc = torch.float64 if dy2.dtype == torch.float64 else torch.float32
    dx2 = dy2.new_empty((T, weight.shape[1]))
    db = dy2.new_empty((N if fuse_db else 0, a.shape[0]), dtype=acc)
    dbias = dy2.new_empty((N if fuse_db and need_dbias else 0,), dtype=acc)
    if T:
        plan_dx(
            dy2,
            weight,
            b,
            a,
            scale,
            dx2,
            s=s if fuse_db else None,
            db=db if fuse_db else None,
            dbias=dbias if fuse_db and need_dbias else None,
            tma=tma,
        )()
    else:  # sums over no tokens
        db.zero_()
        dbias.zero_()
    return dx2, db, dbias


@_backward_op.register_fake
def _(dy2, weight, b, a, s, scale, fuse_db, need_dbias, tma):
    T, N = dy2.shape
    acc = torch.float64 if dy2.dtype == torch.float64 else torch.float32
    return (
        dy2.new_empty((T, weight.shape[1])),
        dy2.new_empty((N if fuse_db else 0, a.shape[0]), dtype=acc),
        dy2.new_empty((N if fuse_db and need_dbias else 0,), dtype=acc),
    )


def _fuses_db(dy2: torch.Tensor) -> bool:
    """Whether the dX launch can also take dB and db: 16-bit inputs on a GPU (fp32's dB tiles, whose products
    are not tensor-core ones, spill registers there), any dtype under the interpreter."""
    return dy2.device.type != "cuda" or dy2.element_size() == 2


class LoRALinearPersistentFunction(torch.autograd.Function):
    """The frozen-A LoRA linear (same math, arguments and saved tensors as ``keeplora_kernels.LoRALinearFunction``):
    forward one :func:`_forward_kernel` launch (Y and s), backward one :func:`_dx_kernel` launch for dX and, with
    ``fuse_db`` (16-bit inputs on a GPU), dB and db in the same launch (else the torch path's GEMM and sum). The
    weight is cast to x's dtype (no copy when it already is); A and B once per step, backward reuses the forward's
    casts. The launches are the registered ops ``keeplora::lora_persistent_forward`` and
    ``keeplora::lora_persistent_backward``, so dynamo traces this Function without a graph break."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, tma=None, fuse_db=True):
        _check(x, weight, bias, lora_a, lora_b)
        w = weight.to(x.dtype)
        a = lora_a.to(x.dtype).contiguous()
        b = lora_b.to(x.dtype).contiguous()
        bias_x = None if bias is None else bias.to(x.dtype)
        y2, s = torch.ops.keeplora.lora_persistent_forward(_flatten_tokens(x), w, bias_x, a, b, scale, tma)
        ctx.save_for_backward(s, w, a, b)
        ctx.scale, ctx.tma, ctx.fuse_db, ctx.x_shape = scale, tma, fuse_db, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.lora_b_dtype = lora_b.dtype
        return y2.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        s, w, a, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy2 = _flatten_tokens(dy).to(s.dtype)
        dx = dlora_b = dbias = None
        fused = need[0] and ctx.fuse_db and _fuses_db(dy2)
        if need[0]:
            dx2, db32, dbias32 = torch.ops.keeplora.lora_persistent_backward(
                dy2, w, b, a, s, ctx.scale, fused, fused and need[2], ctx.tma
            )
            dx = dx2.reshape(ctx.x_shape)
            if fused:
                dlora_b = db32.to(ctx.lora_b_dtype) if need[4] else None
                dbias = dbias32 if need[2] else None
        if not fused:
            _, dlora_b, dbias = _backward(
                dy2, s, w, a, b, ctx.scale, "expand_first", False, ctx.lora_b_dtype if need[4] else None, need[2]
            )
        db = None if dbias is None else dbias.to(ctx.bias_dtype)
        return dx, None, db, None, dlora_b, None, None, None


def lora_linear_persistent(
    x, weight, bias, lora_a, lora_b, scale, *, tma: bool | None = None, fuse_db: bool = True
) -> torch.Tensor:
    """:func:`keeplora_kernels.lora_linear` on the persistent Triton kernels (same arguments and results; x in
    bf16, fp16 or fp32, fp64 under the interpreter; rank ≤ :data:`MAX_RANK`). ``tma``: None = tensor descriptors
    where the operands allow, True = require them, False = the pointer path (for tests). ``fuse_db``: dB and db
    from the dX launch's own tiles (default; 16-bit inputs on a GPU) or from the torch path's GEMM and sum."""
    return LoRALinearPersistentFunction.apply(x, weight, bias, lora_a, lora_b, float(scale), tma, fuse_db)


def planned_launches(x2, weight, bias, lora_a, lora_b, scale, dy2, *, tma: bool, on_gpu: bool = True) -> list[Launch]:
    """The forward, the dX and (16-bit inputs) the dX-with-dB launches for these inputs (not run), for the
    ahead-of-time compile test."""
    T = x2.shape[0]
    a = lora_a.to(x2.dtype)
    b = lora_b.to(x2.dtype)
    y = torch.empty((T, weight.shape[0]), device=x2.device, dtype=x2.dtype)
    s = torch.empty((T, a.shape[0]), device=x2.device, dtype=x2.dtype)
    dx = torch.empty_like(x2)
    db = torch.empty((weight.shape[0], a.shape[0]), device=x2.device, dtype=torch.float32)
    dbias = torch.empty(weight.shape[0], device=x2.device, dtype=torch.float32)
    launches = [
        plan_forward(x2, weight, bias, a, b, scale, y, s, tma=tma, on_gpu=on_gpu),
        plan_dx(dy2, weight, b, a, scale, dx, tma=tma, on_gpu=on_gpu),
    ]
    if x2.element_size() == 2:  # fused dB on a GPU: 16-bit inputs only (_fuses_db)
        launches.append(plan_dx(dy2, weight, b, a, scale, dx, s=s, db=db, dbias=dbias, tma=tma, on_gpu=on_gpu))
    return launches
