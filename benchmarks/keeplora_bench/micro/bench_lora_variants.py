"""The frozen-A LoRA linear's variants side by side: which order of GEMMs makes the training step cheapest.

GPU (bf16; the project's GPU script calls :func:`run` with ``quick=True``)::

    python -m keeplora_bench.micro.bench_lora_variants [--out DIR]
    python -m keeplora_bench.micro.bench_lora_variants --cpu-smoke  # tiny shapes on the CPU: the harness, not the times

Providers, each timed forward, backward and whole step (forward + dX + dB), eager (``do_bench``, median) and replayed
as one CUDA graph (``do_bench_cudagraph``; backward under replay is step − forward, since a captured backward needs its
forward in the same graph):
* ``base``                the frozen layer alone (``F.linear``): the anchor of every ratio;
* ``unfused``             the KeepLoRA authors' path (``x@A@B·s`` + add under plain autograd, saves x);
* ``peft-bf16``           PEFT's LoRA ``Linear`` with bf16 adapters and A frozen;
* ``<fwd>/<bwd>``         ``LoRALinearFunction`` with the forward order (base_first, expand_first) and the backward
                          order (base_first, expand_first, fused_dy: one Triton pass over dY for ds, dB and db);
* ``stacked/<bwd>``       one GEMM against ``[W; A]`` (formed once per task) gives y and s;
* ``ext:<fwd>/<bwd>``     the same GEMMs as the compiled extension's ``keeplora::lora_linear`` (one dispatcher call
                          forward, a C++ backward: what the automatic choice runs in eager when the extension is built);
* ``triton-full``         the Triton kernels that carry the base GEMM in their own (pointer-load) main loop;
* ``triton-persistent``   the persistent, TMA-fed Triton kernels with the rank-r products folded into the main loop
                          and dB/db from the dX launch's own tiles (``keeplora_kernels.experimental.
                          triton_lora_persistent``); ``triton-persistent/torch-db``: dB/db from the torch path.
Shapes: the Llama layer (T=8192, d=4096, r=16), the authors' CLIP layer (T=12608, d=768, r=16) and the CLIP q/k/v of
one input (three layers; ``triton-shared`` shrinks x once for all three, ``triton-persistent`` is three calls).
Every row also has the error against an fp32 reference computed in the same run: of y, of the adapter term alone
(``y − x·Wᵀ − b`` against ``scale·x·Aᵀ·Bᵀ``), of dX and of dB, and the bytes autograd saves. A per-kernel profiler
table of the fastest variant's eager step goes to ``trace_lora_variants.txt``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import keeplora_kernels as kk
from keeplora_kernels import _dispatch
from keeplora_kernels.experimental import (
    BACKWARD_ORDERS,
    LoRALinearVariantFunction,
    StackedLoRALinearFunction,
    stack_frozen,
)
from keeplora_kernels.lora_linear import FORWARD_ORDERS, LoRALinearFunction

from . import harness
from .bench_kernels import (
    _experimental_triton,
    _peft_layer,
    _rel_err,
    _saved_activation_bytes,
    floor_ms,
    lora_counts,
    plain_lora_linear,
)

SHAPES = [(8192, 4096, 16), (12608, 768, 16)]
SHAPES_SMOKE = [(64, 48, 8)]
QKV_SHAPE = (12608, 768, 16)
QKV_SHAPE_SMOKE = (40, 24, 4)
FROZEN_EXTRAS: list[torch.Tensor] = []  # frozen tensors the providers made (the stacked [W; A])
COLUMNS = [
    "op",
    "shape",
    "provider",
    "mode",
    "timing",
    "time_ms",
    "floor_ms",
    "pct_floor",
    "vs_base",
    "vs_unfused",
    "saved_MB",
    "err_y",
    "err_adapter",
    "err_dx",
    "err_db",
    "note",
]


def _variants(device: torch.device, dtype: torch.dtype) -> list[tuple[str, str]]:
    """(forward, backward) pairs that can run here; fused_dy needs Triton on this device (a GPU or the interpreter)."""
    triton_ok = _dispatch.triton_runs(device, (dtype,))
    fwds = list(FORWARD_ORDERS) + ["stacked"]
    return [(f, b) for f in fwds for b in BACKWARD_ORDERS if b != "fused_dy" or triton_ok]


def _function(backward_order: str):
    """The autograd function of a backward order: the production one, or the experimental one for fused_dy."""
    return LoRALinearVariantFunction if backward_order == "fused_dy" else LoRALinearFunction


def lora_providers(w, b, a, lb, scale, device, dtype) -> dict[str, tuple[Callable, torch.Tensor | None]]:
    """name -> (forward of x, the trainable B or None). Each provider owns its own B, A is frozen everywhere."""
    providers: dict[str, tuple[Callable, torch.Tensor | None]] = {"base": (lambda x: F.linear(x, w, b), None)}
    lb_unf = lb.detach().clone().requires_grad_()
    providers["unfused"] = (lambda x: kk.lora_linear_unfused(x, w, b, a, lb_unf, scale), lb_unf)
    layer, lb_peft = _peft_layer(w, b, a, lb, scale, dtype)
    providers[f"peft-{str(dtype).split('.')[-1]}"] = (layer, lb_peft)
    stacked = stack_frozen(w, a)  # once per task in real use
    FROZEN_EXTRAS[:] = [stacked]  # a weight, not an activation, in the saved-bytes count
    for fwd, bwd in _variants(device, dtype):
        lb_v = lb.detach().clone().requires_grad_()
        if fwd == "stacked":
            fn = lambda x, lb_v=lb_v, bwd=bwd: StackedLoRALinearFunction.apply(
                x, stacked, b, lb_v, scale, w.shape[0], bwd
            )
        else:
            fn = lambda x, lb_v=lb_v, fwd=fwd, bwd=bwd: _function(bwd).apply(x, w, b, a, lb_v, scale, fwd, bwd)
        providers[f"{fwd}/{bwd}"] = (fn, lb_v)
    if "lora_linear" in _dispatch.extension_ops(device.type):  # the same GEMMs as one C++ op (no Python per step)
        for fwd in FORWARD_ORDERS:
            for bwd in ("base_first", "expand_first"):
                lb_e = lb.detach().clone().requires_grad_()
                providers[f"ext:{fwd}/{bwd}"] = (
                    lambda x, lb_e=lb_e, fwd=fwd, bwd=bwd: torch.ops.keeplora.lora_linear(
                        x, w, b, a, lb_e, scale, fwd, bwd
                    ),
                    lb_e,
                )
    if _dispatch.triton_runs(device, (dtype,)):
        lb_t = lb.detach().clone().requires_grad_()
        triton_fn = _experimental_triton().lora_linear_triton
        providers["triton-full"] = (lambda x: triton_fn(x, w, b, a, lb_t, scale), lb_t)
        lb_p = lb.detach().clone().requires_grad_()
        persistent = _persistent_triton()
        providers["triton-persistent"] = (lambda x: persistent(x, w, b, a, lb_p, scale), lb_p)
        lb_q = lb.detach().clone().requires_grad_()
        providers["triton-persistent/torch-db"] = (lambda x: persistent(x, w, b, a, lb_q, scale, fuse_db=False), lb_q)
    return providers


def _persistent_triton():
    """The persistent Triton LoRA linear (imported on use: importing it imports triton)."""
    from keeplora_kernels.experimental.triton_lora_persistent import lora_linear_persistent

    return lora_linear_persistent


class _Timer:
    def __init__(self, device: torch.device, smoke: bool):
        self.device, self.smoke = device, smoke

    def eager(self, fn: Callable[[], Any]) -> float:
        if self.device.type == "cuda":
            return harness.time_fn(fn, device=self.device, cuda_warmup_ms=10, cuda_rep_ms=40).median_ms
        return harness.time_fn(fn, device=self.device, warmup=1, repeats=2 if self.smoke else 5).median_ms

    def graph(self, fn: Callable[[], Any]) -> float | None:
        """Median time of ``fn`` replayed from a CUDA graph (None off CUDA): warm-up iterations and the capture on
        one side stream (the documented whole-step pattern, backward included), then timed replays."""
        if self.device.type != "cuda":
            return None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        return harness.time_fn(graph.replay, device=self.device, cuda_warmup_ms=5, cuda_rep_ms=40).median_ms


def _modes(fwd: Callable, x: torch.Tensor, params, dy) -> dict[str, Callable[[], Any]]:
    y = fwd(x)
    return {
        "forward": lambda: fwd(x),
        "backward": lambda: torch.autograd.grad(y, params, dy, retain_graph=True),
        "step": lambda: torch.autograd.grad(fwd(x), params, dy),
    }


def _time_provider(
    timer: _Timer, fns: dict[str, Callable[[], Any]], graph: bool
) -> dict[tuple[str, str], tuple[float, str]]:
    """{(mode, timing): (ms, note)}: eager times of every mode, or (``graph``) graph-replay times of forward and
    step, backward as their difference (a captured backward needs its forward in the same graph). A failing
    capture is recorded, not raised."""
    out: dict[tuple[str, str], tuple[float, str]] = {}
    if not graph:
        for mode, fn in fns.items():
            out[(mode, "eager")] = (timer.eager(fn), "")
        return out
    for mode in ("forward", "step"):
        try:
            out[(mode, "graph")] = (timer.graph(fns[mode]), "")
        except Exception as exc:  # noqa: BLE001 - a provider that cannot be captured is a finding, not a crash
            out[(mode, "graph")] = (float("nan"), f"capture failed: {type(exc).__name__}: {str(exc)[:80]}")
    fwd, step = out[("forward", "graph")][0], out[("step", "graph")][0]
    if not (math.isnan(fwd) or math.isnan(step)):
        out[("backward", "graph")] = (step - fwd, "step - forward")
    return out


def _errors(fwd, lb_param, x, dy, ref, w, b) -> dict[str, float | None]:
    """Relative max errors against the fp32 reference ``ref = (y, adapter term, dX, dB)``."""
    xg = x.detach().clone().requires_grad_()
    params = (xg,) if lb_param is None else (xg, lb_param)
    y = fwd(xg)
    grads = torch.autograd.grad(y, params, dy)
    errs: dict[str, float | None] = {"err_y": _rel_err(y, ref[0]), "err_dx": _rel_err(grads[0], ref[2])}
    if lb_param is not None:
        base32 = F.linear(x.float(), w.float(), None if b is None else b.float())
        errs["err_adapter"] = _rel_err(y.float() - base32, ref[1])
        errs["err_db"] = _rel_err(grads[1], ref[3])
    return {k: float(f"{v:.3g}") for k, v in errs.items()}


def _inputs(T, d, r, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(device, dtype)
    w = (torch.randn(d, d, generator=g) / math.sqrt(d)).to(device, dtype)
    b = torch.randn(d, generator=g).to(device, dtype)
    a = torch.linalg.qr(torch.randn(d, r, generator=g)).Q.T.contiguous().to(device)  # fp32, orthonormal rows
    lb = (torch.randn(d, r, generator=g) * 0.1).to(device)  # fp32 B: the engine's adapter dtype
    dy = torch.randn(T, d, generator=g).to(device, dtype)
    return x, w, b, a, lb, dy


def bench_single(timer: _Timer, rows: list[dict], shape, dtype, graph: bool = False) -> dict[str, Callable[[], Any]]:
    """All providers at one (T, d, r); returns the eager step of each provider (for the profiler table)."""
    T, d, r = shape
    dev = timer.device
    scale = 2.0 / r
    x, w, b, a, lb, dy = _inputs(T, d, r, dev, dtype)
    x32 = x.float().requires_grad_()
    lb32 = lb.clone().requires_grad_()
    y32 = plain_lora_linear(x32, w.float(), b.float(), a, lb32, scale)
    adapter32 = scale * (x.float() @ a.t()) @ lb.t()
    ref = (y32.detach(), adapter32) + torch.autograd.grad(y32, (x32, lb32), dy.float())
    del x32, y32
    steps: dict[str, Callable[[], Any]] = {}
    anchors: dict[str, dict[tuple[str, str], float]] = {}
    for name, (fwd, lb_param) in lora_providers(w, b, a, lb, scale, dev, dtype).items():
        xg = x.detach().clone().requires_grad_()
        params = (xg,) if lb_param is None else (xg, lb_param)
        note = ""
        try:
            errs = _errors(fwd, lb_param, x, dy, ref, w, b)
            weights = [w, b, a, lb, *FROZEN_EXTRAS] + ([lb_param] if lb_param is not None else [])
            if isinstance(fwd, torch.nn.Module):
                weights += list(fwd.parameters())
            saved = _saved_activation_bytes(lambda: fwd(xg), weights) / 2**20
            fns = _modes(fwd, xg, params, dy)
            times = _time_provider(timer, fns, graph)
        except Exception as exc:  # noqa: BLE001 - one broken provider must not cost the others their rows
            rows.append(
                dict(
                    op="lora_linear",
                    shape=f"T={T},d={d},r={r}",
                    provider=name,
                    note=f"FAILED: {type(exc).__name__}: {str(exc)[:100]}",
                )
            )
            continue
        steps[name] = fns["step"]
        if name in ("base", "unfused"):
            anchors[name] = {k: v[0] for k, v in times.items()}
        for (mode, timing), (ms, tnote) in times.items():
            flops, nbytes = lora_counts(T, d, d, r, mode, x.element_size())
            ratios = {
                f"vs_{ref_name}": (
                    round(ms / anchors[ref_name][(mode, timing)], 3)
                    if (mode, timing) in anchors.get(ref_name, {})
                    else None
                )
                for ref_name in ("base", "unfused")
            }
            fl = floor_ms(flops, nbytes, dev)
            rows.append(
                dict(
                    op="lora_linear",
                    shape=f"T={T},d={d},r={r}",
                    provider=name,
                    mode=mode,
                    timing=timing,
                    time_ms=round(ms, 4),
                    floor_ms=round(fl, 4),
                    pct_floor=round(100 * fl / ms, 1) if ms and ms > 0 else None,
                    **ratios,
                    saved_MB=round(saved, 3),
                    **errs,
                    note=tnote or note,
                )
            )
    return steps


def bench_qkv(timer: _Timer, rows: list[dict], shape, dtype, graph: bool = False) -> None:
    """q, k, v of one input (the authors' CLIP attention): three calls of each variant against the shared Triton
    form that shrinks x once."""
    T, d, r = shape
    dev = timer.device
    scale = 2.0 / r
    parts = [_inputs(T, d, r, dev, dtype, seed=i) for i in range(3)]
    x = parts[0][0]
    ws, bs, as_, lbs = ([p[i] for p in parts] for i in (1, 2, 3, 4))
    dys = [p[5] for p in parts]

    def three(call):
        lbs_p = [lb.detach().clone().requires_grad_() for lb in lbs]
        return (lambda x_: tuple(call(x_, w, b, a, lb, scale) for w, b, a, lb in zip(ws, bs, as_, lbs_p))), lbs_p

    providers: dict[str, tuple[Callable, list[torch.Tensor]]] = {
        "base": (lambda x_: tuple(F.linear(x_, w, b) for w, b in zip(ws, bs)), []),
        "unfused": three(kk.lora_linear_unfused),
    }
    for fwd, bwd in _variants(dev, dtype):
        if fwd == "stacked":
            continue
        providers[f"{fwd}/{bwd}"] = three(
            lambda x_, w, b, a, lb, s, fwd=fwd, bwd=bwd: _function(bwd).apply(x_, w, b, a, lb, s, fwd, bwd)
        )
        if "lora_linear" in _dispatch.extension_ops(dev.type) and bwd != "fused_dy":
            providers[f"ext:{fwd}/{bwd}"] = three(
                lambda x_, w, b, a, lb, s, fwd=fwd, bwd=bwd: torch.ops.keeplora.lora_linear(
                    x_, w, b, a, lb, s, fwd, bwd
                )
            )
    if _dispatch.triton_runs(dev, (dtype,)):
        shared = _experimental_triton().lora_linear_shared_triton
        lbs_t = [lb.detach().clone().requires_grad_() for lb in lbs]
        providers["triton-shared"] = (lambda x_: tuple(shared(x_, ws, bs, as_, lbs_t, [scale] * 3)), lbs_t)
        providers["triton-persistent"] = three(_persistent_triton())
    anchors: dict[str, dict[tuple[str, str], float]] = {}
    for name, (fwd, lb_params) in providers.items():
        xg = x.detach().clone().requires_grad_()
        params = (xg, *lb_params)

        def step(fwd=fwd, params=params):
            return torch.autograd.grad(fwd(xg), params, dys)

        ys = fwd(xg)

        def backward(ys=ys, params=params):
            return torch.autograd.grad(ys, params, dys, retain_graph=True)

        try:
            times = _time_provider(
                timer, {"forward": lambda fwd=fwd: fwd(xg), "backward": backward, "step": step}, graph
            )
        except Exception as exc:  # noqa: BLE001
            rows.append(
                dict(
                    op="lora_qkv",
                    shape=f"T={T},d={d},r={r}",
                    provider=name,
                    note=f"FAILED: {type(exc).__name__}: {str(exc)[:100]}",
                )
            )
            continue
        if name in ("base", "unfused"):
            anchors[name] = {k: v[0] for k, v in times.items()}
        for (mode, timing), (ms, tnote) in times.items():
            ratios = {
                f"vs_{ref_name}": (
                    round(ms / anchors[ref_name][(mode, timing)], 3)
                    if (mode, timing) in anchors.get(ref_name, {})
                    else None
                )
                for ref_name in ("base", "unfused")
            }
            rows.append(
                dict(
                    op="lora_qkv",
                    shape=f"T={T},d={d},r={r}",
                    provider=name,
                    mode=mode,
                    timing=timing,
                    time_ms=round(ms, 4),
                    **ratios,
                    note=tnote,
                )
            )


def _fastest(rows: list[dict], shape: str) -> str | None:
    ours = [
        r
        for r in rows
        if r.get("op") == "lora_linear"
        and r.get("shape") == shape
        and r.get("mode") == "step"
        and r.get("timing") == "eager"
        and "/" in r.get("provider", "")
        and r.get("time_ms")
    ]
    return min(ours, key=lambda r: r["time_ms"])["provider"] if ours else None


def run(
    out_dir: Path | None = None,
    quick: bool = True,
    *,
    smoke: bool | None = None,
    device: str | None = None,
    trace: bool = True,
) -> list[dict]:
    """Run every provider at every shape, append the rows to ``<out_dir>/lora_variants.csv`` and return summary rows
    (the eager and graph step of every provider at each shape, the fastest first). ``smoke`` (default on CPU): tiny
    shapes, bf16 as on the GPU. ``quick`` is accepted for the GPU script's calling convention (one size only)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    smoke = dev.type == "cpu" if smoke is None else smoke
    dtype = torch.bfloat16
    timer = _Timer(dev, smoke)
    rows: list[dict] = []
    threads = torch.get_num_threads()
    if smoke:
        torch.set_num_threads(1)
    shapes = SHAPES_SMOKE if smoke else SHAPES
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    pending: list[dict] = []

    def flush() -> None:  # rows are written pass by pass: a run cut short keeps what it measured
        for row in pending:
            row.update(device_type=dev.type, smoke=smoke, dtype=str(dtype).split(".")[-1])
        if pending:
            harness.append_rows("lora_variants", pending, results_dir=Path(out_dir) if out_dir else None)
        rows.extend(pending)
        pending.clear()

    try:
        # eager rows of everything first, graph replays after: a capture that fails cannot cost eager rows
        for shape in shapes:
            steps = bench_single(timer, pending, shape, dtype)
            label = "T={},d={},r={}".format(*shape)
            winner = _fastest(pending, label)
            if trace and out_dir and winner and shape == shapes[0]:
                table = harness.profile_table(steps[winner], device=dev, row_limit=25)
                with (Path(out_dir) / "trace_lora_variants.txt").open("a") as f:
                    f.write(f"== fastest variant {winner}, eager step, {label}, {dtype}\n{table}\n")
        bench_qkv(timer, pending, QKV_SHAPE_SMOKE if smoke else QKV_SHAPE, dtype)
        flush()
        if dev.type == "cuda":
            for shape in shapes:
                bench_single(timer, pending, shape, dtype, graph=True)
            bench_qkv(timer, pending, QKV_SHAPE, dtype, graph=True)
    finally:
        torch.set_num_threads(threads)
        flush()
    harness.print_table(rows, COLUMNS)
    return summarize(rows)


def summarize(rows: list[dict]) -> list[dict]:
    """The GPU script's summary: every provider's step, eager and graph, per shape, fastest first."""
    steps = [r for r in rows if r.get("mode") == "step" and r.get("time_ms") not in (None, "")]
    summary = [
        dict(
            op=f"{r['op']} {r['shape']} {r['provider']} step {r['timing']}",
            time_ms=float(r["time_ms"]),
            ratio=r.get("vs_base"),
            note=f"vs unfused {r.get('vs_unfused')}",
        )
        for r in steps
    ]
    return sorted(summary, key=lambda r: (r["op"].split(" ")[1], r["op"].split(" ")[-1], r["time_ms"]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (seconds)")
    args = parser.parse_args(argv)
    run(
        Path(args.out) if args.out else None,
        device="cpu" if args.cpu_smoke else None,
        smoke=True if args.cpu_smoke else None,
    )


if __name__ == "__main__":
    main()
