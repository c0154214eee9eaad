"""Batched randomized SVD (``keeplora_kernels.rsvd``) against the authors' per-matrix ``torch.svd_lowrank`` loop
(q = 4r, niter = 4) and ``torch.linalg.svd``: time, peak memory and accuracy on the shape groups of KeepLoRA's
targets (CLIP ViT-B/16 48×768², CLIP text 96×512², MiniLM 24×384², Llama-7B 4096² and 11008×4096). Also
``principal_subspace`` on all adapted weights of a few layers at once against the per-weight full-SVD reference
(rows in ``principal_subspace.csv``: time, ranks equal to the reference's, projector distance).

Accuracy: ``resid_excess = ‖A − A_r‖_F / ‖A − A_r^opt‖_F − 1`` (0 = as good as the full SVD; slightly negative
values come from the input's rounding to its dtype), on batches with a known power-law spectrum
(``A = U·diag(s)·Vᵀ``, so the optimal residual is exact). ``linalg_svd`` is timed on ``matrices_timed`` matrices
and scaled to the batch (``batch_time_ms``).

    python -m keeplora_bench.micro.bench_rsvd --quick  # CPU, smaller batches, < 1 min -> benchmarks/results/rsvd.csv
    python -m keeplora_bench.micro.bench_rsvd          # the full shape groups (GPU: ~2 min)

``run(out_dir, quick)`` writes the detailed rows to ``<out_dir>/rsvd.csv`` and returns summary rows (op, time_ms,
pct_of_floor, ratio, peak_mb, note) for keeplora_bench.gpu_check; on CUDA the full mode is sized for about a
minute. On CUDA every keeplora row also reports the bandwidth floor ``(2q+2)·Σ m·n·bytes`` at the device's copy
rate (:mod:`.roofline`: 4.3 TB/s on an H200) and the time as a multiple of it (``x_floor``; the target is ≤ 1.5
on the Llama shapes).
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import keeplora_kernels as kk
from keeplora_kernels import _dispatch
from keeplora_kernels.graphs import GraphedCall, default_cache
from keeplora_kernels.rsvd import rsvd_torch, small_svd_method

from .harness import append_rows, library_calls, measure_memory, print_table, profile_table, time_fn
from .roofline import roofline


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    m: int
    n: int
    rank: int
    dtype: torch.dtype
    svd_subset: int  # matrices timed for torch.linalg.svd (the per-matrix time is scaled to the batch)


def cases(device: torch.device, quick: bool, smoke: bool = False) -> list[Case]:
    if smoke:
        return [Case("smoke", 2, 96, 64, 4, torch.float32, 2)]
    clip = dict(rank=16, dtype=torch.float32)  # the authors' CLIP rank; fp32 gradients
    llama = dict(rank=24, dtype=torch.bfloat16)  # with oversample 8: l = 32, bf16 weights
    if device.type == "cuda":
        full = [
            Case("llama_4096x4096", 32, 4096, 4096, svd_subset=1, **llama),
            Case("llama_11008x4096", 16, 11008, 4096, svd_subset=1, **llama),
            Case("clip_vision", 48, 768, 768, svd_subset=8, **clip),
            Case("clip_text", 96, 512, 512, svd_subset=8, **clip),
            Case("minilm", 24, 384, 384, svd_subset=8, **clip),
        ]
        # quick = full on a GPU: the cost is the one-matrix linalg_svd baseline, not the batch (at a fraction of
        # the Llama batches fixed launch overhead hides the bandwidth-bound part); ordered by value (the Llama
        # rows carry the open floor targets, the CLIP rows' targets are met), as a time box skips the last cases
        # (run_detailed)
        return full
    if quick:  # CPU, < 1 min: the per-layer shapes with smaller batches; Llama scaled down by 4 per side
        return [
            Case("clip_vision", 6, 768, 768, svd_subset=2, **clip),
            Case("clip_text", 8, 512, 512, svd_subset=3, **clip),
            Case("minilm", 8, 384, 384, svd_subset=4, **clip),
            Case("llama_scaled_1024x1024", 2, 1024, 1024, svd_subset=1, **llama),
            Case("llama_scaled_2752x1024", 1, 2752, 1024, svd_subset=1, **llama),
        ]
    return [
        Case("clip_vision", 48, 768, 768, svd_subset=4, **clip),
        Case("clip_text", 96, 512, 512, svd_subset=8, **clip),
        Case("minilm", 24, 384, 384, svd_subset=8, **clip),
        Case("llama_4096x4096", 4, 4096, 4096, svd_subset=1, **llama),
        Case("llama_11008x4096", 2, 11008, 4096, svd_subset=1, **llama),
    ]


def make_batch(case: Case, device: torch.device, seed: int = 0):
    """``A_b = U·diag(s_b)·Vᵀ`` with one random U, V for the batch and power-law spectra s_b,i ∝ (i+1)^-α_b."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    k = min(case.m, case.n)
    u = torch.linalg.qr(torch.randn(case.m, k, generator=gen).to(device)).Q
    v = torch.linalg.qr(torch.randn(case.n, k, generator=gen).to(device)).Q
    alpha = 0.6 + 0.8 * torch.rand(case.batch, 1, generator=gen, dtype=torch.float64)
    spectra = (torch.arange(1, k + 1, dtype=torch.float64).unsqueeze(0) ** -alpha).to(device)
    a = torch.empty(case.batch, case.m, case.n, dtype=case.dtype, device=device)
    for i in range(case.batch):  # written in place: no list of the whole batch next to the batch
        a[i] = (u * spectra[i].float()) @ v.T
    optimal = spectra[:, case.rank :].square().sum(-1).sqrt()  # ‖A − A_r‖_F of the exact spectrum
    return a.contiguous(), optimal


