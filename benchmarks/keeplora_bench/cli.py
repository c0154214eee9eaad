"""The benchmark app's subcommands of the ``keeplora`` command line: ``run``, ``sweep``, ``aggregate``, ``data`` (the
embedded continual benchmark), ``bench`` and ``profile`` (microbenchmarks). ``keeplora.cli`` lists them and hands
them to :func:`main`.

Heavy imports (torch, transformers) happen inside the commands, so ``keeplora <command> -h`` stays fast.

A config argument is a YAML file, or the name of a bundled config (``default``, ``seed1``, ...: the files of the
repository's ``configs/``, which an installed wheel carries as ``keeplora_bench/configs``); without one, ``run``,
``sweep`` and ``data build`` use the bundled ``default``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from keeplora.cli import APP_COMMANDS

DEFAULT_CONFIG = "default"


def config_dir() -> Path:
    """The folder of the bundled configs: ``keeplora_bench/configs`` of an installed wheel, else ``configs/`` of the
    source checkout that holds this package (an editable install)."""
    here = Path(__file__).resolve().parent
    packaged = here / "configs"
    return packaged if packaged.is_dir() else here.parents[1] / "configs"


def bundled_configs() -> list[str]:
    """The names of the bundled configs (file stems), sorted."""
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def resolve_config(arg: str | None) -> Path:
    """The config file a command reads: ``arg`` when it is an existing file, else the bundled config of that name
    (``default``, ``default.yaml``); None: the bundled default. Raises ConfigError naming the bundled configs."""
    from .continual.runconfig import ConfigError

    arg = DEFAULT_CONFIG if arg is None else str(arg)
    path = Path(arg)
    if path.is_file():
        return path
    if path.name == arg:  # a bare name: look among the bundled configs
        bundled = config_dir() / (arg if arg.endswith((".yaml", ".yml")) else f"{arg}.yaml")
        if bundled.is_file():
            return bundled
    raise ConfigError(
        f"config {arg!r} is neither a file nor a bundled config; bundled configs (in {config_dir()}): "
        f"{', '.join(bundled_configs()) or 'none found'}"
    )


def cmd_run(args: argparse.Namespace) -> int:
    from .continual.model import ModelMissing
    from .continual.runconfig import ConfigError
    from .continual.runner import CheckpointError, run
    from .continual.sources import SourceMissing

    try:
        result = run(
            resolve_config(args.config),
            output=args.output,
            quick=args.quick,
            resume=args.resume,
            methods=[m.strip() for m in args.methods.split(",")] if args.methods else None,
            progress=not args.no_progress,
        )
    except (ConfigError, SourceMissing, ModelMissing, CheckpointError) as e:
        print(f"keeplora run: {e}", file=sys.stderr)
        return 2
    print((result.output / "results.md").read_text())
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .continual.model import ModelMissing
    from .continual.runconfig import ConfigError
    from .continual.sources import SourceMissing
    from .continual.sweep import parse_params, sweep

    try:
        params = parse_params(args.param or [])
        if not params:
            raise ConfigError("give at least one --param NAME=V1,V2,...")
        sweep(
            resolve_config(args.config),
            params,
            method=args.method,
            output=args.output,
            quick=args.quick,
            grid=args.grid,
            progress=not args.no_progress,
            select=args.select,
        )
    except (ConfigError, SourceMissing, ModelMissing) as e:
        print(f"keeplora sweep: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .continual import sources

    if args.action == "fetch":
        try:
            sources.fetch(args.names or None, args.cache)
        except Exception as e:  # report the failing command and its output, exit non-zero
            print(f"keeplora data fetch: {e}", file=sys.stderr)
            return 1
        return 0
    if args.action == "status":
        for row in sources.source_status(args.cache):
            print(
                f"{'cached ' if row['cached'] else 'MISSING'}  {row['name']:<20} {row['version']:<16} "
                f"{row['kind']:<6} {row['bytes'] / 1e6:6.2f} MB  {row['path']}"
            )
        return 0
    # build: the processed splits of a config (after this, runs need neither the registries nor the raw sources)
    from .continual.runconfig import ConfigError, load_config
    from .continual.tasks import TaskSpec, load_task

    try:
        cfg = load_config(resolve_config(args.config), quick=args.quick)
    except ConfigError as e:
        print(f"keeplora data build: {e}", file=sys.stderr)
        return 2
    cache = args.cache or cfg["data"].get("cache")
    probe = {"train_per_class": 0, "val_per_class": 0}  # the runner's panel: test splits only, never trained
    specs = [(t, "task") for t in cfg["tasks"]] + [({**p, **probe}, "probe") for p in cfg.get("panel") or []]
    for t, kind in specs:
        task = load_task(TaskSpec.from_dict(t, cfg["data"]), int(cfg["seed"]), cache)
        pools = list((task.meta.get("pool_sizes") or {}).values())  # texts per class the splits were drawn from
        pool = f"{min(pools)}-{max(pools)}" if pools else "?"
        print(
            f"{kind:<5} {task.name:<22} {len(task.classes):3d} classes  train {len(task.train):5d}  "
            f"val {len(task.val):4d}  test {len(task.test):5d}  pool/class {pool:>11}  {task.fingerprint()}"
        )
    return 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    from .continual.aggregate import aggregate, gate_over_runs, run_gates, to_markdown, write_csv, write_plots

    try:
        rows = aggregate(args.runs, baseline=args.baseline)
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
        print(to_markdown(rows, args.baseline, metrics))
        gates = run_gates(args.runs)
        if gates:
            passed = sum(run["gate"]["passed"] is True for run in gates)
            print(f"\ndrift gate per run (over the methods of all its folders): passed on {passed} of {len(gates)}")
            for run in gates:
                print(f"  {' + '.join(run['folders'])}: {run['gate']['text']}")
            print(gate_over_runs(gates)["text"])
    except (FileNotFoundError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.output:
        write_csv(rows, args.output)
    if args.plots:
        for path in write_plots(args.runs, rows, args.baseline, Path(args.plots)):
            print(f"[keeplora] wrote {path}", file=sys.stderr)  # stdout is the table alone
    return 0


_BENCHES = {"kernels": "bench_kernels", "lora-variants": "bench_lora_variants", "rsvd": "bench_rsvd"}


def cmd_bench(argv: list[str]) -> int:
    if not argv or argv[0] not in _BENCHES:
        print(
            f"usage: keeplora bench {{{','.join(_BENCHES)}}} [options]   (keeplora bench kernels -h for options)\n"
            "  kernels: frozen-A LoRA linear, residual projection, second moment vs their baselines\n"
            "  rsvd:    batched randomized SVD and principal subspace vs svd_lowrank loops and linalg.svd",
            file=sys.stderr,
        )
        return 2
    result = importlib.import_module(f"{__package__}.micro.{_BENCHES[argv[0]]}").main(argv[1:])
    return int(result or 0)


def cmd_profile(argv: list[str]) -> int:
    from .micro import profile_lifecycle

    return int(profile_lifecycle.main(argv))


# subcommands that parse their own arguments (everything after the name is passed through)
_PASSTHROUGH = {"profile": cmd_profile, "bench": cmd_bench}


CONFIG_HELP = "a YAML file (e.g. configs/default.yaml) or a bundled config's name (default: default)"


def add_subcommands(sub) -> None:
    p = sub.add_parser("run", help=APP_COMMANDS["run"])
    p.add_argument("config", nargs="?", help=CONFIG_HELP)
    p.add_argument("--output", "-o", help="run folder (default runs/<config name>[-quick])")
    p.add_argument("--quick", action="store_true", help="apply the config's `quick` section (CI-sized)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    p.add_argument("--methods", help="comma-separated subset of the config's method names")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help=APP_COMMANDS["sweep"])
    p.add_argument("config", nargs="?", help=CONFIG_HELP)
    p.add_argument(
        "--param",
        action="append",
        metavar="NAME=V1,V2",
        help="a parameter and its values, e.g. weight_energy=0.6,0.85 (repeatable)",
    )
    p.add_argument("--method", default="keeplora", help="the config's method to vary (default keeplora)")
    p.add_argument("--grid", action="store_true", help="full grid instead of one factor at a time")
    p.add_argument(
        "--select",
        default="val_average",
        choices=["val_average", "val_last", "val_transfer"],
        help="the validation metric that selects the point (default val_average)",
    )
    p.add_argument("--output", "-o")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("aggregate", help=APP_COMMANDS["aggregate"])
    p.add_argument(
        "runs",
        nargs="+",
        help="run folders written by `keeplora run` (folders of one config and seed split by --methods merge)",
    )
    p.add_argument(
        "--baseline",
        action="append",
        help="a method name: also report each method's paired difference to it, with a 95%% interval (repeatable)",
    )
    p.add_argument("--output", "-o", help="also write the rows to this CSV file")
    p.add_argument("--metrics", help="comma-separated metrics for the printed table (default: all; the CSV has all)")
    p.add_argument(
        "--plots",
        metavar="DIR",
        help="also write plots to DIR: the held-out panel over the steps (mean and interval over runs) and the "
        "paired differences to each --baseline",
    )
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("data", help=APP_COMMANDS["data"])
    dsub = p.add_subparsers(dest="action", required=True)
    f = dsub.add_parser("fetch", help="download (pinned, sha256-checked) and unpack sources into the cache")
    f.add_argument("names", nargs="*", help="sources (default: all)")
    f.add_argument("--cache", help="cache folder (default $KEEPLORA_CACHE or ~/.cache/keeplora)")
    s = dsub.add_parser("status", help="which sources are cached")
    s.add_argument("--cache")
    b = dsub.add_parser("build", help="build and cache a config's processed task splits")
    b.add_argument("config", nargs="?", help=CONFIG_HELP)
    b.add_argument("--quick", action="store_true")
    b.add_argument("--cache")
    p.set_defaults(func=cmd_data)
    for name in _PASSTHROUGH:
        sub.add_parser(name, help=APP_COMMANDS[name], add_help=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keeplora", description="the KeepLoRA benchmark app")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _PASSTHROUGH:
        return _PASSTHROUGH[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args))
