"""Kernel benchmarks: frozen-A LoRA linear (single and q/k/v shared-input), residual projection,
streaming second moment — each against its baselines, with its roofline floor.

GPU (bf16; the project's GPU script calls :func:`run`)::

    python -m keeplora_bench.micro.bench_kernels [--quick] [--out DIR]

CPU smoke (tiny shapes, seconds; proves the harness and every provider run; times are meaningless)::

    python -m keeplora_bench.micro.bench_kernels --cpu-smoke          # add KEEPLORA_BACKEND=triton TRITON_INTERPRET=1
                                                            # to run "ours" through the Triton interpreter
Providers (baselines come from the library, never re-defined here):
* ``base``       ``F.linear`` alone: the cuBLAS base GEMM (forward) and its dX GEMM (backward), the targets' anchor;
* ``reference``  the plain formula ``x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`` under autograd (:func:`plain_lora_linear`);
* ``peft-<dt>``  ``peft.tuners.lora.layer.Linear`` around the frozen ``nn.Linear``, A frozen, adapters in fp32
                 (PEFT's default adapter dtype) and in the input dtype;
* ``unfused``    ``keeplora_kernels.lora_linear_unfused``: the authors' ``x@A@B*s`` + add;
* ``ours``       the dispatched op, e.g. ``keeplora_kernels.lora_linear`` (the ``backend`` column says what ran);
* ``experimental-triton``  the Triton full-GEMM LoRA kernels of ``keeplora_kernels.experimental`` (not dispatched),
                 where Triton runs.
Every row: median time, the floor (roofline of the counted FLOPs and bytes at the device's rates,
:mod:`.roofline`: the H200 anchors 790 TFLOP/s bf16 and 4.3 TB/s, or measured on another GPU), % of the floor,
peak memory of the step, bytes of saved activations (autograd's saved tensors that are not weights), and the max
relative error against an fp32 reference computed in the same run.
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
from keeplora_kernels.residual_project import residual_project_dense, residual_project_torch
from keeplora_kernels.second_moment import second_moment_update_torch

from . import harness
from .roofline import roofline

LORA_SHAPES_FULL = [(t, d, r) for d in (768, 4096) for t in (2048, 8192, 12608) for r in (16, 64)]
LORA_SHAPES_QUICK = [(8192, 4096, 16), (12608, 768, 16), (2048, 4096, 64)]
LORA_SHAPES_SMOKE = [(64, 48, 8)]
QKV_SHAPE = (12608, 768, 16)  # the authors' CLIP ViT-B/16 shape: q, k, v of one input
QKV_SHAPE_SMOKE = (64, 48, 8)
# (batch, d, n, k, dtype); batch > 1 is how the engine calls it (all same-shaped weights of a group at once,
# b·n/BLOCK_N programs), batch 1 the single-matrix floor (n/BLOCK_N programs only)
PROJECT_BATCHED = [(8, 1024, 1024, 64, dt) for dt in ("float32", "bfloat16")]
PROJECT_FULL = [(1, 4096, 4096, k, dt) for k in (16, 64, 184, 256) for dt in ("float32", "bfloat16")] + PROJECT_BATCHED
PROJECT_QUICK = [(1, 4096, 4096, k, dt) for k in (64, 184) for dt in ("float32", "bfloat16")] + PROJECT_BATCHED
PROJECT_SMOKE = [(1, 64, 64, 8, "float32"), (2, 40, 24, 4, "float32")]
MOMENT_FULL = [(8192, 4096), (12608, 768)]
MOMENT_QUICK = [(8192, 4096)]
MOMENT_SMOKE = [(128, 48)]
COLUMNS = [
    "op",
    "shape",
    "dtype",
    "provider",
    "backend",
    "mode",
    "time_ms",
    "floor_ms",
    "pct_floor",
    "vs_base",
    "vs_unfused",
    "peak_MB",
    "saved_MB",
    "max_rel_err",
]


# ------------------------------------------------------------------------------------------------------ floors
def floor_ms(flops: float, nbytes: float, device: torch.device) -> float:
    """Roofline floor on ``device`` (:func:`.roofline.roofline`): the larger of compute and memory time."""
    return roofline(device).floor_ms(flops, nbytes)


def lora_counts(T: int, d_in: int, d_out: int, r: int, mode: str, elem: int = 2) -> tuple[float, float]:
    """FLOPs and HBM bytes of the frozen-A LoRA linear (W and A frozen, bias frozen).

    forward: base GEMM 2·T·d_in·d_out, shrink 2·T·d_in·r, expand 2·T·r·d_out; reads x, W, A, B, writes y and s.
    backward: dX GEMM 2·T·d_out·d_in, ds 2·T·d_out·r, ds·A 2·T·r·d_in, dB 2·T·d_out·r; reads dY, W, A, B, s,
    writes dX (dB is d_out×r, negligible).
    """
    fwd_f = 2.0 * T * d_in * d_out + 2.0 * T * d_in * r + 2.0 * T * r * d_out
    fwd_b = elem * (T * d_in + d_out * d_in + r * d_in + d_out * r + T * d_out + T * r)
    bwd_f = 2.0 * T * d_out * d_in + 4.0 * T * d_out * r + 2.0 * T * r * d_in
    bwd_b = elem * (T * d_out + d_out * d_in + r * d_in + d_out * r + T * r + T * d_in)
    return {"forward": (fwd_f, fwd_b), "backward": (bwd_f, bwd_b), "step": (fwd_f + bwd_f, fwd_b + bwd_b)}[mode]


# -------------------------------------------------------------------------------------------------- providers
def _peft_layer(w, b, a, lb, scale, adapter_dtype):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    r = a.shape[0]
    base = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        base.weight.copy_(w)
        if b is not None:
            base.bias.copy_(b)
    base.requires_grad_(False)
    cfg = LoraConfig(r=r, lora_alpha=scale * r, lora_dropout=0.0, target_modules=["base"])
    layer = LoraLinear(base, "default", config=cfg, r=r, lora_alpha=scale * r)
    layer.lora_A["default"].to(adapter_dtype)
    layer.lora_B["default"].to(adapter_dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(lb)
    layer.lora_A["default"].weight.requires_grad_(False)
    return layer, layer.lora_B["default"].weight


def _experimental_triton():
    """The Triton full-GEMM LoRA kernels (imported on use: importing them imports triton)."""
    from keeplora_kernels.experimental import triton_lora_linear

    return triton_lora_linear


def plain_lora_linear(x, weight, bias, lora_a, lora_b, scale):
    """``x·Wᵀ + b + scale·(x·Aᵀ)·Bᵀ`` under plain autograd: the accuracy anchor of the LoRA rows."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_a), lora_b)


