"""``keeplora run`` / ``keeplora sweep`` end to end on tiny random models and fixture sources (offline, seconds):
outputs, metrics, the methods' invariants, crash -> resume == uninterrupted, the CLI's errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from keeplora_bench.continual import metrics as M
from keeplora_bench.continual.runconfig import ConfigError, load_config
from keeplora_bench.continual.runner import CHECKPOINT_DELAY_ENV, run
from support.app_fixtures import make_tiny_clip, tiny_config, write_config

ALL_METHODS = [
    {"name": "zero-shot", "type": "zero_shot"},
    {"name": "full-ft", "type": "full_ft", "lr": 1e-3},
    {"name": "lora-ft", "type": "lora_ft"},
    {"name": "keeplora", "type": "keeplora"},
    {"name": "keeplora+", "type": "keeplora", "head": True},
    {"name": "keeplora eps_w=0", "type": "keeplora", "weight_energy": 0.0},
    {"name": "keeplora no memory", "type": "keeplora", "feature_energy": 0.0},
    {"name": "keeplora random A", "type": "keeplora", "a_init": "random"},
]


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=path)
    env.pop(CHECKPOINT_DELAY_ENV, None)
    return env


@pytest.mark.filterwarnings("error:`is_gradient_checkpointing`:FutureWarning")  # PEFT's, silenced by wrap_peft
def test_all_methods_outputs_and_invariants(world, tmp_path):
    cfg_path = write_config(tiny_config(world / "bert", world / "cache", ALL_METHODS), tmp_path / "cfg.yaml")
    out = tmp_path / "run"
    result = run(cfg_path, output=out, progress=False, log=lambda _: None)
    T = 3
    assert result.tasks == ["topic", "sentiment", "novel"]
    saved = json.loads((out / "results.json").read_text())
    zero = json.loads((out / "zero_shot.json").read_text())["accuracy"]
    for spec in ALL_METHODS:
        acc = np.array(saved["matrices"][spec["name"]])
        assert acc.shape == (T, T) and ((0 <= acc) & (acc <= 1)).all()
        row = next(r for r in saved["methods"] if r["method"] == spec["name"])
        assert {k: row[k] for k in ("transfer", "average", "last")} == M.summarize(acc)
        folder = out / "methods" / yaml_slug(spec["name"])
        assert (folder / "heatmap.png").stat().st_size > 0
        csv_rows = (folder / "accuracy.csv").read_text().splitlines()
        assert len(csv_rows) == T + 1 and csv_rows[0].split(",")[1:] == result.tasks
        if spec["type"] == "zero_shot":
            assert (acc == np.array(zero)[None, :]).all()
    assert (out / "accuracy_over_steps.png").stat().st_size > 0
    assert "| keeplora+ |" in (out / "results.md").read_text()
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["task"]) for r in log) == sorted(
        (m["name"], t) for m in ALL_METHODS if m["type"] != "zero_shot" for t in result.tasks
    )
    # KeepLoRA's memory: bases only grow, never past d_in; no growth without memory (ε_f = 0)
    info = {
        m["name"]: json.loads((out / "methods" / yaml_slug(m["name"]) / "accuracy.json").read_text())["info"]
        for m in ALL_METHODS
        if m["type"] == "keeplora"
    }
    for name, per_task in info.items():
        sizes = [t["basis_sizes"] for t in per_task]
        assert len(sizes) == T
        for before, after in zip(sizes, sizes[1:]):
            assert all(after[k] >= before[k] for k in before), name
        assert all(v <= per_task[0]["d_in"][k] for s in sizes for k, v in s.items())
    nomem = [t["basis_sizes"] for t in info["keeplora no memory"]]
    assert nomem[0] == nomem[-1]
    assert sum(info["keeplora"][-1]["basis_sizes"].values()) > sum(info["keeplora"][0]["basis_sizes"].values())
    # ε_w = 0 starts from an empty basis: after task 1 it holds only that task's feature directions
    assert sum(info["keeplora eps_w=0"][0]["basis_sizes"].values()) < sum(info["keeplora"][0]["basis_sizes"].values())


def yaml_slug(name: str) -> str:
    from keeplora_bench.continual.runconfig import method_slug

    return method_slug(name)


def test_keeplora_leaves_protected_inputs_alone(world, tmp_path):
    """KeepLoRA+'s head aside, a task trained with ε_f = 1 memory keeps its accuracy exactly after later tasks
    whose updates are confined to the residual of that task's features (the no-interference guarantee, end to end,
    on tasks whose feature spans are small)."""
    methods = [{"name": "keeplora", "type": "keeplora", "feature_energy": 1.0}]
    cfg = tiny_config(
        world / "bert",
        world / "cache",
        methods,
        tasks=[
            {"name": "sentiment", "builder": "vader_sentiment", "domain": "tweets"},
            {"name": "sentiment2", "builder": "vader_sentiment", "domain": "nyt"},
        ],
    )
    result = run(write_config(cfg, tmp_path / "c.yaml"), output=tmp_path / "r", progress=False, log=lambda _: None)
    acc = result.matrices["keeplora"]
    info = json.loads((tmp_path / "r" / "methods" / "keeplora" / "accuracy.json").read_text())["info"]
    full = all(info[0]["basis_sizes"][k] == info[0]["d_in"][k] for k in info[0]["d_in"])
    if full:  # every input direction of task 1 is protected: task 2 cannot change task 1's outputs at all
        assert acc[1, 0] == acc[0, 0]
    else:
        pytest.skip("the tiny model's task-1 features do not span all inputs at ε_f = 1")


def test_crash_then_resume_equals_uninterrupted(world, tmp_path):
    methods = [{"name": "lora-ft", "type": "lora_ft"}, {"name": "keeplora+", "type": "keeplora", "head": True}]
    cfg_path = write_config(tiny_config(world / "bert", world / "cache", methods), tmp_path / "cfg.yaml")
    cmd = [sys.executable, "-m", "keeplora", "run", str(cfg_path), "--no-progress", "--output"]
    # 1) start, and kill -9 right after the first checkpoint (the run sleeps after each checkpoint, test knob)
    crashed = tmp_path / "crashed"
    env = dict(_env(), **{CHECKPOINT_DELAY_ENV: "4"})
    proc = subprocess.Popen(cmd + [str(crashed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = crashed / "progress.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and sum(json.loads(progress.read_text() or "{}").values()) >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"run ended before its first checkpoint: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_crash = json.loads(progress.read_text())
    assert done_at_crash == {"lora-ft": 1}
    assert not (crashed / "results.json").exists() or "keeplora+" not in (crashed / "results.json").read_text()
    # 2) resume to the end
    subprocess.run(cmd + [str(crashed), "--resume"], env=_env(), check=True, capture_output=True)
    # 3) the same config, uninterrupted
    subprocess.run(cmd + [str(tmp_path / "clean")], env=_env(), check=True, capture_output=True)
    a = json.loads((crashed / "results.json").read_text())
    b = json.loads((tmp_path / "clean" / "results.json").read_text())
    assert a["matrices"] == b["matrices"]
    assert [(m["method"], m["transfer"], m["average"], m["last"]) for m in a["methods"]] == [
        (m["method"], m["transfer"], m["average"], m["last"]) for m in b["methods"]
    ]
    # nothing finished before the crash was computed again: one log line per (method, task)
    log = [(r["method"], r["task"]) for r in map(json.loads, (crashed / "log.jsonl").read_text().splitlines())]
    assert len(log) == len(set(log)) == 6


def test_resume_needs_the_same_config(world, tmp_path):
    cfg = tiny_config(world / "bert", world / "cache", [{"name": "zero-shot", "type": "zero_shot"}])
    path = write_config(cfg, tmp_path / "cfg.yaml")
    run(path, output=tmp_path / "r", progress=False, log=lambda _: None)
    with pytest.raises(ConfigError, match="already holds a run"):
        run(path, output=tmp_path / "r", progress=False, log=lambda _: None)
    cfg["seed"] = 1
    with pytest.raises(ConfigError, match="differs"):
        run(write_config(cfg, path), output=tmp_path / "r", resume=True, progress=False, log=lambda _: None)
    with pytest.raises(ConfigError, match="holds no run"):
        run(path, output=tmp_path / "none", resume=True, progress=False, log=lambda _: None)


def test_clip_model_directory(world, tmp_path):
    clip = make_tiny_clip(tmp_path / "clip")
    text_targets = r"text_model\..*\.(q_proj|k_proj|v_proj|out_proj)"
    methods = [
        {"name": "zero-shot", "type": "zero_shot"},
        {"name": "lora-ft", "type": "lora_ft"},
        {"name": "keeplora+", "type": "keeplora", "head": True},
    ]
    cfg = tiny_config(
        clip,
        world / "cache",
        methods,
        tasks=[
            {"name": "sentiment", "builder": "vader_sentiment", "domain": "tweets"},
            {"name": "language", "builder": "fortune_language"},
        ],
    )
    cfg["adapter"]["target_modules"] = text_targets
    cfg["model"]["logit_scale"] = "model"
    result = run(write_config(cfg, tmp_path / "c.yaml"), output=tmp_path / "r", progress=False, log=lambda _: None)
    assert set(result.matrices) == {"zero-shot", "lora-ft", "keeplora+"}
    info = json.loads((tmp_path / "r" / "methods" / "keeplora+" / "accuracy.json").read_text())["info"]
    assert info[0]["basis_sizes"] and all(k.startswith("text_model.") for k in info[0]["basis_sizes"])


PANEL = [{"name": "probe-wordnet", "builder": "wordnet_supersense", "classes": ["food", "body", "artifact"]}]


def test_validation_panel_and_drift_gate(world, tmp_path):
    methods = [m for m in ALL_METHODS if m["name"] in ("zero-shot", "full-ft", "lora-ft", "keeplora")]
    cfg = tiny_config(world / "bert", world / "cache", methods, panel=PANEL)
    cfg["data"]["val_per_class"] = 4
    out = tmp_path / "run"
    lines = []
    result = run(write_config(cfg, tmp_path / "c.yaml"), output=out, progress=False, log=lines.append)
    saved = json.loads((out / "results.json").read_text())
    zero = json.loads((out / "zero_shot.json").read_text())
    assert zero["probes"] == ["probe-wordnet"] and len(zero["val"]) == 3 and len(zero["panel"]) == 1
    data = json.loads((out / "data.json").read_text())
    assert [(d["name"], d["role"], d.get("val", 0), d["train"]) for d in data] == [
        ("topic", "task", 4 * len(data[0]["classes"]), 8 * len(data[0]["classes"])),
        ("sentiment", "task", 4 * 2, 8 * 2),
        ("novel", "task", 4 * len(data[2]["classes"]), 8 * len(data[2]["classes"])),
        ("probe-wordnet", "probe", 0, 0),
    ]
    for spec in methods:
        name = spec["name"]
        acc, val = np.array(saved["matrices"][name]), np.array(saved["val_matrices"][name])
        panel = np.array(saved["panel_accuracy"][name])
        assert val.shape == (3, 3) and panel.shape == (4, 1) and (panel[0] == zero["panel"]).all()
        row = next(r for r in saved["methods"] if r["method"] == name)
        expected = M.summarize(acc, zero["accuracy"], panel)
        assert {k: row[k] for k in expected} == expected
        assert {k[4:]: v for k, v in row.items() if k.startswith("val_")} == M.summarize(val, zero["val"])
        if spec["type"] == "zero_shot":
            assert row["bwt"] == 0.0 and row["fwt"] == 0.0 and row["retention"] == round(zero["panel"][0] * 100, 1)
    gate = saved["drift_gate"]
    drops = {name: next(r for r in saved["methods"] if r["method"] == name)["retention"] for name in gate["panel_drop"]}
    zero_panel = round(zero["panel"][0] * 100, 1)
    assert set(gate["panel_drop"]) == {"full-ft", "lora-ft"}
    for name, drop in gate["panel_drop"].items():
        assert drop == pytest.approx(drops[name] - zero_panel, abs=0.11)
    lora_bwt = next(r for r in saved["methods"] if r["method"] == "lora-ft")["bwt"]
    assert gate["passed"] == (min(gate["panel_drop"].values()) <= -5 and lora_bwt <= -3)
    assert any(line.startswith("[keeplora] drift gate") for line in lines)
    assert "Drift gate" in (out / "results.md").read_text() and "probe-wordnet" in (out / "results.md").read_text()
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert (
        header[:7] == ["method", "transfer", "average", "last", "bwt", "fwt", "retention"] and "val_average" in header
    )
    assert (out / "retention.png").stat().st_size > 0
    assert result.probes == ["probe-wordnet"]


def test_probe_overlapping_a_training_split_is_refused(world, tmp_path):
    cfg = tiny_config(
        world / "bert",
        world / "cache",
        [{"name": "zero-shot", "type": "zero_shot"}],
        panel=[{"name": "probe-topic", "builder": "fortune_topic"}],  # the same texts as the task "topic"
    )
    with pytest.raises(ValueError, match="probe-topic"):
        run(write_config(cfg, tmp_path / "c.yaml"), output=tmp_path / "o", progress=False, log=lambda _: None)


def test_sweep_selects_on_validation_only(world, tmp_path):
    from keeplora_bench.continual.sweep import parse_params, sweep

    cfg = tiny_config(
        world / "bert",
        world / "cache",
        [{"name": "keeplora", "type": "keeplora"}],
        tasks=[
            {"name": "sentiment", "builder": "vader_sentiment", "domain": "tweets"},
            {"name": "novel", "builder": "austen_novel"},
        ],
        panel=PANEL,
    )
    params = parse_params(["feature_energy=0.5,0.9", "r=2"])
    with pytest.raises(ConfigError, match="val_per_class"):
        sweep(
            write_config(cfg, tmp_path / "c.yaml"), params, output=tmp_path / "sw0", progress=False, log=lambda _: None
        )
    cfg["data"]["val_per_class"] = 4
    points = sweep(
        write_config(cfg, tmp_path / "c.yaml"), params, output=tmp_path / "sw", progress=False, log=lambda _: None
    )
    assert [p["label"] for p in points] == ["baseline feature_energy=0.9 r=4", "feature_energy=0.5", "r=2"]
    for p in points:
        assert len(p["basis_sizes"]) == 2 and set(p) >= {"val_transfer", "val_average", "val_last"}
        assert not {"transfer", "average", "last", "retention"} & set(p)  # no test split, no probe evaluated
    assert [p["selected"] for p in points].count(True) == 1
    assert max(points, key=lambda p: p["val_average"])["selected"]
    for point in (tmp_path / "sw").iterdir():
        if point.is_dir():
            zero = json.loads((point / "zero_shot.json").read_text())
            assert zero["accuracy"] is None and "panel" not in zero
            for line in (point / "log.jsonl").read_text().splitlines():
                assert set(json.loads(line)) >= {"val_accuracy"} and not {"accuracy", "panel_accuracy"} & set(
                    json.loads(line)
                )
    # a lower ε_f keeps fewer feature directions
    assert sum(points[1]["basis_sizes"][-1].values()) < sum(points[0]["basis_sizes"][-1].values())
    for name in ("sweep.csv", "sweep.md", "sweep.json", "sweep_metrics.png", "basis_sizes.png"):
        assert (tmp_path / "sw" / name).stat().st_size > 0
    assert "selected by val_average" in (tmp_path / "sw" / "sweep.md").read_text()
    with pytest.raises(ConfigError, match="not sweepable"):
        parse_params(["logit_scale=1,2"])
    # numbers however written (YAML alone reads "5e-4" as a string), names stay strings
    assert parse_params(["lr=5e-4,1.0e-3,0.002,2", "b_init=zero"]) == {"lr": [5e-4, 1e-3, 0.002, 2], "b_init": ["zero"]}
    with pytest.raises(ConfigError, match="--select"):
        sweep(
            write_config(cfg, tmp_path / "c.yaml"), params, output=tmp_path / "sw", select="average", log=lambda _: None
        )


def test_a_sweep_point_equals_the_run_of_the_config_with_its_value(world, tmp_path):
    """Sweep points share their method's random stream (LoRA-FT's random A init included), so a point differs from
    the baseline by the swept value only, and equals a plain run of the config with that value."""
    from keeplora_bench.continual.sweep import parse_params, sweep

    cfg = tiny_config(world / "bert", world / "cache", [{"name": "lora-ft", "type": "lora_ft"}], panel=PANEL)
    cfg["data"]["val_per_class"] = 4
    points = sweep(
        write_config(cfg, tmp_path / "c.yaml"),
        parse_params(["lr=0.2"]),
        method="lora-ft",
        output=tmp_path / "sw",
        progress=False,
        log=lambda _: None,
    )
    cfg["training"]["lr"] = 0.2
    plain = run(write_config(cfg, tmp_path / "c2.yaml"), output=tmp_path / "plain", progress=False, log=lambda _: None)
    point = next(p for p in points if p["label"] == "lr=0.2")
    for key in ("val_transfer", "val_average", "val_last", "val_bwt"):
        assert point[key] == plain.metrics["lora-ft"][key], key
    assert points[0]["val_average"] != point["val_average"]  # the learning rate did matter


def test_config_inheritance_order_and_quick(tmp_path):
    root = Path(__file__).resolve().parents[2] / "configs"
    base = load_config(root / "default.yaml")
    other = load_config(root / "order2.yaml")
    assert sorted(t["name"] for t in base["tasks"]) == sorted(t["name"] for t in other["tasks"])
    assert [t["name"] for t in base["tasks"]] != [t["name"] for t in other["tasks"]]
    assert len(base["tasks"]) >= 8 and {m["type"] for m in base["methods"]} == {
        "zero_shot",
        "full_ft",
        "lora_ft",
        "keeplora",
    }
    assert base["methods"] == [dict(m) for m in other["methods"]]
    quick = load_config(root / "default.yaml", quick=True)
    assert quick["training"]["epochs"] == 1 and quick["data"]["train_per_class"] < base["data"]["train_per_class"]
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config(
            write_config(
                {
                    "tasks": [{"name": "a", "builder": "austen_novel"}],
                    "methods": [{"name": "x", "type": "lora_ft", "head": True}],
                },
                tmp_path / "bad.yaml",
            )
        )


def test_config_numbers_in_exponent_form_and_bad_training_values(tmp_path):
    # PyYAML reads `1e-3` (no dot) as a string; the config loader reads it as YAML 1.2 does, a float
    path = tmp_path / "c.yaml"
    path.write_text(
        "tasks: [{name: a, builder: austen_novel}]\ntraining: {lr: 1e-3}\n"
        "methods: [{name: x, type: lora_ft, weight_decay: 5E-2}, {name: y, type: keeplora, lr: 2.5e-4}]\n"
    )
    cfg = load_config(path)
    assert [(m["lr"], m["weight_decay"]) for m in cfg["methods"]] == [(1e-3, 5e-2), (2.5e-4, 0.01)]
    assert all(type(m["lr"]) is float for m in cfg["methods"])
    bad = {
        "lr: fast": r"method 'x': lr must be a number > 0, got 'fast'",
        "lr: 0": r"method 'x': lr must be a number > 0",
        "weight_decay: -1.0": r"method 'x': weight_decay must be a number >= 0",
        "epochs: 1.5": r"method 'x': epochs must be an integer >= 1",
        "schedule: cosine": r"method 'x': schedule must be 'onecycle' or 'constant'",
    }
    for entry, message in bad.items():
        path.write_text(
            f"tasks: [{{name: a, builder: austen_novel}}]\nmethods: [{{name: x, type: lora_ft, {entry}}}]\n"
        )
        with pytest.raises(ConfigError, match=message):
            load_config(path)
    path.write_text(
        "tasks: [{name: a, builder: austen_novel}]\ntraining: {batch_size: 0}\nmethods: [{name: x, type: zero_shot}]\n"
    )
    with pytest.raises(ConfigError, match="training: batch_size must be an integer >= 1"):
        load_config(path)
    # a key that nothing reads (at the top level, in model/data/training, in a section of method defaults) is a
    # typo, not a setting
    for section, message in {
        "keeplora: {weight_enrgy: 0.95}": r"keeplora: unknown keys \['weight_enrgy'\]; accepted: \['a_init', ",
        "adapter: {rank: 4}": r"adapter: unknown keys \['rank'\]; accepted: \['alpha', 'r', 'target_modules'\]",
        "olora: {lambda: 1}": r"olora: unknown keys \['lambda'\]; accepted: \['lambda_l2', 'lambda_orth', ",
        "keeplora: 0.9": r"keeplora: a mapping of method defaults with keys from \['a_init', .*; got 0.9",
        "training: {epoch: 6}": r"training: unknown keys \['epoch'\]; accepted: \['batch_size', 'epochs', ",
        "data: {train_per_clas: 8}": r"data: unknown keys \['train_per_clas'\]; accepted: \['cache', ",
        "model: {max_len: 24}": r"model: unknown keys \['max_len'\]; accepted: \['kind', 'logit_scale', ",
        "threads: 1": r"unknown top-level keys \['threads'\]; accepted: \['adapter', 'data', ",
        "training: 4": r"training: a mapping with keys from \['batch_size', .*; got 4",
    }.items():
        path.write_text(
            f"tasks: [{{name: a, builder: austen_novel}}]\n{section}\nmethods: [{{name: x, type: keeplora}}]\n"
        )
        with pytest.raises(ConfigError, match=message):
            load_config(path)


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "keeplora", *args], capture_output=True, text=True, env=env or _env(), timeout=300
    )


def test_cli_missing_source_names_the_command(world, tmp_path):
    cfg = tiny_config(world / "bert", tmp_path / "empty-cache", [{"name": "zero-shot", "type": "zero_shot"}])
    proc = _cli("run", str(write_config(cfg, tmp_path / "c.yaml")), "--output", str(tmp_path / "o"), "--no-progress")
    assert proc.returncode == 2
    assert f"keeplora data fetch fortunes --cache {tmp_path / 'empty-cache'}" in proc.stderr


def test_cli_registers_run_sweep_data():
    for name, option in (("run", "--resume"), ("sweep", "--param"), ("data", "fetch")):
        proc = _cli(name, "--help")
        assert proc.returncode == 0 and option in proc.stdout
