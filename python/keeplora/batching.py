"""Memory-bounded batches of same-shaped matrices for the batched linear algebra (SVDs, eigendecompositions).

Batching every target of one shape into a single call is what makes the randomized SVD and the eigen step fast, but
the batch's temporaries grow with it (a Llama-7B's 128 attention matrices of 4096² are 8.6 GB per fp32 copy). Each
batch is therefore cut so that one fp32/fp64 copy of it stays under ``KEEPLORA_BATCH_BYTES`` (default 512 MiB).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

DEFAULT_BATCH_BYTES = 512 * 2**20


def batch_bytes() -> int:
    value = os.environ.get("KEEPLORA_BATCH_BYTES")
    if value is None:
        return DEFAULT_BATCH_BYTES
    try:
        parsed = int(value)
    except ValueError:
        parsed = 0
    if parsed <= 0:
        raise ValueError(f"KEEPLORA_BATCH_BYTES must be a positive integer (bytes), got {value!r}")
    return parsed


def bounded_batches(items: Sequence[T], bytes_per_item: int) -> Iterator[list[T]]:
    """Consecutive slices of ``items`` whose total size stays under the budget (at least one item each)."""
    per_batch = max(1, batch_bytes() // max(1, bytes_per_item))
    for start in range(0, len(items), per_batch):
        yield list(items[start : start + per_batch])