def lora_providers(w, b, a, lb, scale, low_dtype) -> dict[str, tuple[Callable, torch.Tensor | None]]:
    """name -> (forward function of x, the trainable B tensor or None)."""
    lb_ref = lb.detach().clone().requires_grad_()
    lb_unf = lb.detach().clone().requires_grad_()
    lb_ours = lb.detach().clone().requires_grad_()
    providers = {
        "base": (lambda x: F.linear(x, w, b), None),
        "reference": (lambda x: plain_lora_linear(x, w, b, a.to(x.dtype), lb_ref.to(x.dtype), scale), lb_ref),
    }
    for adapter_dtype in dict.fromkeys([torch.float32, low_dtype]):
        layer, lb_peft = _peft_layer(w, b, a, lb, scale, adapter_dtype)
        providers[f"peft-{str(adapter_dtype).split('.')[-1]}"] = (layer, lb_peft)
    providers["unfused"] = (lambda x: kk.lora_linear_unfused(x, w, b, a, lb_unf, scale), lb_unf)
    providers["ours"] = (lambda x: kk.lora_linear(x, w, b, a, lb_ours, scale), lb_ours)  # the automatic choice
    if _dispatch.triton_runs(w.device, (w.dtype, w.dtype, a.dtype, lb.dtype)):
        lb_tri = lb.detach().clone().requires_grad_()
        triton_fn = _experimental_triton().lora_linear_triton
        providers["experimental-triton"] = (lambda x: triton_fn(x, w, b, a, lb_tri, scale), lb_tri)
    return providers


