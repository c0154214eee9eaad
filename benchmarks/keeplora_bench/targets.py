"""The open performance targets and A/B decisions, judged from the CSVs of one GPU run.

A GPU run (``benchmarks/gpu_check.sh``) writes ``lora_variants.csv``, ``rsvd.csv``, ``profile_lifecycle.csv`` (one
8192-token sequence per batch) and ``profile_batched.csv`` (four 2048-token rows). This module reads them and prints
one line per target — what was measured, the bound, met / not met / not measured — and one line per A/B still to be
decided (a variant against what ships), so that the decisions after a run are read off one table instead of being
recomputed by hand. The GPU script prints it last and writes ``targets.md`` next to the CSVs.

    python -m keeplora_bench.targets benchmarks/results/h200          # judge a folder of result CSVs

Where a CSV holds several rows for one key (runs appended), the last one counts. Every measured value names the
row it comes from, so the table can be checked against the CSVs.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

LLAMA_LAYER = "T=8192,d=4096,r=16"  # the frozen-A LoRA layer at Llama width
CLIP_LAYER = "T=12608,d=768,r=16"  # the authors' CLIP layer (ViT-B/16, batch 64)
RSVD_FLOOR_CASES = (("llama_4096x4096", "32", 1.5), ("llama_11008x4096", "16", 1.5), ("llama7b_224", "224", 1.3))
CLIP_RSVD_CASES = ("clip_vision", "clip_text")
# providers that are not KeepLoRA's own layer: the frozen layer and the authors' path (and PEFT's, by prefix)
REFERENCE_PROVIDERS = ("base", "unfused")
COLUMNS = ["target", "measured", "bound", "verdict", "source"]

Rows = list[dict[str, str]]


def read_results(folder: Path) -> dict[str, Rows]:
    """The run's CSVs by stem (missing files are empty)."""
    names = ("lora_variants", "rsvd", "profile_lifecycle", "profile_batched")
    out = {}
    for name in names:
        path = Path(folder) / f"{name}.csv"
        out[name] = list(csv.DictReader(path.open())) if path.is_file() else []
    return out


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # NaN counts as not measured


def _last(rows: Rows, **match: str) -> dict[str, str] | None:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return found[-1] if found else None


def _line(target: str, measured: float | None, bound: str, met: Callable[[float], bool] | None, source: str) -> dict:
    if measured is None:
        verdict = "not measured"
    elif met is None:
        verdict = "A/B"
    else:
        verdict = "met" if met(measured) else "NOT met"
    return dict(
        target=target,
        measured="" if measured is None else f"{measured:.3g}",
        bound=bound,
        verdict=verdict,
        source=source,
    )


def _ours(provider: str) -> bool:
    return provider not in REFERENCE_PROVIDERS and not provider.startswith("peft")


def _by_provider(rows: Rows, op: str, shape: str, mode: str, timing: str, column: str) -> dict[str, float]:
    """``column`` of KeepLoRA's providers at one op, shape, mode and timing (the last row per provider)."""
    latest = {
        r.get("provider", ""): _float(r.get(column))
        for r in rows
        if r.get("op") == op and r.get("shape") == shape and r.get("mode") == mode and r.get("timing") == timing
    }
    return {p: v for p, v in latest.items() if _ours(p) and v is not None}


def _best_layer(rows: Rows, op: str, shape: str, mode: str, timing: str, column: str) -> tuple[float | None, str]:
    """The smallest ``column`` over KeepLoRA's providers and which provider gave it."""
    values = _by_provider(rows, op, shape, mode, timing, column)
    if not values:
        return None, f"lora_variants {op} {shape} {mode} {timing}: no row"
    provider = min(values, key=values.get)
    return values[provider], f"lora_variants {op} {shape} {mode} {timing}, {provider}"