def residual_ratio(a: torch.Tensor, u, s, v, optimal: torch.Tensor) -> torch.Tensor:
    approx = (u.float() * s.float().unsqueeze(-2)) @ v.float().mT
    return torch.linalg.matrix_norm(a.float() - approx).double() / optimal


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(fn: Callable, device: torch.device, expensive: bool, quick: bool, cpu_repeats: int | None = None):
    """Outputs of one call, median ms and peak bytes.

    Cheap calls: do_bench on CUDA / wall-clock medians on CPU (harness.time_fn), peak memory from one more call.
    Expensive CUDA baselines (a host sync per matrix, up to seconds per call) run once: that call gives the outputs,
    its synchronised wall time and its peak memory (the GPU script has about a minute for this benchmark).
    """
    if device.type == "cuda" and expensive:
        box = {}

        def once():
            _sync(device)
            t0 = time.perf_counter()
            box["out"] = fn()
            _sync(device)
            box["ms"] = (time.perf_counter() - t0) * 1e3

        peak = measure_memory(once, device=device)
        return box["out"], box["ms"], peak
    out = fn()
    if device.type == "cuda":
        ms = time_fn(fn, device=device).median_ms
    else:
        repeats = cpu_repeats or (5 if quick else 7)
        ms = time_fn(fn, device="cpu", warmup=0 if cpu_repeats else 1, repeats=repeats).median_ms
    return out, ms, measure_memory(fn, device=device)


# Our two settings: "fast" (sketch r + 8, q = 2: the engine's); "matched" (sketch 2r, q = 4, the authors'
# niter) reaches the accuracy of the authors' loop (sketch 4r) on these spectra (see the resid_excess columns).
CONFIGS = {"keeplora_rsvd": lambda r: (8, 2), "keeplora_rsvd_matched": lambda r: (r, 4)}
# keeplora_rsvd_gesvdj (CUDA, l <= 32): the fast setting with cuSOLVER's gesvdjBatched as the small SVD instead of
# the project's Jacobi kernel (small_svd_method), the A/B pair of the keeplora_rsvd row.
# The fast setting replayed as a CUDA graph (keeplora_kernels.graphs): "_graph" with the batch already in the
# graph's static input buffer (how a caller that stacks its matrices into it runs), "_graph_copy" through
# kk.rsvd(graph=True), which copies the batch into that buffer first. Without CUDA both run eagerly (the fallback).
GRAPH_METHODS = ("keeplora_rsvd_graph", "keeplora_rsvd_graph_copy")
COUNTED = (
    "keeplora_rsvd",
    "keeplora_rsvd_fused_basis",
    *GRAPH_METHODS,
)  # rows that report library calls (CUDA: kernels) per call


