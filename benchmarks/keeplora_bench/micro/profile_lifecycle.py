"""End-to-end profile: one KeepLoRA task lifecycle and training steps, side by side with the authors' pipeline and a
plain PEFT LoRA loop, on the same model, data and device, in one process.

Per method and phase (setup, begin_task, train_step, end_task): wall time (median over tasks / steps), peak memory
beyond the model (CUDA max allocated; CPU resident high-water mark), tokens per second, and the ratio of the
baseline to KeepLoRA. A sanity column checks that KeepLoRA and the authors' pipeline chose the same adapter subspace.

``warmup_task`` (default on CUDA) runs one untimed one-batch task per method (batches of the timed shape, so that
the same kernels are compiled) before the timed ones: otherwise the first begin_task/end_task pays Triton's JIT
compiles and the CUDA libraries' first-use set-up, which the first method in the list absorbs for every other, and
a short warm-up leaves part of it in the timed task. The timed tasks then start from one learned task, the steady
state of a continual run. KeepLoRA's begin_task is also timed with its gradient pass's activations in host memory
(``begin_task_offload``), with the model's blocks under activation checkpointing (``begin_task_checkpoint``) and,
per value of ``grad_micro_batches``, with that many tokens per micro-batch (``begin_task_micro<N>``; a batch splits
only by rows). ``trace_dir`` writes torch.profiler tables of one more
keeplora task (begin_task, end_task), untimed, to show where the time goes.

    python -m keeplora_bench.micro.profile_lifecycle --model llama:d=256,layers=2 --batch 4 --seq 128
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
from pathlib import Path
from typing import Any

import torch

from keeplora import KeepLoRA, KeepLoRAConfig

from ..baselines import AuthorsKeepLoRA
from .harness import append_rows, environment, print_table, profile_table, time_and_memory, time_fn
from .models import ProfileModel, lm_loss, profile_model

METHODS = ("keeplora", "authors", "peft-lora")


def _setup(method: str, model, pm: ProfileModel, r: int, alpha: float):
    if method == "keeplora":
        return KeepLoRA(
            model,
            KeepLoRAConfig(
                target_modules=pm.targets, r=r, alpha=alpha, weight_energy=0.85, feature_energy=0.99, progress=False
            ),
        )
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and _is_target(n, pm.targets)]
    if method == "authors":
        return AuthorsKeepLoRA(model, names, r=r, alpha=alpha, weight_energy=0.85, feature_energy=0.99)
    from peft import LoraConfig

    from ..continual.methods import wrap_peft  # PEFT's own deprecation warning silenced

    return wrap_peft(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=pm.targets))


def _trainable(method: str, handle) -> list[torch.nn.Parameter]:
    if method in ("keeplora", "authors"):
        return handle.trainable_parameters()
    return [p for p in handle.parameters() if p.requires_grad]


def _adapter_subspaces(method: str, handle) -> dict[str, torch.Tensor]:
    if method == "keeplora":
        return {n: l.lora_A[handle.adapter_name].weight.detach().float().t() for n, l in handle.layers.items()}
    return {n: l.lora_A.detach().float() for n, l in handle.layers.items()}


def profile(
    model_spec: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    batch: int = 4,
    seq: int = 128,
    steps: int = 5,
    tasks: int = 2,
    batches_per_task: int = 4,
    r: int = 16,
    methods: tuple[str, ...] = METHODS,
    seed: int = 0,
    warmup_task: bool | None = None,
    trace_dir: Path | None = None,
    grad_micro_batches: tuple[int, ...] = (),
) -> list[dict[str, Any]]:
    pm = profile_model(model_spec)
    torch_dtype = getattr(torch, dtype)
    dev = torch.device(device)
    warmup_task = dev.type == "cuda" if warmup_task is None else warmup_task
    if dev.type == "cuda":
        _warm_cuda_libraries(dev)
    torch.manual_seed(seed)
    pristine = pm.build().to(dtype=torch_dtype)
    accumulators = (
        4
        * sum(
            m.weight.numel()
            for n, m in pristine.named_modules()
            if isinstance(m, torch.nn.Linear) and _is_target(n, pm.targets)
        )
        / 2**20
    )
    rows: list[dict[str, Any]] = []
    subspaces = {}
    for method in methods:
        # the model's own loss is given to keeplora as loss_fn=None (what a user passes for it), which lets the
        # gradient pass split a batch into micro-batches; the authors' pipeline takes a loss function
        loss = None if method == "keeplora" and pm.loss is lm_loss else pm.loss
        model = copy.deepcopy(pristine).to(dev)
        gc.collect()
        made = {}
        ms, peak = time_and_memory(lambda: made.update(handle=_setup(method, model, pm, r, float(r))), device=dev)
        handle = made.pop("handle")
        rows.append(dict(method=method, phase="setup", time_ms=ms, peak_mb=peak / 2**20))
        opt = torch.optim.AdamW(_trainable(method, handle), lr=1e-4)
        begin, end, step_times, step_peaks = [], [], [], []
        if warmup_task and method != "peft-lora":  # untimed: JIT compiles and first-use set-up (module docstring)
            short = pm.batches(1, batch, seq, dev, seed=seed + 99)  # one batch of the timed shape: same JIT keys
            handle.begin_task(short, loss)
            handle.end_task(short, loss)
        for task in range(tasks):
            data = pm.batches(batches_per_task, batch, seq, dev, seed=seed + 100 * task)
            tokens_per_batch = _tokens(data[0])
            if method != "peft-lora":
                begin.append(time_and_memory(lambda: handle.begin_task(data, loss), device=dev))
                if task == 0:
                    subspaces[method] = _adapter_subspaces(method, handle)
            model.train()

            def step(b=data[0]):
                pm.loss(model, b).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            step()  # warm-up (optimizer state allocation)
            step_times.append(time_fn(step, device=dev, warmup=0, repeats=steps).median_ms)
            step_peaks.append(time_and_memory(step, device=dev)[1])
            if method != "peft-lora":
                end.append(time_and_memory(lambda: handle.end_task(data, loss), device=dev))
        variants = {}  # keeplora's begin_task again under other settings of its gradient pass, one task each
        failed: dict[str, str] = {}  # setting -> error
        if method == "keeplora":
            default_micro = handle.config.grad_micro_batch
            settings = [
                ("begin_task_offload", dict(grad_offload=True)),
                ("begin_task_checkpoint", dict(grad_checkpoint=True)),
            ] + [(f"begin_task_micro{n}", dict(grad_micro_batch=n)) for n in grad_micro_batches]
            for phase, options in settings:
                for key, value in options.items():
                    setattr(handle.config, key, value)
                try:
                    variants[phase] = time_and_memory(lambda: handle.begin_task(data, loss), device=dev)
                except Exception as exc:  # one setting's failure must not cost the profile its other rows
                    failed[phase] = f"{type(exc).__name__}: {exc}"[:200]
                finally:
                    handle.config.grad_offload, handle.config.grad_checkpoint = False, False
                    handle.config.grad_micro_batch = default_micro
                if phase in variants:  # a failed begin_task leaves no task to end
                    handle.end_task(data, loss)
        if trace_dir is not None and method == "keeplora":
            _trace_task(handle, data, loss, Path(trace_dir), dev)
        step_ms = statistics.median(step_times)
        rows.append(
            dict(
                method=method,
                phase="train_step",
                time_ms=step_ms,
                peak_mb=max(step_peaks) / 2**20,
                tokens_per_s=tokens_per_batch / (step_ms / 1e3),
            )
        )
        if begin:
            # begin_task's peak next to the training step's and the gradient accumulators' (fp32 d_out × d_in per
            # target): the pass should need no more than a training step plus its sums
            context = dict(train_step_peak_mb=max(step_peaks) / 2**20, accumulators_mb=accumulators)
            if method == "keeplora":
                context["default_grad_micro_batch"] = default_micro
            rows.append(
                dict(
                    method=method,
                    phase="begin_task",
                    time_ms=statistics.median(t for t, _ in begin),
                    peak_mb=max(p for _, p in begin) / 2**20,
                    tokens_per_s=batches_per_task * tokens_per_batch / (statistics.median(t for t, _ in begin) / 1e3),
                    **context,
                )
            )
            for phase, (ms, peak) in variants.items():
                rows.append(
                    dict(
                        method=method,
                        phase=phase,
                        time_ms=ms,
                        peak_mb=peak / 2**20,
                        tokens_per_s=batches_per_task * tokens_per_batch / (ms / 1e3),
                        **context,
                    )
                )
            rows += [dict(method=method, phase=phase, error=error) for phase, error in failed.items()]
            rows.append(
                dict(
                    method=method,
                    phase="end_task",
                    time_ms=statistics.median(t for t, _ in end),
                    peak_mb=max(p for _, p in end) / 2**20,
                    tokens_per_s=batches_per_task * tokens_per_batch / (statistics.median(t for t, _ in end) / 1e3),
                )
            )
        model = handle = opt = None  # free this method's model before the next one is built
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    ours = {(row["phase"]): row for row in rows if row["method"] == "keeplora"}
    authors = {(row["phase"]): row for row in rows if row["method"] == "authors"}
    for row in rows:
        row.update(
            model=model_spec, device_kind=dev.type, dtype=dtype, batch=batch, tokens_per_batch=tokens_per_batch, r=r
        )
        if "error" in row:
            continue
        base = ours.get(row["phase"])
        if base and "error" not in base and row["method"] != "keeplora":
            row["time_vs_keeplora"] = row["time_ms"] / base["time_ms"]
            row["memory_vs_keeplora"] = row["peak_mb"] / max(base["peak_mb"], 1e-9)
        if row["method"] == "keeplora" and row["phase"].startswith("begin_task") and "begin_task" in authors:
            row["memory_vs_authors_begin_task"] = row["peak_mb"] / max(authors["begin_task"]["peak_mb"], 1e-9)
            row["authors_begin_task_time_ratio"] = authors["begin_task"]["time_ms"] / max(row["time_ms"], 1e-9)
    if "keeplora" in subspaces and "authors" in subspaces:
        worst = 0.0
        for name, a in subspaces["keeplora"].items():
            b = subspaces["authors"][name].to(a)
            # largest principal-angle sine between the two r-dimensional adapter subspaces
            sines = torch.linalg.svdvals(b - a @ (a.t() @ b))
            worst = max(worst, float(sines.max()))
        for row in rows:
            if row["method"] == "authors" and row["phase"] == "begin_task":
                row["adapter_subspace_max_sine_vs_keeplora"] = worst
    return rows


def _warm_cuda_libraries(dev: torch.device) -> None:
    """First use of cuBLAS, cuSOLVER and the allocator, so that no method's first phase pays for it."""
    a = torch.randn(256, 256, device=dev)
    torch.linalg.eigh(a @ a.T)
    torch.linalg.qr(a)
    torch.linalg.svd(a)
    (a.bfloat16() @ a.bfloat16()).float().sum().item()
    torch.cuda.synchronize(dev)


