"""The one benchmark harness: timing, peak memory, and result rows with machine, versions and git sha.

* GPU: ``triton.testing.do_bench`` medians (it flushes L2 between runs); peak memory from
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
* CPU: median of repeated wall-clock runs after warm-up; peak memory is the process's resident-set high-water mark
  (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident set before the call. So that the resident
  set follows live tensors, glibc is told (``mallopt``) to serve every block above 64 KiB by mmap and to return
  freed memory at once; otherwise memory freed by an earlier measurement would be reused invisibly.
Rows are appended to ``benchmarks/results/<name>.csv`` (one CSV per benchmark); ``keeplora_bench.micro.plot``
reads them.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# benchmarks/results of a source checkout; an installed app (a wheel) writes to ./benchmark-results of the working
# folder instead of into site-packages
_APP_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = _APP_ROOT / "results" if _APP_ROOT.name == "benchmarks" else Path("benchmark-results")


@functools.cache
def environment() -> dict[str, str]:
    """Machine, versions and git sha recorded with every row."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        sha += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = _cpu_name()
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_sha": sha,
        "host_cpus": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + platform.processor()


@dataclass
class Timing:
    median_ms: float
    repeats: int


def time_fn(
    fn: Callable[[], Any],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    repeats: int = 7,
    min_seconds: float = 0.0,
    cuda_warmup_ms: float = 25,
    cuda_rep_ms: float = 100,
) -> Timing:
    """Median time of ``fn()``: do_bench on CUDA (``cuda_warmup_ms``/``cuda_rep_ms`` of warm-up and measured
    runs), wall clock medians on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        return Timing(float(do_bench(fn, warmup=cuda_warmup_ms, rep=cuda_rep_ms, return_mode="median")), repeats=0)
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(samples), repeats=len(samples))


@functools.cache
def _configure_glibc_malloc() -> bool:
    """Large blocks via mmap (returned to the OS on free), no trim hysteresis; False where not glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 64 * 1024) == 1 and libc.mallopt(m_trim_threshold, 0) == 1
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def measure_memory(fn: Callable[[], Any], *, device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated during one call of ``fn`` beyond what was allocated before it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    _configure_glibc_malloc()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = _proc_status_kb("VmRSS")
    fn()
    return max(0, _proc_status_kb("VmHWM") - before) * 1024


def _profiled(fn: Callable[[], Any], device: torch.device | str):
    """torch.profiler record of one ``fn()`` (CPU ops, and CUDA kernels synchronised on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = torch.device(device).type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])) as prof:
        fn()
        if on_cuda:
            torch.cuda.synchronize(device)
    return prof


def profile_table(fn: Callable[[], Any], *, device: torch.device | str = "cpu", row_limit: int = 40) -> str:
    """torch.profiler table of one ``fn()`` (synchronised on CUDA), ops sorted by their own device time on CUDA
    and by their own CPU time elsewhere: where a phase's time goes."""
    prof = _profiled(fn, device)
    sort = "self_device_time_total" if torch.device(device).type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=row_limit, max_name_column_width=70)


# Ops that launch no kernel: views, metadata and uninitialised allocations.
_NO_LAUNCH = frozenset(
    {
        "aten::view",
        "aten::transpose",
        "aten::expand",
        "aten::narrow",
        "aten::slice",
        "aten::select",
        "aten::diagonal",
        "aten::as_strided",
        "aten::unsqueeze",
        "aten::squeeze",
        "aten::permute",
        "aten::t",
        "aten::alias",
        "aten::reshape",
        "aten::_reshape_alias",
        "aten::lift_fresh",
        "aten::detach",
        "aten::result_type",
        "aten::_unsafe_view",
        "aten::mT",
        "aten::flatten",
        "aten::empty",
        "aten::empty_like",
        "aten::empty_strided",
        "aten::resolve_conj",
        "aten::resolve_neg",
        "aten::contiguous",
        "aten::numpy_T",
        "aten::mH",
        "aten::adjoint",
        "aten::swapaxes",
        "aten::transpose_",
        "aten::movedim",
        "aten::unflatten",
        "aten::split",
        "aten::chunk",
        "aten::unbind",
        "aten::view_as",
        "aten::expand_as",
        "aten::split_with_sizes",
    }
)


def library_calls(fn: Callable[[], Any], *, device: torch.device | str = "cpu") -> dict[str, int]:
    """Operator calls one ``fn()`` issues, the measure of per-call overhead for work made of many small steps.

    ``calls``: ATen ops (views and allocations excluded) called directly by Python or by a ``keeplora::`` op, plus
    the ``keeplora::`` ops nested inside another; each is at least one kernel launch on a GPU (several for
    cuSOLVER/cuBLAS routines), so the count is the launch overhead seen from the host, measurable without a GPU.
    ``kernels`` (CUDA only): the device kernels the call actually ran.
    """
    prof = _profiled(fn, device)

    def transparent(event) -> bool:
        """Not an operator call of its own: a view/allocation (a copying reshape or contiguous is counted through
        the copy inside it), or a cast that returned its input."""
        return event.name in _NO_LAUNCH or (
            event.name == "aten::to" and not any(c.name.startswith("aten::") for c in event.cpu_children)
        )

    def owner(event):
        parent = event.cpu_parent
        while parent is not None and (not parent.name.startswith(("aten::", "keeplora::")) or transparent(parent)):
            parent = parent.cpu_parent
        return parent

    calls = 0
    for event in prof.events():
        if not event.name.startswith(("aten::", "keeplora::")) or transparent(event):
            continue
        parent = owner(event)
        if (parent is None and event.name.startswith("aten::")) or (
            parent is not None and parent.name.startswith("keeplora::")
        ):
            calls += 1
    out = {"calls": calls}
    if torch.device(device).type == "cuda":
        out["kernels"] = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return out


def time_and_memory(fn: Callable[[], Any], *, device: torch.device | str = "cpu") -> tuple[float, int]:
    """One call of a one-shot phase (e.g. ``begin_task``): wall milliseconds and peak bytes beyond the start."""
    device = torch.device(device)
    box = {}

    def timed():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        box["ms"] = (time.perf_counter() - t0) * 1e3

    peak = measure_memory(timed, device=device)
    return box["ms"], peak


def append_rows(name: str, rows: Iterable[dict[str, Any]], results_dir: Path | None = None) -> Path:
    """Append rows (dicts) to ``results/<name>.csv`` with the environment columns; returns the path."""
    rows = list(rows)
    path = Path(results_dir or RESULTS_DIR) / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    full = [{**row, **environment(), "timestamp": stamp} for row in rows]
    fields: list[str] = []
    for row in full:
        fields += [k for k in row if k not in fields]
    existing_fields = None
    if path.exists():
        with path.open(newline="") as f:
            existing_fields = next(csv.reader(f), None)
    if existing_fields and existing_fields != fields:
        # schema changed: keep history readable by writing to a new file next to it
        path = path.with_name(f"{name}-{stamp.replace(':', '')}.csv")
        existing_fields = None
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if not existing_fields:
            writer.writeheader()
        writer.writerows(full)
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A plain fixed-width table on stdout."""
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
