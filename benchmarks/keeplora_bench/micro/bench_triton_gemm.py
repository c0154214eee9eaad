"""Go / no-go for the Triton full-GEMM LoRA route: can a Triton GEMM main loop match cuBLAS on the H200?

The full-GEMM LoRA kernels (``keeplora_kernels/experimental/triton_lora_linear.py``) carry the base GEMM ``x·Wᵀ``
inside a Triton main loop. They are worth keeping only if a Triton main loop can run that GEMM at cuBLAS speed. Every
provider here computes the plain GEMM ``y = x·Wᵀ`` (x: M×K bf16, W: N×K bf16, y bf16, fp32 accumulation), no adapter:

* ``cublas``                 ``torch.nn.functional.linear(x, w)``, the anchor;
* ``triton_mainloop``        the project's forward kernel (``_fwd_kernel``, whose K loop is ``_accumulate_product``)
                             called with a rank-0 adapter: its r-loop runs zero times, so what is timed is exactly
                             the main loop of the LoRA forward (pointer loads, one tile per program);
* ``triton_tma_persistent``  :func:`_persistent_gemm_kernel` below, one row per configuration of
                             :data:`TMA_CONFIGS`: one program per SM looping over output tiles, operands loaded
                             through host-side tensor descriptors (TMA on Hopper), with a masked pointer fallback
                             where the descriptor API or the operands' alignment does not allow TMA.

Each provider is checked against an fp32 reference in the same run (max abs error / max |ref|); a provider whose
error is above ``2 × cuBLAS's + 1e-3`` is marked wrong and left out of the decision. Verdict: ``go`` when the best
correct Triton provider reaches ``GO_RATIO`` × cuBLAS speed at the Llama shape (M=8192, N=K=4096), else ``no-go``.

    python -m keeplora_bench.micro.bench_triton_gemm [--quick] [--out DIR]  # GPU; rows -> <DIR>/triton_gemm.csv
    python -m keeplora_bench.micro.bench_triton_gemm --smoke --out /tmp/x   # CPU, tiny ragged shapes, interpreter

``run(out_dir, quick, smoke)`` writes the rows and returns summary rows (op, time_ms, ratio, note) for
``keeplora_bench.gpu_check``; quick mode (the GPU script's) times both shapes with short do_bench windows.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from keeplora_kernels._triton_utils import (
    TensorDescriptor,
    cdiv,
    ensure_tma_allocator,
    interpreted,
    persistent_programs,
    tma_blocker,
)
from keeplora_kernels.experimental import triton_lora_linear as tll
from keeplora_kernels.experimental.triton_lora_linear import _grouped_pid

from . import harness

GO_RATIO = 0.95  # cublas_time / triton_time needed at the Llama shape to keep the full-GEMM LoRA kernels
LLAMA_SHAPE = (8192, 4096, 4096)  # (M, N, K)
SHAPES = [LLAMA_SHAPE, (12608, 768, 768)]  # Llama-7B projection at 8192 tokens; CLIP ViT-B/16 q/k/v width
SMOKE_SHAPES = [(40, 48, 40), (37, 45, 70)]  # ragged; the second has rows TMA cannot describe (70·2 bytes)
COLUMNS = ["shape", "provider", "config", "path", "time_ms", "tflops", "ratio", "max_rel_err", "wrong", "note"]


@dataclass(frozen=True)
class TileConfig:
    """One explicitly timed configuration of the persistent kernel (no autotune: each is its own row)."""

    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int
    flatten: bool = True  # one software pipeline across the tile and K loops: the next tile's loads start early
    split_epilogue: bool = False  # store the output tile as two BM×BN/2 halves: half the staging shared memory
    group_m: int = 8

    @property
    def name(self) -> str:
        flat = ("" if self.flatten else "_noflat") + ("_split" if self.split_epilogue else "")
        return f"{self.block_m}x{self.block_n}x{self.block_k}_s{self.num_stages}_w{self.num_warps}{flat}"

    def smem_bytes(self, elem: int = 2) -> int:
        """Shared memory of the operand ring (``num_stages`` × (A tile + W tile)) plus the output tile the TMA
        store stages through; must stay under the 227 KiB a block may use on sm_90."""
        stage = (self.block_m + self.block_n) * self.block_k * elem
        return self.num_stages * stage + self.block_m * self.block_n * elem // (2 if self.split_epilogue else 1)


# bf16, per stage: A tile BM·BK·2 bytes + W tile BN·BK·2 bytes; the epilogue stages BM·BN·2 bytes (half if split).
#   128×256×64 s3:        3·48 KiB + 64 KiB = 208 KiB  the LoRA kernels' own tile, persistent and TMA-fed
#   128×256×64 s4, split: 4·48 KiB + 32 KiB = 224 KiB  one stage deeper, paid for by the halved epilogue
#   128×128×64 s4:        4·32 KiB + 32 KiB = 160 KiB  twice the tiles: 4.5 waves instead of 2.25 at N=768
#   128×256×64 s3, not flattened: the first one with a pipeline drain and refill at every tile (what flattening
#   buys; also the row that still measures if the flattened pipeline misbehaves)
# 256×128 is left out: with x and W both K-major it moves the same bytes per stage as 128×256.
TMA_CONFIGS = [
    TileConfig(128, 256, 64, 3, 8),
    TileConfig(128, 256, 64, 4, 8, split_epilogue=True),
    TileConfig(128, 128, 64, 4, 8),
    TileConfig(128, 256, 64, 3, 8, flatten=False),
]
SMOKE_CONFIGS = [
    TileConfig(32, 32, 32, 1, 4, split_epilogue=True, group_m=2),
    TileConfig(16, 32, 16, 1, 4, flatten=False, group_m=2),
]
SM90_SMEM = 232448  # bytes of shared memory one block may use on sm_90 (H100 and H200)
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# ------------------------------------------------------------------------------------------------------- kernel
@triton.jit
def _persistent_gemm_kernel(
    X,
    W,
    Y,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    NUM_PROGRAMS: tl.constexpr,
    USE_TMA: tl.constexpr,
    UPCAST: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    FLATTEN: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Y = X·Wᵀ, fp32 accumulation. ``NUM_PROGRAMS`` programs (one per SM) each walk the output tiles
    ``pid, pid + NUM_PROGRAMS, …`` in grouped order, so the grid is launched once and the tiles in flight at any
    moment share operand rows in L2. With ``USE_TMA`` X, W and Y are tensor descriptors (blocks BM×BK, BN×BK,
    BM×BN): the hardware clips and zero-fills ragged edges. Otherwise they are pointers and every edge is masked.
    ``UPCAST`` converts tiles to fp32 right after the load (the interpreter computes bf16 wrongly otherwise)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(pid, num_tiles, NUM_PROGRAMS, flatten=FLATTEN):
        pid_m, pid_n = _grouped_pid(tile, num_pid_m, num_pid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if USE_TMA:
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            for ki in range(0, k_tiles):
                a = X.load([off_m, ki * BLOCK_K])
                b = W.load([off_n, ki * BLOCK_K])
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b.T, acc)
            if SPLIT_EPILOGUE:  # Y's block is BM×BN/2: columns [0, BN/2) then [BN/2, BN) of the tile
                left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
                Y.store([off_m, off_n], left.to(OUT_DTYPE))
                Y.store([off_m, off_n + BLOCK_N // 2], right.to(OUT_DTYPE))
            else:
                Y.store([off_m, off_n], acc.to(OUT_DTYPE))
        else:
            offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M·stride may pass 2³¹
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_k = tl.arange(0, BLOCK_K)
            rows = offs_m % M  # wrapped indices keep the loads in bounds; the store is masked
            cols = offs_n % N
            x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
            w_ptrs = W + cols[:, None] * stride_wn + offs_k[None, :] * stride_wk
            for ki in range(0, k_tiles):
                in_k = offs_k < K - ki * BLOCK_K
                a = tl.load(x_ptrs, mask=in_k[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=in_k[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b.T, acc)
                x_ptrs += BLOCK_K * stride_xk
                w_ptrs += BLOCK_K * stride_wk
            mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(OUT_DTYPE), mask=mask)


# ---------------------------------------------------------------------------------------------------- launchers
def persistent_gemm(
    x: torch.Tensor, w: torch.Tensor, cfg: TileConfig, *, use_tma: bool | None = None, out: torch.Tensor | None = None
) -> tuple[Callable[[], torch.Tensor], str]:
    """A launcher of ``y = x·wᵀ`` through :func:`_persistent_gemm_kernel` (descriptors are built once, outside the
    timed call). ``use_tma``: None = TMA where possible, True = require it, False = the pointer path. Returns
    ``(call, path)`` with path ``"tma"`` or ``"pointer (<why>)"``."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"persistent_gemm: x must be (M, K) and w (N, K), got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype != w.dtype or x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"persistent_gemm: x and w must both be bfloat16 or float16, got {x.dtype} and {w.dtype}")
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype) if out is None else out
    why_not = tma_blocker(x, w, y)
    if use_tma is True and why_not:
        raise ValueError(f"persistent_gemm: use_tma=True but {why_not}")
    tma = why_not is None and use_tma is not False
    if tma:
        ensure_tma_allocator(x.device)
        ops = (
            TensorDescriptor.from_tensor(x, [cfg.block_m, cfg.block_k]),
            TensorDescriptor.from_tensor(w, [cfg.block_n, cfg.block_k]),
            TensorDescriptor.from_tensor(y, [cfg.block_m, cfg.block_n // (2 if cfg.split_epilogue else 1)]),
        )
    else:
        ops = (x, w, y)
    num_tiles = cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n)
    programs = persistent_programs(x.device, num_tiles)
    kernel = _persistent_gemm_kernel[(programs,)]
    args = (*ops, M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1))
    meta = dict(
        NUM_PROGRAMS=programs,
        USE_TMA=tma,
        UPCAST=interpreted(),
        OUT_DTYPE=_TL_DTYPES[y.dtype],
        FLATTEN=cfg.flatten,
        SPLIT_EPILOGUE=cfg.split_epilogue,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )

    def call() -> torch.Tensor:
        kernel(*args, **meta)
        return y

    return call, "tma" if tma else f"pointer ({'forced' if use_tma is False else why_not})"


