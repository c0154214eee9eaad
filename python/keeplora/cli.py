"""The ``keeplora`` command line. ``keeplora info`` belongs to the library; the benchmark app's subcommands (run,
sweep, aggregate, data, bench, profile) are parsed and run by ``keeplora_bench.cli``, which is imported only when
one of them is called."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

# The benchmark app's subcommands with their one-line help: ``keeplora --help`` lists them without importing the app.
APP_COMMANDS = {
    "run": "run a continual-learning config: every method, T x T accuracies, metrics, plots",
    "sweep": "sensitivity of a method to its hyper-parameters (one factor at a time)",
    "aggregate": "mean ± std of Transfer/Average/Last over runs (seeds) of one config",
    "data": "the benchmark's data sources: fetch, status, build processed splits",
    "bench": "kernel microbenchmarks: keeplora bench {kernels,lora-variants,rsvd} [options]",
    "profile": "time and peak memory of a task lifecycle and training steps vs the authors' pipeline and PEFT LoRA "
    "(options: keeplora profile -h)",
}

APP_MISSING = (
    "keeplora {command}: the benchmark app (package keeplora_bench, in benchmarks/ of the source tree) is "
    "not installed; from a clone of the repository, (re)install keeplora, which installs the app with it: "
    "pip install --no-build-isolation -e '.[bench]'"
)


def run_app(argv: list[str]) -> int:
    """Hand an app subcommand (``argv[0]``) and its arguments to the benchmark app."""
    try:
        from keeplora_bench.cli import main as app_main
    except ModuleNotFoundError as exc:
        if exc.name not in ("keeplora_bench", "keeplora_bench.cli"):
            raise  # the app is there but one of its dependencies is not: the error names it
        print(APP_MISSING.format(command=argv[0]), file=sys.stderr)
        return 2
    return int(app_main(argv))


def _version(distribution: str) -> str:
    """The installed version of a distribution, read from its metadata (nothing is imported)."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(_args: argparse.Namespace) -> int:
    import torch

    import keeplora
    import keeplora_kernels
    from keeplora_kernels import _dispatch, _extension

    print(f"keeplora {keeplora.__version__}, torch {torch.__version__}")
    print(
        f"  triton {_version('triton')}, transformers {_version('transformers')}, peft {_version('peft')}; "
        f"torch CUDA build: {torch.version.cuda or 'none'}"
    )
    print(f"  keeplora imported from {Path(keeplora.__file__).resolve().parent}")
    lib = _extension.library()
    if lib is None:
        present = "absent (the PyTorch/Triton paths are used)"
    else:
        present = f"present, built with CUDA: {'yes' if lib.built_with_cuda() else 'no'}"
    print(f"compiled extension: {present}; {keeplora_kernels.extension_status()}")
    print(f"CUDA available: {torch.cuda.is_available()}")
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
    for name, text in APP_COMMANDS.items():  # listed here, parsed by the app (main never parses them)
        sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in APP_COMMANDS:
        return run_app(argv)
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
