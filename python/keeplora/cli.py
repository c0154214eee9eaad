"""The ``keeplora`` command line. Each subcommand is a function ``cmd_<name>(args) -> int`` registered below."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

# subcommand -> (help, issue that builds it) for those not built yet: they say so and exit non-zero.
_NOT_BUILT = {
    "bench": ("kernel microbenchmarks", 3),
    "profile": ("time and memory of one task lifecycle vs peft LoRA and the authors' pipeline", 5),
}


def _not_built(name: str) -> Callable[[argparse.Namespace], int]:
    def cmd(_args: argparse.Namespace) -> int:
        print(f"keeplora {name}: not built yet (tracked in issue {_NOT_BUILT[name][1]}); nothing was run.",
              file=sys.stderr)
        return 2

    return cmd


def cmd_info(_args: argparse.Namespace) -> int:
    import torch

    import keeplora
    import keeplora_kernels

    print(f"keeplora {keeplora.__version__}, torch {torch.__version__}")
    print(f"compiled extension: {keeplora_kernels.extension_status()}")
    print(f"CUDA available: {torch.cuda.is_available()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keeplora", description="KeepLoRA continual learning for HF models")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, compiled extension and device")
    info.set_defaults(func=cmd_info)
    from .benchmark.cli import add_subcommands  # run, sweep, data (issue 6)

    add_subcommands(sub)
    for name, (help_text, _issue) in _NOT_BUILT.items():
        p = sub.add_parser(name, help=f"{help_text} (not built yet)")
        p.add_argument("args", nargs=argparse.REMAINDER)
        p.set_defaults(func=_not_built(name))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