def mainloop_gemm_config(x: torch.Tensor) -> str:
    """Name of the tile configuration the LoRA forward kernel uses for inputs like ``x``."""
    c = tll._tiles("gemm", x.dtype, x.device.type == "cuda")
    return f"{c['BLOCK_T']}x{c['BLOCK_N']}x{c['BLOCK_K']}_s{c['num_stages']}_w{c['num_warps']}"


def mainloop_gemm(x: torch.Tensor, w: torch.Tensor) -> tuple[Callable[[], torch.Tensor], str]:
    """``y = x·wᵀ`` through the LoRA forward kernel with a rank-0 adapter (the r-loop runs zero times, the
    accumulator is multiplied by scale 1.0, no bias), i.e. its ``_accumulate_product`` main loop with the tile
    sizes the library uses. Returns ``(call, config name)``."""
    M = x.shape[0]
    N = w.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    # rank 0 as empty slices of real buffers: never read, but the pointers handed to the kernel are not null
    s = torch.zeros((M, 1), device=x.device, dtype=x.dtype)[:, :0]
    lora_b = torch.zeros((N, 1), device=x.device, dtype=x.dtype)[:, :0]
    launches = tll.plan_forward(x, w, None, s, lora_b, 1.0, y)

    def call() -> torch.Tensor:
        for launch in launches:
            launch()
        return y

    return call, mainloop_gemm_config(x)


