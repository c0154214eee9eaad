"""The one place that decides which implementation runs each op.

Backends: ``torch`` (the PyTorch production path: every op has it), ``triton`` and ``extension`` (the compiled
C++/CUDA library) where an op has them. Order of preference for ``KEEPLORA_BACKEND=auto`` (the default): the
compiled extension when it is loaded and implements the op for the tensor's device, then Triton for CUDA tensors
where it measured faster than the PyTorch path (``TRITON_AUTO_ON_CUDA``), then ``torch``.
``KEEPLORA_BACKEND=torch|triton|extension`` forces that path for every op that has it (and raises if it cannot
run, e.g. triton on a CPU tensor without ``TRITON_INTERPRET=1``); ops without it keep the automatic choice, so the
whole engine runs under a forced backend. Tests use ``triton`` on CPU together with ``TRITON_INTERPRET=1``. Nothing
here touches CUDA at import time.

Triton compiles no float64 ``tl.dot`` for a GPU (its dot lowering asserts; the interpreter does run it), so on
CUDA, ops whose operands include float64 take the ``torch`` path.

Kernels that lost to these paths wherever they were measured, or that no GPU has measured yet, are not rows here:
they live in ``keeplora_kernels.experimental``, each with what it must beat to be dispatched.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable

import torch

BACKENDS = ("torch", "triton", "extension")
_ENV = "KEEPLORA_BACKEND"
_RENAMED = {"reference": "torch"}  # old value -> its current name (a clear error instead of a silent fallback)

# op -> {backend: "module:function"}: every implementation of every op, the ``torch`` one included. Modules are
# imported on first use (importing triton is slow).
_TABLE: dict[str, dict[str, str]] = {
    "lora_linear": {"torch": ".lora_linear:lora_linear_torch", "extension": ".lora_linear:lora_linear_extension"},
    "lora_linear_shared": {"torch": ".lora_linear:lora_linear_shared_torch"},
    "residual_project": {
        "torch": ".residual_project:residual_project_torch",
        "triton": ".triton_residual_project:residual_project_triton",
    },
    "second_moment_update": {
        "torch": ".second_moment:second_moment_update_torch",
        "triton": ".triton_second_moment:second_moment_update_triton",
    },
    "outer_sum": {"torch": ".outer_sum:outer_sum_torch"},
    "rsvd": {"torch": ".rsvd:_rsvd_fallback", "extension": ".rsvd:rsvd_extension"},
}


def implemented(op: str) -> frozenset[str]:
    """The backends that implement ``op``."""
    if op not in _TABLE:
        raise KeyError(f"no dispatch row for op {op!r}; ops: {sorted(_TABLE)}")
    return frozenset(_TABLE[op])


def implementation(op: str, backend: str) -> Callable:
    """The function implementing ``op`` on ``backend``."""
    module_name, fn_name = _TABLE[op][backend].split(":")
    return getattr(importlib.import_module(module_name, __package__), fn_name)


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def extension_ops(device_type: str | None = None) -> frozenset[str]:
    """Ops the compiled extension registered (empty when it is not built or failed to load).

    With ``device_type`` ("cpu", "cuda"): only the ops that have a kernel for that device.
    """
    from . import _extension  # local import: loading the library is lazy

    return _extension.registered_ops(device_type)


def requested_backend() -> str:
    """The value of ``KEEPLORA_BACKEND``: "auto" (unset or empty) or one of :data:`BACKENDS`."""
    value = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    accepted = ", ".join(repr(v) for v in ("auto",) + BACKENDS)
    if value in _RENAMED:
        raise ValueError(
            f"{_ENV}={value!r} is now called {_RENAMED[value]!r} (the PyTorch production path); "
            f"accepted values: {accepted}"
        )
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"{_ENV} must be one of {accepted}, got {value!r}")
    return value


TRITON_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what Triton's dot compiles for a GPU

# op -> data-operand dtypes for which the automatic choice on CUDA is Triton, from the side-by-side kernel benchmark
# (benchmarks/results/h200/bench_kernels.csv). The second moment kernel (measured with bf16 x) computes only the
# upper triangle and reads masked rows as zeros, where the torch path makes an fp32 copy and a masked copy of x
# first: chosen for every dtype Triton compiles on a GPU. The residual projection kernel reads and writes g once
# with no upcast copy: faster for bf16/fp16 g, slower than the two library GEMMs for fp32 g. Elsewhere the kernels
# stay available under KEEPLORA_BACKEND=triton.
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
            raise RuntimeError(
                f"{_ENV}=triton needs triton and CUDA tensors of dtype float16, bfloat16 or float32 "
                f"(Triton has no float64 dot on GPUs), or TRITON_INTERPRET=1 on CPU; got {device.type} "
                f"tensors of {sorted({str(d).replace('torch.', '') for d in dtypes})}"
            )
        if requested == "extension" and op not in extension_ops(device.type):
            raise RuntimeError(
                f"{_ENV}=extension but the compiled extension does not provide {op!r} for "
                f"{device.type} tensors (not built, built without CUDA, or failed to load: see "
                "keeplora_kernels.extension_status())"
            )
        return requested
    if "extension" in impl and op in extension_ops(device.type):
        return "extension"
    if (
        "triton" in impl
        and device.type == "cuda"
        and triton_runs(device, dtypes)
        and dtypes
        and dtypes[0] in TRITON_AUTO_ON_CUDA.get(op, ())
    ):
        return "triton"
    return "torch"


@functools.cache
def mixed_dtype_gemm(op: str, device_type: str) -> bool:
    """Whether ``torch.<op>(..., out_dtype=torch.float32)`` (``op`` = "mm", "addmm", "bmm") has a kernel for this
    device type: CUDA builds of torch ≥ 2.8 multiply bf16/fp16 on the tensor cores and write fp32 in one kernel;
    CPU builds have none."""
    overloads = getattr(torch.ops.aten, op)
    if device_type != "cuda" or not hasattr(overloads, "dtype"):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}.dtype", "CUDA")


_ORDERS_ENV = "KEEPLORA_LORA_ORDERS"
FORWARD_ORDERS = ("base_first", "expand_first")
BACKWARD_ORDERS = ("base_first", "expand_first")

# (forward order, backward order) of the torch LoRA path and the compiled op per device type: on CUDA expand_first
# in both directions gave the fastest bf16 training step at the Llama and CLIP layer shapes of the side-by-side
# benchmark (benchmarks/results/h200/lora_variants.csv), eager and graph-replayed; the CPU keeps base_first.
LORA_ORDERS: dict[str, tuple[str, str]] = {
    "cpu": ("base_first", "base_first"),
    "cuda": ("expand_first", "expand_first"),
}


def lora_orders(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """The GEMM orders of the LoRA linear on ``device`` (see ``lora_linear._forward`` / ``_backward``); the measured
    winner did not depend on the shape or dtype, so there is no shape class (``dtype`` is part of the signature for
    the callers' sake).

    ``KEEPLORA_LORA_ORDERS=<forward>,<backward>`` forces them (e.g. ``expand_first,base_first``). The experimental
    orders (the Triton ``fused_dy`` backward, the stacked ``[W; A]`` forward) are not accepted here: they run only
    through ``keeplora_kernels.experimental``.
    """
    forced = os.environ.get(_ORDERS_ENV, "").strip()
    if not forced:
        return LORA_ORDERS.get(device.type, ("base_first", "base_first"))
    parts = [p.strip().lower() for p in forced.split(",")]
    if len(parts) != 2 or parts[0] not in FORWARD_ORDERS or parts[1] not in BACKWARD_ORDERS:
        hint = ""
        if any(p in ("fused_dy", "stacked") for p in parts):
            hint = "; fused_dy and stacked are experimental (keeplora_kernels.experimental.lora_variants)"
        raise ValueError(
            f"{_ORDERS_ENV} must be '<forward>,<backward>' with forward in {FORWARD_ORDERS} and "
            f"backward in {BACKWARD_ORDERS}, got {forced!r}{hint}"
        )
    return parts[0], parts[1]


OUTER_SUM_PATHS = ("mixed_dtype_addmm", "addmm", "converted_chunks")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def outer_sum_path(device_type: str, acc_dtype: torch.dtype, dy_dtype: torch.dtype, x_dtype: torch.dtype) -> str:
    """How the torch ``outer_sum`` computes ``acc + dyᵀ·x`` (one of :data:`OUTER_SUM_PATHS`):

    * ``"mixed_dtype_addmm"``: fp32 ``acc``, both inputs bf16 (or both fp16), and a mixed-dtype ``addmm`` kernel on
      this device (CUDA): the tensor cores multiply the 16-bit values and write fp32, no converted copies;
    * ``"addmm"``: both inputs already in ``acc``'s dtype: one in-place ``addmm_``;
    * ``"converted_chunks"``: anything else: inputs converted to ``acc``'s dtype in row chunks no larger than ``acc``.
    """
    if (
        acc_dtype == torch.float32
        and dy_dtype == x_dtype
        and dy_dtype in _LOW_PRECISION
        and mixed_dtype_gemm("addmm", device_type)
    ):
        return "mixed_dtype_addmm"
    if dy_dtype == acc_dtype and x_dtype == acc_dtype:
        return "addmm"
    return "converted_chunks"


def choices(device: torch.device) -> dict[str, dict[str, str]]:
    """What ``select`` picks on ``device`` for each op and data dtype (``keeplora info`` prints it); "unavailable"
    where a forced backend cannot run (the call would raise). ``outer_sum`` also names its torch path
    (:func:`outer_sum_path`, with an fp32 accumulator for 16-bit and fp32 data, fp64 for fp64 data)."""
    out: dict[str, dict[str, str]] = {}
    for op in _TABLE:
        row = {}
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            name = str(dtype).replace("torch.", "")
            try:
                row[name] = select(op, device, dtype)
            except RuntimeError:
                row[name] = "unavailable"
                continue
            if op == "outer_sum":
                acc = torch.float64 if dtype == torch.float64 else torch.float32
                row[name] += f" ({outer_sum_path(device.type, acc, dtype, dtype)})"
        out[op] = row
    return out