def layer_targets(rows: Rows) -> list[dict]:
    """The frozen-A LoRA layer against the frozen layer (Llama width) and the authors' path (CLIP)."""
    out = []
    for mode, what in (("forward", "base GEMM"), ("backward", "dX GEMM"), ("step", "frozen layer's step")):
        value, source = _best_layer(rows, "lora_linear", LLAMA_LAYER, mode, "eager", "vs_base")
        out.append(
            _line(f"layer {mode} ≤ 1.10x the {what} (Llama width)", value, "≤ 1.10", lambda v: v <= 1.10, source)
        )
    for timing, bound in (("graph", 1.5), ("eager", 1.3)):
        value, source = _best_layer(rows, "lora_linear", CLIP_LAYER, "step", timing, "vs_unfused")
        speedup = None if not value else 1 / value
        out.append(
            _line(
                f"CLIP layer step ≥ {bound}x faster than the authors' ({timing})",
                speedup,
                f"≥ {bound}",
                lambda v, b=bound: v >= b,
                source,
            )
        )
    return out


def layer_ab(rows: Rows) -> list[dict]:
    """The persistent Triton kernels (experimental until measured) against the best other KeepLoRA provider."""
    out = []
    shapes = sorted({r.get("shape", "") for r in rows if r.get("provider", "").startswith("triton-persistent")})
    for op in ("lora_linear", "lora_qkv"):
        for shape in shapes:
            for timing in ("eager", "graph"):
                times = _by_provider(rows, op, shape, "step", timing, "time_ms")
                persistent = {p: t for p, t in times.items() if p.startswith("triton-persistent")}
                others = {p: t for p, t in times.items() if not p.startswith("triton-persistent")}
                if not persistent or not others:
                    continue
                p_name, p_time = min(persistent.items(), key=lambda kv: kv[1])
                o_name, o_time = min(others.items(), key=lambda kv: kv[1])
                out.append(
                    _line(
                        f"A/B {op} step {timing} {shape}: {p_name} / {o_name} (< 1: dispatch it)",
                        p_time / o_time,
                        "< 1",
                        None,
                        f"lora_variants time_ms {p_time:.4g} / {o_time:.4g}",
                    )
                )
    return out


def rsvd_targets(rows: Rows) -> list[dict]:
    """The batched rSVD against its bandwidth floor (Llama) and the authors' svd_lowrank loop (CLIP)."""
    out = []
    ours = ("keeplora_rsvd", "keeplora_rsvd_graph", "keeplora_rsvd_fused_basis")
    for case, batch, bound in RSVD_FLOOR_CASES:
        values = [
            (v, m)
            for m in ours
            if (r := _last(rows, case=case, batch=batch, method=m, impl="extension"))
            and (v := _float(r.get("x_floor"))) is not None
        ]
        value, method = min(values) if values else (None, "no row")
        out.append(
            _line(
                f"rSVD {case} b={batch} ≤ {bound}x its bandwidth floor",
                value,
                f"≤ {bound}",
                lambda v, b=bound: v <= b,
                f"rsvd x_floor, {method}",
            )
        )
    for case in CLIP_RSVD_CASES:
        r = _last(rows, case=case, method="keeplora_rsvd_matched", impl="extension")
        value = _float(r.get("speedup_vs_lowrank_loop")) if r else None
        out.append(
            _line(
                f"rSVD {case} ≥ 50x the svd_lowrank loop at matched accuracy",
                value,
                "≥ 50",
                lambda v: v >= 50,
                "rsvd speedup_vs_lowrank_loop, keeplora_rsvd_matched",
            )
        )
    return out


def rsvd_ab(rows: Rows) -> list[dict]:
    """The fused intermediate bases (``KEEPLORA_RSVD_FUSED_BASIS=1``) against the default path, per case."""
    out = []
    for case in dict.fromkeys(r.get("case") for r in rows if r.get("method") == "keeplora_rsvd_fused_basis"):
        fused = _last(rows, case=case, method="keeplora_rsvd_fused_basis", impl="extension")
        default = _last(rows, case=case, method="keeplora_rsvd", impl="extension")
        a = _float(fused.get("time_ms")) if fused else None
        b = _float(default.get("time_ms")) if default else None
        out.append(
            _line(
                f"A/B rSVD {case}: fused basis / default (< 1: make it the default)",
                a / b if a is not None and b else None,
                "< 1",
                None,
                f"rsvd time_ms {a} / {b}",
            )
        )
    return out