# -------------------------------------------------------------------------------------------------------- bench
def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _time(fn: Callable[[], Any], device: torch.device, quick: bool, smoke: bool) -> float:
    if device.type == "cuda":
        warm, rep = (5, 20) if quick or smoke else (25, 100)
        return harness.time_fn(fn, device=device, cuda_warmup_ms=warm, cuda_rep_ms=rep).median_ms
    return harness.time_fn(fn, device=device, warmup=1, repeats=1 if smoke else 3).median_ms


def triton_runs(device: torch.device) -> str | None:
    """None when Triton kernels can run on ``device``, else why not."""
    if device.type == "cuda" or interpreted():
        return None
    return "Triton runs on the CPU only under TRITON_INTERPRET=1"


def bench_shape(
    M: int, N: int, K: int, device: torch.device, configs: list[TileConfig], *, quick: bool, smoke: bool
) -> list[dict[str, Any]]:
    """One row per provider at shape (M, N, K): time, TFLOP/s, ratio to cuBLAS, error against fp32."""
    gen = torch.Generator(device="cpu").manual_seed(M * 7 + N * 3 + K)
    x = torch.randn(M, K, generator=gen).to(device=device, dtype=torch.bfloat16)
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(device=device, dtype=torch.bfloat16)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is true fp32
    try:
        ref = x.float() @ w.float().t()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    flops = 2.0 * M * N * K
    shape = f"M={M},N={N},K={K}"
    # (provider, config, maker): maker() -> (call or None, path, note); made inside the loop so that a
    # configuration that cannot be built or compiled costs only its own row
    providers: list[tuple[str, str, Callable[[], tuple[Callable[[], torch.Tensor] | None, str, str]]]] = [
        ("cublas", "-", lambda: (lambda: F.linear(x, w), "torch", ""))
    ]
    skip = triton_runs(device)
    if skip is None:

        def mainloop():
            call, _ = mainloop_gemm(x, w)
            return call, "pointer", "LoRA forward kernel, rank-0 adapter (r-loop empty): its _accumulate_product loop"

        providers.append(("triton_mainloop", mainloop_gemm_config(x), mainloop))
        for cfg in configs:

            def persistent(cfg=cfg):
                if device.type == "cuda" and cfg.smem_bytes() > SM90_SMEM:
                    return None, "-", f"skipped: {cfg.smem_bytes()} B of shared memory > {SM90_SMEM}"
                call, path = persistent_gemm(x, w, cfg)
                return call, path, "" if path == "tma" else "no TMA on these operands"

            providers.append(("triton_tma_persistent", cfg.name, persistent))
    else:
        providers.append(("triton_mainloop", "-", lambda: (None, "-", f"skipped: {skip}")))
        providers.append(("triton_tma_persistent", "-", lambda: (None, "-", f"skipped: {skip}")))
    rows: list[dict[str, Any]] = []
    cublas_ms = cublas_err = None
    for provider, config, maker in providers:
        row = dict(
            op="triton_gemm",
            shape=shape,
            provider=provider,
            config=config,
            path=None,
            time_ms=None,
            tflops=None,
            ratio=None,
            max_rel_err=None,
            wrong=None,
            note="",
        )
        rows.append(row)
        try:
            call, row["path"], row["note"] = maker()
            if call is None:
                continue
            err = _rel_err(call(), ref)  # also the compile, outside the timing
            t = _time(call, device, quick, smoke)
        except Exception as exc:  # one failing configuration must not cost the others their row
            row["note"] = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
            continue
        if provider == "cublas":
            cublas_ms, cublas_err = t, err
        row.update(time_ms=round(t, 5), tflops=round(flops / t / 1e9, 2), max_rel_err=float(f"{err:.3g}"))
        if cublas_ms:
            row["ratio"] = round(cublas_ms / t, 4)
        if cublas_err is not None:
            row["wrong"] = err > 2.0 * cublas_err + 1e-3
    return rows


