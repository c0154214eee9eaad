"""Loads the compiled ``keeplora_kernels._C`` library if it was built; never fails at import.

Importing ``_C`` runs the library's static initialisers, which register the ``torch.ops.keeplora.*`` ops. Which
ops exist is asked from the library itself (``_C.registered_ops()``; ``dir(torch.ops.keeplora)`` does not list
ops reliably), and which devices each op supports from the dispatcher (a CPU-only build registers no CUDA
kernels). Nothing here touches CUDA.
"""

from __future__ import annotations

import functools

_STATUS = "not loaded yet"
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@functools.cache
def library():
    """The ``_C`` module, or None when it is not built or fails to load."""
    global _STATUS
    try:
        from . import _C
    except ImportError as exc:  # not built (KEEPLORA_BUILD_EXT=0, no compiler) or ABI mismatch
        _STATUS = f"not available: {exc}"
        return None
    _STATUS = "loaded"
    return _C


def _has_kernel(name: str, dispatch_key: str) -> bool:
    import torch

    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"keeplora::{name}", dispatch_key))


@functools.cache
def registered_ops(device_type: str | None = None) -> frozenset[str]:
    """Names of the ``torch.ops.keeplora`` ops the compiled library provides (empty if it is absent).

    With ``device_type`` ("cpu", "cuda"), only the ops with a kernel for that device.
    """
    lib = library()
    if lib is None:
        return frozenset()
    names = list(lib.registered_ops())
    if device_type is None:
        keys = list(_DISPATCH_KEYS.values())
    elif device_type in _DISPATCH_KEYS:
        keys = [_DISPATCH_KEYS[device_type]]
    else:
        return frozenset()
    return frozenset(n for n in names if any(_has_kernel(n, k) for k in keys))


def status() -> str:
    lib = library()
    if lib is None:
        return _STATUS
    return (
        f"loaded from {lib.__file__}; CPU ops: {sorted(registered_ops('cpu'))}; "
        f"CUDA ops: {sorted(registered_ops('cuda'))} (built with CUDA: {lib.built_with_cuda()})"
    )
