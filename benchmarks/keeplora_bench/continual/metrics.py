"""MTIL metrics (ZSCL's protocol, as the KeepLoRA authors' ``cal_MTIL_metrics``).

``acc[j, i]`` = accuracy on task i's test set after training step j (T x T, tasks in training order).

* Transfer = mean over i >= 2 (1-based) of ``mean_{j < i} acc[j, i]``: accuracy on tasks before they are trained.
* Average  = mean over i of ``mean_j acc[j, i]``: every task at every step.
* Last     = mean over i of ``acc[T-1, i]``: every task after the whole sequence.

Forgetting and zero-shot erosion (the drift setting's metrics):

* BWT (backward transfer, GEM's) = mean over i < T of ``acc[T-1, i] - acc[i, i]``: what the later tasks did to a
  task's accuracy right after it was learned (negative = forgetting).
* FWT (forward transfer) = mean over i >= 2 of ``acc[i-1, i] - zero_shot[i]``: what the earlier tasks did to a task
  before it is trained, against the untouched model (GEM measures against a random-init model; the zero-shot model
  is the reference that matters here).
* Retention = mean accuracy on the held-out panel (probe tasks that no method trains) after the last step; its
  curve over the steps starts at the zero-shot panel mean.

Inputs are fractions or percentages; the functions do not rescale. Reported to one decimal in percent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

GATE_PANEL_DROP = 5.0  # points below zero-shot on the panel that full FT or LoRA-FT must lose
GATE_BWT = -3.0  # LoRA-FT's backward transfer must be at most this


def _matrix(acc) -> np.ndarray:
    a = np.asarray(acc, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square T x T with T >= 1, got shape {a.shape}")
    return a


def transfer(acc) -> float:
    a = _matrix(acc)
    if a.shape[0] < 2:
        return float("nan")
    return float(np.mean([a[:i, i].mean() for i in range(1, a.shape[0])]))


def average(acc) -> float:
    a = _matrix(acc)
    return float(a.mean(axis=0).mean())


def last(acc) -> float:
    a = _matrix(acc)
    return float(a[-1].mean())


def bwt(acc) -> float:
    a = _matrix(acc)
    if a.shape[0] < 2:
        return float("nan")
    return float(np.mean([a[-1, i] - a[i, i] for i in range(a.shape[0] - 1)]))


def fwt(acc, zero_shot: Sequence[float]) -> float:
    a = _matrix(acc)
    z = np.asarray(zero_shot, dtype=np.float64)
    if z.shape != (a.shape[0],):
        raise ValueError(f"zero_shot must have one accuracy per task ({a.shape[0]}), got shape {z.shape}")
    if a.shape[0] < 2:
        return float("nan")
    return float(np.mean([a[i - 1, i] - z[i] for i in range(1, a.shape[0])]))


def panel_curve(panel_rows) -> list[float]:
    """Mean panel accuracy at each step: ``panel_rows[j]`` = accuracy on every probe after step j (row 0 may be
    the zero-shot model)."""
    rows = np.asarray(panel_rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise ValueError(f"panel rows must be steps x probes with at least one probe, got shape {rows.shape}")
    return [float(r.mean()) for r in rows]


def summarize(acc, zero_shot: Sequence[float] | None = None, panel_rows=None) -> dict[str, float]:
    """Transfer / Average / Last (and, given the zero-shot row, BWT and FWT; given the panel rows after each step,
    Retention) in percent (input in [0, 1]), rounded to one decimal."""
    a = _matrix(acc) * 100.0
    out = {"transfer": round(transfer(a), 1), "average": round(average(a), 1), "last": round(last(a), 1)}
    if zero_shot is not None:
        out["bwt"] = round(bwt(a), 1)
        out["fwt"] = round(fwt(a, np.asarray(zero_shot, dtype=np.float64) * 100.0), 1)
    if panel_rows is not None and len(panel_rows):
        out["retention"] = round(panel_curve(panel_rows)[-1] * 100.0, 1)
    return out


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub markdown table from dict rows; ``columns`` = [(key, header)]."""

    def fmt(v):
        if isinstance(v, float):
            return "—" if v != v else f"{v:.1f}"
        return str(v)

    out = [
        "| " + " | ".join(h for _, h in columns) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|",
    ]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(k, "")) for k, _ in columns) + " |")
    return "\n".join(out)


def drift_gate_passes(panel_drops: Sequence[float], lora_ft_bwt: float) -> bool:
    """The gate's rule, for one run or for means over runs: one unprotected baseline lost at least
    ``GATE_PANEL_DROP`` points on the panel and LoRA-FT's BWT is at most ``GATE_BWT``."""
    return min(panel_drops) <= -GATE_PANEL_DROP and lora_ft_bwt <= GATE_BWT


def judge_drift(kinds: dict[str, str], metrics: dict[str, dict], zero_panel: float) -> dict:
    """The drift gate from a run's methods (``{name: type}``), their metrics (``retention``, ``bwt``) and the
    zero-shot model's panel mean (%): what the runner writes and ``keeplora aggregate`` recomputes for a
    run whose methods were split over several processes."""
    drops = {
        name: metrics[name]["retention"] - zero_panel
        for name, kind in kinds.items()
        if kind in ("full_ft", "lora_ft") and "retention" in metrics.get(name, {})
    }
    lora = [name for name, kind in kinds.items() if kind == "lora_ft" and "bwt" in metrics.get(name, {})]
    if not drops or not lora:
        return {
            "passed": None,
            "text": "drift gate: not computed (needs a full_ft or lora_ft method with the panel, and a lora_ft method)",
        }
    bwt = min(metrics[name]["bwt"] for name in lora)
    passed = bool(drift_gate_passes(list(drops.values()), bwt))
    detail = (
        f"panel drop vs zero-shot ({zero_panel:.1f}): "
        + ", ".join(f"{name} {d:+.1f}" for name, d in drops.items())
        + f" (need <= -{GATE_PANEL_DROP:g} for one); LoRA-FT BWT {bwt:+.1f} (need <= {GATE_BWT:g})"
    )
    verdict = (
        "PASSED: the unprotected baselines forget and erode, so this run can judge protection"
        if passed
        else "FAILED: the unprotected baselines do not drift enough here, so this run cannot judge protection"
    )
    return {
        "passed": passed,
        "zero_shot_panel": round(zero_panel, 1),
        "panel_drop": {k: round(v, 1) for k, v in drops.items()},
        "lora_ft_bwt": bwt,
        "text": f"drift gate {verdict}; {detail}",
    }