def verdict(rows: list[dict[str, Any]], smoke: bool) -> dict[str, Any]:
    """The decision row: ``go`` when the fastest correct Triton provider at the Llama shape is at least
    :data:`GO_RATIO` × cuBLAS speed. In smoke mode the shapes and times are not the GPU's, so no decision."""
    target = rows[0]["shape"] if smoke else f"M={LLAMA_SHAPE[0]},N={LLAMA_SHAPE[1]},K={LLAMA_SHAPE[2]}"
    at_shape = [r for r in rows if r["shape"] == target]  # smoke: the decision mechanics on the first shape
    candidates = [r for r in at_shape if r["provider"] != "cublas" and r["ratio"] is not None and not r["wrong"]]
    row = dict(
        op="triton_gemm",
        shape=target,
        provider="verdict",
        config=None,
        path=None,
        time_ms=None,
        tflops=None,
        ratio=None,
        max_rel_err=None,
        wrong=None,
    )
    if not candidates:
        row["note"] = "no-go: no correct Triton provider was timed at the decision shape"
        return row
    best = max(candidates, key=lambda r: r["ratio"])
    decision = "go" if best["ratio"] >= GO_RATIO else "no-go"
    row.update(
        config=f"{best['provider']}:{best['config']}",
        time_ms=best["time_ms"],
        tflops=best["tflops"],
        ratio=best["ratio"],
    )
    row["note"] = (
        f"{decision}: best Triton ({best['provider']} {best['config']}) at {best['ratio']:.3f}x cuBLAS "
        f"speed (threshold {GO_RATIO})" + (" [smoke: CPU interpreter times, not a decision]" if smoke else "")
    )
    return row


