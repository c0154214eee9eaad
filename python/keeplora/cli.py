"""The ``keeplora`` command line. Each subcommand is a function ``cmd_<name>(args) -> int`` registered below."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

def _benchmarks_module(name: str):
    """Import ``benchmarks.<name>`` from the source checkout this package runs from (benchmarks are not installed)."""
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "harness.py").is_file():
        raise SystemExit(f"keeplora: the benchmarks live in the source checkout, not found next to {root}; "
                         "run from a clone (pip install -e .)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"benchmarks.{name}")


def cmd_profile(argv: list[str]) -> int:
    return int(_benchmarks_module("profile_lifecycle").main(argv))


_BENCHES = {"kernels": "bench_kernels", "lora-variants": "bench_lora_variants", "rsvd": "bench_rsvd"}


def cmd_bench(argv: list[str]) -> int:
    if not argv or argv[0] not in _BENCHES:
        print(f"usage: keeplora bench {{{','.join(_BENCHES)}}} [options]   (keeplora bench kernels -h for options)\n"
              "  kernels: frozen-A LoRA linear, residual projection, second moment vs their baselines\n"
              "  rsvd:    batched randomized SVD and principal subspace vs svd_lowrank loops and linalg.svd",
              file=sys.stderr)
        return 2
    result = _benchmarks_module(_BENCHES[argv[0]]).main(argv[1:])
    return int(result or 0)


# subcommands that parse their own arguments (everything after the name is passed through)
_PASSTHROUGH = {"profile": cmd_profile, "bench": cmd_bench}


def cmd_info(_args: argparse.Namespace) -> int:
    import torch

    import keeplora
    import keeplora_kernels

    print(f"keeplora {keeplora.__version__}, torch {torch.__version__}")
    print(f"compiled extension: {keeplora_kernels.extension_status()}")
    print(f"CUDA available: {torch.cuda.is_available()}")
    from keeplora_kernels import _dispatch

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"backends on {device.type} (KEEPLORA_BACKEND={_dispatch.requested_backend()}), per data dtype:")
        for op, row in _dispatch.choices(device).items():
            print(f"  {op:22s} " + ", ".join(f"{dtype} → {backend}" for dtype, backend in row.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keeplora", description="KeepLoRA continual learning for HF models")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, compiled extension and device")
    info.set_defaults(func=cmd_info)
    from .benchmark.cli import add_subcommands  # run, sweep, data

    add_subcommands(sub)
    sub.add_parser("bench", help="kernel microbenchmarks: keeplora bench {kernels,lora-variants,rsvd} [options]",
                   add_help=False)
    sub.add_parser("profile", help="time and peak memory of a task lifecycle and training steps vs the authors' "
                                   "pipeline and PEFT LoRA (options: keeplora profile -h)", add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _PASSTHROUGH:
        return _PASSTHROUGH[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
