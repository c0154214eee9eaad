"""Where begin_task's peak memory goes, and the peak of begin_task next to the training step's, for KeepLoRA and the
authors' pipeline, for several versions of the code in one run.

``account``: byte counts of what can be alive at begin_task's peak, in this process on this code: the tensors
autograd saves for backward during the gradient pass (unique storages seen by a saved-tensor pack hook, parameters
excluded, grouped by the innermost module that saved them), the accumulators, the largest ``dY``, the batch, and
what ``outer_sum`` and the adapter initialisation allocate (from their shapes).

``compare``: for every code version (``HEAD`` is this working tree; any other git revision is checked out into a
temporary worktree) and method, a fresh subprocess builds the model, runs one untimed task, then measures one
``begin_task`` and one training step with :func:`keeplora_bench.micro.harness.measure_memory` (CUDA: max allocated after
``reset_peak_memory_stats``; CPU: resident high-water mark beyond the start). Both methods use the model's own loss
(``loss_fn=None``), so the micro-batched pass applies where it is exact.

    python -m keeplora_bench.micro.begin_task_memory --model llama:d=512,layers=2,heads=8,ff=1376,vocab=1024 \\
        --batch 1 --seq 1024 --dtype bfloat16 --versions main,HEAD
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from .harness import _configure_glibc_malloc, append_rows, environment, measure_memory, print_table
from .models import profile_model

APP = Path(__file__).resolve().parents[2]  # the folder that holds the keeplora_bench package
ROOT = APP.parent  # the source tree (a git checkout)
MIB = 2**20


# ----------------------------------------------------------------------------------------------- accounting
def account(
    model_spec: str,
    *,
    dtype: str = "bfloat16",
    batch: int = 1,
    seq: int = 1024,
    r: int = 16,
    micro_batch: int | None = None,
) -> dict[str, float]:
    """MiB of each holder of memory at begin_task's peak (this code, CPU or the default device)."""
    from keeplora import KeepLoRA, KeepLoRAConfig
    from keeplora.statistics import _micro_batches

    pm = profile_model(model_spec)
    torch.manual_seed(0)
    model = pm.build().to(dtype=getattr(torch, dtype)).eval()
    options = {} if micro_batch is None else {"grad_micro_batch": micro_batch}
    kl = KeepLoRA(model, KeepLoRAConfig(target_modules=pm.targets, r=r, alpha=float(r), progress=False, **options))
    data = pm.batches(1, batch, seq, "cpu")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    saved: dict[int, tuple[str, int]] = {}
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def enter(module, _args) -> None:
        stack.append(names[module])

    def leave(*_) -> None:
        stack.pop()

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
    target_inputs: set[int] = set()  # the tap saves x after the target's own hooks ran: found by storage
    for layer in kl.layers.values():
        handles.append(
            layer.register_forward_pre_hook(lambda _m, args: target_inputs.add(args[0].untyped_storage().data_ptr()))
        )

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in saved:
            where = "<target input>" if ptr in target_inputs else stack[-1] if stack else "(loss)"
            saved[ptr] = (where, t.untyped_storage().nbytes())
        return t

    # the saved tensors of the largest micro-batch are what the pass holds at its peak
    part = max(_micro_batches(model, data[0], kl.config.grad_micro_batch), key=lambda pw: pw[0]["labels"].numel())[0]
    from keeplora.adapters import adapters_bypassed
    from keeplora.statistics import estimate_gradients

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), adapters_bypassed(kl.layers):  # as begin_task
        estimate_gradients(
            model, kl.layers, [part], None, device=torch.device("cpu"), dtype=torch.float32, progress=False
        )
    for h in handles:
        h.remove()
    by_kind: dict[str, int] = defaultdict(int)
    for name, nbytes in saved.values():
        leaf = name.rsplit(".", 1)[-1]
        if name == "<target input>":
            leaf = "target inputs x (kept for dYᵀ·X)"
        elif leaf.endswith("norm"):
            leaf = "norms (fp32 input)"
        elif leaf in ("mlp", "act_fn"):
            leaf = "MLP (act input, gate·up operands)"
        elif leaf == "self_attn":
            leaf = "attention (q, k, v, out, rotary)"
        elif leaf in ("model", "(loss)", "lm_head") or name == "":
            leaf = "logits / loss"
        by_kind[f"saved: {leaf}"] += nbytes
    item = torch.finfo(getattr(torch, dtype)).bits // 8
    tokens = part["labels"].numel()
    shapes = [layer.base_layer.weight.shape for layer in kl.layers.values()]
    acc = sum(4 * o * i for o, i in shapes)
    out = {
        f"model weights ({dtype})": sum(p.numel() * p.element_size() for p in model.parameters()),
        "batch tensors": sum(v.numel() * v.element_size() for v in data[0].values()),
        **dict(sorted(by_kind.items())),
        "saved: total activations": sum(n for _, n in saved.values()),
        "accumulators (fp32 d_out×d_in, all targets)": acc,
        "largest dY (one at a time)": max(tokens * o * item for o, _ in shapes),
        "outer_sum temporaries, CPU 16-bit (fp32 copies of dY and X)": max(tokens * (o + i) * 4 for o, i in shapes)
        if item < 4
        else 0,
        "outer_sum temporaries, CUDA 16-bit (new d_out×d_in fp32 result)": max(4 * o * i for o, i in shapes),
        "adapter init: stacked Gᵀ of one shape group (bounded)": min(acc, 512 * MIB),
        "weight update: (B·A) fp32 product + scaled copy": max(8 * o * i for o, i in shapes),
    }
    return {k: v / MIB for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- phases
def phases(
    model_spec: str,
    *,
    device: str = "cpu",
    dtype: str = "bfloat16",
    batch: int = 1,
    seq: int = 1024,
    batches: int = 4,
    r: int = 16,
) -> dict[str, float]:
    """MiB beyond what was allocated before, measured (not estimated) for begin_task and for each of its parts run
    alone on this code (the engine's own steps): the gradient pass, then the adapter initialisation with the gradient
    sums held. KeepLoRA is set up as in profile_lifecycle."""
    from .profile_lifecycle import _setup

    dev = torch.device(device)
    pm = profile_model(model_spec)
    torch.manual_seed(0)
    model = pm.build().to(dtype=getattr(torch, dtype)).to(dev)
    kl = _setup("keeplora", model, pm, r, float(r))
    data = pm.batches(batches, batch, seq, dev, seed=1)
    kl.begin_task(data[:1])  # first-use set-up and a learned task, as in profile_lifecycle
    kl.end_task(data[:1])
    held = {}
    out = {"begin_task": measure_memory(lambda: kl.begin_task(data), device=dev)}
    kl.end_task(data)
    out["gradient pass (ends holding the sums)"] = measure_memory(
        lambda: held.update(grads=kl._task_gradients(data, None)), device=dev
    )
    out["gradient sums held"] = sum(g.numel() * g.element_size() for g in held["grads"].values())
    out["adapter initialisation, beyond the sums"] = measure_memory(
        lambda: held.update(factors=kl._adapter_factors(held["grads"])), device=dev
    )
    return {k: v / MIB for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- measurement
def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One method on one code version: peak of begin_task and of a training step (runs in its own process)."""
    # the app (harness, models, the authors' baseline) is this tree's; keeplora and its kernels come from the
    # version's tree, which compare() puts first on the worker's path
    import keeplora
    from keeplora import KeepLoRA, KeepLoRAConfig

    from ..baselines import AuthorsKeepLoRA

    tree = Path(spec["tree"]).resolve()
    if tree not in Path(keeplora.__file__).resolve().parents:
        raise RuntimeError(f"keeplora was imported from {keeplora.__file__}, not from the version's tree {tree}")

    _configure_glibc_malloc()  # before the first large allocation, so that no freed block is reused unseen
    dev = torch.device(spec["device"])
    pm = profile_model(spec["model"])
    torch.manual_seed(0)
    model = pm.build().to(dtype=getattr(torch, spec["dtype"])).to(dev)
    if spec["method"] == "authors":
        names = [
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in pm.targets)
        ]
        handle = AuthorsKeepLoRA(
            model, names, r=spec["r"], alpha=float(spec["r"]), weight_energy=0.85, feature_energy=0.99
        )
    else:
        known = set(KeepLoRAConfig.__dataclass_fields__)
        options = {k: v for k, v in spec["options"].items() if k in known}
        if len(options) != len(spec["options"]):
            return {"skipped": f"options {sorted(set(spec['options']) - known)} not in this version"}
        handle = KeepLoRA(
            model,
            KeepLoRAConfig(target_modules=pm.targets, r=spec["r"], alpha=float(spec["r"]), progress=False, **options),
        )
    data = pm.batches(spec["batches"], spec["batch"], spec["seq"], dev, seed=1)
    handle.begin_task(data[:1])  # untimed: first-use set-up and a learned task, as in profile_lifecycle
    handle.end_task(data[:1])
    begin = measure_memory(lambda: handle.begin_task(data), device=dev)
    opt = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-4)
    model.train()

    def step():
        pm.loss(model, data[0]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # optimizer state
    train = measure_memory(step, device=dev)
    return {"begin_task_peak_mb": begin / MIB, "train_step_peak_mb": train / MIB}


@contextlib.contextmanager
def _checkout(version: str):
    """The source tree of a git revision (``HEAD``: this working tree, uncommitted changes included)."""
    if version == "HEAD":
        yield ROOT
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(path), version], cwd=ROOT, check=True, capture_output=True
        )
        try:
            yield path
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)


def compare(
    model_spec: str,
    *,
    versions: tuple[str, ...] = ("HEAD",),
    device: str = "cpu",
    dtype: str = "bfloat16",
    batch: int = 1,
    seq: int = 1024,
    batches: int = 4,
    r: int = 16,
    variants: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    variants = variants if variants is not None else {"keeplora": {}}
    rows = []
    for version in versions:
        with _checkout(version) as tree:
            sha = subprocess.run(
                ["git", "rev-parse", "--short=12", version], cwd=ROOT, capture_output=True, text=True
            ).stdout.strip()
            for method, options in [*variants.items(), ("authors", {})]:
                spec = dict(
                    model=model_spec,
                    device=device,
                    dtype=dtype,
                    batch=batch,
                    seq=seq,
                    batches=batches,
                    r=r,
                    method=method,
                    options=options,
                    tree=str(tree),
                )
                # keeplora and keeplora_kernels from the version's tree, the app from this one; cwd is the version's
                # tree because `python -m` puts the working directory first on the path
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "python"), str(tree), str(APP)])}
                done = subprocess.run(
                    [sys.executable, "-m", "keeplora_bench.micro.begin_task_memory", "--worker", json.dumps(spec)],
                    cwd=tree,
                    env=env,
                    capture_output=True,
                    text=True,
                )
                if done.returncode != 0:
                    raise RuntimeError(f"{method} on {version} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                if "skipped" in result:
                    continue
                rows.append(
                    dict(
                        code=version,
                        code_sha=sha,
                        method=method,
                        options=json.dumps(options),
                        **result,
                        model=model_spec,
                        device_kind=device,
                        dtype=dtype,
                        batch=batch,
                        seq=seq,
                        tokens_per_batch=batch * seq,
                        batches_per_task=batches,
                        r=r,
                    )
                )
    for row in rows:
        base = next(b for b in rows if b["code"] == row["code"] and b["method"] == "authors")
        row["begin_vs_authors"] = row["begin_task_peak_mb"] / base["begin_task_peak_mb"]
        row["begin_minus_train_step_mb"] = row["begin_task_peak_mb"] - row["train_step_peak_mb"]
    return rows


COLUMNS = [
    "code",
    "method",
    "options",
    "begin_task_peak_mb",
    "train_step_peak_mb",
    "begin_vs_authors",
    "begin_minus_train_step_mb",
]


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama:d=512,layers=2,heads=8,ff=1376,vocab=1024")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("-r", "--rank", type=int, default=16)
    parser.add_argument("--versions", default="HEAD", help="comma-separated git revisions; HEAD = this tree")
    parser.add_argument("--offload", action="store_true", help="also measure keeplora with grad_offload=True")
    parser.add_argument("--checkpoint", action="store_true", help="also measure keeplora with grad_checkpoint=True")
    parser.add_argument("--micro-batch", default="", help="comma-separated grad_micro_batch values to measure too")
    parser.add_argument("--account", action="store_true", help="print the accounting of this code's peak")
    parser.add_argument("--phases", action="store_true", help="print the measured peak of each part of begin_task")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.phases:
        table = phases(
            args.model,
            device=args.device,
            dtype=args.dtype,
            batch=args.batch,
            seq=args.seq,
            batches=args.batches,
            r=args.rank,
        )
        for key, mib in table.items():
            print(f"{mib:10.2f} MiB  {key}")
        return 0
    if args.account:
        table = account(args.model, dtype=args.dtype, batch=args.batch, seq=args.seq, r=args.rank)
        for key, mib in table.items():
            print(f"{mib:10.2f} MiB  {key}")
        return 0
    variants = {"keeplora": {}}
    if args.offload:
        variants["keeplora-offload"] = {"grad_offload": True}
    if args.checkpoint:
        variants["keeplora-checkpoint"] = {"grad_checkpoint": True}
    for tokens in filter(None, (v.strip() for v in args.micro_batch.split(","))):
        variants[f"keeplora-micro{tokens}"] = {"grad_micro_batch": int(tokens)}
    rows = compare(
        args.model,
        versions=tuple(v.strip() for v in args.versions.split(",") if v.strip()),
        device=args.device,
        dtype=args.dtype,
        batch=args.batch,
        seq=args.seq,
        batches=args.batches,
        r=args.rank,
        variants=variants,
    )
    append_rows("begin_task_memory", rows, results_dir=args.out)
    env = environment()
    print(
        f"\n{args.model}, {args.device} ({env['device']}), {args.dtype}, batch {args.batch}×{args.seq}, "
        f"torch {env['torch']}, git {env['git_sha']}"
    )
    print_table(rows, COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
