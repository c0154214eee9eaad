"""The recorded five-seed runs of the drift setting (``docs/results/drift-seeds/``, the tables of the README and
``docs/benchmark.md``) against the configs as they stand: every folder is a run of ``configs/drift.yaml`` or
``configs/drift-seed<N>.yaml`` (apart from its name, the torch thread count and which methods it ran), so a config
change that is not re-run fails here; and every recorded run able to compute the drift gate passed it, i.e. the
unprotected baseline forgot and eroded enough for the runs to judge protection."""

import json
from pathlib import Path

import pytest
import yaml

from keeplora_bench.continual.runconfig import load_config

ROOT = Path(__file__).resolve().parents[2]
RECORDS = ROOT / "docs" / "results" / "drift-seeds"
SEEDS = {0, 1, 2, 3, 4}


def _records() -> list[Path]:
    return sorted(p.parent for p in RECORDS.glob("*/config.yaml"))


def _source(seed: int) -> Path:
    return ROOT / "configs" / ("drift.yaml" if seed == 0 else f"drift-seed{seed}.yaml")


@pytest.mark.parametrize("record", [p.name for p in _records()])
def test_a_recorded_drift_run_is_a_run_of_its_config_as_it_stands(record):
    recorded = yaml.safe_load((RECORDS / record / "config.yaml").read_text())
    expected = load_config(_source(recorded["seed"]))
    methods = {}
    for which, cfg in (("recorded", recorded), ("expected", expected)):
        cfg.pop("name")
        cfg["training"].pop("threads")
        methods[which] = {m["name"]: m for m in cfg.pop("methods")}
    assert recorded == expected
    assert methods["recorded"], "a run without methods"
    for name, spec in methods["recorded"].items():
        assert spec == methods["expected"].get(name), name


def test_the_recorded_drift_runs_cover_five_seeds_and_pass_the_drift_gate():
    records = _records()
    assert {yaml.safe_load((p / "config.yaml").read_text())["seed"] for p in records} == SEEDS
    gates = {p.name: json.loads((p / "results.json").read_text()).get("drift_gate") or {} for p in records}
    computed = {name: g for name, g in gates.items() if g.get("passed") is not None}
    assert len(computed) == len(SEEDS), gates  # one run with LoRA-FT per seed
    failed = {name: g["text"] for name, g in computed.items() if not g["passed"]}
    assert not failed, failed
