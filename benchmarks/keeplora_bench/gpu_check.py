"""The one GPU script: everything a lent GPU session (an H200 or an H100) should measure, in one prepared run
(< 8 minutes).

    bash benchmarks/gpu_check.sh                              # on the GPU machine: sets the path, runs this
    python -m keeplora_bench.gpu_check --dry --out /tmp/x     # CPU rehearsal with tiny shapes (tested in CI)

Steps, each time-boxed and independent (a failing step is recorded, the others still run; the tests, benchmarks and
profiles run in subprocesses, so that a CUDA fault in never-run device code cannot take the later steps' device), in
the order of what is still to be measured, since the script's overall limit cuts the last ones:
  1. environment: GPU, driver, torch/triton/transformers/peft versions, git sha, and the roofline every step's
     floors use (the H200 anchors on an H200, measured on any other GPU: keeplora_bench.micro.roofline);
  2. build the C++/CUDA extension for sm_90 in place (skipped in dry mode unless a compiler is there);
  3. the GPU-marked tests (pytest -m gpu) — the whole suite's CUDA paths;
  4. the LoRA linear's variants side by side, eager and graph-replayed (keeplora_bench.micro.bench_lora_variants);
  5. the batched rSVD and principal-subspace benchmarks (keeplora_bench.micro.bench_rsvd) with a profiler trace;
  6. the end-to-end profile (keeplora_bench.micro.profile_lifecycle) on a Llama-like random model, bf16, T=8192 tokens,
     as one sequence and as four (profile_batched: begin_task's micro-batched gradient pass against the authors');
  7. kernel microbenchmarks (keeplora_bench.micro.bench_kernels) with a per-kernel trace of the Triton LoRA step.
Measured and decided, so run only when named in ``--steps``: KeepLoRA's lifecycle under each alternative GEMM order
of the LoRA linear (profile_orders) and the Triton GEMM main loop against cuBLAS, the go / no-go for the full-GEMM
LoRA kernels (triton_gemm, keeplora_bench.micro.bench_triton_gemm).
Everything goes under --out (logs, CSVs, summary.json); a short table (op, time, % of floor, ratio) prints at the
end, then the open targets and A/B decisions judged from this run's CSVs (keeplora_bench.targets; also targets.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import targets

APP = Path(__file__).resolve().parents[1]  # the folder that holds the keeplora_bench package
ROOT = APP.parent  # the source tree: the extension is built and the tests run there

# (step name, seconds allowed), each a hard box; gpu_check.sh stops everything at its own limit, so the steps are
# ordered by value and the last ones are the first to be cut.
BUDGET = {
    "environment": 20,
    "build_extension": 150,
    "gpu_tests": 150,
    "lora_variants": 100,
    "bench_rsvd": 100,
    "profile": 115,  # run 5: 92 s in process; a subprocess adds its imports and CUDA start-up
    "profile_batched": 90,
    "bench_kernels": 60,
    "profile_orders": 60,
    "triton_gemm": 50,
}


class StepTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise StepTimeout("step ran past its time box")


def _run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> int:
    with log.open("w") as f:
        try:
            return subprocess.run(
                cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env={**os.environ, **(env or {})}
            ).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[gpu_check] timed out after {timeout:.0f} s\n")
            return 124


def step_environment(out: Path, dry: bool) -> list[dict[str, Any]]:
    import torch

    from .micro.harness import environment

    info = dict(environment())
    for module in ("transformers", "peft", "triton"):
        try:
            info[module] = importlib.import_module(module).__version__
        except ImportError:
            info[module] = "missing"
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        from .micro import roofline

        # measured once here (on a GPU other than the H200) and handed to every later step, subprocesses included
        os.environ[roofline.ENV] = roofline.roofline(torch.device("cuda")).to_json()
        info["roofline"] = json.loads(os.environ[roofline.ENV])
    (out / "environment.json").write_text(json.dumps(info, indent=1))
    return []


def step_build_extension(out: Path, dry: bool) -> list[dict[str, Any]]:
    import torch

    if dry and not torch.cuda.is_available():
        return [dict(op="build_extension", note="dry run: CPU build only")] if _build(out, cuda=False) == 0 else []
    rc = _build(out, cuda=True)
    if rc != 0:
        raise RuntimeError(f"extension build failed (rc={rc}); see build_extension.log")
    return []


def _build(out: Path, cuda: bool) -> int:
    env = {"MAX_JOBS": str(os.cpu_count() or 4), "TORCH_CUDA_ARCH_LIST": "9.0"}
    if not cuda:
        env["CUDA_HOME"] = ""
    return _run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        out / "build_extension.log",
        BUDGET["build_extension"],
        env,
    )


def step_gpu_tests(out: Path, dry: bool) -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available() and not dry:
        raise RuntimeError("no CUDA device")
    marker = "gpu" if torch.cuda.is_available() else "gpu or not gpu"
    # -v: each test's outcome is in the log as it ends, so a run cut by the box still says which passed and failed;
    # the slowest tests are listed to size the box
    args = [sys.executable, "-m", "pytest", "-v", "-rfE", "--durations=15", "-m", marker, "--no-header"]
    args += ["-p", "no:cacheprovider"]
    if dry and not torch.cuda.is_available():
        args += ["tests/kernels/test_reference_ops.py"]  # rehearsal: the mechanics only
    rc = _run(
        args,
        out / "gpu_tests.log",
        BUDGET["gpu_tests"],
        {"PYTHONPATH": os.pathsep.join(map(str, (ROOT, ROOT / "python", APP))), "JUNIT": ""},
    )
    tail = (out / "gpu_tests.log").read_text().strip().splitlines()[-1:] or [""]
    return [dict(op="gpu tests", note=tail[0], rc=rc)]


# One benchmark function in a child process: keeplora_bench.micro.<module>.<function>(**kwargs), rows back as JSON.
_CHILD = """
import importlib, json, sys
from pathlib import Path
module, function, kwargs, rows_file = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])
rows = getattr(importlib.import_module(module), function)(**kwargs)
rows_file.write_text(json.dumps(rows, default=str))
"""


def _in_subprocess(
    module: str, function: str, kwargs: dict[str, Any], out: Path, name: str, timeout: float, env: dict | None = None
) -> tuple[int, list[dict[str, Any]]]:
    """``keeplora_bench.micro.<module>.<function>(**kwargs)`` in a subprocess (log ``<name>.log``): a CUDA fault or a
    broken graph capture in new, never-run device code leaves a process's CUDA context unusable, which must not cost
    the later steps their rows. Returns the exit code and the rows the function returned (none if it failed; the
    rows a benchmark writes case by case survive its failure)."""
    rows_file = out / f"{name}.rows.json"
    rows_file.unlink(missing_ok=True)
    target = f"{__package__}.micro.{module}"
    args = [sys.executable, "-c", _CHILD, target, function, json.dumps(kwargs), str(rows_file)]
    rc = _run(args, out / f"{name}.log", timeout, env)
    return rc, json.loads(rows_file.read_text()) if rc == 0 and rows_file.is_file() else []


def _failed(name: str, rc: int) -> list[dict[str, Any]]:
    return [dict(op=name, note=f"FAILED: rc={rc}, see {name}.log")] if rc != 0 else []


def _bench_step(module: str, budget: str, **extra) -> Callable[[Path, bool], list[dict[str, Any]]]:
    """``keeplora_bench.micro.<module>.run(out, quick=True, smoke=dry, **extra)`` (the GPU script's subset; dry: tiny
    shapes) in a subprocess boxed by ``BUDGET[budget]``; its summary rows."""

    def step(out: Path, dry: bool) -> list[dict[str, Any]]:
        if importlib.util.find_spec(f"{__package__}.micro.{module}") is None:
            return [dict(op=module, note="not in this checkout")]
        kwargs = dict(out_dir=str(out), quick=True, smoke=dry, **extra)
        rc, rows = _in_subprocess(module, "run", kwargs, out, module, BUDGET[budget] - 5)
        return rows + _failed(module, rc)

    return step


def _profile_kwargs(dry: bool) -> dict[str, Any]:
    import torch

    if dry or not torch.cuda.is_available():
        kwargs = dict(
            model_spec="llama:d=64,layers=1,heads=4,ff=128,vocab=128",
            device="cpu",
            dtype="float32",
            batch=2,
            seq=16,
            steps=2,
            tasks=1,
            batches_per_task=2,
            r=4,
            warmup_task=True,
        )
    else:  # Llama-7B-like width, two layers, bf16, 8192 tokens per step
        kwargs = dict(
            model_spec="llama:d=4096,layers=2,heads=32,ff=11008,vocab=1024,max_pos=8192",
            device="cuda",
            dtype="bfloat16",
            batch=1,
            seq=8192,
            steps=5,
            tasks=1,
            batches_per_task=4,
            r=16,
        )
    return kwargs


def step_lora_variants(out: Path, dry: bool) -> list[dict[str, Any]]:
    """The LoRA variants in a subprocess: a CUDA graph capture that fails can leave the process's CUDA state
    unusable (the RNG offset of a broken capture), which must not cost the later steps."""
    import csv

    from .micro import bench_lora_variants

    args = [sys.executable, "-m", bench_lora_variants.__name__, "--out", str(out)]
    if dry:
        args.append("--cpu-smoke")
    rc = _run(args, out / "lora_variants.log", BUDGET["lora_variants"] - 5)
    path = out / "lora_variants.csv"
    rows = list(csv.DictReader(path.open())) if path.is_file() else []
    summary = bench_lora_variants.summarize(rows)
    if rc != 0:
        summary.append(dict(op="lora_variants", note=f"FAILED: rc={rc}, see lora_variants.log"))
    return summary


def step_profile(out: Path, dry: bool) -> list[dict[str, Any]]:
    # timed after one untimed warm-up task per method (JIT, library set-up); one traced keeplora task at the end
    kwargs = dict(out_dir=str(out), trace_dir=str(out), **_profile_kwargs(dry))
    rc, rows = _in_subprocess("profile_lifecycle", "run", kwargs, out, "profile", BUDGET["profile"] - 5)
    return [
        dict(
            op=f"{r['method']} {r['phase']}",
            time_ms=r.get("time_ms", ""),
            peak_mb=r.get("peak_mb", ""),
            ratio=r.get("time_vs_keeplora", ""),
            note=f"FAILED: {r['error']}" if "error" in r else "",
        )
        for r in rows
    ] + _failed("profile", rc)


def step_profile_batched(out: Path, dry: bool) -> list[dict[str, Any]]:
    """The same 8192 tokens per batch as ``profile`` in four rows of 2048: begin_task's gradient pass splits a batch
    into micro-batches by rows only (exact for the model's own loss), so here it holds the activations of 4096
    tokens (the default ``grad_micro_batch``) or 2048, where the authors' pipeline holds the whole batch's."""
    from .micro.harness import append_rows

    kwargs = _profile_kwargs(dry)
    if not dry and kwargs["device"] == "cuda":
        kwargs.update(batch=4, seq=2048, steps=3)
    else:
        kwargs.update(batch=4, seq=kwargs["seq"] // 2)
    kwargs.update(methods=["keeplora", "authors"], grad_micro_batches=[kwargs["seq"]])
    rc, rows = _in_subprocess(
        "profile_lifecycle", "profile", kwargs, out, "profile_batched", BUDGET["profile_batched"] - 5
    )
    if rows:
        append_rows("profile_batched", rows, results_dir=out)
    summary = _failed("profile_batched", rc)
    for r in rows:
        row = dict(op=f"{r['method']} {r['phase']} ({r['batch']}x{r['tokens_per_batch'] // r['batch']})")
        row.update(time_ms=r.get("time_ms", ""), peak_mb=r.get("peak_mb", ""), ratio=r.get("time_vs_keeplora", ""))
        if "error" in r:
            row["note"] = f"FAILED: {r['error']}"
        if "memory_vs_authors_begin_task" in r:
            row["note"] = (
                f"peak {r['memory_vs_authors_begin_task']:.2f}x the authors' begin_task's, "
                f"{r['authors_begin_task_time_ratio']:.2f}x faster"
            )
        summary.append(row)
    return summary


PROFILED_ORDERS = ("expand_first,expand_first", "base_first,base_first")


def step_profile_orders(out: Path, dry: bool) -> list[dict[str, Any]]:
    """KeepLoRA's lifecycle again under each alternative GEMM order of the LoRA linear (``KEEPLORA_LORA_ORDERS``):
    the training step of the candidates for the CUDA default, next to the default's own row of step ``profile``."""

    from .micro.harness import append_rows

    summary = []
    for orders in PROFILED_ORDERS:
        kwargs = dict(methods=["keeplora"], **_profile_kwargs(dry))
        name = f"profile_orders_{orders.replace(',', '_')}"
        timeout = BUDGET["profile_orders"] / len(PROFILED_ORDERS) - 5
        rc, rows = _in_subprocess(
            "profile_lifecycle", "profile", kwargs, out, name, timeout, env={"KEEPLORA_LORA_ORDERS": orders}
        )
        summary += _failed(name, rc)
        for row in rows:
            row["lora_orders"] = orders
        append_rows("profile_orders", rows, results_dir=out)
        summary += [
            dict(op=f"keeplora[{orders}] {r['phase']}", time_ms=r.get("time_ms", ""), peak_mb=r.get("peak_mb", ""))
            for r in rows
        ]
    return summary


STEPS: dict[str, Callable[[Path, bool], list[dict[str, Any]]]] = {
    "environment": step_environment,
    "build_extension": step_build_extension,
    "gpu_tests": step_gpu_tests,
    "lora_variants": step_lora_variants,
    # no bench_rsvd case starts after 60 s (the trace and the summary still fit the box); the single calls and the
    # whole model's set first (the open floor targets, changed since they were last measured), then the engine's
    # own calls (principal subspaces at set-up, the memory update of end_task: measured in run 5)
    "bench_rsvd": _bench_step(
        "bench_rsvd",
        "bench_rsvd",
        trace=True,
        time_box_s=BUDGET["bench_rsvd"] - 40,
        sections=("rsvd", "model_set", "principal_subspace", "memory_update"),
    ),
    "profile": step_profile,
    "profile_batched": step_profile_batched,
    "bench_kernels": _bench_step("bench_kernels", "bench_kernels", trace=True),
    "profile_orders": step_profile_orders,
    "triton_gemm": _bench_step("bench_triton_gemm", "triton_gemm"),
}
# what a plain run measures (module docstring): every step but the measured-and-decided ones
DEFAULT_STEPS = [name for name in STEPS if name not in ("profile_orders", "triton_gemm")]

SUMMARY_COLUMNS = ["op", "time_ms", "pct_of_floor", "ratio", "peak_mb", "note"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    parser.add_argument("--dry", action="store_true", help="CPU rehearsal with tiny shapes")
    parser.add_argument(
        "--steps", default=",".join(DEFAULT_STEPS), help=f"subset of {list(STEPS)} (default: {DEFAULT_STEPS})"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        parser.error(f"--steps: unknown {unknown}; accepted: {list(STEPS)}")
    from .micro.harness import print_table

    summary, status = [], {}
    for name in chosen:
        t0 = time.perf_counter()
        # In-process steps get a hard time box too (subprocess steps have their own, a little shorter).
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(BUDGET[name] + 10)
        try:
            rows = STEPS[name](args.out, args.dry)
            status[name] = "ok"
        except Exception as exc:  # a failing step must not cost the others their device time
            rows = [dict(op=name, note=f"FAILED: {type(exc).__name__}: {str(exc)[:120]}")]
            status[name] = "failed"
            (args.out / f"{name}.error.txt").write_text(traceback.format_exc())
        finally:
            signal.alarm(0)
        seconds = time.perf_counter() - t0
        status[name] += f" ({seconds:.0f} s)"
        summary += rows
        print(f"[gpu_check] {name}: {status[name]}", flush=True)
        # written after every step: a run killed by its time limit keeps what it measured
        (args.out / "summary.json").write_text(json.dumps({"status": status, "rows": summary}, indent=1, default=str))
    print()
    print_table(summary, SUMMARY_COLUMNS)
    print()
    # last: the open targets and the A/B decisions, judged from the CSVs this run wrote (keeplora_bench.targets)
    try:
        lines = targets.judge(targets.read_results(args.out))
        (args.out / "targets.md").write_text(targets.markdown(lines))
        print_table(lines, targets.COLUMNS)
    except Exception as exc:  # a report, read from the CSVs: it does not change what the steps measured
        print(f"[gpu_check] targets: FAILED: {type(exc).__name__}: {exc}")
    return 0 if all(v.startswith("ok") for v in status.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
