"""Plots of a run and of a sweep (matplotlib, headless). Imported lazily: matplotlib is an optional extra."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig, path: Path, **layout) -> Path:
    """Lay out, write (110 dpi) and close ``fig``; ``layout`` goes to ``tight_layout`` (unless the figure has its
    own layout engine, e.g. ``layout="constrained"``). Returns ``path``."""
    if fig.get_layout_engine() is None:
        fig.tight_layout(**layout)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def heatmap(acc: np.ndarray, tasks: Sequence[str], title: str, path: Path) -> None:
    """T x T accuracy heatmap: row j = after training task j, column i = evaluated on task i."""
    a = np.asarray(acc) * 100
    T = len(tasks)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * T, 0.8 + 0.65 * T))
    im = ax.imshow(a, vmin=0, vmax=100, cmap="viridis")
    for j in range(a.shape[0]):
        for i in range(a.shape[1]):
            ax.text(
                i, j, f"{a[j, i]:.0f}", ha="center", va="center", fontsize=8, color="white" if a[j, i] < 60 else "black"
            )
    ax.set_xticks(range(T), tasks, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(a.shape[0]), [f"after {t}" for t in tasks[: a.shape[0]]], fontsize=8)
    ax.set_xlabel("evaluated on")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(fig, path)


def accuracy_over_steps(
    matrices: Mapping[str, np.ndarray], zero_shot: Sequence[float], tasks: Sequence[str], path: Path
) -> None:
    """One panel per task: its accuracy at step 0 (zero-shot) and after each training step, one line per method."""
    T = len(tasks)
    cols = min(4, T)
    rows = (T + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False, sharex=True)
    steps = np.arange(T + 1)
    for i, task in enumerate(tasks):
        ax = axes[i // cols][i % cols]
        for name, acc in matrices.items():
            series = np.concatenate([[zero_shot[i]], np.asarray(acc)[:, i]]) * 100
            ax.plot(steps[: len(series)], series, marker=".", lw=1.2, label=name)
        ax.axvline(i + 1, color="grey", lw=0.6, ls=":")  # the step that trains this task
        ax.set_title(task, fontsize=9)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    for k in range(T, rows * cols):
        axes[k // cols][k % cols].axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("tasks trained")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle("Accuracy (%) on each task after each training step (dotted: the step that trains it)", fontsize=10)
    save_figure(fig, path, rect=(0, 0.06 + 0.02 * ((len(labels) - 1) // 4), 1, 0.96))


def sweep_metrics(points: Sequence[dict], path: Path) -> None:
    """The validation Transfer / Average / Last against each swept parameter (others at their defaults)."""
    params = sorted({p["param"] for p in points})
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.3), squeeze=False)
    for ax, param in zip(axes[0], params):
        pts = sorted((p for p in points if p["param"] == param), key=lambda p: float(p["value"]))
        xs = [float(p["value"]) for p in pts]
        for key, label in (("val_transfer", "Transfer"), ("val_average", "Average"), ("val_last", "Last")):
            ax.plot(xs, [p.get(key, float("nan")) for p in pts], marker="o", label=label)
        ax.set_xlabel(param)
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def basis_sizes(points: Sequence[dict], tasks: Sequence[str], path: Path) -> None:
    """Protected-basis size (columns of P) per adapted module after each task, one panel per sweep point."""
    pts = [p for p in points if p.get("basis_sizes")]
    if not pts:
        return
    cols = min(3, len(pts))
    rows = (len(pts) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for k, p in enumerate(pts):
        ax = axes[k // cols][k % cols]
        sizes = p["basis_sizes"]  # list over tasks of {module: k}
        modules = sorted(sizes[0], key=_module_order)
        grid = np.array([[s[m] for s in sizes] for m in modules], dtype=float)
        im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=max(1.0, p.get("d_in", grid.max())))
        ax.set_xticks(range(len(sizes)), tasks[: len(sizes)], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(modules)), [_short(m) for m in modules], fontsize=6)
        ax.set_title(f"{p['label']}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, label="basis columns")
    for k in range(len(pts), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle("Protected basis size per module after each task", fontsize=10)
    save_figure(fig, path)


def _module_order(name: str):
    import re

    nums = [int(x) for x in re.findall(r"\d+", name)]
    return (nums, name)


def _short(name: str) -> str:
    return name.replace("encoder.layer.", "L").replace("attention.self.", "").replace("attention.output.dense", "o")


def retention_over_steps(
    curves: Mapping[str, Sequence[float]],
    tasks: Sequence[str],
    path: Path,
    intervals: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    title: str = "Retention: accuracy on never-trained probe tasks",
) -> None:
    """Mean accuracy on the held-out panel after each step (step 0: the zero-shot model), one line per method, in
    [0, 1]; ``intervals[method] = (low, high)`` adds a band (e.g. a 95 % interval over runs; NaNs draw none)."""
    fig, ax = plt.subplots(figsize=(1.8 + 0.7 * len(tasks), 3.8))
    steps = np.arange(len(tasks) + 1)
    for name, curve in curves.items():
        n = len(curve)
        (line,) = ax.plot(steps[:n], np.asarray(curve) * 100, marker="o", markersize=3, label=name)
        low, high = (np.asarray(v, dtype=float) * 100 for v in (intervals or {}).get(name, ([np.nan], [np.nan])))
        if not np.isnan(low).all():
            ax.fill_between(steps[:n], low, high, color=line.get_color(), alpha=0.2)
    ax.set_xticks(steps, ["zero-shot"] + [f"after {t}" for t in tasks], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("held-out panel accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    save_figure(fig, path)


def paired_differences(
    rows: Sequence[Mapping], baseline: str, metrics: Sequence[str], key: Callable[[str], str], path: Path
) -> None:
    """One panel per metric: each method's mean paired difference to ``baseline`` (points, in points of %) with its
    95 % interval (bars); ``key(metric)`` is the column prefix of the differences in ``rows``."""
    others = [r for r in rows if r["method"] != baseline]
    cols = min(3, len(metrics))
    nrows = (len(metrics) + cols - 1) // cols
    height = 0.8 + 0.32 * len(others) * nrows + 0.6 * nrows
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, height), layout="constrained")
    axes = np.atleast_1d(axes).ravel()
    y = np.arange(len(others))
    for ax, metric in zip(axes, metrics):
        k = key(metric)
        mean = np.array([r[f"{k}_mean"] for r in others], dtype=float)
        low = np.array([r[f"{k}_ci_low"] for r in others], dtype=float)
        high = np.array([r[f"{k}_ci_high"] for r in others], dtype=float)
        err = np.vstack([mean - low, high - mean])
        err[np.isnan(err)] = 0.0
        colors = ["tab:green" if lo > 0 else "tab:red" if hi < 0 else "tab:grey" for lo, hi in zip(low, high)]
        for j, color in enumerate(colors):
            ax.errorbar(mean[j], y[j], xerr=err[:, j : j + 1], fmt="o", color=color, ms=4, elinewidth=1.5, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y, [r["method"] for r in others], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"Δ {metric}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[len(metrics) :]:
        ax.axis("off")
    fig.suptitle(f"Paired difference to {baseline} over runs (95 % interval; green/red: excludes 0)", fontsize=10)
    save_figure(fig, path)