def _batch_label(rows: Rows, name: str) -> str:
    """``"1 × 8192 tokens"``: the shape of the profile's batches, read from its rows (else the file's name)."""
    for r in rows:
        batch, tokens = _float(r.get("batch")), _float(r.get("tokens_per_batch"))
        if batch and tokens:
            return f"{int(batch)} × {int(tokens // batch)} tokens"
    return name


def lifecycle_targets(rows: Rows, name: str) -> list[dict]:
    """One lifecycle profile against the authors' pipeline: the step, begin_task's time and memory, end_task."""
    label = _batch_label(rows, name)
    ours = {r["phase"]: r for r in rows if r.get("method") == "keeplora"}
    authors = {r["phase"]: r for r in rows if r.get("method") == "authors"}
    out = []
    step = _float(authors.get("train_step", {}).get("time_vs_keeplora"))
    out.append(
        _line(
            f"training step ≥ 1.25x faster than the authors' ({label})",
            step,
            "≥ 1.25",
            lambda v: v >= 1.25,
            f"{name}, authors train_step time_vs_keeplora",
        )
    )
    begin = ours.get("begin_task", {})
    out.append(
        _line(
            f"begin_task ≥ 5x faster than the authors' ({label})",
            _float(begin.get("authors_begin_task_time_ratio")),
            "≥ 5",
            lambda v: v >= 5,
            f"{name}, keeplora begin_task authors_begin_task_time_ratio",
        )
    )
    for phase in sorted(p for p in ours if p.startswith("begin_task")):
        row = ours[phase]
        if row.get("error"):
            out.append(
                _line(
                    f"{phase} peak ≤ 0.5x the authors' begin_task ({label})",
                    None,
                    "≤ 0.5",
                    None,
                    f"{name}: FAILED {row['error'][:80]}",
                )
            )
            continue
        speed = _float(row.get("authors_begin_task_time_ratio"))
        out.append(
            _line(
                f"{phase} peak ≤ 0.5x the authors' begin_task ({label})",
                _float(row.get("memory_vs_authors_begin_task")),
                "≤ 0.5",
                lambda v: v <= 0.5,
                f"{name}, memory_vs_authors_begin_task; {speed:.3g}x the authors' speed" if speed else name,
            )
        )
    peak, step_peak, sums = (_float(begin.get(k)) for k in ("peak_mb", "train_step_peak_mb", "accumulators_mb"))
    out.append(
        _line(
            f"begin_task peak ≤ the step's peak + the gradient sums ({label}), MB over that",
            None if None in (peak, step_peak, sums) else peak - step_peak - sums,
            "≤ 0",
            lambda v: v <= 0,
            f"{name}, peak_mb − train_step_peak_mb − accumulators_mb",
        )
    )
    end = _float(authors.get("end_task", {}).get("time_vs_keeplora"))
    out.append(
        _line(
            f"end_task ≥ 20x faster than the authors' ({label})",
            end,
            "≥ 20",
            lambda v: v >= 20,
            f"{name}, authors end_task time_vs_keeplora",
        )
    )
    return out


def judge(results: dict[str, Rows]) -> list[dict]:
    """Every target line, then every A/B line."""
    lines = layer_targets(results.get("lora_variants", []))
    lines += rsvd_targets(results.get("rsvd", []))
    lines += lifecycle_targets(results.get("profile_lifecycle", []), "profile_lifecycle")
    lines += lifecycle_targets(results.get("profile_batched", []), "profile_batched")
    lines += layer_ab(results.get("lora_variants", [])) + rsvd_ab(results.get("rsvd", []))
    return lines


def markdown(lines: Iterable[dict]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(str(line[c]) for c in COLUMNS) + " |" for line in lines]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a folder with a GPU run's CSVs (e.g. benchmarks/results/h200)")
    parser.add_argument("--write", type=Path, help="also write the table as markdown to this file")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"folder: {args.folder} is not a folder")
    from .micro.harness import print_table

    lines = judge(read_results(args.folder))
    print_table(lines, COLUMNS)
    if args.write:
        args.write.write_text(markdown(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
