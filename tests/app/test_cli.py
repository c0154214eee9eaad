"""The ``keeplora`` command: ``info``, the listing of every subcommand, and the hand-over of the app's subcommands to
the benchmark app (their behaviour is tested with their modules in tests/app/)."""

import sys

import pytest

from keeplora.cli import main


def test_info_prints_versions_extension_and_the_backend_of_every_op(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("keeplora ") and "compiled extension:" in out and "CUDA available:" in out
    assert "backends on cpu (KEEPLORA_BACKEND=" in out
    for op in ("lora_linear", "residual_project", "second_moment_update", "rsvd"):
        assert f"  {op} " in out


def test_help_lists_the_library_and_app_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("info", "run", "sweep", "aggregate", "data", "bench", "profile"):
        assert f"\n    {command} " in out, command


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["run", "-h"], "usage: keeplora run [-h]"),
        (["sweep", "-h"], "--param NAME=V1,V2"),
        (["aggregate", "-h"], "usage: keeplora aggregate"),
        (["data", "-h"], "{fetch,status,build}"),
        (["profile", "-h"], "usage: keeplora profile"),
        (["bench", "kernels", "-h"], "--cpu-smoke"),
    ],
)
def test_app_subcommands_are_parsed_by_the_app(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert expected in capsys.readouterr().out


def test_bench_without_a_known_benchmark_prints_the_choices(capsys):
    assert main(["bench"]) == 2
    assert "usage: keeplora bench {kernels,lora-variants,rsvd}" in capsys.readouterr().err


def test_app_subcommand_without_the_app_says_how_to_install_it(monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "keeplora_bench" or m.startswith("keeplora_bench.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "keeplora_bench", None)  # what an import finds when the package is absent
    assert main(["run", "configs/default.yaml"]) == 2
    err = capsys.readouterr().err
    assert "keeplora run: the benchmark app (package keeplora_bench" in err and "pip install" in err