def _graph_methods(batches: list[torch.Tensor], r: int, over: int, q: int, backend: str):
    """(method, impl, fn, expensive, (over, q), graph note) of the two graph rows for ``batches`` (shape groups)."""

    def calls(*mats):
        return [kk.rsvd(x, r, oversample=over, power_iters=q, seed=0) for x in mats]

    graphed = GraphedCall(calls, batches, adopt_inputs=True)

    def copied():
        return [kk.rsvd(x, r, oversample=over, power_iters=q, seed=0, graph=True) for x in batches]

    note = "replay" if graphed.graphed else f"eager: {graphed.reason}"
    return [
        ("keeplora_rsvd_graph", backend, lambda: graphed(*batches), False, (over, q), note),
        ("keeplora_rsvd_graph_copy", backend, copied, False, (over, q), note),
    ]


FUSED_BASIS_ENV = "KEEPLORA_RSVD_FUSED_BASIS"


def _fused_basis_runs(device: torch.device, backend: str, dtype: torch.dtype) -> bool:
    """Whether the fused range finder applies (csrc/rsvd.cpp: CUDA extension, a 16-bit matrix, no projection)."""
    return device.type == "cuda" and backend == "extension" and dtype in (torch.bfloat16, torch.float16)


def _with_fused_basis(fn: Callable):
    """``fn`` with the range finder's intermediate bases kept as split operands (A/B with the default path)."""

    def run():
        before = os.environ.get(FUSED_BASIS_ENV)
        os.environ[FUSED_BASIS_ENV] = "1"
        try:
            return fn()
        finally:
            if before is None:
                del os.environ[FUSED_BASIS_ENV]
            else:
                os.environ[FUSED_BASIS_ENV] = before

    return run


@functools.cache
def _gesvdj_runs(device: torch.device) -> bool:
    """Whether the extension's cuSOLVER small-SVD launcher runs here (CUDA build, cuSOLVER loadable); the reason is
    printed when not, and the A/B row is left out rather than failing its case."""
    if device.type != "cuda" or "gesvdj_batched" not in _dispatch.extension_ops("cuda"):
        return False
    try:
        torch.ops.keeplora.gesvdj_batched(torch.eye(4, device=device, dtype=torch.float64).expand(2, 4, 4))
        return True
    except Exception as exc:
        print(f"[bench_rsvd] no cuSOLVER small-SVD rows: {type(exc).__name__}: {exc}", flush=True)
        return False


def _rows(
    case_fields: dict,
    groups: list[tuple[torch.Tensor, torch.Tensor]],
    methods,
    device: torch.device,
    quick: bool,
    backend: str,
) -> list[dict]:
    """Measure ``methods`` on the shape ``groups`` [(batch, optimal residuals)] of one case; one row per method.

    Every method returns one (U, S, V) per group (the linalg_svd baseline: for the first matrices of the first
    group only). Every row has the same columns, so every case appends to the same CSV schema."""
    total = sum(a.shape[0] for a, _ in groups)
    rows = []
    for method, impl, fn, expensive, (over, q), graph in methods:
        outs, ms, peak = _measure(fn, device, expensive, quick)
        excess = []
        for (a, optimal), (u, s, v) in zip(groups, outs):
            count = u.shape[0]
            for lo in range(0, count, 8):  # chunks: the fp32 residual of a whole model-scale group is large
                hi = min(lo + 8, count)
                excess.append(residual_ratio(a[lo:hi], u[lo:hi], s[lo:hi], v[lo:hi], optimal[lo:hi]) - 1)
        del outs
        excess = torch.cat(excess)
        matrices = excess.numel()
        batch_ms = ms * total / matrices
        row = {
            **case_fields,
            "sketch": case_fields["rank"] + over if over != "" else "",
            "power_iters": q,
            "method": method,
            "impl": impl,
            "device_type": device.type,
            "matrices_timed": matrices,
            "time_ms": ms,
            "batch_time_ms": batch_ms,
            "peak_mem_mb": peak / 2**20,
            "resid_excess_mean": excess.mean().item(),
            "resid_excess_max": excess.max().item(),
            "library_calls": "",
            "kernels": "",
            "graph": graph,
        }
        if method in COUNTED and impl == backend:  # per-call overhead: library calls (CUDA: kernels)
            try:
                counts = library_calls(fn, device=device)
                row.update(library_calls=counts["calls"], kernels=counts.get("kernels", ""))
            except Exception as exc:  # the profiler on graph replays: a failure must not cost the case its rows
                row.update(graph=f"{graph}; not counted: {type(exc).__name__}: {exc}"[:200])
        if device.type == "cuda" and method.startswith("keeplora"):
            bytes_read = sum(a.numel() * a.element_size() for a, _ in groups)
            floor_ms = roofline(device).floor_ms(0.0, (2 * q + 2) * bytes_read)
            row.update(floor_ms=floor_ms, x_floor=batch_ms / floor_ms)
        rows.append(row)
    base = next(x for x in rows if x["method"] == "svd_lowrank_loop")
    full = next((x for x in rows if x["method"] == "linalg_svd"), None)
    for row in rows:
        row["speedup_vs_lowrank_loop"] = base["batch_time_ms"] / row["batch_time_ms"]
        row["speedup_vs_linalg_svd"] = full["batch_time_ms"] / row["batch_time_ms"] if full else ""
    return rows


