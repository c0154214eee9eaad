"""Several runs (seeds) of one benchmark config: each method's mean with a 95 % confidence interval, and its paired
difference to one or more baseline methods with a 95 % confidence interval.

    keeplora aggregate runs/drift runs/drift-seed1 ... --baseline lora-ft --baseline keeplora

Each run folder holds the ``results.csv`` that ``keeplora run`` writes; the metrics are its numeric columns (wall
times left out), in the file's order. A method's statistics use the runs that have it (``n``). Folders whose resolved
configs (``config.yaml``) have equal shared settings (all but the name, the methods and the per-method defaults the
methods carry) are one run split over method subsets (``keeplora run --methods``, e.g. two processes for one seed):
their methods are merged, and a method that two of them ran must be defined alike and have equal numbers (runs are
deterministic), else the folders are refused.

Intervals are percentile bootstraps over runs (:data:`RESAMPLES` resamples of the runs with replacement, a fixed
seed, so the output is deterministic). Differences are paired by run: seeds move every method together (the same
splits, order and initialisation per seed), so the per-run difference is what tells two methods apart, not the
overlap of two intervals. With few runs the bootstrap distribution has few distinct values and the interval is
approximate (5 runs allow only 126 distinct resamples, so the 2.5 % and 97.5 % points fall on a coarse grid of
resampled means). Below :data:`MIN_RUNS` runs no interval is given (shown as such, never as zero width, and never in
bold): with 3 runs a resample of three copies of the smallest value already has probability 1/27 > 2.5 %, so the
"interval" is the range of the runs, whatever their spread, and not a 95 % interval. The sample standard deviations
are reported as well.

Runs with a held-out panel also get their drift gates: each run's (:func:`run_gates`, over the methods of all its
folders) and the gate over the runs (:func:`gate_over_runs`, the same thresholds on the means).
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from . import metrics as M
from .runconfig import shared_settings

LEADING = ("transfer", "average", "last")  # listed first when present
NOT_METRICS = {"method", "seed", "seconds", "wall_s"}  # identifiers and wall times: not compared across runs
NOT_METRIC_SUFFIXES = ("_seconds", "_wall_s")
RESAMPLES = 10_000
MIN_RUNS = 4  # fewest runs with an interval narrower than their range (1/n**n < 2.5 % from n = 4)
SEED = 0


def load_results(run_dir: Path) -> dict[str, dict[str, float]]:
    """``{method: {metric: value}}`` from ``<run_dir>/results.csv``, in the run's method order (empty cells left
    out)."""
    path = Path(run_dir) / "results.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"keeplora aggregate: {path} not found (is {run_dir} a finished `keeplora run` folder?)"
        )
    out = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            values = {}
            for key, text in row.items():
                if key is None or not is_metric(key) or text in (None, ""):
                    continue
                try:
                    values[key] = float(text)
                except ValueError:
                    continue
            out[row["method"]] = values
    return out


def _run_config(run_dir: Path) -> tuple[str | None, dict[str, dict]]:
    """The run's shared settings (:func:`~.runconfig.shared_settings`, as text; ``None`` for a folder without
    ``config.yaml``) and the method definitions by name: folders with the same identity are one run. The name only
    labels a config (no random stream derives from it), so a peers config that extends a setting pairs with that
    setting's runs; a method's values are compared in its resolved definition, not in the section defaults."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None, {}
    config = yaml.safe_load(path.read_text()) or {}
    specs = {m["name"]: m for m in config.get("methods") or [] if isinstance(m, dict) and "name" in m}
    return yaml.safe_dump(shared_settings(config), sort_keys=True), specs


def group_runs(run_dirs: Sequence[Path]) -> list[list[Path]]:
    """The folders of each run, in first-seen order: folders with equal shared settings are one run; a method
    defined differently by two of them is refused."""
    groups: dict[object, tuple[list[Path], dict[str, dict]]] = {}
    for i, d in enumerate(run_dirs):
        identity, specs = _run_config(Path(d))
        folders, known_specs = groups.setdefault((None, i) if identity is None else identity, ([], {}))
        for name, spec in specs.items():
            if known_specs.setdefault(name, spec) != spec:
                raise ValueError(
                    f"keeplora aggregate: {folders[0]} and {d} share a config and seed but define method {name!r} "
                    "differently; they cannot be one run"
                )
        if Path(d) not in folders:
            folders.append(Path(d))
    return [folders for folders, _ in groups.values()]


