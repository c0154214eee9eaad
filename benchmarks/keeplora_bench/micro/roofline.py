"""The device's roofline: the two rates behind every floor the benchmarks report next to a time.

The project's floors are anchored on an H200, where they were measured: 790 TFLOP/s for a bf16 matmul on random data
and 4.3 TB/s for a device-to-device copy. A run on an H200 uses those anchors, so its floors compare with every
earlier H200 run. On any other CUDA device (the GPU lent to a session may be an H100, whose HBM is slower) both rates
are measured once, the same way (:func:`measure`), so the floors are that device's; a floor computed from the H200's
rates would make an H100 look closer to its floor than it is. Without CUDA (the CPU rehearsals) the H200 anchors keep
the floor columns' arithmetic exercised; those CPU percentages mean nothing.

The GPU script measures once and hands the result to its subprocesses through ``KEEPLORA_BENCH_ROOFLINE`` (JSON), so
every step of one run uses the same floors; ``environment.json`` records them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass

import torch

from . import harness

ENV = "KEEPLORA_BENCH_ROOFLINE"


@dataclass(frozen=True)
class Roofline:
    flops_per_s: float  # bf16 dense matmul, as cuBLAS reaches it on random data
    bytes_per_s: float  # device-to-device copy: bytes read + bytes written per second
    source: str  # where the rates come from ("H200 anchors", "measured on <device>")

    def floor_ms(self, flops: float, nbytes: float) -> float:
        """The larger of the compute time and the memory time, in ms."""
        return max(flops / self.flops_per_s, nbytes / self.bytes_per_s) * 1e3

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Roofline:
        try:
            fields = json.loads(text)
            return cls(float(fields["flops_per_s"]), float(fields["bytes_per_s"]), str(fields["source"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{ENV} must be a JSON object with flops_per_s, bytes_per_s and source, got {text!r}"
            ) from exc


H200 = Roofline(790e12, 4.3e12, "H200 anchors")


def measure(device: torch.device | str, *, matmul_n: int = 8192, copy_bytes: int = 1 << 29) -> Roofline:
    """Measure both rates on ``device``: a bf16 ``matmul_n``³ matmul of random matrices and a copy of ``copy_bytes``
    (medians: do_bench on CUDA, repeated timing elsewhere)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def timed(fn, *operands) -> float:  # the operands live only while they are timed
        return harness.time_fn(lambda: fn(*operands), device=device).median_ms

    square = (matmul_n, matmul_n)
    mm_ms = timed(
        torch.matmul,
        torch.randn(square, device=device, generator=gen).to(torch.bfloat16),
        torch.randn(square, device=device, generator=gen).to(torch.bfloat16),
    )
    elements = copy_bytes // 2
    src = torch.empty(elements, dtype=torch.bfloat16, device=device).normal_(generator=gen)
    copy_ms = timed(torch.Tensor.copy_, torch.empty_like(src), src)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else harness.environment()["device"]
    flops = 2.0 * matmul_n**3 / (mm_ms * 1e-3)
    return Roofline(flops, 2.0 * elements * 2 / (copy_ms * 1e-3), f"measured on {name}")


@functools.cache
def _cuda_roofline(index: int) -> Roofline:
    name = torch.cuda.get_device_name(index)
    if "H200" in name:
        return H200
    return measure(torch.device("cuda", index))


def roofline(device: torch.device | str) -> Roofline:
    """The roofline for floors on ``device``: ``KEEPLORA_BENCH_ROOFLINE`` when set (the GPU script's one
    measurement), else the H200 anchors on an H200 or without CUDA, else measured once per process."""
    text = os.environ.get(ENV, "").strip()
    if text:
        return Roofline.from_json(text)
    device = torch.device(device)
    if device.type != "cuda":
        return H200
    return _cuda_roofline(device.index if device.index is not None else torch.cuda.current_device())
