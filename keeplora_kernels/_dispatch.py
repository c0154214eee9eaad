"""The one place that decides which implementation runs each op.

Order of preference for ``KEEPLORA_BACKEND=auto`` (the default): the compiled extension when it is loaded and
implements the op for the tensor's device, then Triton for CUDA tensors, then the pure-PyTorch reference.
``KEEPLORA_BACKEND=reference|triton|extension`` forces that path for every op that has it (and raises if it cannot
run, e.g. triton on a CPU tensor without ``TRITON_INTERPRET=1``); ops without it keep the automatic choice, so the
whole engine runs under a forced backend. Tests use ``triton`` on CPU together with ``TRITON_INTERPRET=1``. Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Callable, Optional

import torch

BACKENDS = ("reference", "triton", "extension")
_ENV = "KEEPLORA_BACKEND"

# op -> {backend: "module:function"} for every non-reference implementation. The reference lives next to each
# op's public function and is always available. Modules are imported on first use (importing triton is slow).
_TABLE: dict[str, dict[str, str]] = {
    "lora_linear": {"triton": ".triton_lora_linear:lora_linear_triton"},
    "lora_linear_shared": {"triton": ".triton_lora_linear:lora_linear_shared_triton"},
    "residual_project": {"triton": ".triton_residual_project:residual_project_triton"},
    "second_moment_update": {"triton": ".triton_second_moment:second_moment_update_triton"},
    "rsvd": {"extension": ".rsvd:rsvd_extension"},
    "principal_subspace": {"extension": ".principal_subspace:principal_subspace_extension"},
}


def implemented(op: str) -> frozenset[str]:
    return frozenset({"reference", *_TABLE.get(op, {})})


def implementation(op: str, backend: str) -> Callable:
    """The function implementing ``op`` on a non-reference ``backend``."""
    module_name, fn_name = _TABLE[op][backend].split(":")
    return getattr(importlib.import_module(module_name, __package__), fn_name)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def extension_ops(device_type: Optional[str] = None) -> frozenset[str]:
    """Ops the compiled extension registered (empty when it is not built or failed to load).

    With ``device_type`` ("cpu", "cuda"): only the ops that have a kernel for that device.
    """
    from . import _extension  # local import: loading the library is lazy

    return _extension.registered_ops(device_type)


def requested_backend() -> str:
    value = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"{_ENV} must be 'auto' or one of {BACKENDS}, got {value!r}")
    return value


def select(op: str, device: torch.device) -> str:
    """Return the backend that runs ``op`` for tensors on ``device``."""
    requested = requested_backend()
    impl = implemented(op)
    if requested != "auto" and requested in impl:
        if requested == "triton" and not (triton_available() and (device.type == "cuda" or triton_interpreted())):
            raise RuntimeError(f"{_ENV}=triton needs triton and a CUDA tensor, or TRITON_INTERPRET=1 on CPU")
        if requested == "extension" and op not in extension_ops(device.type):
            raise RuntimeError(f"{_ENV}=extension but the compiled extension does not provide {op!r} for "
                               f"{device.type} tensors (not built, built without CUDA, or failed to load: see "
                               "keeplora_kernels.extension_status())")
        return requested
    if "extension" in impl and op in extension_ops(device.type):
        return "extension"
    if "triton" in impl and device.type == "cuda" and triton_available():
        return "triton"
    return "reference"