def _merge(folders: Sequence[Path], per_folder: Sequence[dict], what: str) -> dict:
    """``{method: value}`` of one run from its folders; a method two folders ran must have equal values."""
    merged: dict = {}
    for folder, values in zip(folders, per_folder):
        for method, value in values.items():
            if method in merged and merged[method] != value:
                raise ValueError(
                    f"keeplora aggregate: {', '.join(map(str, folders))} are one run (same config and seed) but give "
                    f"different {what} for {method!r} (in {folder})"
                )
            merged[method] = value
    return merged


def load_runs(run_dirs: Sequence[Path]) -> list[dict[str, dict[str, float]]]:
    """One ``{method: {metric: value}}`` per run, merging the folders of one run (see the module docstring)."""
    return [_merge(fs, [load_results(f) for f in fs], "numbers") for fs in group_runs(run_dirs)]


def load_panel_curves(run_dirs: Sequence[Path]) -> tuple[list[dict[str, list[float]]], list[str]]:
    """Per run ``{method: held-out panel accuracy after each step}`` (from ``results.json``; step 0 is the zero-shot
    model), and the run's task names; runs without a panel give ``{}``."""
    runs, tasks = [], []
    for folders in group_runs(run_dirs):
        curves = []
        for f in folders:
            saved = json.loads((f / "results.json").read_text()) if (f / "results.json").is_file() else {}
            curves.append(saved.get("panel_curves") or {})
            tasks = tasks or list(saved.get("tasks") or [])
        runs.append(_merge(folders, curves, "panel curves"))
    return runs, tasks


def run_gates(run_dirs: Sequence[Path]) -> list[dict]:
    """Per run (its folders merged), the drift gate over all its methods: ``{"folders", "gate"}``; runs without
    a held-out panel are left out. A run split over processes has a gate only in the folder with the baselines
    (or none); this one judges the whole run (:func:`metrics.judge_drift`)."""
    out = []
    for folders in group_runs(run_dirs):
        panels, kinds = [], {}
        for f in folders:
            saved = json.loads((f / "results.json").read_text()) if (f / "results.json").is_file() else {}
            if saved.get("zero_shot_panel"):
                panels.append(float(np.mean(saved["zero_shot_panel"])) * 100.0)
            kinds.update({name: spec.get("type") for name, spec in _run_config(f)[1].items()})
        if not panels:
            continue
        if max(panels) - min(panels) > 1e-9:
            raise ValueError(
                f"keeplora aggregate: {', '.join(map(str, folders))} are one run but give different zero-shot panels"
            )
        metrics = _merge(folders, [load_results(f) for f in folders], "numbers")
        out.append({"folders": [str(f) for f in folders], "gate": M.judge_drift(kinds, metrics, panels[0])})
    return out


