"""KeepLoRA across the ranks of ``torch.distributed``: every collective and every sharded-tensor access in one place.

KeepLoRA's statistics are sums over data, so data parallelism is exact. Each rank accumulates over its own batches;
a pass ends with

1. one status exchange (:func:`failures_shared`: each rank's error text, or None, gathered by every rank) so that
   a rank that failed makes every rank raise instead of leaving the others waiting in the next collective;
2. one all-reduce per accumulator bucket (:func:`all_reduce_sum`: sums and counts, divided by the global counts
   afterwards, never averages of averages).

Everything derived from the reduced sums (the principal subspaces, A, B, the grown bases) is computed on every rank
and then replaced by rank 0's copy (:func:`sync_from_rank0`, one broadcast per bucket), so all ranks hold
bit-identical state even where linear-algebra libraries round differently on different machines.

Data parallelism with DDP: KeepLoRA works on the bare module (``DistributedDataParallel.module``); its passes never
call the wrapper. FSDP2 (``torch.distributed.fsdp.fully_shard``): target weights and adapters are DTensors sharded on
dim 0 outside forward (plain tensors inside it, so the passes' hooks see plain tensors); KeepLoRA reads a full
tensor with :func:`full_tensor` where it needs one and writes full values shard-correctly with
:func:`copy_full_` / :func:`add_full_`.

The status exchange runs on its own gloo process group whose timeout is twice the default group's: a rank blocked
in a collective of the model (an FSDP all-gather whose peer failed) reaches the exchange after the default group's
timeout and still finds the failed rank waiting there. Every rank of the default group is a data-parallel replica
(tensor parallelism is not supported).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
from torch import distributed as dist
from torch import nn

# Largest flat buffer (bytes) packed for one all-reduce or broadcast; a single larger tensor goes on its own.
BUCKET_BYTES = 256 << 20


class RankFailedError(RuntimeError):
    """Raised on every rank that did not fail itself when another rank failed in the same KeepLoRA step."""


# ----------------------------------------------------------------------------------------------- ranks
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ----------------------------------------------------------------------------------------------- status exchange
_status: list[Any] = [None, None]  # [the default group it was made for, the status group]


def _default_timeout() -> timedelta:
    group = dist.distributed_c10d._get_default_group()
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except Exception:  # noqa: BLE001 - backend without options, or no backend for this device
            continue
    return dist.distributed_c10d.default_pg_timeout


def _status_group():
    """A gloo group for the status exchange, created once per default group (a collective call on every rank)."""
    default = dist.distributed_c10d._get_default_group()
    if _status[0] is not default:
        _status[:] = [default, dist.new_group(backend="gloo", timeout=2 * _default_timeout())]
    return _status[1]


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, …]`` on every rank (picklable, small objects); ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_status_group())
    return out


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def failures_shared(what: str) -> Iterator[None]:
    """Run a step's local work; afterwards every rank knows whether any rank failed in it (one collective).

    In one process this does nothing. Under ``torch.distributed`` every rank must enter and leave the block at the
    same step. When exactly one rank's block raised, that rank re-raises its own exception (with a note naming the
    rank) and the others raise :class:`RankFailedError` naming it and its error; when several failed (e.g. a rank
    whose collective timed out because its peer had failed), all raise :class:`RankFailedError` listing every
    failed rank's error. Put it before the step's data collectives, so that no rank waits in one for a rank that
    failed.
    """
    if not is_distributed():
        yield
        return
    me, size = dist.get_rank(), dist.get_world_size()
    try:
        yield
    except Exception as error:
        try:
            statuses = all_gather_objects(_describe(error))
        except Exception as exchange_error:  # noqa: BLE001 - the original error is the one to show
            _add_note(
                error,
                f"[keeplora] rank {me} of {size} failed in the {what}, and the other ranks did not "
                f"answer the status exchange: {exchange_error}",
            )
            statuses = None
        if statuses is not None:
            failed = [(r, text) for r, text in enumerate(statuses) if text is not None]
            if len(failed) > 1:
                raise RankFailedError(_summary(what, failed, size, me)) from error
            _add_note(
                error, f"[keeplora] rank {me} of {size} failed in the {what}; the other ranks raise RankFailedError"
            )
        raise
    statuses = all_gather_objects(None)
    failed = [(r, text) for r, text in enumerate(statuses) if text is not None]
    if failed:
        raise RankFailedError(_summary(what, failed, size, me))


def _summary(what: str, failed: list[tuple[int, str]], size: int, me: int) -> str:
    ranks = ", ".join(str(r) for r, _ in failed)
    detail = "; ".join(f"rank {r}: {text}" for r, text in failed)
    return (
        f"the {what} failed on rank{'s' if len(failed) > 1 else ''} {ranks} of {size} ({detail}); "
        f"nothing was changed on rank {me}"
    )


def _add_note(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note"):  # Python ≥ 3.11
        error.add_note(note)


# ----------------------------------------------------------------------------------------------- data collectives
def _buckets(tensors: Sequence[torch.Tensor], limit: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive groups of tensors with one dtype and device, at most ``limit`` bytes each (or one tensor)."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in group:
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > limit:
                yield bucket
                bucket, size = [], 0
            bucket.append(t)
            size += nbytes
        if bucket:
            yield bucket


def all_reduce_sum(tensors: Sequence[torch.Tensor], *, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum accumulators over the ranks in place (no-op in one process).

    Tensors of one dtype and device are packed into flat buffers of at most ``bucket_bytes`` (one all-reduce
    each); an accumulator larger than that is reduced in place on its own.
    """
    if not is_distributed():
        return
    for bucket in _buckets(tensors, bucket_bytes):
        if len(bucket) == 1 and bucket[0].is_contiguous():
            dist.all_reduce(bucket[0], op=dist.ReduceOp.SUM)
            continue
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def sync_from_rank0(tensors: Sequence[torch.Tensor], *, bucket_bytes: int = BUCKET_BYTES) -> list[torch.Tensor]:
    """Rank 0's tensors on every rank: one broadcast of the shapes, then one per bucket of values.

    Every rank passes the same number of tensors with the same dtypes and numbers of dimensions; shapes may differ
    (rank 0's win). Returns the tensors in order: on rank 0 (and in one process) the inputs themselves; on the other
    ranks an input whose shape is rank 0's and that is contiguous receives rank 0's values in place, any other is
    replaced by a new tensor. Values are packed like :func:`all_reduce_sum`'s (one dtype and device per buffer of
    at most ``bucket_bytes``; a larger tensor is broadcast on its own).
    """
    tensors = list(tensors)
    if not is_distributed() or not tensors:
        return tensors
    me = dist.get_rank()
    shapes = torch.tensor([s for t in tensors for s in t.shape], dtype=torch.int64, device=tensors[0].device)
    dist.broadcast(shapes, src=0)
    dims = shapes.tolist()
    out, offset = [], 0
    for t in tensors:
        shape = tuple(dims[offset : offset + t.dim()])
        offset += t.dim()
        out.append(t if me == 0 or (tuple(t.shape) == shape and t.is_contiguous()) else t.new_empty(shape))
    for bucket in _buckets(out, bucket_bytes):
        if len(bucket) == 1:
            dist.broadcast(bucket[0], src=0)
            continue
        if me == 0:
            flat = torch.cat([t.reshape(-1) for t in bucket])
        else:
            flat = bucket[0].new_empty(sum(t.numel() for t in bucket))
        dist.broadcast(flat, src=0)
        if me != 0:
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
    return out