def _trace_task(handle, data, loss, trace_dir: Path, dev: torch.device) -> None:
    """torch.profiler tables (by self device time, or CPU time without a GPU) of one begin_task and one end_task."""
    trace_dir.mkdir(parents=True, exist_ok=True)
    for phase, call in (
        ("begin_task", lambda: handle.begin_task(data, loss)),
        ("end_task", lambda: handle.end_task(data, loss)),
    ):
        (trace_dir / f"trace_{phase}.txt").write_text(profile_table(call, device=dev))


def _is_target(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _tokens(batch) -> int:
    ids = batch["input_ids"] if isinstance(batch, dict) else batch.input_ids
    return int(ids.numel())


COLUMNS = [
    "method",
    "phase",
    "time_ms",
    "peak_mb",
    "tokens_per_s",
    "time_vs_keeplora",
    "memory_vs_keeplora",
    "train_step_peak_mb",
    "accumulators_mb",
    "memory_vs_authors_begin_task",
    "authors_begin_task_time_ratio",
]


def run(out_dir: Path | None = None, **kwargs) -> list[dict[str, Any]]:
    rows = profile(**kwargs)
    append_rows("profile_lifecycle", rows, results_dir=out_dir)
    return rows


def main(argv=None, prog: str = "keeplora profile") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama:d=256,layers=2,heads=4,ff=688,vocab=512")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--batches-per-task", type=int, default=4)
    parser.add_argument("-r", "--rank", type=int, default=16)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--grad-micro-batches",
        default="",
        help="comma-separated token counts: keeplora's begin_task timed again with each as grad_micro_batch",
    )
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; accepted: {list(METHODS)}")
    rows = run(
        args.out,
        model_spec=args.model,
        device=args.device,
        dtype=dtype,
        batch=args.batch,
        seq=args.seq,
        steps=args.steps,
        tasks=args.tasks,
        batches_per_task=args.batches_per_task,
        r=args.rank,
        methods=methods,
        grad_micro_batches=tuple(int(v) for v in args.grad_micro_batches.split(",") if v.strip()),
    )
    env = environment()
    print(
        f"\nprofile: {args.model}, {args.device} ({env['device']}), {dtype}, batch {args.batch} "
        f"({rows[0]['tokens_per_batch']} tokens), "
        f"r={args.rank}, torch {env['torch']}, git {env['git_sha']}"
    )
    print_table(rows, COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