def _triton_forced_differs(op: str, device: torch.device, *dtypes: torch.dtype) -> bool:
    """Whether a forced-Triton provider adds a row: Triton can run here and is not already the automatic choice."""
    return (
        "triton" in _dispatch.implemented(op)
        and _dispatch.triton_runs(device, dtypes)
        and _dispatch.select(op, device, *dtypes) != "triton"
    )


def _backend(name: str, op: str, device: torch.device, *dtypes: torch.dtype) -> str:
    if name.endswith("-triton"):  # forced Triton rows and the experimental Triton kernels
        return "triton"
    return _dispatch.select(op, device, *dtypes) if name.startswith("ours") else "torch"


def _grad_modes(fwd: Callable, x: torch.Tensor, params, dy) -> dict[str, Callable]:
    """The three timed modes of a provider at input ``x``: forward, backward through one retained graph, and the
    full step; gradients with respect to ``params`` (x and the trainable B's)."""
    y = fwd(x)
    return {
        "forward": lambda: fwd(x),
        "backward": lambda: torch.autograd.grad(y, params, dy, retain_graph=True),
        "step": lambda: torch.autograd.grad(fwd(x), params, dy),
    }


def _saved_activation_bytes(fn: Callable[[], Any], weights: list[torch.Tensor]) -> int:
    """Bytes autograd keeps for backward during ``fn()``, not counting (views of) the weights."""
    weight_storages = {t.untyped_storage().data_ptr() for t in weights}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weight_storages and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total


def _rel_err(got, ref) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------------ benches
class _Bench:
    def __init__(self, device: torch.device, smoke: bool, quick: bool):
        self.device, self.smoke, self.quick = device, smoke, quick
        self.rows: list[dict[str, Any]] = []

    def time(self, fn) -> float:
        if self.device.type == "cuda":
            warm, rep = (10, 40) if self.quick else (25, 100)
            return harness.time_fn(fn, device=self.device, cuda_warmup_ms=warm, cuda_rep_ms=rep).median_ms
        return harness.time_fn(fn, device=self.device, warmup=1, repeats=2 if self.smoke else 5).median_ms

    def time_modes(self, name: str, fns: dict[str, Callable], anchors: dict[str, dict[str, float]]):
        """Time each mode; yields ``(mode, ms, {vs_base, vs_unfused})``. The "base" and "unfused" providers (run
        first) record their times in ``anchors`` for the ratios of the providers after them."""
        for mode, fn in fns.items():
            t = self.time(fn)
            if name in ("base", "unfused"):
                anchors.setdefault(name, {})[mode] = t
            yield (
                mode,
                t,
                {
                    f"vs_{ref}": t / anchors[ref][mode] if mode in anchors.get(ref, {}) else None
                    for ref in ("base", "unfused")
                },
            )

    def peak_mb(self, fn) -> float:
        return harness.measure_memory(fn, device=self.device) / 2**20

    def add(self, **row):
        if row.get("floor_ms") and row.get("time_ms"):
            row["pct_floor"] = round(100.0 * row["floor_ms"] / row["time_ms"], 1)
        self.rows.append(row)


