"""The continual state: what a KeepLoRA run carries from task to task besides the model's own tensors.

The model holds the target weights (every finished task merged in) and, during a task, the adapter's A and B.
:class:`ContinualState` holds everything else: the protected bases, the task counter, the history, the record of the
task in progress, B at task start, and the fingerprint of the pre-trained weights the run started from.
:class:`keeplora.KeepLoRA` owns one (``kl.state``) and :mod:`keeplora.checkpoint` writes and reads it; neither
module reaches into the other.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import distributed


@dataclass
class ContinualState:
    """The continual state of one run (see the module docstring for what lives in the model instead).

    Attributes:
        bases: ``{target: P}``, the unified protected basis of every target (``d_in × k``, orthonormal columns).
        initial_fingerprint: :func:`fingerprint` of the pre-trained target weights (before any task was merged).
        tasks_done: number of finished tasks.
        in_task: whether a task has begun and not ended (the model's adapters then hold its A and B).
        history: one dict per finished task (basis sizes, adapter ranks, token counts, timings, memory).
        task_record: what ``begin_task`` recorded about the task in progress (between tasks: about the last one,
            empty before the first); ``end_task`` completes it into the task's history entry.
        b_start: ``{target: B}`` at the start of the task in progress (``d_out × r``, the adapter's dtype); empty
            between tasks. The task's own change is ``B − B_start``.
    """

    bases: dict[str, torch.Tensor]
    initial_fingerprint: dict[str, list[float]]
    tasks_done: int = 0
    in_task: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    task_record: dict[str, Any] = field(default_factory=dict)
    b_start: dict[str, torch.Tensor] = field(default_factory=dict)

    def basis_sizes(self) -> dict[str, int]:
        """``{target: k}``: the number of protected directions of every target."""
        return {name: int(p.shape[1]) for name, p in self.bases.items()}

    def check(self, shapes: Mapping[str, tuple[int, int]], r: int) -> None:
        """Raise ``ValueError`` unless this state fits targets ``{name: (d_out, d_in)}`` with adapter rank ``r``:
        the same targets, a ``d_in × k`` basis (``k ≤ d_in``) for each, and ``B_start`` (``d_out × r``) for each
        exactly when a task is in progress."""
        if sorted(self.bases) != sorted(shapes):
            raise ValueError(
                f"state.bases covers targets {sorted(self.bases)[:4]} ({len(self.bases)}), but the "
                f"model's targets are {sorted(shapes)[:4]} ({len(shapes)})"
            )
        for name, (_, d_in) in shapes.items():
            p = self.bases[name]
            if p.dim() != 2 or p.shape[0] != d_in or p.shape[1] > d_in or not p.is_floating_point():
                raise ValueError(
                    f"state.bases[{name!r}] must be a floating-point d_in × k tensor with d_in = {d_in} "
                    f"and k ≤ {d_in}, got {p.dtype} of shape {tuple(p.shape)}"
                )
        if not self.in_task:
            if self.b_start:
                raise ValueError(
                    "state.b_start must be empty when state.in_task is False (B at task start only "
                    "exists during a task)"
                )
            return
        if sorted(self.b_start) != sorted(shapes):
            raise ValueError(
                f"state.in_task is True, so state.b_start needs every target; it covers "
                f"{sorted(self.b_start)[:4]} ({len(self.b_start)} of {len(shapes)})"
            )
        for name, (d_out, _) in shapes.items():
            b = self.b_start[name]
            if tuple(b.shape) != (d_out, r) or not b.is_floating_point():
                raise ValueError(
                    f"state.b_start[{name!r}] must be a floating-point tensor of shape {(d_out, r)} "
                    f"(d_out, r), got {b.dtype} of shape {tuple(b.shape)}"
                )

    def to(
        self, device: torch.device, stats_dtype: torch.dtype, b_dtypes: Mapping[str, torch.dtype] | None = None
    ) -> ContinualState:
        """A copy (new containers; tensors already in place are shared, never written in place) with the bases on
        ``device`` in ``stats_dtype`` and each ``B_start`` on ``device`` in ``b_dtypes[target]`` (its own dtype
        when not given)."""
        b_dtypes = b_dtypes or {}
        return dataclasses.replace(
            self,
            bases={n: p.to(device=device, dtype=stats_dtype) for n, p in self.bases.items()},
            initial_fingerprint={n: list(v) for n, v in self.initial_fingerprint.items()},
            history=list(self.history),
            task_record=dict(self.task_record),
            b_start={n: b.to(device=device, dtype=b_dtypes.get(n, b.dtype)) for n, b in self.b_start.items()},
        )


def fingerprint(weights: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per target ``[Σw, Σw²]`` of the weight in fp64: identifies a model's weights without storing them.

    A sharded (FSDP2) weight is summed over its shards without being gathered."""
    out = {}
    for name, weight in weights.items():
        w = weight.detach().double()
        out[name] = [float(distributed.full_tensor(w.sum())), float(distributed.full_tensor(w.square().sum()))]
    return out


def same_fingerprint(a: Mapping[str, list[float]], b: Mapping[str, list[float]]) -> bool:
    """Whether two fingerprints name the same targets with sums equal up to fp rounding."""
    if a.keys() != b.keys():
        return False
    return all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6) for n in a for x, y in zip(a[n], b[n]))


__all__ = ["ContinualState", "fingerprint", "same_fingerprint"]
