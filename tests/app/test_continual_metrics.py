"""MTIL metrics against matrices computed by hand."""

import math

import numpy as np
import pytest

from keeplora_bench.continual import metrics as M

# acc[j, i]: after step j, on task i
ACC = np.array([[0.90, 0.40, 0.30], [0.80, 0.85, 0.20], [0.70, 0.75, 0.95]])


def test_transfer_by_hand():
    # task 2: acc[0,1] = 0.40; task 3: mean(acc[0,2], acc[1,2]) = 0.25  ->  (0.40 + 0.25) / 2
    assert M.transfer(ACC) == pytest.approx(0.325)


def test_average_by_hand():
    # column means: 0.80, 0.6667, 0.4833 -> 0.65
    assert M.average(ACC) == pytest.approx((0.8 + 2.0 / 3 + 1.45 / 3) / 3)


def test_last_by_hand():
    assert M.last(ACC) == pytest.approx((0.70 + 0.75 + 0.95) / 3)


def test_summarize_percent_one_decimal():
    assert M.summarize(ACC) == {"transfer": 32.5, "average": 65.0, "last": 80.0}


def test_constant_rows_zero_shot():
    row = np.array([0.6, 0.7, 0.8, 0.5])
    acc = np.tile(row, (4, 1))
    # zero-shot: every metric is a mean over the same row (Transfer leaves out the first task)
    assert M.transfer(acc) == pytest.approx(row[1:].mean())
    assert M.average(acc) == pytest.approx(row.mean())
    assert M.last(acc) == pytest.approx(row.mean())


def test_single_task_and_bad_shapes():
    assert math.isnan(M.transfer([[0.5]]))
    assert M.last([[0.5]]) == 0.5
    with pytest.raises(ValueError, match="square"):
        M.average(np.zeros((2, 3)))


def test_markdown_table():
    text = M.markdown_table([{"m": "a", "x": 1.234}, {"m": "b", "x": float("nan")}], [("m", "method"), ("x", "X")])
    assert text.splitlines() == ["| method | X |", "|---|---:|", "| a | 1.2 |", "| b | — |"]


def test_bwt_fwt_by_hand():
    # BWT: (acc[2,0] - acc[0,0] + acc[2,1] - acc[1,1]) / 2 = (-0.20 - 0.10) / 2
    assert M.bwt(ACC) == pytest.approx(-0.15)
    # FWT against zero-shot z: (acc[0,1] - z1 + acc[1,2] - z2) / 2 = (0.40 - 0.50 + 0.20 - 0.30) / 2
    assert M.fwt(ACC, [0.6, 0.5, 0.3]) == pytest.approx(-0.10)
    assert math.isnan(M.bwt([[0.5]])) and math.isnan(M.fwt([[0.5]], [0.5]))
    with pytest.raises(ValueError, match="one accuracy per task"):
        M.fwt(ACC, [0.5, 0.5])


def test_zero_shot_rows_have_no_forgetting_and_no_forward_transfer():
    row = np.array([0.6, 0.7, 0.8])
    acc = np.tile(row, (3, 1))
    assert M.bwt(acc) == 0.0 and M.fwt(acc, row) == 0.0


def test_summarize_with_zero_shot_and_panel():
    panel = [[0.50, 0.70], [0.40, 0.60], [0.30, 0.50], [0.20, 0.40]]  # zero-shot row + one row per step
    assert M.panel_curve(panel) == pytest.approx([0.60, 0.50, 0.40, 0.30])
    out = M.summarize(ACC, zero_shot=[0.6, 0.5, 0.3], panel_rows=panel)
    assert out == {"transfer": 32.5, "average": 65.0, "last": 80.0, "bwt": -15.0, "fwt": -10.0, "retention": 30.0}
    with pytest.raises(ValueError, match="probes"):
        M.panel_curve([[], []])