def bench_lora(bench: _Bench, shapes, dtype) -> None:
    dev = bench.device
    for T, d, r in shapes:
        scale = 2.0 / r
        x = torch.randn(T, d, device=dev).to(dtype)
        w = (torch.randn(d, d, device=dev) / math.sqrt(d)).to(dtype)
        b = torch.randn(d, device=dev).to(dtype)
        a = torch.linalg.qr(torch.randn(d, r, device=dev)).Q.T.contiguous()  # fp32, orthonormal rows
        lb = torch.randn(d, r, device=dev) * 0.1
        dy = torch.randn(T, d, device=dev).to(dtype)
        # fp32 reference of y, dX, dB in the same run
        x32 = x.float().requires_grad_()
        lb32 = lb.clone().requires_grad_()
        y32 = plain_lora_linear(x32, w.float(), b.float(), a, lb32, scale)
        ref = (y32.detach(),) + torch.autograd.grad(y32, (x32, lb32), dy.float())
        del x32, y32
        anchors: dict[str, dict[str, float]] = {}
        for name, (fwd, lb_param) in lora_providers(w, b, a, lb, scale, dtype).items():
            xg = x.detach().clone().requires_grad_()
            params = (xg,) if lb_param is None else (xg, lb_param)
            backend = _backend(name, "lora_linear", dev, dtype, w.dtype, a.dtype, lb.dtype)
            y = fwd(xg)
            grads = torch.autograd.grad(y, params, dy)
            err = None
            if lb_param is not None:
                err = max(_rel_err(y, ref[0]), _rel_err(grads[0], ref[1]), _rel_err(grads[1], ref[2]))
            weights = [w, b, a, lb] + ([lb_param] if lb_param is not None else [])
            if isinstance(fwd, torch.nn.Module):
                weights += list(fwd.parameters())
            saved = _saved_activation_bytes(lambda: fwd(xg), weights) / 2**20
            fns = _grad_modes(fwd, xg, params, dy)
            peak = bench.peak_mb(fns["step"])
            for mode, t, ratios in bench.time_modes(name, fns, anchors):
                bench.add(
                    op="lora_linear",
                    shape=f"T={T},d={d},r={r}",
                    dtype=str(dtype).split(".")[-1],
                    provider=name,
                    backend=backend,
                    mode=mode,
                    time_ms=t,
                    floor_ms=floor_ms(*lora_counts(T, d, d, r, mode, x.element_size()), bench.device),
                    **ratios,
                    peak_MB=round(peak, 2),
                    saved_MB=saved,
                    max_rel_err=None if err is None else float(f"{err:.3g}"),
                )


def bench_qkv(bench: _Bench, shape, dtype) -> None:
    """q, k, v of one input at the authors' CLIP shape: three unfused LoRA paths vs ours (three calls, shared)."""
    dev = bench.device
    T, d, r = shape
    scale = 2.0 / r
    x = torch.randn(T, d, device=dev).to(dtype)
    ws = [(torch.randn(d, d, device=dev) / math.sqrt(d)).to(dtype) for _ in range(3)]
    bs = [torch.randn(d, device=dev).to(dtype) for _ in range(3)]
    as_ = [torch.linalg.qr(torch.randn(d, r, device=dev)).Q.T.contiguous() for _ in range(3)]
    lbs = [(torch.randn(d, r, device=dev) * 0.1).requires_grad_() for _ in range(3)]
    dys = [torch.randn(T, d, device=dev).to(dtype) for _ in range(3)]
    providers = {
        "base": lambda x_: tuple(F.linear(x_, w, b) for w, b in zip(ws, bs)),
        "unfused": lambda x_: tuple(
            kk.lora_linear_unfused(x_, w, b, a, lb, scale) for w, b, a, lb in zip(ws, bs, as_, lbs)
        ),
        "ours-3-calls": lambda x_: tuple(
            kk.lora_linear(x_, w, b, a, lb, scale) for w, b, a, lb in zip(ws, bs, as_, lbs)
        ),
        "ours-shared": lambda x_: kk.lora_linear_shared(x_, ws, bs, as_, lbs, [scale] * 3),
    }
    if _dispatch.triton_runs(dev, (dtype, dtype, torch.float32, torch.float32)):
        shared_triton = _experimental_triton().lora_linear_shared_triton
        providers["experimental-shared-triton"] = lambda x_: shared_triton(x_, ws, bs, as_, lbs, [scale] * 3)
    anchors: dict[str, dict[str, float]] = {}
    for name, fwd in providers.items():
        xg = x.detach().clone().requires_grad_()
        params = (xg,) if name == "base" else (xg, *lbs)
        backend = _backend(
            name,
            "lora_linear_shared" if "shared" in name else "lora_linear",
            dev,
            dtype,
            dtype,
            torch.float32,
            torch.float32,
        )
        fns = _grad_modes(fwd, xg, params, dys)
        saved = _saved_activation_bytes(lambda: fwd(xg), ws + bs + as_ + lbs) / 2**20
        peak = bench.peak_mb(fns["step"])
        for mode, t, ratios in bench.time_modes(name, fns, anchors):
            f, nb = lora_counts(T, d, d, r, mode, x.element_size())  # per projection; the floor counts three
            bench.add(
                op="lora_qkv",
                shape=f"T={T},d={d},r={r}",
                dtype=str(dtype).split(".")[-1],
                provider=name,
                backend=backend,
                mode=mode,
                time_ms=t,
                floor_ms=floor_ms(3 * f, 3 * nb, bench.device),
                **ratios,
                peak_MB=round(peak, 2),
                saved_MB=saved,
            )


