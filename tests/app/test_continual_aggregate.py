"""keeplora aggregate: mean ± std over runs and paired differences to a baseline, from results.csv files."""

import csv
import math

import pytest

from keeplora.cli import main
from keeplora_bench.continual.aggregate import aggregate, to_markdown


def _run(tmp_path, name, rows):
    d = tmp_path / name
    d.mkdir()
    with (d / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "transfer", "average", "last", "seconds"])
        w.writeheader()
        for method, (t, a, l) in rows.items():
            w.writerow(dict(method=method, transfer=t, average=a, last=l, seconds=1.0))
    return d


@pytest.fixture
def runs(tmp_path):
    return [
        _run(tmp_path, "s0", {"lora-ft": (60, 70, 72), "keeplora": (61, 72, 75)}),
        _run(tmp_path, "s1", {"lora-ft": (62, 68, 70), "keeplora": (62, 69, 74)}),
        _run(tmp_path, "s2", {"lora-ft": (58, 66, 71), "keeplora": (60, 67, 73), "extra": (1, 2, 3)}),
    ]


def test_means_stds_and_paired_differences(runs):
    rows = {r["method"]: r for r in aggregate(runs, baseline="lora-ft")}
    assert list(rows) == ["lora-ft", "keeplora", "extra"]
    k = rows["keeplora"]
    assert k["n"] == 3 and k["last_mean"] == pytest.approx(74.0) and k["last_std"] == pytest.approx(1.0)
    # per-run differences 3, 4, 2 -> mean 3, sample std 1
    assert k["last_diff_mean"] == pytest.approx(3.0) and k["last_diff_std"] == pytest.approx(1.0)
    assert rows["extra"]["n"] == 1 and math.isnan(rows["extra"]["last_std"])
    assert math.isnan(rows["extra"]["last_diff_std"]) and rows["extra"]["last_diff_mean"] == pytest.approx(-68.0)
    table = to_markdown(list(rows.values()), "lora-ft")
    assert "| keeplora | 3 | 61.0 ± 1.0 | 69.3 ± 2.5 | 74.0 ± 1.0 | +1.0 ± 1.0 | +1.3 ± 0.6 | +3.0 ± 1.0 |" in table


def test_cli_prints_the_table_and_writes_csv(runs, tmp_path, capsys):
    out = tmp_path / "agg.csv"
    assert main(["aggregate", *map(str, runs), "--baseline", "lora-ft", "-o", str(out)]) == 0
    assert "Δlast vs lora-ft".lower() in capsys.readouterr().out.lower()
    assert len(out.read_text().splitlines()) == 4


def test_bad_inputs_are_named(runs, tmp_path, capsys):
    assert main(["aggregate", str(tmp_path / "nope")]) == 2
    assert "results.csv not found" in capsys.readouterr().err
    assert main(["aggregate", *map(str, runs), "--baseline", "peft"]) == 2
    assert "'peft' is in none of the runs" in capsys.readouterr().err
