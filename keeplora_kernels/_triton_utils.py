"""Shared pieces of the Triton kernels: launch plans, precision modes, block-size choices, jit helpers.

Imported only by the ``triton_*`` op modules, which ``_dispatch`` imports lazily: importing
``keeplora_kernels`` never imports triton.

Precision policy (every kernel):
* accumulation is fp32 (fp64 when the inputs are fp64);
* fp32/fp64 operands, and *every* operand under ``TRITON_INTERPRET=1``, are converted to the accumulation dtype
  right after ``tl.load`` (the interpreter stores bf16 as uint16, so bf16 arithmetic there is wrong otherwise);
* on a GPU, bf16/fp16 ``tl.dot`` operands stay in their storage dtype: tensor-core products of bf16/fp16 values
  are exact and are summed in fp32, so this is the same arithmetic as converting first, at twice the rate; all
  element-wise math (scale, bias, subtraction) is done in fp32 on converted values;
* fp32 ``tl.dot`` follows ``torch.backends.cuda.matmul.allow_tf32`` (PyTorch's default: off, i.e. ``"ieee"``),
  so fp32 results agree with ``torch.matmul`` on the same machine.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

__all__ = [
    "Launch",
    "interpreted",
    "dot_mode",
    "acc_dtype",
    "target_programs",
    "cdiv",
    "next_pow2",
    "load",
    "load_all",
    "mma",
    "round_to",
    "TensorDescriptor",
    "tma_blocker",
    "ensure_tma_allocator",
    "persistent_programs",
]


try:  # host-side tensor descriptors (TMA on Hopper); older Triton builds lack them
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed triton
    TensorDescriptor = None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host integers. ``triton.cdiv`` is a constexpr function in recent Triton (usable inside
    kernels): calling it from Python costs microseconds, and a launch plan needs a dozen."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def acc_dtype(*dtypes: torch.dtype):
    """Triton accumulation dtype for inputs of these torch dtypes: fp64 if any is fp64, else fp32."""
    return tl.float64 if torch.float64 in dtypes else tl.float32


def dot_mode(dtype: torch.dtype, *, low_precision_prec: str = "ieee") -> tuple[bool, str]:
    """``(UPCAST, PREC)`` constexprs for tiles whose storage dtype is ``dtype`` (see the module docstring)."""
    if interpreted() or dtype == torch.float64:
        return True, "ieee"
    if dtype == torch.float32:
        return True, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return False, low_precision_prec


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs fill the device: two per SM on a GPU; a small number under the interpreter (so the tests
    exercise split-K / split-rows paths on small shapes)."""
    if device.type != "cuda":
        return 4
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def persistent_programs(device: torch.device, num_tiles: int) -> int:
    """Programs of a persistent kernel (each walks the tiles ``pid, pid + programs, …``): one per SM on a GPU, never
    more than there are tiles; four under the interpreter, so the tile loop runs several times on test shapes."""
    sms = (
        _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        if device.type == "cuda"
        else 4
    )
    return max(1, min(sms, num_tiles))


def tma_blocker(*tensors: torch.Tensor) -> str | None:
    """None when every tensor can be described for TMA (a host-side tensor descriptor), else why not."""
    if TensorDescriptor is None:
        return "this triton has no triton.tools.tensor_descriptor"
    for t in tensors:
        if t.dim() != 2 or t.stride(1) != 1:
            return "operands must be row-major 2-D"
        if t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
            return f"row stride {t.stride(0) * t.element_size()} B or base not 16-byte aligned"
    return None


@functools.cache
def ensure_tma_allocator(device: torch.device) -> None:
    """Some Triton versions build TMA descriptors in global memory at launch and refuse to launch without a device
    allocator: torch's caching allocator serves it (set once per device: launches are on the host's hot path)."""
    if device.type == "cuda" and hasattr(triton, "set_allocator"):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device=device, dtype=torch.int8))


@dataclass
class Launch:
    """One kernel launch: ``kernel[grid](**args, **constexprs)``. Kept as data so that a test can compile every
    launch a launcher makes ahead of time for a GPU target (``tests/kernels/test_triton_compile.py``) without a GPU."""

    kernel: Any
    grid: tuple[int, ...]
    args: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> None:
        if any(g == 0 for g in self.grid):
            return
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


@triton.jit
def load(ptrs, mask, UPCAST: tl.constexpr, ACC: tl.constexpr):
    """``tl.load`` with zeros outside ``mask``, converted to ``ACC`` right away when ``UPCAST``."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(ACC)
    return x


@triton.jit
def load_all(ptrs, UPCAST: tl.constexpr, ACC: tl.constexpr):
    """Unmasked ``tl.load`` (every pointer in bounds), converted to ``ACC`` right away when ``UPCAST``."""
    x = tl.load(ptrs)
    if UPCAST:
        x = x.to(ACC)
    return x


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """``acc + a·b``. With ``UPCAST`` both operands are already in acc's dtype; otherwise b takes a's
    (bf16/fp16) dtype and the tensor cores accumulate in fp32."""
    if UPCAST:
        return tl.dot(a, b, acc, input_precision=PREC)
    else:
        return tl.dot(a, b.to(a.dtype), acc)


@triton.jit
def round_to(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """``x`` (fp32 or fp64) rounded to ``DTYPE`` to nearest-even, as a GPU converts. The interpreter converts to
    bf16 by truncation; there (``UPCAST`` with a bf16 target) the fp32 bits are rounded first, so that the CPU tests
    check the GPU's rounding (finite values; a carry into the exponent is the correct result)."""
    if UPCAST and DTYPE == tl.bfloat16:
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        x = u.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


_TRITON_TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int8: "i8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "i1",
    torch.uint8: "u8",
}


def aot_compile(launch: Launch, capability: int = 90):
    """Compile ``launch``'s kernel for an NVIDIA target without a GPU (ptxas ships with triton): catches type and
    lowering errors of the compiled path, which the interpreter does not run. Tensor arguments are typed as
    pointers, host-side tensor descriptors (``triton.tools.tensor_descriptor``) as ``tensordesc`` of their block.
    Needs ``TRITON_INTERPRET`` unset when the kernel modules were imported. Returns the compiled kernel (``.asm``
    has ttir/ttgir/ptx/cubin)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.kernel
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):  # specialise like the JIT: ints equal to 1 become constants,
        if name in launch.constexprs:  # 16-aligned pointers and multiples of 16 get a divisibility hint
            signature[name] = "constexpr"
            constexprs[name] = launch.constexprs[name]
            continue
        value = launch.args[name]
        base = getattr(value, "base", None)
        if isinstance(base, torch.Tensor) and hasattr(value, "block_shape"):  # a host-side tensor descriptor
            signature[name] = f"tensordesc<{_TRITON_TYPES[base.dtype]}{list(value.block_shape)}>"
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(
        src,
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": launch.num_warps, "num_stages": launch.num_stages},
    )
