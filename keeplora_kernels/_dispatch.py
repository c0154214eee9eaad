"""The one place that decides which implementation runs each op.

Order of preference for ``KEEPLORA_BACKEND=auto`` (the default): the compiled extension when it is loaded and
implements the op for the tensor's device, then Triton for CUDA tensors where it measured faster than the
PyTorch path (``TRITON_AUTO_ON_CUDA``), then the pure-PyTorch reference.
``KEEPLORA_BACKEND=reference|triton|extension`` forces that path for every op that has it (and raises if it cannot
run, e.g. triton on a CPU tensor without ``TRITON_INTERPRET=1``); ops without it keep the automatic choice, so the
whole engine runs under a forced backend. Tests use ``triton`` on CPU together with ``TRITON_INTERPRET=1``. Nothing here touches CUDA at import time.

Triton compiles no float64 ``tl.dot`` for a GPU (triton 3.6 on an H200: an assertion in its dot lowering; the
interpreter does run it), so on CUDA, ops whose operands include float64 take the reference path.
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
    "lora_linear": {"triton": ".triton_lora_linear:lora_linear_triton",
                    "extension": ".lora_linear:lora_linear_extension"},
    "lora_linear_shared": {"triton": ".triton_lora_linear:lora_linear_shared_triton"},
    "residual_project": {"triton": ".triton_residual_project:residual_project_triton"},
    "second_moment_update": {"triton": ".triton_second_moment:second_moment_update_triton"},
    "rsvd": {"extension": ".rsvd:rsvd_extension"},
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


TRITON_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what Triton's dot compiles for a GPU

# op -> data-operand dtypes for which the automatic choice on CUDA is Triton. Measured side by side on an H200
# (benchmarks/results/h200/bench_kernels.csv, triton 3.6, torch 2.11); elsewhere the kernels stay available under
# KEEPLORA_BACKEND=triton until tuned:
#   second_moment_update, bf16 N=8192 d=4096: 0.45 ms vs 5.46 ms for the reference (fp32 upcast + masked addmm);
#   residual_project, d=n=4096 k=64: bf16 0.27 vs 0.31 ms with no temporaries (chosen); fp32 0.38 vs 0.18 ms (not);
#   lora_linear, bf16 train step: 1.23 vs 1.08 ms (unfused PyTorch) at T=8192 d=4096 r=16, 1.14 vs 0.38 ms at
#   T=12608 d=768: slower than cuBLAS, so not chosen (the PyTorch path keeps only s = x·Aᵀ for backward too).
TRITON_AUTO_ON_CUDA: dict[str, tuple[torch.dtype, ...]] = {
    "second_moment_update": TRITON_GPU_DTYPES,
    "residual_project": (torch.float16, torch.bfloat16),
}


def triton_runs(device: torch.device, dtypes: tuple[torch.dtype, ...] = ()) -> bool:
    """Whether Triton kernels can run on tensors of ``dtypes`` on ``device`` (see the module docstring)."""
    if not triton_available():
        return False
    if triton_interpreted():
        return True
    return device.type == "cuda" and all(dt in TRITON_GPU_DTYPES for dt in dtypes)


def select(op: str, device: torch.device, *dtypes: torch.dtype) -> str:
    """Return the backend that runs ``op`` for tensors on ``device`` whose operands have ``dtypes`` (the data
    operand first: x, g; then the weights, bases or accumulators)."""
    requested = requested_backend()
    impl = implemented(op)
    if requested != "auto" and requested in impl:
        if requested == "triton" and not triton_runs(device, dtypes):
            raise RuntimeError(f"{_ENV}=triton needs triton and CUDA tensors of dtype float16, bfloat16 or float32 "
                               f"(Triton has no float64 dot on GPUs), or TRITON_INTERPRET=1 on CPU; got {device.type} "
                               f"tensors of {sorted({str(d).replace('torch.', '') for d in dtypes})}")
        if requested == "extension" and op not in extension_ops(device.type):
            raise RuntimeError(f"{_ENV}=extension but the compiled extension does not provide {op!r} for "
                               f"{device.type} tensors (not built, built without CUDA, or failed to load: see "
                               "keeplora_kernels.extension_status())")
        return requested
    if "extension" in impl and op in extension_ops(device.type):
        return "extension"
    if ("triton" in impl and device.type == "cuda" and triton_runs(device, dtypes)
            and dtypes and dtypes[0] in TRITON_AUTO_ON_CUDA.get(op, ())):
        return "triton"
    return "reference"


@functools.lru_cache(maxsize=None)
def mixed_dtype_gemm(op: str, device_type: str) -> bool:
    """Whether ``torch.<op>(..., out_dtype=torch.float32)`` (``op`` = "mm", "addmm", "bmm") has a kernel for this
    device type: CUDA builds of torch ≥ 2.8 multiply bf16/fp16 on the tensor cores and write fp32 in one kernel;
    CPU builds have none."""
    overloads = getattr(torch.ops.aten, op)
    if device_type != "cuda" or not hasattr(overloads, "dtype"):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}.dtype", "CUDA")


_ORDERS_ENV = "KEEPLORA_LORA_ORDERS"

# (forward order, backward order) of the PyTorch LoRA path and the compiled op per device type, chosen by the H200
# side-by-side run (benchmarks/results/h200/lora_variants.csv): on CUDA expand_first in both directions gave the
# fastest bf16 step at the Llama layer, eager and graph-replayed, and at the CLIP layer through the compiled op; the
# Triton dY pass (fused_dy) was slower than the two cuBLAS GEMMs it replaces at both shapes. The CPU keeps base_first.
LORA_ORDERS: dict[str, tuple[str, str]] = {"cpu": ("base_first", "base_first"),
                                           "cuda": ("expand_first", "expand_first")}


def lora_orders(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """The GEMM orders of the LoRA linear on ``device`` (see ``lora_linear._forward`` / ``_backward``); the measured
    winner did not depend on the shape, so there is no shape class.

    ``KEEPLORA_LORA_ORDERS=<forward>,<backward>`` forces them (e.g. ``expand_first,fused_dy``); the ``fused_dy``
    backward needs Triton to run on ``device`` (a GPU, or the interpreter).
    """
    from .lora_linear import BACKWARD_ORDERS, FORWARD_ORDERS

    forced = os.environ.get(_ORDERS_ENV, "").strip()
    if forced:
        parts = [p.strip().lower() for p in forced.split(",")]
        if len(parts) != 2 or parts[0] not in FORWARD_ORDERS or parts[1] not in BACKWARD_ORDERS:
            raise ValueError(f"{_ORDERS_ENV} must be '<forward>,<backward>' with forward in {FORWARD_ORDERS} and "
                             f"backward in {BACKWARD_ORDERS}, got {forced!r}")
        # checked in eager calls only: probing for triton is not traceable (a traced call trusts the eager one)
        if parts[1] == "fused_dy" and not torch.compiler.is_compiling() and not triton_runs(device, (dtype,)):
            raise RuntimeError(f"{_ORDERS_ENV}={forced!r}: the fused_dy backward needs Triton on {device.type} "
                               f"tensors of {dtype} (a GPU, or TRITON_INTERPRET=1)")
        forward, backward = parts
    else:
        forward, backward = LORA_ORDERS.get(device.type, ("base_first", "base_first"))
        if backward == "fused_dy" and not torch.compiler.is_compiling() and not triton_runs(device, (dtype,)):
            backward = "expand_first"
    return forward, backward


def choices(device: torch.device) -> dict[str, dict[str, str]]:
    """What ``select`` picks on ``device`` for each op and data dtype (``keeplora info`` prints it); "unavailable"
    where a forced backend cannot run (the call would raise)."""
    out: dict[str, dict[str, str]] = {}
    for op in _TABLE:
        row = {}
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            try:
                row[str(dtype).replace("torch.", "")] = select(op, device, dtype)
            except RuntimeError:
                row[str(dtype).replace("torch.", "")] = "unavailable"
        out[op] = row
    return out
