"""keeplora_bench.targets: the open targets judged from a GPU run's CSVs."""

from __future__ import annotations

from pathlib import Path

import pytest

from keeplora_bench import targets

ROOT = Path(__file__).resolve().parents[2]
H200 = ROOT / "benchmarks" / "results" / "h200"


def _by_target(lines):
    return {line["target"]: line for line in lines}


def test_the_recorded_h200_runs_judge_as_their_readme_reports():
    lines = _by_target(targets.judge(targets.read_results(H200)))
    expected = {  # target -> (measured, verdict), the numbers benchmarks/results/h200/README.md and README.md quote
        "layer step ≤ 1.10x the frozen layer's step (Llama width)": ("1.11", "NOT met"),
        "CLIP layer step ≥ 1.5x faster than the authors' (graph)": ("1.36", "NOT met"),
        "CLIP layer step ≥ 1.3x faster than the authors' (eager)": ("1.72", "met"),
        "rSVD llama7b_224 b=224 ≤ 1.3x its bandwidth floor": ("1.48", "NOT met"),
        "rSVD clip_vision ≥ 50x the svd_lowrank loop at matched accuracy": ("136", "met"),
        "begin_task peak ≤ 0.5x the authors' begin_task (1 × 8192 tokens)": ("0.746", "NOT met"),
        "begin_task peak ≤ 0.5x the authors' begin_task (4 × 2048 tokens)": ("0.43", "met"),
        "begin_task ≥ 5x faster than the authors' (1 × 8192 tokens)": ("13.5", "met"),
        "end_task ≥ 20x faster than the authors' (1 × 8192 tokens)": ("52.1", "met"),
        "training step ≥ 1.25x faster than the authors' (1 × 8192 tokens)": ("1.01", "NOT met"),
    }
    for target, (measured, verdict) in expected.items():
        assert (lines[target]["measured"], lines[target]["verdict"]) == (measured, verdict), target
    # the step's provider is named, so the table can be checked against the CSV
    assert lines["layer step ≤ 1.10x the frozen layer's step (Llama width)"]["source"].endswith(
        "expand_first/expand_first"
    )
    # run 5 had no fused-basis or persistent rows: no A/B line is invented
    assert not [line for line in lines.values() if line["verdict"] == "A/B"]


def _lora_row(provider, timing, time_ms, shape=targets.LLAMA_LAYER, op="lora_linear", **extra):
    return dict(op=op, shape=shape, provider=provider, mode="step", timing=timing, time_ms=str(time_ms), **extra)


def test_ab_lines_compare_the_candidate_with_the_best_shipped_variant():
    rows = [
        _lora_row("base", "eager", 0.5),  # not KeepLoRA's: never the comparison
        _lora_row("expand_first/expand_first", "eager", 1.0),
        _lora_row("ext:expand_first/expand_first", "eager", 0.8),
        _lora_row("triton-persistent", "eager", 0.9),
        _lora_row("triton-persistent/torch-db", "eager", 0.6),
        _lora_row("triton-persistent", "graph", 0.7),  # no other provider in graph mode: no line
    ]
    (line,) = targets.layer_ab(rows)
    assert line["verdict"] == "A/B" and line["measured"] == "0.75"
    assert "triton-persistent/torch-db / ext:expand_first/expand_first" in line["target"]

    rsvd = [
        dict(case="llama_4096x4096", batch="32", method="keeplora_rsvd", impl="extension", time_ms="3.0"),
        dict(case="llama_4096x4096", batch="32", method="keeplora_rsvd", impl="reference", time_ms="12.0"),
        dict(case="llama_4096x4096", batch="32", method="keeplora_rsvd_fused_basis", impl="extension", time_ms="2.4"),
    ]
    (line,) = targets.rsvd_ab(rsvd)
    assert (line["measured"], line["verdict"]) == ("0.8", "A/B")


def test_rsvd_floor_takes_the_best_of_our_methods_and_ignores_other_backends():
    rows = [
        dict(case="llama_4096x4096", batch="32", method="keeplora_rsvd", impl="extension", x_floor="2.0"),
        dict(case="llama_4096x4096", batch="32", method="keeplora_rsvd_fused_basis", impl="extension", x_floor="1.45"),
        dict(case="llama_4096x4096", batch="32", method="keeplora_rsvd", impl="reference", x_floor="1.0"),
        dict(case="llama_11008x4096", batch="16", method="keeplora_rsvd", impl="extension", x_floor="nan"),
    ]
    lines = _by_target(targets.rsvd_targets(rows))
    first = lines["rSVD llama_4096x4096 b=32 ≤ 1.5x its bandwidth floor"]
    assert (first["measured"], first["verdict"]) == ("1.45", "met") and "fused_basis" in first["source"]
    assert lines["rSVD llama_11008x4096 b=16 ≤ 1.5x its bandwidth floor"]["verdict"] == "not measured"  # NaN
    assert lines["rSVD llama7b_224 b=224 ≤ 1.3x its bandwidth floor"]["verdict"] == "not measured"


def test_a_failed_begin_task_setting_is_not_measured_and_names_its_error():
    rows = [
        dict(method="keeplora", phase="begin_task", batch="1", tokens_per_batch="8192", peak_mb="300",
             train_step_peak_mb="250", accumulators_mb="64", memory_vs_authors_begin_task="0.6",
             authors_begin_task_time_ratio="10"),
        dict(method="keeplora", phase="begin_task_checkpoint", error="OutOfMemoryError: CUDA out of memory"),
        dict(method="authors", phase="begin_task", time_vs_keeplora="10"),
    ]  # fmt: skip
    lines = _by_target(targets.lifecycle_targets(rows, "profile_lifecycle"))
    failed = lines["begin_task_checkpoint peak ≤ 0.5x the authors' begin_task (1 × 8192 tokens)"]
    assert failed["verdict"] == "not measured" and "OutOfMemoryError" in failed["source"]
    over = lines["begin_task peak ≤ the step's peak + the gradient sums (1 × 8192 tokens), MB over that"]
    assert (over["measured"], over["verdict"]) == ("-14", "met")
    assert lines["end_task ≥ 20x faster than the authors' (1 × 8192 tokens)"]["verdict"] == "not measured"


def test_the_committed_targets_table_is_what_the_judge_makes_of_the_committed_csvs():
    assert (H200 / "targets.md").read_text() == targets.markdown(targets.judge(targets.read_results(H200)))


def test_cli_writes_the_table(tmp_path, capsys):
    out = tmp_path / "targets.md"
    assert targets.main([str(H200), "--write", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("| target | measured | bound | verdict | source |")
    assert text.count("\n") == len(targets.judge(targets.read_results(H200))) + 2
    assert "NOT met" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        targets.main([str(tmp_path / "missing")])
