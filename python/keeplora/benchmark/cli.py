"""Subcommands ``run``, ``sweep`` and ``data`` of the ``keeplora`` command line (registered by ``keeplora.cli``).

Heavy imports (torch, transformers) happen inside the commands, so ``keeplora --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def cmd_run(args: argparse.Namespace) -> int:
    from .model import ModelMissing
    from .runconfig import ConfigError
    from .runner import CheckpointError, run
    from .sources import SourceMissing

    try:
        result = run(args.config, output=args.output, quick=args.quick, resume=args.resume,
                     methods=[m.strip() for m in args.methods.split(",")] if args.methods else None,
                     progress=not args.no_progress)
    except (ConfigError, SourceMissing, ModelMissing, CheckpointError) as e:
        print(f"keeplora run: {e}", file=sys.stderr)
        return 2
    print((result.output / "results.md").read_text())
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .model import ModelMissing
    from .runconfig import ConfigError
    from .sources import SourceMissing
    from .sweep import parse_params, sweep

    try:
        params = parse_params(args.param or [])
        if not params:
            raise ConfigError("give at least one --param NAME=V1,V2,...")
        sweep(args.config, params, method=args.method, output=args.output, quick=args.quick, grid=args.grid,
              progress=not args.no_progress)
    except (ConfigError, SourceMissing, ModelMissing) as e:
        print(f"keeplora sweep: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from . import sources

    if args.action == "fetch":
        try:
            sources.fetch(args.names or None, args.cache)
        except Exception as e:  # report the failing command and its output, exit non-zero
            print(f"keeplora data fetch: {e}", file=sys.stderr)
            return 1
        return 0
    if args.action == "status":
        for row in sources.source_status(args.cache):
            print(f"{'cached ' if row['cached'] else 'MISSING'}  {row['name']:<20} {row['version']:<16} "
                  f"{row['kind']:<6} {row['bytes'] / 1e6:6.2f} MB  {row['path']}")
        return 0
    # build: the processed splits of a config (after this, runs need neither the registries nor the raw sources)
    from .runconfig import load_config
    from .tasks import TaskSpec, load_task

    cfg = load_config(args.config, quick=args.quick)
    cache = args.cache or cfg["data"].get("cache")
    for t in cfg["tasks"]:
        task = load_task(TaskSpec.from_dict(t, cfg["data"]), int(cfg["seed"]), cache)
        print(f"{task.name:<22} {len(task.classes)} classes  train {len(task.train):5d}  test {len(task.test):5d}  "
              f"{task.fingerprint()}")
    return 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    from .aggregate import aggregate, to_markdown, write_csv

    try:
        rows = aggregate(args.runs, baseline=args.baseline)
    except (FileNotFoundError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    print(to_markdown(rows, args.baseline))
    if args.output:
        write_csv(rows, args.output)
    return 0


def add_subcommands(sub) -> None:
    p = sub.add_parser("run", help="run a continual-learning config: every method, T x T accuracies, metrics, plots")
    p.add_argument("config", help="YAML config, e.g. configs/default.yaml")
    p.add_argument("--output", "-o", help="run folder (default runs/<config name>[-quick])")
    p.add_argument("--quick", action="store_true", help="apply the config's `quick` section (CI-sized)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    p.add_argument("--methods", help="comma-separated subset of the config's method names")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="sensitivity of a method to its hyper-parameters (one factor at a time)")
    p.add_argument("config")
    p.add_argument("--param", action="append", metavar="NAME=V1,V2",
                   help="a parameter and its values, e.g. weight_energy=0.6,0.85 (repeatable)")
    p.add_argument("--method", default="keeplora", help="the config's method to vary (default keeplora)")
    p.add_argument("--grid", action="store_true", help="full grid instead of one factor at a time")
    p.add_argument("--output", "-o")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("aggregate", help="mean ± std of Transfer/Average/Last over runs (seeds) of one config")
    p.add_argument("runs", nargs="+", help="run folders written by `keeplora run`")
    p.add_argument("--baseline", help="a method name: also report each method's per-run difference to it")
    p.add_argument("--output", "-o", help="also write the rows to this CSV file")
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("data", help="the benchmark's data sources: fetch, status, build processed splits")
    dsub = p.add_subparsers(dest="action", required=True)
    f = dsub.add_parser("fetch", help="download (pinned, sha256-checked) and unpack sources into the cache")
    f.add_argument("names", nargs="*", help="sources (default: all)")
    f.add_argument("--cache", help="cache folder (default $KEEPLORA_CACHE or ~/.cache/keeplora)")
    s = dsub.add_parser("status", help="which sources are cached")
    s.add_argument("--cache")
    b = dsub.add_parser("build", help="build and cache a config's processed task splits")
    b.add_argument("config")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--cache")
    p.set_defaults(func=cmd_data)
