"""Sweep the tile sizes of the Triton LoRA kernels (``triton_lora_linear.GPU_TILES``) on a GPU, one shape at a time.

    python -m keeplora_bench.micro.tune_triton [--out DIR]  # GPU: the candidates below at the bench's quick shapes
    python -m keeplora_bench.micro.tune_triton --smoke      # CPU rehearsal under TRITON_INTERPRET=1, tiny shapes

For every (shape, kernel entry, candidate): the entry is replaced by the candidate, one Triton train step is
checked against the PyTorch path in the same run (the suite's rule: error ≤ 2× PyTorch's own error at the dtype +
floor), then forward, backward and step are timed (``do_bench``). A candidate that fails to compile or to agree is
recorded as such. Rows are appended to ``<out>/tune_triton.csv`` as they come (a run stopped by its time box keeps
them), and the best candidate per shape and entry is printed last. Nothing in the library changes: a winner goes
into ``GPU_TILES`` by hand, after which tests/kernels/test_triton_compile.py checks it compiles spill-free for sm_90.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from keeplora_kernels import _dispatch
from keeplora_kernels.lora_linear import LoRALinearFunction

from . import harness
from .bench_kernels import _grad_modes, plain_lora_linear

# Hopper-class candidates (bf16): square-ish 128-wide tiles with 4 or 8 warps and 3-4 stages, the current 128×256,
# and narrower tiles for small d (more programs on 132 SMs at d = 768).
GEMM_CANDIDATES = [
    dict(BLOCK_T=128, BLOCK_N=256, BLOCK_K=64, GROUP_T=8, num_warps=8, num_stages=3),
    dict(BLOCK_T=128, BLOCK_N=256, BLOCK_K=64, GROUP_T=8, num_warps=8, num_stages=4),
    dict(BLOCK_T=256, BLOCK_N=128, BLOCK_K=64, GROUP_T=8, num_warps=8, num_stages=3),
    dict(BLOCK_T=128, BLOCK_N=128, BLOCK_K=64, GROUP_T=8, num_warps=8, num_stages=4),
    dict(BLOCK_T=128, BLOCK_N=128, BLOCK_K=64, GROUP_T=8, num_warps=4, num_stages=4),
    dict(BLOCK_T=128, BLOCK_N=64, BLOCK_K=64, GROUP_T=8, num_warps=4, num_stages=4),
    dict(BLOCK_T=64, BLOCK_N=128, BLOCK_K=64, GROUP_T=8, num_warps=4, num_stages=4),
]
DY_PASS_CANDIDATES = [
    dict(BLOCK_T=64, BLOCK_N=128, num_warps=4, num_stages=2),
    dict(BLOCK_T=128, BLOCK_N=128, num_warps=4, num_stages=3),
    dict(BLOCK_T=64, BLOCK_N=256, num_warps=8, num_stages=3),
    dict(BLOCK_T=128, BLOCK_N=64, num_warps=4, num_stages=3),
]
SHAPES = [(8192, 4096, 16), (12608, 768, 16), (2048, 4096, 64)]
SMOKE_SHAPES = [(64, 48, 8)]
SMOKE_CANDIDATES = {
    "gemm": [
        dict(BLOCK_T=32, BLOCK_N=32, BLOCK_K=32, GROUP_T=4, num_warps=4, num_stages=1),
        dict(BLOCK_T=16, BLOCK_N=32, BLOCK_K=16, GROUP_T=2, num_warps=4, num_stages=1),
    ],
    "dy_pass": [
        dict(BLOCK_T=32, BLOCK_N=32, num_warps=4, num_stages=1),
        dict(BLOCK_T=16, BLOCK_N=16, num_warps=4, num_stages=1),
    ],
}
FLOOR = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5}
COLUMNS = ["shape", "entry", "config", "status", "forward_ms", "backward_ms", "step_ms", "err", "torch_err"]


def _config_name(cfg: dict[str, int]) -> str:
    return ",".join(f"{k.replace('BLOCK_', '').lower()}={v}" for k, v in cfg.items())


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


class _Patched:
    """Replace one tile table entry for the duration of a ``with`` block."""

    def __init__(self, table: dict, key: str, value: dict):
        self.table, self.key, self.value = table, key, value

    def __enter__(self):
        self.saved = self.table[self.key]
        self.table[self.key] = dict(self.value)

    def __exit__(self, *exc):
        self.table[self.key] = self.saved


def tune(
    out_dir: Path | None = None,
    *,
    smoke: bool = False,
    device: str | None = None,
    shapes=None,
    dtype: torch.dtype = torch.bfloat16,
    time_box_s: float = float("inf"),
) -> list[dict[str, Any]]:
    from keeplora_kernels.experimental import triton_lora_linear as tll

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not _dispatch.triton_runs(dev, (dtype,)):
        raise RuntimeError(f"Triton cannot run on {dev} here (set TRITON_INTERPRET=1 for the CPU smoke run)")
    on_gpu = dev.type == "cuda"
    shapes = shapes or (SMOKE_SHAPES if smoke else SHAPES)
    width = "16bit" if dtype in (torch.float16, torch.bfloat16) else "32bit"
    if on_gpu:
        entries = [
            ("gemm", tll.GPU_TILES, f"gemm_{width}", GEMM_CANDIDATES),
            ("dy_pass", tll.GPU_TILES, f"dy_pass_{width}", DY_PASS_CANDIDATES),
        ]
    else:  # the interpreter reads INTERPRETER_TILES
        entries = [(kernel, tll.INTERPRETER_TILES, kernel, SMOKE_CANDIDATES[kernel]) for kernel in ("gemm", "dy_pass")]
    triton_fn = tll.lora_linear_triton
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for T, d, r in shapes:
        torch.manual_seed(0)
        x = torch.randn(T, d, device=dev).to(dtype)
        w = (torch.randn(d, d, device=dev) / math.sqrt(d)).to(dtype)
        b = torch.randn(d, device=dev).to(dtype)
        a = torch.linalg.qr(torch.randn(d, r, device=dev)).Q.T.contiguous()
        lb = (torch.randn(d, r, device=dev) * 0.1).requires_grad_()
        dy = torch.randn(T, d, device=dev).to(dtype)
        scale = 2.0 / r
        # fp32 truth and PyTorch's own error at this dtype (the frozen-A PyTorch path), once per shape
        x32 = x.float().requires_grad_()
        y32 = plain_lora_linear(x32, w.float(), b.float(), a, lb.detach().clone().requires_grad_(), scale)
        truth = (y32.detach(),) + torch.autograd.grad(y32, (x32,), dy.float())
        xt = x.detach().clone().requires_grad_()
        yt = LoRALinearFunction.apply(xt, w, b, a, lb, scale)
        torch_err = max(_rel_err(yt, truth[0]), _rel_err(torch.autograd.grad(yt, (xt,), dy)[0], truth[1]))
        for _entry, table, key, candidates in entries:
            for cfg in candidates:
                if time.perf_counter() - start > time_box_s:
                    return rows
                row = dict.fromkeys(COLUMNS)  # one schema for every row (the CSV is appended row by row)
                row.update(
                    shape=f"T={T},d={d},r={r}",
                    entry=key,
                    config=_config_name(cfg),
                    dtype=str(dtype)[6:],
                    device_type=dev.type,
                    torch_err=float(f"{torch_err:.3g}"),
                )
                with _Patched(table, key, cfg):
                    try:
                        xg = x.detach().clone().requires_grad_()
                        y = triton_fn(xg, w, b, a, lb, scale)
                        (dx,) = torch.autograd.grad(y, (xg,), dy)
                        err = max(_rel_err(y, truth[0]), _rel_err(dx, truth[1]))
                        row["err"] = float(f"{err:.3g}")
                        if not err <= 2 * torch_err + FLOOR[dtype]:
                            row["status"] = "mismatch"
                        else:
                            fns = _grad_modes(lambda x_: triton_fn(x_, w, b, a, lb, scale), xg, (xg, lb), dy)
                            for mode, fn in fns.items():
                                row[f"{mode}_ms"] = (
                                    harness.time_fn(fn, device=dev, cuda_warmup_ms=10, cuda_rep_ms=30)
                                    if on_gpu
                                    else harness.time_fn(fn, device=dev, warmup=0, repeats=1)
                                ).median_ms
                            row["status"] = "ok"
                    except Exception as exc:  # a candidate that does not compile (e.g. shared memory) is a result
                        row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                rows.append(row)
                harness.append_rows("tune_triton", [row], results_dir=out_dir)
    return rows


def best(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fastest agreeing candidate (by step time) per shape and entry."""
    out = {}
    for row in rows:
        if row.get("status") != "ok":
            continue
        key = (row["shape"], row["entry"])
        if key not in out or row["step_ms"] < out[key]["step_ms"]:
            out[key] = row
    return list(out.values())


def run(
    out_dir: Path | None = None, quick: bool = True, *, smoke: bool = False, time_box_s: float = 100.0, **_
) -> list[dict[str, Any]]:
    """Entry point of keeplora_bench.gpu_check: the sweep, then summary rows (op, time_ms, note) of the winners."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not _dispatch.triton_runs(dev, (torch.bfloat16,)):
        return [dict(op="tune_triton", note=f"skipped: Triton cannot run on {dev.type} here")]
    rows = tune(out_dir, smoke=smoke, time_box_s=time_box_s)
    winners = best(rows)
    harness.print_table(winners, COLUMNS)
    failed = sum(1 for r in rows if r.get("status") != "ok")
    return [
        dict(
            op=f"tune {w['entry']} {w['shape']}",
            time_ms=w["step_ms"],
            note=f"best {w['config']} (fwd {w['forward_ms']:.3f}, bwd {w['backward_ms']:.3f}); "
            f"{len(rows)} tried, {failed} failed",
        )
        for w in winners
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="CPU rehearsal (needs TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    run(args.out, smoke=args.smoke, time_box_s=float("inf"))


if __name__ == "__main__":
    main()