def run(
    out_dir: Path | None = None, quick: bool = False, smoke: bool = False, *, device: str | None = None, **kwargs
) -> list[dict[str, Any]]:
    """Benchmark every provider on :data:`SHAPES` (``smoke``: :data:`SMOKE_SHAPES` with small tiles), append the
    rows and the verdict to ``<out_dir>/triton_gemm.csv`` and return summary rows (op, time_ms, ratio, note)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda" and not smoke:
        raise ValueError(
            f"bench_triton_gemm: the full shapes need a CUDA device, got device={dev.type!r}; "
            "pass smoke=True (--smoke) for the tiny CPU shapes"
        )
    shapes = SMOKE_SHAPES if smoke else SHAPES
    configs = SMOKE_CONFIGS if dev.type != "cuda" else TMA_CONFIGS
    threads = torch.get_num_threads()
    if dev.type == "cpu":  # tiny shapes: a thread pool on a shared CPU only adds spinning
        torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    try:
        for M, N, K in shapes:
            rows += bench_shape(M, N, K, dev, configs, quick=quick, smoke=smoke)
    finally:  # also when cut short (the GPU script's time box): keep the rows measured so far
        torch.set_num_threads(threads)
        if rows:
            rows.append(verdict(rows, smoke))
            for row in rows:
                row.update(device_type=dev.type, smoke=smoke, quick=quick)
            harness.append_rows("triton_gemm", rows, results_dir=Path(out_dir) if out_dir else None)
    harness.print_table(rows, COLUMNS)
    return [
        dict(
            op=f"gemm {r['shape']} {r['provider']}"
            + (f" {r['config']}" if r["config"] not in (None, "-") and r["provider"] != "verdict" else ""),
            time_ms=r["time_ms"],
            ratio=r["ratio"],
            note=("WRONG " if r["wrong"] else "") + (r["note"] or ""),
        )
        for r in rows
    ]


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="the GPU script's subset (short timing windows)")
    parser.add_argument("--smoke", action="store_true", help="tiny ragged shapes; on a CPU through the interpreter")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: the full shapes need a Hopper GPU; use --smoke for tiny shapes on the CPU")
    if args.smoke and not torch.cuda.is_available() and not interpreted():
        # the interpreter is chosen when triton is imported, which already happened: start again with it set
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        os.execve(sys.executable, [sys.executable, "-m", "keeplora_bench.micro.bench_triton_gemm", *argv], env)
    run(args.out, quick=args.quick, smoke=args.smoke)


if __name__ == "__main__":
    main()
