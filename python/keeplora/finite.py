"""Finiteness checks for the statistics and results KeepLoRA writes into the continual state.

Each tensor costs one reduction (``aminmax``: both ends are NaN when any element is, ±inf when one is; no temporary of
the tensor's size) and a whole check costs one host sync, however many layers it covers. Under ``torch.distributed``
the flags can be summed over the ranks, so that every rank names the same layers and raises together.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import distributed


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on ``t``'s device: whether every element of ``t`` is finite (no host sync)."""
    t = distributed.local_tensor(t.detach())
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    if not t.is_floating_point():
        return torch.ones((), dtype=torch.bool, device=t.device)
    return torch.isfinite(torch.stack(torch.aminmax(t))).all()


def failed(flags: Mapping[str, torch.Tensor], *, across_ranks: bool = False) -> list[str]:
    """The names whose flag (a 0-dim bool tensor, True = fine) is False, with one host sync.

    ``across_ranks``: a name fails when it failed on any rank (the flags are summed with one all-reduce; every rank
    must call this at the same step). Leave it off for values every rank holds identically (reduced sums, values
    synced from rank 0): every rank then decides alike without communicating.
    """
    if not flags:
        return []
    names = list(flags)
    device = flags[names[0]].device
    bad = torch.stack([~flags[n].to(device) for n in names]).to(torch.int32)
    if across_ranks:
        distributed.all_reduce_sum([bad])
    return [name for name, count in zip(names, bad.tolist()) if count]


def nonfinite(tensors: Mapping[str, torch.Tensor], *, across_ranks: bool = False) -> list[str]:
    """The names of the tensors holding a NaN or an infinity (one reduction each, one host sync in all)."""
    return failed({name: all_finite(t) for name, t in tensors.items()}, across_ranks=across_ranks)


__all__ = ["all_finite", "failed", "nonfinite"]
