"""MTIL metrics (ZSCL's protocol, as the KeepLoRA authors' ``cal_MTIL_metrics``).

``acc[j, i]`` = accuracy on task i's test set after training step j (T x T, tasks in training order).

* Transfer = mean over i >= 2 (1-based) of ``mean_{j < i} acc[j, i]``: accuracy on tasks before they are trained.
* Average  = mean over i of ``mean_j acc[j, i]``: every task at every step.
* Last     = mean over i of ``acc[T-1, i]``: every task after the whole sequence.

Inputs are fractions or percentages; the functions do not rescale. Reported to one decimal in percent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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


def summarize(acc) -> dict[str, float]:
    """Transfer / Average / Last in percent (input in [0, 1]), rounded to one decimal."""
    a = _matrix(acc) * 100.0
    return {"transfer": round(transfer(a), 1), "average": round(average(a), 1), "last": round(last(a), 1)}


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
