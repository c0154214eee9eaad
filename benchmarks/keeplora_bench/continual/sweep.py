"""``keeplora sweep``: choose one method's hyper-parameters on the validation splits of a task sequence.

Points are one-factor-at-a-time around the config's values (the baseline point plus, per parameter, every other
value), or the full grid with ``--grid``. Each point is an ordinary run folder under the sweep folder (so points
resume like runs do) that evaluates **only the validation splits** (the config must carve them:
``data.val_per_class > 0``): no test split and no held-out probe is ever evaluated, so a value chosen here is chosen
on validation data. The point with the best ``select`` metric (default ``val_average``: the validation Average) is
marked as selected. The sweep writes ``sweep.{csv,json,md}``, ``sweep_metrics.png`` (the validation metrics against
each parameter) and ``basis_sizes.png`` (protected-basis size per module after each task, per point).
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from . import metrics as M
from .runconfig import ADAPTER_KEYS, KEEPLORA_KEYS, PEER_KEYS, TRAINING_KEYS, ConfigError, load_config, method_slug
from .runner import Runner, prepare_output

SWEEPABLE = (
    set(ADAPTER_KEYS) | set(KEEPLORA_KEYS) | set(TRAINING_KEYS) | {k for keys in PEER_KEYS.values() for k in keys}
)
SELECTABLE = ("val_average", "val_last", "val_transfer")  # higher is better
METRICS = ("val_transfer", "val_average", "val_last")


def parse_values(text: str) -> list:
    """``"0.6,0.85"`` -> ``[0.6, 0.85]`` (YAML scalars: numbers, strings, booleans; ``1e-3`` is a number too)."""
    return [_scalar(v) for v in text.split(",") if v.strip()]


def _scalar(text: str):
    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads an exponent without a dot ("5e-4") as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_params(items: list[str]) -> dict[str, list]:
    params = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(f"--param expects NAME=V1,V2,..., got {item!r}")
        if name not in SWEEPABLE:
            raise ConfigError(f"--param {name}: not sweepable; choose from {sorted(SWEEPABLE)}")
        params[name] = parse_values(values)
    return params


def sweep_points(base: dict, params: dict[str, list], grid: bool) -> list[dict]:
    """``[{"label", "param", "value", "overrides"}]``; ``param``/``value`` name the varied one (None: baseline)."""
    if grid:
        names = list(params)
        return [
            {
                "label": " ".join(f"{n}={v}" for n, v in zip(names, combo)),
                "param": None,
                "value": None,
                "overrides": dict(zip(names, combo)),
            }
            for combo in itertools.product(*params.values())
        ]
    points = [
        {
            "label": "baseline " + " ".join(f"{n}={base[n]}" for n in params),
            "param": None,
            "value": None,
            "overrides": {},
        }
    ]
    for name, values in params.items():
        for v in values:
            if v != base[name]:
                points.append({"label": f"{name}={v}", "param": name, "value": v, "overrides": {name: v}})
    return points


def sweep(
    config,
    params: dict[str, list],
    method: str = "keeplora",
    output: Path | None = None,
    quick: bool = False,
    grid: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    select: str = "val_average",
) -> list[dict]:
    cfg = load_config(config, quick=quick) if not isinstance(config, dict) else config
    if select not in SELECTABLE:
        raise ConfigError(f"--select must be one of {list(SELECTABLE)}, got {select!r}")
    if int(cfg["data"].get("val_per_class") or 0) <= 0:
        raise ConfigError(
            "keeplora sweep selects on validation splits only: set data.val_per_class > 0 in the config (the "
            "test splits are evaluated by `keeplora run` only)"
        )
    specs = {m["name"]: m for m in cfg["methods"]}
    if method not in specs:
        raise ConfigError(f"--method {method!r} is not in the config's methods {list(specs)}")
    base = specs[method]
    missing = [p for p in params if p not in base]
    if missing:
        raise ConfigError(f"method {method!r} ({base['type']}) has no parameters {missing}")
    out = Path(output) if output else Path("runs") / f"sweep-{cfg['name']}{'-quick' if quick else ''}"
    out.mkdir(parents=True, exist_ok=True)
    points = sweep_points(base, params, grid)
    zero_shot = None
    results = []
    for i, point in enumerate(points):
        spec = copy.deepcopy(base)
        spec.update(point["overrides"])
        spec["name"] = f"{method} {point['label']}" if point["overrides"] else method
        spec["slug"] = method_slug(spec["name"])
        spec["seed_key"] = base["slug"]  # the base method's random stream (the runner's seeding)
        point_cfg = dict(cfg, methods=[spec], name=f"{cfg['name']}-{spec['slug']}")
        folder = out / spec["slug"]
        log(f"[keeplora] sweep point {i + 1}/{len(points)}: {point['label']}")
        resume = (folder / "config.yaml").is_file()
        run_dir = prepare_output(point_cfg, folder, resume)
        if zero_shot is not None and not (run_dir / "zero_shot.json").exists():
            shutil.copyfile(zero_shot, run_dir / "zero_shot.json")
        result = Runner(point_cfg, run_dir, progress=progress, log=log, evaluate_test=False).run()
        zero_shot = run_dir / "zero_shot.json"
        info = json.loads((run_dir / "methods" / spec["slug"] / "accuracy.json").read_text())["info"]
        results.append(
            {
                "label": point["label"],
                "param": point["param"],
                "value": point["value"],
                **point["overrides"],
                **result.metrics[spec["name"]],
                "seconds": result.wall_s[spec["name"]],
                "basis_sizes": [x.get("basis_sizes") for x in info if x.get("basis_sizes")],
                "d_in": max((max(x.get("d_in", {}).values(), default=0) for x in info), default=0),
                "tasks": result.tasks,
            }
        )
    best = max(results, key=lambda r: r[select])
    for r in results:
        r["selected"] = r is best
    log(f"[keeplora] sweep: selected {best['label']} ({select} {best[select]:.1f})")
    write_sweep(out, results, base, params, select)
    return results


def write_sweep(
    out: Path, results: list[dict], base: dict, params: dict[str, list], select: str = "val_average"
) -> None:
    (out / "sweep.json").write_text(json.dumps({"select": select, "points": results}, indent=1))
    with open(out / "sweep.csv", "w", newline="") as f:
        cols = ["label"] + list(params) + [*METRICS, "selected", "seconds", "mean_basis_after_last"]
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in results:
            row = {**{p: r.get(p, base[p]) for p in params}, **r}
            last = r["basis_sizes"][-1] if r["basis_sizes"] else {}
            row["mean_basis_after_last"] = round(sum(last.values()) / len(last), 1) if last else ""
            w.writerow(row)
    rows = [  # parameters verbatim; the selected point marked
        {
            **r,
            **{p: str(r.get(p, base[p])) for p in params},
            "label": r["label"] + (" **(selected)**" if r.get("selected") else ""),
        }
        for r in results
    ]
    table = M.markdown_table(
        rows,
        [("label", "point")]
        + [(p, p) for p in params]
        + [("val_transfer", "val Transfer"), ("val_average", "val Average"), ("val_last", "val Last")],
    )
    (out / "sweep.md").write_text(
        f"# Sweep of {base['name']}\n\nEvaluated on the validation splits only; selected by {select}.\n\n{table}\n"
    )
    try:
        from .plots import basis_sizes, sweep_metrics
    except ImportError:
        return
    baseline = [r for r in results if r["param"] is None and not any(p in r for p in params)]
    if baseline:  # one-factor-at-a-time: each parameter's curve runs through the baseline point
        plotted = [{**baseline[0], "param": p, "value": base[p]} for p in params]
        plotted += [r for r in results if r["param"] is not None]
        sweep_metrics(plotted, out / "sweep_metrics.png")
    basis_sizes(results, results[0]["tasks"] if results else [], out / "basis_sizes.png")