def bench_project(bench: _Bench, shapes) -> None:
    dev = bench.device
    for b, d, n, k, dt in shapes:
        dtype = getattr(torch, dt)
        lead = (b,) if b > 1 else ()
        basis = torch.linalg.qr(torch.randn(*lead, d, k, device=dev)).Q
        g = torch.randn(*lead, d, n, device=dev).to(dtype)
        exact = residual_project_torch(g.double(), basis.double())
        nbytes = b * (2 * d * n * g.element_size() + d * k * 4)
        floor = floor_ms(4.0 * b * d * n * k, nbytes, bench.device)
        work = g.clone()
        providers = {
            "reference": lambda: residual_project_torch(g, basis),
            "ours": lambda: kk.residual_project(g, basis),
            "ours-inplace": lambda: kk.residual_project(work, basis, inplace=True),
        }
        if b == 1:  # the authors' dense projector (2-D only)
            providers["dense"] = lambda: residual_project_dense(g, basis)
        if _triton_forced_differs("residual_project", dev, dtype, basis.dtype):
            project_triton = _dispatch.implementation("residual_project", "triton")
            providers["ours-triton"] = lambda: project_triton(g, basis, inplace=False)
        for name, fn in providers.items():
            err = _rel_err(
                fn() if name != "ours-inplace" else kk.residual_project(g.clone(), basis, inplace=True), exact
            )
            t = bench.time(fn)
            backend = _backend(name, "residual_project", dev, dtype, basis.dtype)
            shape = f"d={d},n={n},k={k}" if b == 1 else f"b={b},d={d},n={n},k={k}"
            bench.add(
                op="residual_project",
                shape=shape,
                dtype=dt,
                provider=name,
                backend=backend,
                mode="forward",
                time_ms=t,
                floor_ms=floor,
                peak_MB=round(bench.peak_mb(fn), 2),
                max_rel_err=float(f"{err:.3g}"),
            )


def bench_moment(bench: _Bench, shapes, dtype) -> None:
    dev = bench.device
    for n, d in shapes:
        x = torch.randn(n, d, device=dev).to(dtype)
        mask = torch.rand(n, device=dev) > 0.1
        rows = x.double() * mask[:, None]
        exact = rows.T @ rows
        tiles_flops = 2.0 * n * d * (d + 1) / 2  # upper triangle incl. diagonal
        floor = floor_ms(tiles_flops, n * d * x.element_size() + d * d * 4 * 2, bench.device)
        providers = {
            "reference": lambda acc: second_moment_update_torch(acc, x, mask),
            "addmm-out-dtype": lambda acc: (
                acc.addmm_(x.t(), x)
                if x.dtype == torch.float32
                else torch.addmm(acc, x.t(), x, out_dtype=torch.float32)
            ),
            "ours": lambda acc: kk.second_moment_update(acc, x, mask),
        }
        for name, update in providers.items():
            acc = torch.zeros(d, d, device=dev)
            try:
                update(acc)
            except (RuntimeError, TypeError, NotImplementedError) as exc:  # out_dtype needs a CUDA build
                bench.add(
                    op="second_moment",
                    shape=f"N={n},d={d}",
                    dtype=str(dtype).split(".")[-1],
                    provider=name,
                    backend="unavailable",
                    mode="forward",
                    note=str(exc).splitlines()[0][:80],
                )
                continue
            err = None if name == "addmm-out-dtype" else _rel_err(acc, exact)  # addmm ignores the mask
            t = bench.time(lambda: update(acc))
            backend = _backend(name, "second_moment_update", dev, dtype, torch.float32)
            bench.add(
                op="second_moment",
                shape=f"N={n},d={d}",
                dtype=str(dtype).split(".")[-1],
                provider=name,
                backend=backend,
                mode="forward",
                time_ms=t,
                floor_ms=floor,
                peak_MB=round(bench.peak_mb(lambda: update(acc)), 2),
                max_rel_err=None if err is None else float(f"{err:.3g}"),
            )