def _lowrank_loop(batches: list[torch.Tensor], r: int):
    """The authors' pipeline: one ``svd_lowrank`` call per matrix, q = 4r, niter = 4, in float32."""
    out = []
    for a in batches:
        m, n = a.shape[-2:]
        outs = [torch.svd_lowrank(a[i].float(), q=min(4 * r, m, n), niter=4) for i in range(a.shape[0])]
        out.append(
            (
                torch.stack([o[0][:, :r] for o in outs]),
                torch.stack([o[1][:r] for o in outs]),
                torch.stack([o[2][:, :r] for o in outs]),
            )
        )
    return out


def run_case(case: Case, device: torch.device, quick: bool) -> list[dict]:
    a, optimal = make_batch(case, device)
    r = case.rank
    methods: list[tuple] = []
    backend = _dispatch.select("rsvd", device)
    for name, config in CONFIGS.items():
        over, q = config(r)

        def eager(over=over, q=q):
            return [kk.rsvd(a, r, oversample=over, power_iters=q, seed=0)]

        methods.append((name, backend, eager, False, (over, q), ""))
        if name == "keeplora_rsvd":
            methods += _graph_methods([a], r, over, q, backend)
            if _fused_basis_runs(device, backend, case.dtype) and r + over <= 64:
                methods.append(("keeplora_rsvd_fused_basis", backend, _with_fused_basis(eager), False, (over, q), ""))
            if backend == "extension" and r + over <= 32 and _gesvdj_runs(device):

                def cusolver_small_svd(over=over, q=q):  # A/B with the row above: the small SVD by cuSOLVER
                    before = small_svd_method()
                    small_svd_method("cusolver")
                    try:
                        return [kk.rsvd(a, r, oversample=over, power_iters=q, seed=0)]
                    finally:
                        small_svd_method(before)

                methods.append(("keeplora_rsvd_gesvdj", backend, cusolver_small_svd, False, (over, q), ""))
        if backend != "torch" and name == "keeplora_rsvd":  # the PyTorch fallback of the same algorithm

            def fallback(over=over, q=q):
                return [rsvd_torch(a, r, oversample=over, power_iters=q, seed=0)[:3]]

            methods.append((name, "torch", fallback, False, (over, q), ""))

    lowrank_over = min(4 * r, case.m, case.n) - r
    methods.append(("svd_lowrank_loop", "torch", lambda: _lowrank_loop([a], r), True, (lowrank_over, 4), ""))
    subset = a[: case.svd_subset]

    def full_svd():
        uu, ss, vh = torch.linalg.svd(subset.float(), full_matrices=False)
        return [(uu[..., :r], ss[..., :r], vh[..., :r, :].mT)]

    methods.append(("linalg_svd", "torch", full_svd, True, ("", ""), ""))
    fields = {
        "case": case.name,
        "batch": case.batch,
        "m": case.m,
        "n": case.n,
        "rank": r,
        "dtype": str(case.dtype).replace("torch.", ""),
    }
    try:
        return _rows(fields, [(a, optimal)], methods, device, quick, backend)
    finally:
        default_cache.clear()  # the graphs' memory pools go with the case


# ---------------------------------------------------------------------------------------------------------------
# A whole model's adapted weights: one rSVD call per shape group, eager and as one captured graph.


@dataclass(frozen=True)
class ModelSet:
    name: str
    groups: tuple[tuple[int, int, int], ...]  # (m, n, count) per shape group
    rank: int
    dtype: torch.dtype


