"""The recorded five-seed runs of the drift setting (``docs/results/drift-seeds/``, the tables of the README and
``docs/benchmark.md``) and of the peers on it (``docs/results/peers-drift/``) against the configs and the gate as they
stand: every folder is a run of its setting's config for its seed (the same shared settings, which leave out the
torch thread count, and each method it ran resolved as the config resolves it now, wherever the config sets its
values), so a config change that is not re-run fails here; and each seed's recorded drift-gate verdict
is the one the gate's thresholds give for its recorded numbers, so the docs' count of seeds that can judge
protection stays true when the gate changes; and the gate over the five seeds, which judges the means that the
tables report, passes."""

import json
from pathlib import Path

import pytest
import yaml

from keeplora_bench.continual.aggregate import gate_over_runs, load_results, run_gates
from keeplora_bench.continual.metrics import judge_drift
from keeplora_bench.continual.runconfig import load_config, shared_settings

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"
RECORDS = RESULTS / "drift-seeds"
SEEDS = {0, 1, 2, 3, 4}
SETTINGS = {"drift-seeds": "drift", "peers-drift": "peers"}  # results folder -> its configs (seed 0, seed<N>)


def _records(folder: str = "drift-seeds") -> list[Path]:
    return sorted(p.parent for p in (RESULTS / folder).glob("*/config.yaml"))


def _source(setting: str, seed: int) -> Path:
    return ROOT / "configs" / (f"{setting}.yaml" if seed == 0 else f"{setting}-seed{seed}.yaml")


@pytest.mark.parametrize("record", [f"{f}/{p.name}" for f in SETTINGS for p in _records(f)])
def test_a_recorded_drift_run_is_a_run_of_its_config_as_it_stands(record):
    recorded = yaml.safe_load((RESULTS / record / "config.yaml").read_text())
    expected = load_config(_source(SETTINGS[record.split("/")[0]], recorded["seed"]))
    methods, shared = {}, {}
    for which, cfg in (("recorded", recorded), ("expected", expected)):
        methods[which] = {m["name"]: m for m in cfg["methods"]}
        shared[which] = shared_settings(cfg)
    assert shared["recorded"] == shared["expected"]
    assert methods["recorded"], "a run without methods"
    for name, spec in methods["recorded"].items():
        assert spec == methods["expected"].get(name), name


def test_the_recorded_drift_runs_cover_five_seeds_with_the_gate_verdicts_of_their_numbers():
    records = _records()
    assert {yaml.safe_load((p / "config.yaml").read_text())["seed"] for p in records} == SEEDS
    gates = {p.name: json.loads((p / "results.json").read_text()).get("drift_gate") or {} for p in records}
    computed = {name: g for name, g in gates.items() if g.get("passed") is not None}
    assert len(computed) == len(SEEDS), gates  # one run with LoRA-FT per seed
    for name, gate in computed.items():  # the gate as it stands, from the folder's recorded numbers
        saved = json.loads((RECORDS / name / "results.json").read_text())
        kinds = {m["name"]: m["type"] for m in yaml.safe_load((RECORDS / name / "config.yaml").read_text())["methods"]}
        zero = sum(saved["zero_shot_panel"]) / len(saved["zero_shot_panel"]) * 100.0
        assert judge_drift(kinds, load_results(RECORDS / name), zero)["passed"] == gate["passed"], name


def test_the_drift_setting_passes_its_gate_over_the_five_seeds():
    over = gate_over_runs(run_gates(_records()))
    assert over["n"] == len(SEEDS), over["text"]
    assert over["passed"] is True, over["text"]
