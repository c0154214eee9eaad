"""Loads the compiled ``keeplora_kernels._C`` library if it was built; never fails at import."""

from __future__ import annotations

import functools

_STATUS = "not loaded yet"


@functools.lru_cache(maxsize=None)
def registered_ops() -> frozenset[str]:
    """Names of the ``torch.ops.keeplora`` ops the compiled library provides (empty if it is absent)."""
    global _STATUS
    try:
        from . import _C  # noqa: F401  (registers torch.ops.keeplora.*)
    except ImportError as exc:  # not built (KEEPLORA_BUILD_EXT=0, no compiler) or ABI mismatch
        _STATUS = f"not available: {exc}"
        return frozenset()
    import torch

    names = frozenset(name for name in dir(torch.ops.keeplora) if not name.startswith("_"))
    _STATUS = f"loaded, ops: {sorted(names)}"
    return names


def status() -> str:
    registered_ops()
    return _STATUS
