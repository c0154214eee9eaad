"""Mean ± standard deviation of Transfer / Average / Last over several runs (seeds) of one benchmark config.

    keeplora aggregate runs/default runs/default-seed1 runs/default-seed2 --baseline lora-ft

Each run folder holds the ``results.csv`` that ``keeplora run`` writes. A method's statistics use the runs that have
it (``n``); the sample standard deviation needs two. With ``--baseline`` every method also gets its per-run
difference to the baseline method, averaged: seeds move every method together (same splits, same order), so the
paired difference is what tells a method from the baseline, not the overlap of two ± ranges.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

METRICS = ("transfer", "average", "last")


def load_results(run_dir: Path) -> dict[str, dict[str, float]]:
    """``{method: {metric: value}}`` from ``<run_dir>/results.csv``, in the run's method order."""
    path = Path(run_dir) / "results.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"keeplora aggregate: {path} not found (is {run_dir} a finished `keeplora run` folder?)"
        )
    with path.open(newline="") as f:
        return {row["method"]: {m: float(row[m]) for m in METRICS} for row in csv.DictReader(f)}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def aggregate(run_dirs: Sequence[Path], baseline: str | None = None) -> list[dict]:
    """One row per method: ``n``, ``<metric>_mean``, ``<metric>_std`` and, with ``baseline``, ``<metric>_diff_mean``
    / ``<metric>_diff_std`` of the per-run difference (method − baseline) over the runs that have both."""
    if not run_dirs:
        raise ValueError("keeplora aggregate: give at least one run folder")
    runs = [load_results(Path(d)) for d in run_dirs]
    if baseline is not None and not any(baseline in r for r in runs):
        known = sorted({m for r in runs for m in r})
        raise ValueError(f"keeplora aggregate: --baseline {baseline!r} is in none of the runs; methods: {known}")
    methods = list(dict.fromkeys(m for r in runs for m in r))
    rows = []
    for method in methods:
        have = [r for r in runs if method in r]
        row: dict = {"method": method, "n": len(have)}
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r[method][metric] for r in have])
            if baseline is not None:
                diffs = [r[method][metric] - r[baseline][metric] for r in have if baseline in r]
                row[f"{metric}_diff_mean"], row[f"{metric}_diff_std"] = _mean_std(diffs) if diffs else (math.nan,) * 2
        rows.append(row)
    return rows


def _pm(mean: float, std: float, signed: bool = False) -> str:
    head = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return head if math.isnan(std) else f"{head} ± {std:.1f}"


def to_markdown(rows: list[dict], baseline: str | None = None) -> str:
    header = ["method", "n"] + [m.capitalize() for m in METRICS]
    if baseline is not None:
        header += [f"Δ{m.capitalize()} vs {baseline}" for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * (len(header) - 2)]
    for row in rows:
        cells = [row["method"], str(row["n"])] + [_pm(row[f"{m}_mean"], row[f"{m}_std"]) for m in METRICS]
        if baseline is not None:
            cells += [
                "—" if row["method"] == baseline else _pm(row[f"{m}_diff_mean"], row[f"{m}_diff_std"], True)
                for m in METRICS
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