def gate_over_runs(gates: Sequence[dict]) -> dict:
    """The drift gate of several runs together: the per-run thresholds (:func:`metrics.judge_drift`) applied to the
    means over the runs whose gate was computed (``run_gates``) -- each baseline's panel drop over the runs that have
    it, and LoRA-FT's BWT -- reported with their 95 % intervals. One run's panel mean is an estimate from a few hundred
    probe examples, so a baseline whose mean sits near a threshold passes on some seeds and fails on others; the
    aggregate tables report means over the runs, and this gate says whether those tables can judge protection.
    ``{"passed", "n", "panel_drop": {name: (mean, low, high)}, "lora_ft_bwt": (mean, low, high), "text"}``."""
    judged = [g["gate"] for g in gates if g["gate"].get("passed") is not None]
    if not judged:
        return {"passed": None, "n": 0, "text": "drift gate over runs: not computed (no run has a computed gate)"}

    def stats(values):
        return (statistics.fmean(values), *bootstrap_ci(values))

    per_name: dict[str, list[float]] = {}
    for g in judged:
        for name, drop in g["panel_drop"].items():
            per_name.setdefault(name, []).append(drop)
    drops = {name: stats(values) for name, values in per_name.items()}
    bwt = stats([g["lora_ft_bwt"] for g in judged])
    passed = M.drift_gate_passes([d[0] for d in drops.values()], bwt[0])
    verdict = (
        "PASSED: on average over the runs the unprotected baselines forget and erode, so the aggregate can judge "
        "protection"
        if passed
        else "FAILED: on average over the runs the unprotected baselines do not drift enough, so the aggregate cannot "
        "judge protection"
    )
    detail = (
        "panel drop vs zero-shot: "
        + ", ".join(f"{name} {_interval(*drops[name], signed=True)} (n={len(v)})" for name, v in per_name.items())
        + f" (need a mean <= -{M.GATE_PANEL_DROP:g} for one); LoRA-FT BWT {_interval(*bwt, signed=True)} "
        f"(need a mean <= {M.GATE_BWT:g})"
    )
    return {
        "passed": bool(passed),
        "n": len(judged),
        "panel_drop": drops,
        "lora_ft_bwt": bwt,
        "text": f"drift gate over {len(judged)} runs (means, 95 % intervals) {verdict}; {detail}",
    }


def is_metric(column: str) -> bool:
    return column not in NOT_METRICS and not column.endswith(NOT_METRIC_SUFFIXES)


def metric_names(runs: Sequence[dict[str, dict[str, float]]]) -> list[str]:
    seen = list(dict.fromkeys(k for run in runs for values in run.values() for k in values))
    return [m for m in LEADING if m in seen] + [m for m in seen if m not in LEADING]


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _baselines(baseline: str | Sequence[str] | None) -> list[str]:
    return list(dict.fromkeys([baseline] if isinstance(baseline, str) else (baseline or [])))


