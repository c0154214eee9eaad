"""Smoke run of keeplora_bench.micro.bench_rsvd: every method runs, rows are complete and written, accuracy is sane."""

import csv
import math

import torch

from keeplora_bench.micro import bench_rsvd


def test_bench_rsvd_smoke(tmp_path):
    rows = bench_rsvd.run_detailed(tmp_path, quick=True, smoke=True, device=torch.device("cpu"))
    memory = [row for row in rows if "old_width" in row]
    subspace = [row for row in rows if "energy" in row and "old_width" not in row]
    rows = [row for row in rows if "energy" not in row]
    # the memory update: both paths ran, the randomized one added at least what eigh added (never fewer)
    assert {r["method"] for r in memory} == {"exact", "randomized"} and (tmp_path / "memory_update-smoke.csv").is_file()
    assert all(r["max_extra_vs_exact"] >= 0 and r["mean_added"] > 0 and r["time_ms"] > 0 for r in memory), memory
    assert {r["method"] for r in subspace} == {"principal_subspace", "principal_subspace_ref_loop"}
    # power-law spectra have no gap at p, so the directions near the cut are loosely determined: the smoke run
    # checks the ranks and that the subspaces are close (test_rsvd.py checks accuracy on spectra with a gap)
    assert all(r["ranks_equal_ref"] == "3/3" and r["max_projector_dist"] < 0.05 for r in subspace), subspace
    assert (tmp_path / "principal_subspace-smoke.csv").is_file()
    methods = {row["method"] for row in rows}
    assert {
        "keeplora_rsvd",
        "keeplora_rsvd_matched",
        "svd_lowrank_loop",
        "linalg_svd",
        "keeplora_rsvd_graph",
        "keeplora_rsvd_graph_copy",
    } <= methods
    assert {row["case"] for row in rows} == {"smoke", "smoke_set"}  # one batch, and a model's shape groups
    for row in rows:
        assert row["batch_time_ms"] > 0 and math.isfinite(row["speedup_vs_lowrank_loop"])
        # the smoke batch has a fast-decaying spectrum: every method is within 1% of the optimal residual
        assert -1e-3 < row["resid_excess_mean"] < 1e-2, row
    graphed = [row for row in rows if row["method"].startswith("keeplora_rsvd_graph")]
    # without CUDA the graph rows run the eager fallback, and say so
    assert len(graphed) == 4 and all(row["graph"].startswith("eager: cpu tensors") for row in graphed), graphed
    by_case = {(row["case"], row["method"], row["impl"]): row for row in rows}
    for case in ("smoke", "smoke_set"):  # the fallback computes exactly what the eager call does
        eager = by_case[(case, "keeplora_rsvd", graphed[0]["impl"])]
        for method in ("keeplora_rsvd_graph", "keeplora_rsvd_graph_copy"):
            assert by_case[(case, method, eager["impl"])]["resid_excess_max"] == eager["resid_excess_max"]
    assert next(r for r in rows if r["case"] == "smoke_set")["batch"] == 3
    counted = [row for row in rows if row["library_calls"] != ""]  # per-call overhead (profiler), chosen backend
    assert sorted((row["case"], row["method"]) for row in counted) == sorted(
        (case, method)
        for case in ("smoke", "smoke_set")
        for method in bench_rsvd.COUNTED
        if method != "keeplora_rsvd_fused_basis"  # its A/B row is CUDA-only (a split GEMM)
    ), counted
    assert all(row["library_calls"] >= 10 for row in counted), counted
    with (tmp_path / "rsvd-smoke.csv").open() as f:
        written = list(csv.DictReader(f))
    # every case appends to one CSV schema (a changed header would start a second file)
    assert len(written) == len(rows) and {"git_sha", "device", "torch", "graph"} <= set(written[0])
    summary = bench_rsvd.summarize(rows + subspace + memory)  # what keeplora_bench.gpu_check prints
    assert len(summary) == len(rows) + len(subspace) + len(memory)
    assert all({"op", "time_ms", "pct_of_floor", "ratio", "peak_mb", "note"} <= set(r) for r in summary)