# ----------------------------------------------------------------------------------------------- sharded tensors
def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly sharded) tensor: a DTensor is gathered (a collective), others returned."""
    return t.full_tensor() if is_sharded(t) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank stores (its rows of an FSDP2 parameter), as a plain tensor view."""
    return t.to_local() if is_sharded(t) else t


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of the full value ``full`` that this rank stores of ``like`` (``full`` when ``like`` is plain).

    Every rank holds the same ``full``, so the rank's shard is sliced locally (no communication).
    """
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.detach(), like.device_mesh, like.placements, src_data_rank=None).to_local()


def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """``param ← full`` (a full value held by every rank), written to this rank's shard only."""
    local = local_tensor(param)
    local.copy_(local_part(full.to(device=local.device), param))


def add_full_(param: torch.Tensor, delta: torch.Tensor) -> None:
    """``param += delta`` (a full value held by every rank) in fp32, rounded once to the parameter's dtype."""
    local = local_tensor(param)
    part = local_part(delta.to(device=local.device), param)
    local.copy_((local.float() + part.float()).to(local.dtype))


# ----------------------------------------------------------------------------------------------- wrappers
def _data_parallel_types() -> tuple[type, ...]:
    return (nn.parallel.DistributedDataParallel, nn.DataParallel)


def unwrap_data_parallel(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (the model itself otherwise)."""
    while isinstance(model, _data_parallel_types()):
        model = model.module
    return model


def check_wrapping(model: nn.Module, bare: nn.Module, targets: dict[str, nn.Module], adapter: str) -> None:
    """Refuse a model wrapped in DDP or sharded by FSDP2 before KeepLoRA put its adapters on it.

    DDP registers the parameters it averages when it is built, and FSDP2 shards the parameters that exist when
    ``fully_shard`` runs: adapters added afterwards would silently train per rank. A wrapped model is accepted when
    its targets already carry the adapter (e.g. :meth:`KeepLoRA.load` into a wrapped model). ``DataParallel``
    replicates the module at every forward, so adapters added later are included. ``targets`` maps target names to
    their modules in ``bare``.
    """
    from peft.tuners.lora.layer import LoraLayer

    wrapper = type(model).__name__ if isinstance(model, nn.parallel.DistributedDataParallel) else None
    for name, module in targets.items():
        has_adapter = isinstance(module, LoraLayer) and adapter in module.lora_A
        base = module.get_base_layer() if isinstance(module, LoraLayer) else module
        if wrapper is not None and not has_adapter:
            raise ValueError(
                f"KeepLoRA got a model wrapped in {wrapper} whose target {name!r} has no adapter "
                f"{adapter!r} yet: construct KeepLoRA on the bare model first, then wrap it (the "
                "wrapper only synchronises the parameters that existed when it was built)"
            )
        if is_sharded(base.weight) and not (has_adapter and is_sharded(module.lora_A[adapter].weight)):
            raise ValueError(
                f"target {name!r} is already sharded by FSDP (fully_shard): construct KeepLoRA on the "
                "unsharded model first, then apply fully_shard (its adapters must be sharded too)"
            )


# ----------------------------------------------------------------------------------------------- memory
def memory_report(model: nn.Module, device: torch.device) -> dict[str, int]:
    """This rank's memory: the parameter bytes it holds (its shards under FSDP) and, on CUDA, the peak allocated."""
    held = sum(local_tensor(p).numel() * p.element_size() for p in model.parameters())
    report = {"rank": rank(), "parameter_bytes": int(held)}
    if device.type == "cuda":
        report["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return report


__all__ = [
    "RankFailedError",
    "add_full_",
    "all_gather_objects",
    "all_reduce_sum",
    "check_wrapping",
    "copy_full_",
    "failures_shared",
    "full_tensor",
    "is_distributed",
    "is_sharded",
    "local_part",
    "local_tensor",
    "memory_report",
    "rank",
    "sync_from_rank0",
    "unwrap_data_parallel",
    "world_size",
]