def bootstrap_ci(values: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``values`` over resamples with replacement; NaNs for fewer than
    :data:`MIN_RUNS` values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < MIN_RUNS:
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    means = x[idx].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def aggregate(run_dirs: Sequence[Path], baseline: str | Sequence[str] | None = None) -> list[dict]:
    """One row per method: ``n``; per metric ``<m>_mean``, ``<m>_std``, ``<m>_ci_low``, ``<m>_ci_high``; per
    baseline B and metric ``<m>_diff_vs_<slug(B)>_{mean,std,ci_low,ci_high,n}`` of the per-run difference method − B
    over the runs that have both. For a single baseline the differences are also under ``<m>_diff_{mean,std}``."""
    if not run_dirs:
        raise ValueError("keeplora aggregate: give at least one run folder")
    baselines = _baselines(baseline)
    runs = load_runs(run_dirs)
    known = list(dict.fromkeys(m for r in runs for m in r))
    for b in baselines:
        if not any(b in r for r in runs):
            raise ValueError(f"keeplora aggregate: --baseline {b!r} is in none of the runs; methods: {sorted(known)}")
    metrics = metric_names(runs)
    rows = []
    for method in known:
        have = [r for r in runs if method in r]
        row: dict = {"method": method, "n": len(have)}
        for metric in metrics:
            values = [r[method][metric] for r in have if metric in r[method]]
            row[f"{metric}_mean"] = statistics.fmean(values) if values else math.nan
            row[f"{metric}_std"] = _std(values)
            row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = bootstrap_ci(values)
            for b in baselines:
                diffs = [
                    r[method][metric] - r[b][metric] for r in have if b in r and metric in r[method] and metric in r[b]
                ]
                key = f"{metric}_diff_vs_{slug(b)}"
                row[f"{key}_n"] = len(diffs)
                row[f"{key}_mean"] = statistics.fmean(diffs) if diffs else math.nan
                row[f"{key}_std"] = _std(diffs)
                row[f"{key}_ci_low"], row[f"{key}_ci_high"] = bootstrap_ci(diffs)
                if len(baselines) == 1:
                    row[f"{metric}_diff_mean"], row[f"{metric}_diff_std"] = row[f"{key}_mean"], row[f"{key}_std"]
        rows.append(row)
    return rows


def _interval(mean: float, low: float, high: float, signed: bool = False) -> str:
    if math.isnan(mean):
        return "—"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    head = fmt.format(mean)
    if math.isnan(low):
        return head
    return f"{head} [{fmt.format(low)}, {fmt.format(high)}]"


def table_metrics(rows: list[dict]) -> list[str]:
    """The metrics of ``aggregate``'s rows, in their order."""
    means = [k[: -len("_mean")] for k in rows[0] if k.endswith("_mean")] if rows else []
    # a difference column is "<metric>_diff..." of a metric that is itself listed; a metric may contain "_diff"
    return [m for m in means if not any(m == f"{o}_diff" or m.startswith(f"{o}_diff_vs_") for o in means)]


def to_markdown(
    rows: list[dict], baseline: str | Sequence[str] | None = None, metrics: Sequence[str] | None = None
) -> str:
    """Means with their 95 % intervals; per baseline, the paired differences with theirs, in bold when the interval
    excludes 0. ``metrics``: the columns to show (default: all), refused when unknown."""
    baselines = _baselines(baseline)
    known = table_metrics(rows)
    unknown = [m for m in metrics or [] if m not in known]
    if unknown:
        raise ValueError(f"keeplora aggregate: --metrics {unknown} not in the runs; choose from {known}")
    metrics = list(metrics) if metrics else known
    header = ["method", "n"] + [m for m in metrics]
    for b in baselines:
        header += [f"Δ{m} vs {b}" for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * (len(header) - 2)]
    for row in rows:
        cells = [row["method"], str(row["n"])]
        cells += [_interval(row[f"{m}_mean"], row[f"{m}_ci_low"], row[f"{m}_ci_high"]) for m in metrics]
        for b in baselines:
            for m in metrics:
                key = f"{m}_diff_vs_{slug(b)}"
                if row["method"] == b:
                    cells.append("—")
                    continue
                text = _interval(row[f"{key}_mean"], row[f"{key}_ci_low"], row[f"{key}_ci_high"], signed=True)
                excludes_zero = row[f"{key}_ci_low"] > 0 or row[f"{key}_ci_high"] < 0
                cells.append(f"**{text}**" if excludes_zero else text)
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "\n\nMeans over runs with 95 % percentile-bootstrap intervals over runs (paired by run for the differences; "
        "bold: the interval excludes 0)."
    )
    return "\n".join(lines) + note


def write_csv(rows: list[dict], path: Path) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_plots(
    run_dirs: Sequence[Path], rows: list[dict], baseline: str | Sequence[str] | None, out: Path
) -> list[Path]:
    """``retention.png`` (the held-out panel over the steps: mean and 95 % interval over runs, when the runs have a
    panel) and ``differences_vs_<baseline>.png`` per baseline (the test metrics' paired differences); returns the
    files written."""
    from . import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    curves, tasks = load_panel_curves(run_dirs)
    methods = list(dict.fromkeys(m for run in curves for m in run))
    if methods:
        means, intervals = {}, {}
        for m in methods:
            have = np.array([run[m] for run in curves if m in run], dtype=np.float64)
            label = f"{m} (n={len(have)})"
            bounds = [bootstrap_ci(have[:, step]) for step in range(have.shape[1])]
            means[label] = have.mean(0)
            intervals[label] = ([lo for lo, _ in bounds], [hi for _, hi in bounds])
        title = "Retention over runs: mean and 95 % bootstrap interval"
        plots.retention_over_steps(means, tasks, out / "retention.png", intervals, title)
        written.append(out / "retention.png")
    metrics = [m for m in table_metrics(rows) if not m.startswith("val_")]
    for b in _baselines(baseline):
        path = out / f"differences_vs_{slug(b)}.png"
        plots.paired_differences(rows, b, metrics, lambda m, b=b: f"{m}_diff_vs_{slug(b)}", path)
        written.append(path)
    return written
