"""Protected-basis sizes of the embedded benchmark under both feature statistics (feature_stat), without training.

The default benchmark's model (all-MiniLM-L6-v2) and its eight tasks in order, built as ``keeplora run`` builds them
(``configs/default.yaml``: the runner's task data, the keeplora method's engine config and loss); KeepLoRA is
attached as that method attaches it, with ``feature_stat`` and ``feature_energy`` (ε_f) replaced. Each task runs
``begin_task`` then ``end_task`` on the runner's fixed training batches with no training in between: B stays as
``begin_task`` initialised it (b_init='gradient', W offset by the same amount, so the function is the pre-trained
one up to rounding). After each task the script prints the mean protected-basis size over the targets (of 384
input dimensions for every target of this model) and writes the table as Markdown.

Run from the repository root:
    PYTHONPATH=$PWD:$PWD/python:$PWD/benchmarks python benchmarks/results/cpu/feature_stat_bases.py
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from keeplora import KeepLoRA
from keeplora_bench.continual.data import TaskData, seed_from
from keeplora_bench.continual.methods import build_method
from keeplora_bench.continual.model import load_encoder
from keeplora_bench.continual.runconfig import load_config
from keeplora_bench.continual.tasks import TaskSpec, load_task

ROOT = Path(__file__).resolve().parents[3]
STATS = ("second-moment", "official-sketch")


def encoder_for(cfg: dict):
    m = cfg["model"]
    return load_encoder(m["path"], m["kind"], int(m["max_length"]), m["logit_scale"])


def basis_sizes(cfg: dict, datas: list[TaskData], stat: str, energy: float) -> dict:
    """Mean, min and max basis size over the targets: before the first task, then after each task."""
    seed = int(cfg["seed"])
    spec = next(s for s in cfg["methods"] if s["type"] == "keeplora" and s["name"] == "keeplora")
    method = build_method(spec, encoder_for(cfg), seed)
    config = dataclasses.replace(method.engine_config(), feature_energy=energy, feature_stat=stat)
    method.kl = KeepLoRA(method.model, config)
    d_in = {layer.in_features for layer in method.kl.layers.values()}
    rows = []

    def record():
        sizes = list(method.kl.basis_sizes().values())
        rows.append((sum(sizes) / len(sizes), min(sizes), max(sizes)))

    record()
    start = time.perf_counter()
    for t, data in enumerate(datas):
        torch.manual_seed(seed_from(seed, spec["slug"], t))  # as the runner does before a task
        loader = data.batches("train", int(spec["batch_size"]))  # the runner's fixed (unshuffled) loader
        method.begin_task(t, data, loader)
        method.end_task(t, data, loader)
        record()
        print(f"  {stat} eps_f={energy}: task {t + 1} {data.task.name}: mean {rows[-1][0]:.1f}", flush=True)
    return {"rows": rows, "d_in": sorted(d_in), "targets": len(method.kl.layers), "s": time.perf_counter() - start}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu} ({os.cpu_count()} cores, shared with other jobs, no GPU), {torch.get_num_threads()} torch thread, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def git_sha() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return sha + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--energies", default="0.99,0.8", help="comma-separated ε_f values")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".md")))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    specs = [TaskSpec.from_dict(t, cfg["data"]) for t in cfg["tasks"]]
    tasks = [load_task(s, int(cfg["seed"]), cfg["data"].get("cache")) for s in specs]
    first = encoder_for(cfg)
    datas = [TaskData(t, first, i) for i, t in enumerate(tasks)]
    energies = [float(e) for e in args.energies.split(",")]
    results = {}
    for energy in energies:
        for stat in STATS:
            results[(stat, energy)] = basis_sizes(cfg, datas, stat, energy)
    any_result = next(iter(results.values()))
    names = [t.name for t in tasks]
    header = "| feature_stat | ε_f | pre-trained | " + " | ".join(f"{i + 1} {n}" for i, n in enumerate(names)) + " |"
    lines = [header, "|" + "---|" * (3 + len(names))]
    for (stat, energy), res in results.items():
        cells = [f"{mean:.1f}" for mean, _, _ in res["rows"]]
        lines.append(f"| {stat} | {energy} | " + " | ".join(cells) + " |")
    ranges = [
        f"| {stat} | {energy} | " + " | ".join(f"{lo}–{hi}" for _, lo, hi in res["rows"]) + " |"
        for (stat, energy), res in results.items()
    ]
    command = "python benchmarks/results/cpu/feature_stat_bases.py" + (
        f" --energies {args.energies}" if args.energies != "0.99,0.8" else ""
    )
    seconds = ", ".join(f"{s} ε_f={e}: {r['s']:.0f} s" for (s, e), r in results.items())
    text = "\n".join(
        [
            "# Protected-basis sizes under both feature statistics (default benchmark, no training)",
            "",
            f"Command (repository root, `PYTHONPATH=$PWD:$PWD/python:$PWD/benchmarks`): `{command}`  ",
            f"Machine: {machine()}  ",
            f"Code: git {git_sha()}; config `{Path(args.config).name}` (order I, {len(names)} tasks, seed "
            f"{cfg['seed']}, batch size {cfg['training']['batch_size']}, max_length {cfg['model']['max_length']})",
            "",
            f"KeepLoRA as the benchmark's `keeplora` method attaches it ({any_result['targets']} targets of "
            f"all-MiniLM-L6-v2, d_in = {any_result['d_in']}, r = {cfg['adapter']['r']}, ε_w = "
            f"{cfg['keeplora']['weight_energy']}), with `feature_stat` and `feature_energy` (ε_f) replaced. Each task "
            "runs `begin_task` then `end_task` on the runner's fixed training batches with **no training**: B stays "
            "as `begin_task` initialised it, so the features are those of the pre-trained function (up to rounding) "
            "and the sizes show what each statistic protects, not what a trained run would. The text batches are "
            "padded per batch (dynamic padding), and each batch passes the input texts and then the task's label "
            "prompts through every target: for the sketch these are two calls, both added from column 0 (shorter "
            "calls zero-padded, padding tokens zeroed).",
            "",
            "Mean protected-basis size per target (of 384 input dimensions) before the first task and after each task:",
            "",
            *lines,
            "",
            "Smallest–largest basis size over the targets:",
            "",
            header,
            "|" + "---|" * (3 + len(names)),
            *ranges,
            "",
            f"Time of the 8 begin_task/end_task pairs: {seconds}.",
            "",
        ]
    )
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