def model_sets(device: torch.device, quick: bool, smoke: bool = False) -> list[ModelSet]:
    """Llama-7B: per layer q, k, v, o 4096×4096, gate and up 11008×4096, down 4096×11008; 32 layers = 224
    matrices, 13 GB in bf16 (one H200 holds it). Without CUDA a quarter-scale single layer."""
    if smoke:
        return [ModelSet("smoke_set", ((96, 64, 2), (64, 96, 1)), 4, torch.float32)]
    if device.type == "cuda":
        return [ModelSet("llama7b_224", ((4096, 4096, 128), (11008, 4096, 64), (4096, 11008, 32)), 24, torch.bfloat16)]
    return [ModelSet("llama7b_scaled_1_layer", ((1024, 1024, 4), (2752, 1024, 2), (1024, 2752, 1)), 24, torch.bfloat16)]


def run_model_set(mset: ModelSet, device: torch.device, quick: bool) -> list[dict]:
    groups = [
        make_batch(Case(f"{mset.name}_{m}x{n}", count, m, n, mset.rank, mset.dtype, 1), device, seed=i)
        for i, (m, n, count) in enumerate(mset.groups)
    ]
    batches = [a for a, _ in groups]
    r, (over, q) = mset.rank, CONFIGS["keeplora_rsvd"](mset.rank)
    backend = _dispatch.select("rsvd", device)

    def eager():
        return [kk.rsvd(a, r, oversample=over, power_iters=q, seed=0) for a in batches]

    methods = [
        ("keeplora_rsvd", backend, eager, False, (over, q), ""),
        *_graph_methods(batches, r, over, q, backend),
        ("svd_lowrank_loop", "torch", lambda: _lowrank_loop(batches, r), True, (3 * r, 4), ""),
    ]
    if _fused_basis_runs(device, backend, mset.dtype) and r + over <= 64:
        methods.insert(1, ("keeplora_rsvd_fused_basis", backend, _with_fused_basis(eager), False, (over, q), ""))
    total = sum(c for _, _, c in mset.groups)
    fields = {
        "case": mset.name,
        "batch": total,
        "m": "|".join(str(m) for m, _, _ in mset.groups),
        "n": "|".join(str(n) for _, n, _ in mset.groups),
        "rank": r,
        "dtype": str(mset.dtype).replace("torch.", ""),
    }
    try:
        return _rows(fields, groups, methods, device, quick, backend)
    finally:
        default_cache.clear()


# ---------------------------------------------------------------------------------------------------------------
def full_svd_subspace(weight: torch.Tensor, energy: float) -> torch.Tensor:
    """The per-weight baseline: a full SVD in fp32 and the energy rule on its singular values (input side)."""
    _, sigma, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    return vh[: kk.energy_rank(sigma.square(), energy)].mT.contiguous()


# principal_subspace: the engine's one call for all targets, against the reference (full SVD per weight).


def subspace_cases(device: torch.device, quick: bool, smoke: bool = False):
    """(name, [(d_out, d_in, count)], energies): the adapted weights of a few transformer layers."""
    if smoke:
        return [("smoke", [(96, 64, 2), (64, 96, 1)], (0.5,))]
    if device.type == "cuda":
        return [
            ("clip_vision_12_layers", [(768, 768, 48), (3072, 768, 12), (768, 3072, 12)], (0.85,)),
            ("clip_text_12_layers", [(512, 512, 48), (2048, 512, 12), (512, 2048, 12)], (0.2,)),
        ]
    layers = 1 if quick else 12
    return [
        (
            f"clip_text_{layers}_layers",
            [(512, 512, 4 * layers), (2048, 512, layers), (512, 2048, layers)],
            (0.2, 0.85),
        )
    ]


