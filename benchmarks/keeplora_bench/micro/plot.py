"""Plots of the benchmark CSVs in benchmarks/results/ (one PNG per benchmark that has rows).

    python -m keeplora_bench.micro.plot [--results DIR] [--out DIR]

* profile_lifecycle*.csv → time and peak memory per phase and method (the newest run of each model/device);
* rsvd*.csv → speed-up over the svd_lowrank loop against the extra rank-r error, per case and method;
* bench_kernels*.csv → time per provider for each op/shape/pass (the newest run).
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..continual.plots import save_figure  # noqa: E402
from .harness import RESULTS_DIR  # noqa: E402


def _rows(results: Path, prefix: str) -> list[dict[str, str]]:
    rows = []
    for path in sorted(results.glob(f"{prefix}*.csv")):
        with path.open(newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def _newest(rows: list[dict[str, str]], key: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of the newest timestamp for each value of ``key``."""
    newest: dict[tuple, str] = {}
    for r in rows:
        k = tuple(r.get(c, "") for c in key)
        newest[k] = max(newest.get(k, ""), r.get("timestamp", ""))
    return [r for r in rows if r.get("timestamp", "") == newest[tuple(r.get(c, "") for c in key)]]


def _num(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def plot_profile(results: Path, out: Path) -> list[Path]:
    rows = _newest(_rows(results, "profile_lifecycle"), ("model", "device"))
    written = []
    for (model, device), group in _group(rows, ("model", "device")).items():
        phases = [p for p in ("setup", "begin_task", "train_step", "end_task") if any(r["phase"] == p for r in group)]
        methods = list(dict.fromkeys(r["method"] for r in group))
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for ax, column, label in ((axes[0], "time_ms", "time (ms)"), (axes[1], "peak_mb", "peak memory (MB)")):
            width = 0.8 / len(methods)
            for i, method in enumerate(methods):
                values = [
                    next((_num(r[column]) for r in group if r["method"] == method and r["phase"] == p), float("nan"))
                    for p in phases
                ]
                ax.bar([j + i * width for j in range(len(phases))], values, width, label=method)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(phases))], phases)
            ax.set_ylabel(label)
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend(fontsize=8)
        sha = group[0].get("git_sha", "")
        fig.suptitle(f"task lifecycle: {model} on {device} (git {sha})", fontsize=10)
        written.append(save_figure(fig, out / f"profile_{_slug(model)}_{_slug(device)}.png"))
    return written


def plot_rsvd(results: Path, out: Path) -> list[Path]:
    rows = [r for r in _rows(results, "rsvd") if r.get("speedup_vs_lowrank_loop")]
    if not rows:
        return []
    rows = _newest(rows, ("case", "device"))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, group in _group(rows, ("method",)).items():
        ax.scatter(
            [max(_num(r["resid_excess_mean"]), 1e-7) for r in group],
            [_num(r["speedup_vs_lowrank_loop"]) for r in group],
            label=method[0],
            s=18,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("extra rank-r residual vs the optimal one (clipped at 1e-7)")
    ax.set_ylabel("speed-up over the svd_lowrank loop")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"batched randomized SVD ({rows[0].get('device', '')})", fontsize=10)
    return [save_figure(fig, out / "rsvd.png")]


def plot_kernels(results: Path, out: Path) -> list[Path]:
    rows = _rows(results, "bench_kernels")
    time_column = next((c for c in ("time_ms", "median_ms", "ms") if rows and c in rows[0]), None)
    if not rows or time_column is None:
        return []
    rows = _newest(rows, ("device",))
    labels, values, colors = [], [], []
    for r in rows:
        labels.append(" ".join(str(r.get(c, "")) for c in ("op", "shape", "mode", "provider") if r.get(c)))
        values.append(_num(r[time_column]))
        colors.append("tab:red" if r.get("provider") == "ours" else "tab:blue")
    fig, ax = plt.subplots(figsize=(8, max(3, 0.18 * len(rows))))
    ax.barh(range(len(rows)), values, color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(f"{time_column} (red: ours)")
    ax.set_title(f"kernels ({rows[0].get('device', '')}, git {rows[0].get('git_sha', '')})", fontsize=10)
    return [save_figure(fig, out / "bench_kernels.png")]


def _group(rows, key: tuple[str, ...]) -> dict[tuple[str, ...], list[dict[str, str]]]:
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(c, "") for c in key)].append(r)
    return dict(groups)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")[:60]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--out", type=Path, default=None, help="where the PNGs go (default: --results)")
    args = parser.parse_args(argv)
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    written = plot_profile(args.results, out) + plot_rsvd(args.results, out) + plot_kernels(args.results, out)
    for path in written:
        print(path)
    if not written:
        print(f"no benchmark rows under {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