# ----------------------------------------------------------------------------------------------------- trace
def trace_lora_kernels(out_dir: Path, device: torch.device, shapes, dtype) -> Path:
    """torch.profiler table of five Triton LoRA train steps per shape (forward + backward): the time of each kernel
    (shrink, forward GEMM, the dY pass, dX GEMM, partial sums), to see which one misses its floor."""
    triton_fn = _experimental_triton().lora_linear_triton
    sections = []
    for T, d, r in shapes:
        x = torch.randn(T, d, device=device).to(dtype).requires_grad_()
        w = (torch.randn(d, d, device=device) / math.sqrt(d)).to(dtype)
        b = torch.randn(d, device=device).to(dtype)
        a = torch.linalg.qr(torch.randn(d, r, device=device)).Q.T.contiguous()
        lb = (torch.randn(d, r, device=device) * 0.1).requires_grad_()
        dy = torch.randn(T, d, device=device).to(dtype)

        def step():
            return torch.autograd.grad(triton_fn(x, w, b, a, lb, 2.0 / r), (x, lb), dy)

        def five_steps():
            for _ in range(5):
                step()

        step()  # compiled before the trace
        sections.append(
            f"lora_linear Triton step x5, T={T} d={d} r={r} {str(dtype).split('.')[-1]}\n"
            + harness.profile_table(five_steps, device=device, row_limit=15)
        )
    path = Path(out_dir) / "trace_kernels.txt"
    path.write_text("\n\n".join(sections))
    return path


# ---------------------------------------------------------------------------------------------------- entry
def run(
    out_dir, quick: bool, *, device: str | None = None, smoke: bool | None = None, trace: bool = False
) -> list[dict]:
    """Run the kernel benchmarks, append the rows to ``<out_dir>/bench_kernels.csv`` and return them; ``trace``
    also writes ``<out_dir>/trace_kernels.txt`` (:func:`trace_lora_kernels`) where Triton can run.

    ``device`` defaults to CUDA when available. ``smoke`` (default: on CPU) uses tiny shapes so the whole run takes
    seconds; the GPU quick run (bf16, 3 LoRA shapes, q/k/v, 4 projections, 1 second moment) is sized for well under
    two minutes, the full run adds 12 LoRA shapes and more projection/moment shapes.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    smoke = dev.type == "cpu" if smoke is None else smoke
    bench = _Bench(dev, smoke, quick)
    # bf16 as on the GPU; the full-size CPU run uses fp32 (bf16 matmuls on CPU are slow and not the topic). The smoke
    # run keeps bf16 so that a CPU rehearsal meets the GPU run's mixed dtypes (bf16 activations, fp32 adapters).
    dtype = torch.float32 if dev.type == "cpu" and not smoke else torch.bfloat16
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    if smoke:  # tiny shapes: a thread pool on a shared CPU only adds spinning
        torch.set_num_threads(1)
    try:
        bench_lora(bench, LORA_SHAPES_SMOKE if smoke else LORA_SHAPES_QUICK if quick else LORA_SHAPES_FULL, dtype)
        bench_qkv(bench, QKV_SHAPE_SMOKE if smoke else QKV_SHAPE, dtype)
        bench_project(bench, PROJECT_SMOKE if smoke else PROJECT_QUICK if quick else PROJECT_FULL)
        bench_moment(bench, MOMENT_SMOKE if smoke else MOMENT_QUICK if quick else MOMENT_FULL, dtype)
    finally:  # also when cut short (the GPU script's time box): keep the rows measured so far
        torch.set_num_threads(threads)
        rows = bench.rows
        for row in rows:
            row.update(device_type=dev.type, smoke=smoke, quick=quick)
        if rows:
            harness.append_rows("bench_kernels", rows, results_dir=Path(out_dir) if out_dir else None)
    if trace and out_dir and _dispatch.triton_runs(dev, (dtype,)):
        trace_lora_kernels(Path(out_dir), dev, LORA_SHAPES_SMOKE if smoke else LORA_SHAPES_QUICK, dtype)
    harness.print_table(rows, COLUMNS)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="the GPU script's subset")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (seconds)")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        run(args.out, quick=True, device="cpu", smoke=True)
    else:
        run(args.out, quick=args.quick)


if __name__ == "__main__":
    main()
