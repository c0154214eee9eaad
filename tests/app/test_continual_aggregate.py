"""keeplora aggregate: means, sample sds and percentile-bootstrap intervals over runs, and paired differences to one
or more baselines, from results.csv files."""

import csv
import json
import math

import numpy as np
import pytest
import yaml

from keeplora.cli import main
from keeplora_bench.continual.aggregate import aggregate, bootstrap_ci, to_markdown
from keeplora_bench.continual.runconfig import load_config


def _run(tmp_path, name, rows, extra=None):
    d = tmp_path / name
    d.mkdir()
    fields = ["method", "transfer", "average", "last"] + list(extra or []) + ["seconds"]
    with (d / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for method, values in rows.items():
            w.writerow(dict(zip(fields[1:-1], values), method=method, seconds=1.0))
    return d


@pytest.fixture
def runs(tmp_path):
    return [
        _run(tmp_path, "s0", {"lora-ft": (60, 70, 72), "keeplora": (61, 72, 75)}),
        _run(tmp_path, "s1", {"lora-ft": (62, 68, 70), "keeplora": (62, 69, 74)}),
        _run(tmp_path, "s2", {"lora-ft": (58, 66, 71), "keeplora": (60, 67, 73), "extra": (1, 2, 3)}),
        _run(tmp_path, "s3", {"lora-ft": (60, 67, 71), "keeplora": (61, 68, 74)}),
    ]


def test_means_stds_and_paired_differences(runs):
    rows = {r["method"]: r for r in aggregate(runs, baseline="lora-ft")}
    assert list(rows) == ["lora-ft", "keeplora", "extra"]
    k = rows["keeplora"]
    assert k["n"] == 4 and k["last_mean"] == pytest.approx(74.0) and k["last_std"] == pytest.approx((2 / 3) ** 0.5)
    # per-run differences 3, 4, 2, 3 -> mean 3, sample std sqrt(2/3); the interval lies within [2, 4], excludes 0
    assert k["last_diff_mean"] == pytest.approx(3.0) and k["last_diff_std"] == pytest.approx((2 / 3) ** 0.5)
    assert 2.0 <= k["last_diff_vs_lora_ft_ci_low"] < 3.0 < k["last_diff_vs_lora_ft_ci_high"] <= 4.0
    assert rows["extra"]["n"] == 1 and math.isnan(rows["extra"]["last_std"])
    assert math.isnan(rows["extra"]["last_ci_low"]) and math.isnan(rows["extra"]["last_diff_vs_lora_ft_ci_high"])
    assert rows["extra"]["last_diff_mean"] == pytest.approx(-68.0)
    table = to_markdown(list(rows.values()), "lora-ft")
    line = next(x for x in table.splitlines() if x.startswith("| keeplora |"))
    assert line.startswith("| keeplora | 4 | 61.0 [") and "**+3.0 [" in line
    assert "| extra | 1 | 1.0 | 2.0 | 3.0 | -57.0 | -64.0 | -68.0 |" in table  # one run: no interval, not bold


def test_bootstrap_interval_properties():
    assert bootstrap_ci([2.5, 2.5, 2.5, 2.5]) == (2.5, 2.5)  # a constant difference
    assert bootstrap_ci([1.0, 2.0, 1.5, 3.0, 2.5]) == bootstrap_ci([1.0, 2.0, 1.5, 3.0, 2.5])  # deterministic
    low, high = bootstrap_ci([1.0, 2.0, 1.5, 3.0, 2.5])
    assert 0 < low < 2.0 < high  # clearly positive: excludes 0
    low, high = bootstrap_ci([-2.0, 1.5, -1.0, 2.0, 0.5])
    assert low < 0 < high  # changes sign: includes 0
    # the percentile interval of the resampled means, checked against a direct computation
    x = np.array([3.0, 1.0, 4.0, 1.0, 5.0])
    idx = np.random.default_rng(0).integers(0, 5, size=(10_000, 5))
    assert bootstrap_ci(x) == pytest.approx(tuple(np.percentile(x[idx].mean(1), [2.5, 97.5])))
    assert all(math.isnan(v) for v in bootstrap_ci([1.0]))


def test_too_few_runs_have_no_interval_and_nothing_in_bold(tmp_path):
    # below MIN_RUNS the percentile interval would be the range of the runs (P(all copies of the minimum) >= 1/27)
    assert all(math.isnan(v) for n in (2, 3) for v in bootstrap_ci([1.0, 2.0, 3.0][:n]))
    low, high = bootstrap_ci([1.0, 2.0, 3.0, 4.0])  # from MIN_RUNS = 4 on: strictly inside the range
    assert 1.0 < low < 2.5 < high < 4.0
    runs = [_run(tmp_path, f"s{i}", {"lora-ft": (60, 70, 72), "keeplora": (61 + i, 72 + i, 75 + i)}) for i in range(3)]
    rows = aggregate(runs, baseline="lora-ft")
    k = {r["method"]: r for r in rows}["keeplora"]
    assert k["n"] == 3 and k["last_diff_vs_lora_ft_mean"] == pytest.approx(4.0)
    assert math.isnan(k["last_diff_vs_lora_ft_ci_low"]) and math.isnan(k["last_ci_high"])
    line = next(x for x in to_markdown(rows, "lora-ft").splitlines() if x.startswith("| keeplora |"))
    assert line == "| keeplora | 3 | 62.0 | 73.0 | 76.0 | +2.0 | +3.0 | +4.0 |"  # every run better, yet not bold


def test_several_baselines_and_columns_of_some_runs(tmp_path):
    runs = [
        _run(tmp_path, "a", {"lora-ft": (60, 70, 72, -4), "keeplora": (61, 72, 75, -1)}, extra=["bwt"]),
        _run(tmp_path, "b", {"lora-ft": (62, 68, 70), "keeplora": (62, 69, 74)}),
    ]
    rows = {r["method"]: r for r in aggregate(runs, baseline=["lora-ft", "keeplora"])}
    k, lora = rows["keeplora"], rows["lora-ft"]
    assert k["bwt_mean"] == -1.0 and k["bwt_diff_vs_lora_ft_n"] == 1 and k["bwt_diff_vs_lora_ft_mean"] == 3.0
    assert k["last_diff_vs_lora_ft_mean"] == pytest.approx(3.5) and lora["last_diff_vs_keeplora_mean"] == -3.5
    assert k["last_diff_vs_keeplora_mean"] == 0.0 and "last_diff_mean" not in k  # the short form: one baseline
    header = to_markdown(list(rows.values()), ["lora-ft", "keeplora"]).splitlines()[0]
    assert header.split(" | ")[2:6] == ["transfer", "average", "last", "bwt"]
    assert "Δbwt vs lora-ft" in header and "Δlast vs keeplora" in header


def test_cli_prints_the_table_and_writes_csv(runs, tmp_path, capsys):
    out = tmp_path / "agg.csv"
    assert main(["aggregate", *map(str, runs), "--baseline", "lora-ft", "--baseline", "keeplora", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Δlast vs lora-ft" in text and "Δlast vs keeplora" in text and "bootstrap" in text
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert len(rows) == 3 and "last_diff_vs_keeplora_ci_low" in rows[0]


def test_bad_inputs_are_named(runs, tmp_path, capsys):
    assert main(["aggregate", str(tmp_path / "nope")]) == 2
    assert "results.csv not found" in capsys.readouterr().err
    assert main(["aggregate", *map(str, runs), "--baseline", "peft"]) == 2
    assert "'peft' is in none of the runs" in capsys.readouterr().err


def test_output_is_deterministic_and_a_constant_difference_has_that_interval(tmp_path):
    runs = [
        _run(tmp_path, f"s{i}", {"lora-ft": (60 + i, 70 - i, 72 + i), "keeplora": (60 + i, 71.5 - i, 72 + 2 * i)})
        for i in range(5)
    ]
    first, second = aggregate(runs, baseline="lora-ft"), aggregate(runs, baseline="lora-ft")
    assert to_markdown(first, "lora-ft") == to_markdown(second, "lora-ft")
    k = {r["method"]: r for r in first}["keeplora"]
    # average: the difference is +1.5 in every run, so every resampled mean is 1.5
    assert (k["average_diff_vs_lora_ft_ci_low"], k["average_diff_vs_lora_ft_ci_high"]) == pytest.approx((1.5, 1.5))
    assert k["transfer_diff_vs_lora_ft_ci_low"] == k["transfer_diff_vs_lora_ft_ci_high"] == 0.0
    assert 0 <= k["last_diff_vs_lora_ft_ci_low"] < 2.0 < k["last_diff_vs_lora_ft_ci_high"] <= 4.0  # differences 0..4


def test_a_single_run_has_undefined_intervals(tmp_path, capsys):
    run = _run(tmp_path, "only", {"lora-ft": (60, 70, 72), "keeplora": (61, 72, 75)})
    k = {r["method"]: r for r in aggregate([run], baseline=["lora-ft"])}["keeplora"]
    assert k["n"] == 1 and k["last_mean"] == 75.0 and k["last_diff_vs_lora_ft_mean"] == 3.0
    assert all(math.isnan(k[key]) for key in ("last_ci_low", "last_ci_high", "last_std", "last_diff_vs_lora_ft_ci_low"))
    out = tmp_path / "one.csv"
    assert main(["aggregate", str(run), "--baseline", "lora-ft", "-o", str(out)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| keeplora |"))
    assert line == "| keeplora | 1 | 61.0 | 72.0 | 75.0 | +1.0 | +2.0 | +3.0 |"  # no interval, not bold
    row = next(r for r in csv.DictReader(out.read_text().splitlines()) if r["method"] == "keeplora")
    assert row["last_ci_low"] == "nan" and row["last_diff_vs_lora_ft_ci_high"] == "nan"


def test_wall_times_are_not_metrics_and_diff_named_metrics_are_kept(tmp_path):
    runs = [
        _run(
            tmp_path,
            f"s{i}",
            {"a": (1, 2, 3, 9, 4, 0.5), "b": (2, 3, 4, 9, 5, 1.5)},
            extra=["seed", "train_seconds", "val_diff"],
        )
        for i in range(2)
    ]
    rows = aggregate(runs, baseline=["b", "b"])  # a repeated --baseline counts once
    assert not any(k.startswith(("seed", "train_seconds", "seconds")) for k in rows[0])
    assert rows[0]["val_diff_diff_vs_b_mean"] == -1.0 and "val_diff_mean" in rows[0]
    header = to_markdown(rows, ["b", "b"]).splitlines()[0]
    assert header.split(" | ")[2:6] == ["transfer", "average", "last", "val_diff"] and header.count("Δlast vs b") == 1


def _config(run_dir, seed, methods, lr=1e-3, name="drift"):
    specs = [{"name": m, "type": m.replace("-", "_"), "lr": lr} for m in methods]
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": name, "seed": seed, "methods": specs}))
    return run_dir


def test_folders_of_one_seed_split_over_methods_are_one_run(tmp_path):
    """`keeplora run --methods` in two processes for one seed: the folders merge into one run (n counts seeds), the
    method both ran (zero-shot) must agree, and the paired differences pair within the seed."""
    s0 = _config(
        _run(tmp_path, "s0", {"zero-shot": (50, 50, 50), "lora-ft": (60, 70, 72), "keeplora": (61, 72, 75)}),
        0,
        ["zero-shot", "lora-ft", "keeplora"],
    )
    s1a = _config(
        _run(tmp_path, "s1a", {"zero-shot": (51, 51, 51), "lora-ft": (62, 68, 70)}), 1, ["zero-shot", "lora-ft"]
    )
    s1b = _config(  # a config of another name that extends seed 1's (a peers config) is the same run
        _run(tmp_path, "s1b", {"zero-shot": (51, 51, 51), "keeplora": (62, 71, 74)}),
        1,
        ["zero-shot", "keeplora"],
        name="peers-seed1",
    )
    rows = {r["method"]: r for r in aggregate([s0, s1a, s1b], baseline="lora-ft")}
    assert {m: r["n"] for m, r in rows.items()} == {"zero-shot": 2, "lora-ft": 2, "keeplora": 2}
    assert rows["keeplora"]["average_diff_vs_lora_ft_n"] == 2
    assert rows["keeplora"]["average_diff_vs_lora_ft_mean"] == pytest.approx(((72 - 70) + (71 - 68)) / 2)
    # without the configs the three folders are three runs and seed 1's halves cannot pair
    for d in (s0, s1a, s1b):
        (d / "config.yaml").unlink()
    rows = {r["method"]: r for r in aggregate([s0, s1a, s1b], baseline="lora-ft")}
    assert rows["zero-shot"]["n"] == 3 and rows["keeplora"]["average_diff_vs_lora_ft_n"] == 1


def test_folders_of_one_run_that_disagree_are_refused(tmp_path):
    a = _config(_run(tmp_path, "a", {"zero-shot": (50, 50, 50), "lora-ft": (60, 70, 72)}), 0, ["zero-shot", "lora-ft"])
    b = _config(
        _run(tmp_path, "b", {"zero-shot": (50, 50, 49), "keeplora": (61, 72, 75)}), 0, ["zero-shot", "keeplora"]
    )
    with pytest.raises(ValueError, match="different numbers for 'zero-shot'"):
        aggregate([a, b])
    c = _config(_run(tmp_path, "c", {"lora-ft": (61, 71, 73)}), 0, ["lora-ft"], lr=2e-3)
    with pytest.raises(ValueError, match="define method 'lora-ft' differently"):
        aggregate([a, c])
    # the same folder twice is one run, not two
    assert {r["method"]: r["n"] for r in aggregate([a, a])} == {"zero-shot": 1, "lora-ft": 1}


def _resolved(run_dir, tmp_path, text):
    """A run folder's ``config.yaml`` as ``keeplora run`` writes it: the resolved config of ``text``."""
    source = tmp_path / f"{run_dir.name}.yaml"
    source.write_text("tasks: [{name: t, builder: b}]\n" + text)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(load_config(source)))
    return run_dir


def test_a_method_value_from_its_section_or_its_entry_is_the_same_run(tmp_path):
    """Runs are identified by what their methods share and by each method's resolved values, not by where a value
    was written: a KeepLoRA at ε_w 0.95 set in the ``keeplora`` section pairs with a LoRA-FT run whose section said
    0.85 (LoRA-FT never reads it); a shared setting that differs, or a method resolved differently, does not."""
    zero, lora, keep = (50, 50, 50), (60, 70, 72), (61, 72, 75)
    methods = "methods: [{name: zero-shot, type: zero_shot}, {name: kl, type: keeplora}]"  # the ones each ran
    lora_methods = "methods: [{name: zero-shot, type: zero_shot}, {name: lora-ft, type: lora_ft}]"
    a = _resolved(_run(tmp_path, "a", {"zero-shot": zero, "lora-ft": lora}), tmp_path, lora_methods)
    b = _resolved(
        _run(tmp_path, "b", {"zero-shot": zero, "kl": keep}), tmp_path, "keeplora: {weight_energy: 0.95}\n" + methods
    )
    assert yaml.safe_load((a / "config.yaml").read_text())["keeplora"]["weight_energy"] == 0.85
    rows = {r["method"]: r for r in aggregate([a, b], baseline="lora-ft")}
    assert {m: r["n"] for m, r in rows.items()} == {"zero-shot": 1, "lora-ft": 1, "kl": 1}
    assert rows["kl"]["average_diff_vs_lora_ft_mean"] == 2.0  # paired within the one run
    c = _resolved(
        _run(tmp_path, "c", {"zero-shot": zero, "kl": keep}),
        tmp_path,
        "data: {train_per_class: 81}\nkeeplora: {weight_energy: 0.95}\n" + methods,
    )
    assert {r["method"]: r["n"] for r in aggregate([a, c])} == {"zero-shot": 2, "lora-ft": 1, "kl": 1}
    d = _resolved(_run(tmp_path, "d", {"zero-shot": zero, "kl": keep}), tmp_path, methods)  # kl at ε_w 0.85
    with pytest.raises(ValueError, match="define method 'kl' differently"):
        aggregate([b, d])


def test_the_torch_thread_count_does_not_split_a_run(tmp_path):
    """Two processes of one seed, one run with ``training.threads: 1`` in its config and one with the thread count
    from the environment: the same run (the count says how a machine ran it, not what was computed), still checked
    by the numbers of the method both ran."""
    zero, lora, keep = (50, 50, 50), (60, 70, 72), (61, 72, 75)
    a = _resolved(
        _run(tmp_path, "a", {"zero-shot": zero, "lora-ft": lora}),
        tmp_path,
        "training: {threads: 1}\nmethods: [{name: zero-shot, type: zero_shot}, {name: lora-ft, type: lora_ft}]",
    )
    b = _resolved(
        _run(tmp_path, "b", {"zero-shot": zero, "kl": keep}),
        tmp_path,
        "methods: [{name: zero-shot, type: zero_shot}, {name: kl, type: keeplora}]",
    )
    assert yaml.safe_load((a / "config.yaml").read_text())["training"]["threads"] == 1
    assert yaml.safe_load((b / "config.yaml").read_text())["training"]["threads"] is None
    rows = {r["method"]: r for r in aggregate([a, b], baseline="lora-ft")}
    assert {m: r["n"] for m, r in rows.items()} == {"zero-shot": 1, "lora-ft": 1, "kl": 1}
    assert rows["kl"]["average_diff_vs_lora_ft_mean"] == 2.0
    c = _resolved(
        _run(tmp_path, "c", {"zero-shot": (50, 50, 49), "kl": keep}),
        tmp_path,
        "methods: [{name: zero-shot, type: zero_shot}, {name: kl, type: keeplora}]",
    )
    with pytest.raises(ValueError, match="different numbers for 'zero-shot'"):
        aggregate([a, c])


def test_plots_of_the_panel_over_runs_and_of_the_paired_differences(tmp_path, capsys):
    """--plots: the held-out panel's curves of one run split over two folders merge per method; the PNGs are
    written, and disagreeing curves of one run are refused."""
    runs = []
    for seed in range(3):
        curves = {"zero-shot": [0.6] * 4, "lora-ft": [0.6, 0.5 - 0.01 * seed, 0.45, 0.4]}
        k_curves = {"zero-shot": [0.6] * 4, "keeplora": [0.6, 0.59, 0.58 + 0.01 * seed, 0.58]}
        for part, (rows, cv) in enumerate(
            [
                ({"zero-shot": (50, 50, 50), "lora-ft": (60, 70 - seed, 72)}, curves),
                ({"zero-shot": (50, 50, 50), "keeplora": (61, 72, 75 + seed)}, k_curves),
            ]
        ):
            d = _config(_run(tmp_path, f"s{seed}{part}", rows), seed, list(rows))
            (d / "results.json").write_text(json.dumps({"tasks": ["a", "b", "c"], "panel_curves": cv}))
            runs.append(d)
    out = tmp_path / "plots"
    assert main(["aggregate", *map(str, runs), "--baseline", "lora-ft", "--plots", str(out)]) == 0
    printed = capsys.readouterr()
    assert "| keeplora | 3 |" in printed.out and "wrote" not in printed.out  # stdout: the table alone (> aggregate.md)
    assert f"wrote {out / 'retention.png'}" in printed.err
    for name in ("retention.png", "differences_vs_lora_ft.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from keeplora_bench.continual.aggregate import load_panel_curves

    curves, tasks = load_panel_curves(runs)
    assert tasks == ["a", "b", "c"] and len(curves) == 3
    assert sorted(curves[2]) == ["keeplora", "lora-ft", "zero-shot"] and curves[2]["keeplora"][2] == 0.6
    (runs[1] / "results.json").write_text(json.dumps({"panel_curves": {"zero-shot": [0.5] * 4}}))
    with pytest.raises(ValueError, match="different panel curves for 'zero-shot'"):
        load_panel_curves(runs)


def test_metrics_option_selects_the_table_columns(runs, capsys):
    assert main(["aggregate", *map(str, runs), "--baseline", "lora-ft", "--metrics", "last,average"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == "| method | n | last | average | Δlast vs lora-ft | Δaverage vs lora-ft |"
    assert main(["aggregate", *map(str, runs), "--metrics", "last,retention"]) == 2
    err = capsys.readouterr().err
    assert "--metrics ['retention'] not in the runs" in err and "'transfer'" in err


def test_drift_gate_of_a_run_split_over_folders_judges_all_its_methods(tmp_path, capsys):
    """A seed run in two processes (LoRA-FT in one, full FT in the other): neither folder's own gate sees both
    baselines; aggregate's gate of the merged run does, and passes only when one baseline eroded by >= 5 and
    LoRA-FT's BWT is <= -3."""

    def folder(name, seed, rows):
        d = _config(_run(tmp_path, name, rows, extra=["bwt", "retention"]), seed, list(rows))
        (d / "results.json").write_text(json.dumps({"zero_shot_panel": [0.60, 0.70]}))  # mean 65.0
        return d

    zero = (50, 50, 50, 0, 65)
    runs = [
        folder("s0a", 0, {"zero-shot": zero, "lora-ft": (60, 70, 72, -4.0, 61.0)}),  # LoRA-FT erodes only 4
        folder("s0b", 0, {"zero-shot": zero, "full-ft": (60, 70, 72, -1.0, 59.5)}),  # full FT erodes 5.5
        folder("s1a", 1, {"zero-shot": zero, "lora-ft": (60, 70, 72, -2.0, 61.0)}),  # BWT -2: not forgetting
        folder("s1b", 1, {"zero-shot": zero, "full-ft": (60, 70, 72, -1.0, 59.0)}),
        folder("s2", 2, {"zero-shot": zero, "full-ft": (60, 70, 72, -1.0, 50.0)}),  # no LoRA-FT: not computed
    ]
    from keeplora_bench.continual.aggregate import run_gates

    gates = run_gates(runs)
    assert [g["folders"] for g in gates] == [[str(runs[0]), str(runs[1])], [str(runs[2]), str(runs[3])], [str(runs[4])]]
    assert [g["gate"]["passed"] for g in gates] == [True, False, None]
    assert gates[0]["gate"]["panel_drop"] == {"lora-ft": -4.0, "full-ft": -5.5}
    assert gates[1]["gate"]["lora_ft_bwt"] == -2.0
    assert main(["aggregate", *map(str, runs), "--baseline", "lora-ft"]) == 0
    assert "drift gate per run (over the methods of all its folders): passed on 1 of 3" in capsys.readouterr().out
    (runs[1] / "results.json").write_text(json.dumps({"zero_shot_panel": [0.60, 0.71]}))
    with pytest.raises(ValueError, match="different zero-shot panels"):
        run_gates(runs)


def test_drift_gate_over_runs_applies_the_thresholds_to_the_means(tmp_path, capsys):
    """Five seeds whose LoRA-FT sits near the thresholds: the per-run gate passes on some seeds only, the gate over
    the runs judges the means (each with its interval) against the same thresholds, and it fails when a mean misses
    one of them."""
    from keeplora_bench.continual.aggregate import gate_over_runs, run_gates

    def runs_with(drops, bwts, folder):
        out = []
        for seed, (drop, bwt) in enumerate(zip(drops, bwts)):
            rows = {"zero-shot": (50, 50, 50, 0.0, 65.0), "lora-ft": (60, 70, 72, bwt, 65.0 + drop)}
            d = _config(_run(tmp_path, f"{folder}{seed}", rows, extra=["bwt", "retention"]), seed, list(rows))
            (d / "results.json").write_text(json.dumps({"zero_shot_panel": [0.60, 0.70]}))  # mean 65.0
            out.append(d)
        return out

    near = runs_with([-6.0, -9.0, -4.5, -4.0, -7.5], [-4.0, -4.0, -5.0, -2.0, -4.5], "a")  # means -6.2, -3.9
    gates = run_gates(near)
    assert [g["gate"]["passed"] for g in gates] == [True, True, False, False, True]
    over = gate_over_runs(gates)
    assert over["passed"] is True and over["n"] == 5
    mean, low, high = over["panel_drop"]["lora-ft"]
    assert mean == pytest.approx(-6.2) and low < mean < high
    assert over["lora_ft_bwt"][0] == pytest.approx(-3.9)
    assert main(["aggregate", *map(str, near)]) == 0
    out = capsys.readouterr().out
    assert "passed on 3 of 5" in out and "drift gate over 5 runs (means, 95 % intervals) PASSED" in out
    assert "lora-ft -6.2 [" in out and "LoRA-FT BWT -3.9 [" in out

    shallow = run_gates(runs_with([-6.0, -4.0, -4.5, -4.0, -5.0], [-4.0] * 5, "b"))  # panel mean -4.7
    assert gate_over_runs(shallow)["passed"] is False
    no_forgetting = run_gates(runs_with([-8.0] * 5, [-4.0, -2.0, -2.5, -3.0, -3.0], "c"))  # BWT mean -2.9
    assert gate_over_runs(no_forgetting)["passed"] is False
    assert gate_over_runs([])["passed"] is None