def make_weights(groups, device, seed=0):
    """Weights with power-law spectra s_i = i^-alpha (alpha in [0.3, 0.7], like trained layers: no gap)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    weights = []
    for d_out, d_in, count in groups:
        k = min(d_out, d_in)
        u = torch.linalg.qr(torch.randn(d_out, k, generator=gen)).Q.to(device)
        v = torch.linalg.qr(torch.randn(d_in, k, generator=gen)).Q.to(device)
        for _ in range(count):
            alpha = 0.3 + 0.4 * torch.rand(1, generator=gen).item()
            s = (torch.arange(1, k + 1, dtype=torch.float32) ** -alpha).to(device)
            weights.append((u * s) @ v.T)
    return weights


def run_subspace_case(name, groups, energies, device, quick) -> list[dict]:
    weights = make_weights(groups, device)
    rows = []
    for energy in energies:
        methods = [
            ("principal_subspace", _dispatch.select("rsvd", device), lambda: kk.principal_subspace(weights, energy)),
            ("principal_subspace_ref_loop", "torch", lambda: [full_svd_subspace(w, energy) for w in weights]),
        ]
        results = {}
        for method, impl, fn in methods:
            out, ms, peak = _measure(fn, device, expensive=True, quick=quick, cpu_repeats=3)
            results[method] = (out, ms, peak, impl)
        ref = results["principal_subspace_ref_loop"][0]
        for method, (out, ms, peak, impl) in results.items():
            same_p = sum(int(a.shape == b.shape) for a, b in zip(out, ref))
            dist = max(
                (
                    torch.linalg.matrix_norm(a.double() @ a.double().T - b.double() @ b.double().T, ord=2).item()
                    for a, b in zip(out, ref)
                    if a.shape == b.shape and a.shape[1]
                ),
                default=0.0,
            )
            rows.append(
                {
                    "case": name,
                    "weights": len(weights),
                    "energy": energy,
                    "method": method,
                    "impl": impl,
                    "device_type": device.type,
                    "time_ms": ms,
                    "peak_mem_mb": peak / 2**20,
                    "speedup_vs_ref_loop": results["principal_subspace_ref_loop"][1] / ms,
                    "ranks_equal_ref": f"{same_p}/{len(weights)}",
                    "max_projector_dist": dist,
                    "mean_rank": sum(a.shape[1] for a in out) / len(out),
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The memory update (keeplora.basis.expand_bases): eigh of every d×d feature moment vs the randomized Ritz path.


def memory_update_cases(device: torch.device, quick: bool, smoke: bool = False):
    """(name, d, count, old basis width, energies): feature second moments of one layer's targets."""
    if smoke:
        return [("smoke", 96, 2, 4, (0.5,))]
    if device.type == "cuda":
        return [("llama_attn_4096", 4096, 4, 64, (0.8, 0.99)), ("llama_down_11008", 11008, 1, 64, (0.8,))]
    return [("scaled_1024", 1024, 2, 16, (0.8, 0.99))]


def make_moments(d: int, count: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """PSD moments with power-law spectra λ_i ∝ i^-α, α in [1.0, 1.6] (feature covariances decay like this)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(count):
        q = torch.linalg.qr(torch.randn(d, d, generator=gen).to(device)).Q  # QR on the device: d = 11008 on a GPU
        alpha = 1.0 + 0.6 * torch.rand(1, generator=gen).item()
        lam = (torch.arange(1, d + 1, dtype=torch.float32) ** -alpha).to(device)
        out.append((q * lam) @ q.T)
    return out


def run_memory_update_case(name, d, count, width, energies, device, quick) -> list[dict]:
    from keeplora.basis import expand_bases

    moments = {f"m{i}": m for i, m in enumerate(make_moments(d, count, device))}
    gen = torch.Generator(device="cpu").manual_seed(1)
    bases = {n: torch.linalg.qr(torch.randn(d, width, generator=gen)).Q.to(device) for n in moments}
    rows = []
    for energy in energies:
        results = {}
        for method in ("exact", "randomized"):
            fn = functools.partial(expand_bases, bases, moments, energy, method=method, seed=0)
            out, ms, peak = _measure(fn, device, expensive=True, quick=quick, cpu_repeats=2)
            results[method] = (out, ms, peak)
        exact_out, exact_ms = results["exact"][0], results["exact"][1]
        for method, (out, ms, peak) in results.items():
            added = [out[n].shape[1] - width for n in moments]
            extra = [out[n].shape[1] - exact_out[n].shape[1] for n in moments]
            rows.append(
                {
                    "case": name,
                    "d": d,
                    "moments": count,
                    "old_width": width,
                    "energy": energy,
                    "method": method,
                    "device_type": device.type,
                    "time_ms": ms,
                    "peak_mem_mb": peak / 2**20,
                    "speedup_vs_exact": exact_ms / ms,
                    "mean_added": sum(added) / len(added),
                    "max_extra_vs_exact": max(extra),
                }
            )
    return rows


# groups of cases: single rSVD calls, a whole model's weights, the engine's principal subspaces, memory updates
SECTIONS = ("rsvd", "model_set", "principal_subspace", "memory_update")


def run_detailed(
    out_dir: Path | None = None,
    quick: bool = False,
    *,
    smoke: bool = False,
    device: torch.device | None = None,
    cpu_threads: int | None = 1,
    only: list[str] | None = None,
    time_box_s: float | None = None,
    sections: tuple[str, ...] = SECTIONS,
) -> list[dict]:
    """Run every case on ``device`` (CUDA when available); append the rows to ``<out_dir>/rsvd.csv`` (default
    benchmarks/results/) and return them. ``only``: case names to run (default all). ``time_box_s``: no case
    starts after that many seconds (the later ones are skipped and named on stdout). ``sections``: which groups of
    cases run, in that order (each group's cases in order of value); default all of :data:`SECTIONS`.

    On CPU the torch thread count is set to ``cpu_threads`` for the run (default 1: on shared machines OpenMP
    regions of several threads stall on descheduled threads and timings vary wildly; None keeps torch's).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads_before = torch.get_num_threads()
    if device.type == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    threads = cpu_threads if device.type == "cpu" and cpu_threads else threads_before
    suffix = "-smoke" if smoke else ""
    out: list[dict] = []

    def keep(name: str, rows: list[dict]) -> None:  # written case by case: a run cut short keeps what it measured
        for row in rows:
            row["run_threads"] = threads
        if rows:
            append_rows(name + suffix, rows, results_dir=out_dir)
        out.extend(rows)

    start = time.perf_counter()

    def wanted(name: str) -> bool:
        if only is not None and name not in only:
            return False
        if time_box_s is not None and time.perf_counter() - start > time_box_s:
            print(f"[bench_rsvd] time box of {time_box_s:.0f} s used up: skipped {name}", flush=True)
            return False
        return True

    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"bench_rsvd: unknown sections {unknown}; accepted: {list(SECTIONS)}")

    def run_section(section: str) -> None:
        if section == "rsvd":
            for case in cases(device, quick, smoke):
                if wanted(case.name):
                    keep("rsvd", run_case(case, device, quick))
        elif section == "model_set":
            for mset in model_sets(device, quick, smoke):
                if wanted(mset.name):
                    keep("rsvd", run_model_set(mset, device, quick))
        elif section == "principal_subspace":
            for name, groups, energies in subspace_cases(device, quick, smoke):
                if wanted(name):
                    keep("principal_subspace", run_subspace_case(name, groups, energies, device, quick))
        else:
            for name, d, count, width, energies in memory_update_cases(device, quick, smoke):
                if wanted(name):
                    keep("memory_update", run_memory_update_case(name, d, count, width, energies, device, quick))

    try:
        with torch.no_grad():
            for section in sections:
                run_section(section)
    finally:
        torch.set_num_threads(threads_before)
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """The GPU script's summary rows: op, time_ms (whole batch), pct_of_floor (CUDA, ours), ratio (speed-up over
    the authors' svd_lowrank loop, or over the per-weight full-SVD reference for principal_subspace), peak_mb,
    note (accuracy)."""
    out = []
    for row in rows:
        if "old_width" in row:  # memory update rows
            out.append(
                dict(
                    op=f"memory_update {row['case']} eps={row['energy']} {row['method']}",
                    time_ms=row["time_ms"],
                    pct_of_floor="",
                    ratio=row["speedup_vs_exact"],
                    peak_mb=row["peak_mem_mb"],
                    note=f"added {row['mean_added']:.1f}/matrix, {row['max_extra_vs_exact']} more than eigh",
                )
            )
            continue
        if "energy" in row:  # principal_subspace rows
            out.append(
                dict(
                    op=f"principal_subspace {row['case']} eps={row['energy']} {row['method']} [{row['impl']}]",
                    time_ms=row["time_ms"],
                    pct_of_floor="",
                    ratio=row["speedup_vs_ref_loop"],
                    peak_mb=row["peak_mem_mb"],
                    note=f"ranks = ref {row['ranks_equal_ref']}, projector dist {row['max_projector_dist']:.1e}",
                )
            )
            continue
        op = f"rsvd {row['case']} b={row['batch']} {row['method']}" + (
            f" [{row['impl']}]" if row["method"].startswith("keeplora") else ""
        )
        if row.get("graph", "").startswith("eager"):
            op += " (graph fell back to eager)"
        pct = 100 * row["floor_ms"] / row["batch_time_ms"] if "floor_ms" in row else ""
        out.append(
            dict(
                op=op,
                time_ms=row["batch_time_ms"],
                pct_of_floor=pct,
                ratio=row["speedup_vs_lowrank_loop"],
                peak_mb=row["peak_mem_mb"],
                note=f"resid_excess {row['resid_excess_mean']:.1e}, {row['matrices_timed']} timed"
                + (f", {row['library_calls']} calls" if row.get("library_calls", "") != "" else "")
                + (f"/{row['kernels']} kernels" if row.get("kernels", "") != "" else ""),
            )
        )
    return out


def trace_rsvd(out_dir: Path, device: torch.device, smoke: bool = False) -> Path:
    """torch.profiler table (by self device time; CPU time without a GPU) of one warm batched ``kk.rsvd`` call on
    the Llama 4096² case at the batch of its floor target, 32 (tiny in smoke mode): where the gap to the bandwidth
    floor goes. At a smaller batch the fixed per-call costs (one block per matrix) weigh more than at the target.
    Where the fused intermediate bases apply, a second table shows the same call with them."""
    case = (
        Case("smoke", 2, 96, 64, 4, torch.float32, 1)
        if smoke
        else Case("llama_4096x4096", 32, 4096, 4096, 24, torch.bfloat16, 1)
    )
    a, _ = make_batch(case, device)
    backend = _dispatch.select("rsvd", device)
    variants = {"": functools.partial(kk.rsvd, a, case.rank, oversample=8, power_iters=2, seed=0)}
    if _fused_basis_runs(device, backend, case.dtype):
        variants[f" {FUSED_BASIS_ENV}=1"] = _with_fused_basis(variants[""])
    text = ""
    for label, call in variants.items():
        with torch.no_grad():
            call()
            _sync(device)
            table = profile_table(call, device=device)
        text += (
            f"kk.rsvd {case.name} b={case.batch} r={case.rank} oversample=8 power_iters=2 [{backend}]{label}\n"
            + table
            + "\n"
        )
    path = Path(out_dir) / "trace_rsvd.txt"
    path.write_text(text)
    return path


def run(out_dir: Path | None = None, quick: bool = False, trace: bool = False, **kwargs) -> list[dict]:
    """Entry point of keeplora_bench.gpu_check: detailed rows to ``<out_dir>/rsvd.csv``, summary rows returned;
    ``trace`` also writes ``<out_dir>/trace_rsvd.txt`` (:func:`trace_rsvd`), unless the cases used up
    ``time_box_s`` and more (then the trace would run past the caller's box)."""
    start = time.perf_counter()
    rows = summarize(run_detailed(out_dir, quick, **kwargs))
    box = kwargs.get("time_box_s")
    if box is not None and time.perf_counter() - start > box + 10:
        print("[bench_rsvd] time box used up: no trace", flush=True)
        trace = False
    if trace and out_dir is not None:
        device = torch.device(kwargs.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        trace_rsvd(Path(out_dir), device, smoke=kwargs.get("smoke", False))
    return rows


COLUMNS = [
    "case",
    "batch",
    "m",
    "n",
    "rank",
    "dtype",
    "method",
    "impl",
    "sketch",
    "power_iters",
    "batch_time_ms",
    "speedup_vs_lowrank_loop",
    "speedup_vs_linalg_svd",
    "resid_excess_mean",
    "resid_excess_max",
    "library_calls",
    "kernels",
    "graph",
]


SUBSPACE_COLUMNS = [
    "case",
    "weights",
    "energy",
    "method",
    "impl",
    "time_ms",
    "speedup_vs_ref_loop",
    "ranks_equal_ref",
    "max_projector_dist",
    "mean_rank",
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches (CPU: < 1 min)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--cases", nargs="*", default=None, help="case names to run (default: all)")
    args = parser.parse_args(argv)
    rows = run_detailed(args.out, args.quick, device=args.device, cpu_threads=args.cpu_threads or None, only=args.cases)
    rsvd_rows = [r for r in rows if "energy" not in r]
    columns = COLUMNS + (["floor_ms", "x_floor"] if any("floor_ms" in r for r in rsvd_rows) else [])
    print_table(rsvd_rows, columns)
    print()
    print_table([r for r in rows if "energy" in r], SUBSPACE_COLUMNS)


if __name__ == "__main__":
    main()
